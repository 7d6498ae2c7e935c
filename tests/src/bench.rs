//! `cargo xtask bench`: podnet against the real alternatives, measured in one
//! run on this machine, rounds interleaved, the dataplanes in a fresh random
//! order every round (seeded; the seed is printed and `--seed` replays it), so
//! that drift and position hit every dataplane alike. Every figure is reported
//! as median/min/max over the rounds, and podnet's as ratios to its peers.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

pub mod scale;
use serde_json::{Value, json};

use crate::{
    lab::{LabDatastore, LabGuard},
    netns::{NetNs, run},
    netns::{command_in, run_in},
    node::{Node, TempDir},
};

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: usize,
    /// Seconds per throughput / latency run.
    pub seconds: u64,
    /// Pods per CNI timing run.
    pub cni_pods: usize,
    pub quick: bool,
    /// Only these parts of the run (names as in [`PARTS`]); empty = all.
    pub only: Vec<String>,
    /// Release builds of `podnetd` and `podnet` from an older commit: when
    /// set, the same-node and cross-node parts also measure podnet built
    /// from them (`podnet-baseline`, `podnet-vxlan-baseline`,
    /// `podnet-direct-baseline`) in the same
    /// rounds, and the report gives per-round ratios to them.
    pub baseline_bin_dir: Option<PathBuf>,
    /// Seed of the per-round order: printed at the start, `--seed` replays
    /// a run's order (the bootstrap has a fixed seed of its own,
    /// [`BOOTSTRAP_SEED`]).
    pub seed: u64,
}

/// A seed from the clock, for runs not given one.
#[must_use]
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            #[allow(clippy::cast_possible_truncation, reason = "any 64 bits will do")]
            let ns = d.as_nanos() as u64;
            ns
        })
}

/// SplitMix64: a small seeded generator for the round order and the
/// bootstrap (reproducible from the printed seed, no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is below 2^-50 here).
    pub fn below(&mut self, n: usize) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "the result is below n")]
        let i = (self.next_u64() % n as u64) as usize;
        i
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The parts of a run, in the order they run.
pub const PARTS: [&str; 6] = ["same-node", "shaping", "cni", "scale", "cross-node", "bpf"];

impl BenchOptions {
    #[must_use]
    pub fn full() -> Self {
        Self {
            rounds: 10,
            seconds: 5,
            cni_pods: 50,
            quick: false,
            only: Vec::new(),
            baseline_bin_dir: None,
            seed: clock_seed(),
        }
    }

    #[must_use]
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            seconds: 1,
            cni_pods: 8,
            quick: true,
            only: Vec::new(),
            baseline_bin_dir: None,
            seed: clock_seed(),
        }
    }
}

/// One figure over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: String,
    pub dataplane: String,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

/// The median of `values` (NaN when empty).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        f64::midpoint(sorted[sorted.len() / 2 - 1], sorted[sorted.len() / 2])
    }
}

fn figure(scenario: &str, dataplane: &str, metric: &str, unit: &str, runs: Vec<f64>) -> Figure {
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    Figure {
        scenario: scenario.into(),
        dataplane: dataplane.into(),
        metric: metric.into(),
        unit: unit.into(),
        median: median(&runs),
        min: sorted.first().copied().unwrap_or(f64::NAN),
        max: sorted.last().copied().unwrap_or(f64::NAN),
        runs,
    }
}

/// Two namespaces that can talk: what every dataplane boils down to.
#[derive(Debug, Clone)]
pub struct Pair {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
}

// ---------------------------------------------------------------- metrics

/// iperf3 single-stream TCP throughput, Gbit/s.
pub fn throughput(pair: &Pair, seconds: u64) -> anyhow::Result<f64> {
    throughput_and_cpu(pair, seconds).map(|(gbps, _)| gbps)
}

/// Busy CPU time of the whole machine so far, in seconds: user + system +
/// irq + softirq of every CPU from /proc/stat's `cpu` line (idle and iowait
/// excluded; nice too, so that niced background builds count less; the
/// unit is USER_HZ, 100 per second on Linux).
fn busy_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: {line}"))?;
    // user nice system idle iowait irq softirq ...
    anyhow::ensure!(f.len() >= 7, "/proc/stat: {line}");
    let ticks = f[0] + f[2] + f[5] + f[6];
    #[allow(clippy::cast_precision_loss, reason = "tick counts far below 2^52")]
    Ok(ticks as f64 / 100.0)
}

/// iperf3 single-stream TCP throughput in Gbit/s, and the machine's CPU
/// cost of the transfer: busy CPU seconds over the client's whole run
/// divided by the GB it moved (every interval's bytes, the omitted warm-up
/// second included, since the CPU time includes it too).
pub fn throughput_and_cpu(pair: &Pair, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let mut server = command_in(&pair.server_ns, "iperf3")?
        .args(["-s", "-1", "-B", &pair.server_ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = busy_cpu_seconds();
    let out = command_in(&pair.client_ns, "iperf3")?
        .args([
            "-c",
            &pair.server_ip.to_string(),
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "-J",
        ])
        .output()
        .context("iperf3 client");
    let cpu_after = busy_cpu_seconds();
    let _ = server.kill();
    let _ = server.wait();
    let json: Value = serde_json::from_slice(&out?.stdout).context("iperf3 JSON")?;
    let gbps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("no throughput from iperf3: {}", json["error"]))?;
    let bytes: f64 = json["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["sum"]["bytes"].as_f64())
        .sum();
    anyhow::ensure!(bytes > 0.0, "iperf3 moved no bytes");
    let cpu_s_per_gb = (cpu_after? - cpu_before?) / (bytes / 1e9);
    Ok((gbps, cpu_s_per_gb))
}

/// sockperf TCP ping-pong latency (one-way, as sockperf reports: half the
/// round trip), p50 and p99 in microseconds.
pub fn latency(pair: &Pair, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let ip = pair.server_ip.to_string();
    let mut server = command_in(&pair.server_ns, "sockperf")?
        .args(["server", "--tcp", "-i", &ip, "-p", "11111"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("sockperf server")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = command_in(&pair.client_ns, "sockperf")?
        .args([
            "ping-pong",
            "--tcp",
            "-i",
            &ip,
            "-p",
            "11111",
            "-t",
            &seconds.to_string(),
        ])
        .output()
        .context("sockperf client")?;
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let percentile = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Ok((
        percentile("50.000").context("no p50 from sockperf")?,
        percentile("99.000").context("no p99 from sockperf")?,
    ))
}

/// TCP connections per second: connect, one byte each way, close. The
/// server blocks in `accept` on one thread per CPU (no polling, so it does
/// not cap the rate); the client is one sequential connection at a time.
pub fn connection_rate(pair: &Pair, seconds: u64) -> anyhow::Result<f64> {
    let addr = SocketAddrV4::new(pair.server_ip, 19_000);
    let listener = run_in(&pair.server_ns, move || TcpListener::bind(addr))?
        .context("conn-rate server bind")?;
    let stop = Arc::new(AtomicBool::new(false));
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut servers = Vec::new();
    for _ in 0..threads {
        let listener = listener.try_clone().context("conn-rate listener")?;
        let stop = Arc::clone(&stop);
        servers.push(std::thread::spawn(move || -> std::io::Result<()> {
            loop {
                let (mut s, _) = listener.accept()?;
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            }
        }));
    }
    let counted = run_in(&pair.client_ns, move || -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(seconds) {
            let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            n += 1;
        }
        Ok(n)
    });
    // Wake every blocked acceptor with one connection each, so that they
    // see `stop` and end (also when the client failed).
    stop.store(true, Ordering::Relaxed);
    let woken = run_in(&pair.client_ns, move || {
        (0..threads)
            .filter(|_| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)).is_ok())
            .count()
    })?;
    // An acceptor left blocked would hang the join: fail instead.
    anyhow::ensure!(
        woken == threads,
        "conn-rate: woke {woken} of {threads} server threads ({:?})",
        counted
            .as_ref()
            .map(|r| r.as_ref().map_err(ToString::to_string))
    );
    for server in servers {
        server
            .join()
            .map_err(|_| anyhow::anyhow!("conn-rate server panicked"))?
            .context("conn-rate server accept")?;
    }
    let count = counted??;
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    Ok(count as f64 / seconds as f64)
}

// ------------------------------------------------------------- BPF cost

/// One loaded podnet program: name, run_cnt, run_time_ns.
type ProgStats = (String, u64, u64);

/// podnet's loaded programs by program ID, with run_cnt / run_time_ns
/// (needs kernel.bpf_stats_enabled). By ID, not by name: the baseline's
/// programs have the same names as this build's.
fn bpf_stats() -> BTreeMap<u64, ProgStats> {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
    else {
        return BTreeMap::new();
    };
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut stats = BTreeMap::new();
    for p in list.as_array().into_iter().flatten() {
        let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) else {
            continue;
        };
        if podnet_common::names::ALL_PROGRAMS.contains(&name) {
            stats.insert(
                id,
                (
                    name.to_owned(),
                    p["run_cnt"].as_u64().unwrap_or(0),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    stats
}

/// IDs of podnet's loaded programs.
fn bpf_program_ids() -> BTreeSet<u64> {
    bpf_stats().into_keys().collect()
}

/// Builds a fixture with the baseline binaries and returns it with the IDs
/// of the programs its agents loaded (those that appeared meanwhile: the
/// fixtures are built one after the other), so bpf_stats can tell its
/// programs from this build's.
fn with_new_programs<T>(
    make: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, BTreeSet<u64>)> {
    let before = bpf_program_ids();
    let built = make()?;
    let after = bpf_program_ids();
    Ok((built, after.difference(&before).copied().collect()))
}

/// Sets `kernel.bpf_stats_enabled` (a global sysctl, not per netns) for a
/// phase, restores the old value on drop. Off during the traffic runs (on,
/// it adds two clock reads to every podnet program run and none to the
/// baselines); on only in the short phase that measures the programs' cost.
struct BpfStatsSwitch(Option<String>);

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsSwitch {
    fn set(on: bool) -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS_ENABLED)
            .with_context(|| format!("reading {BPF_STATS_ENABLED}"))?;
        std::fs::write(BPF_STATS_ENABLED, if on { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS_ENABLED}"))?;
        Ok(Self(Some(old.trim().to_owned())))
    }
}

impl Drop for BpfStatsSwitch {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(BPF_STATS_ENABLED, old);
        }
    }
}

/// Runs per `BPF_PROG_TEST_RUN` call. Test-run runs the program `repeat`
/// times on the same skb, so the rewrites accumulate: the TTL drops by one
/// per run and must stay above 1 for every run to take the forwarding path
/// (the frames start at 255).
const RUNS_PER_CALL: u32 = 250;
const COST_FRAME_TTL: u8 = 255;

/// Mean cost of `runs` runs of `program` on `frame`, in ns. Fails unless
/// every run ended in `expected` (so the figure is that path's, not a drop's
/// or a pass's).
fn cost(
    h: &mut crate::bpf_run::BpfHarness,
    runs: u32,
    program: &'static str,
    frame: &[u8],
    expected: podnet_common::Verdict,
    arriving_on: Option<&crate::bpf_run::TestUnderlay>,
) -> anyhow::Result<f64> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let before = h.datapath.counters()?.verdict(expected);
    let calls = runs.div_ceil(RUNS_PER_CALL);
    let context = arriving_on.map(crate::bpf_run::TestUnderlay::skb_context);
    // Drop events go to a ring buffer: read it after every call so that
    // the measured runs reserve and submit (a full ring would make them
    // fail, which is cheaper).
    let mut events = drop_events_ring(h)?;
    let prog = h.datapath.classifier(program)?;
    // `drain` runs after every call (outside the measured runs).
    let run_all = |drain: &mut dyn FnMut()| -> anyhow::Result<f64> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut total_ns = 0.0;
        for _ in 0..calls {
            let result = prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: context.as_ref().map(|c| &c[..]),
                repeat: RUNS_PER_CALL,
                ..TestRunOptions::default()
            })?;
            // The kernel reports the mean of the call's runs.
            total_ns += result.duration.as_secs_f64() * 1e9 * f64::from(RUNS_PER_CALL);
            drain();
        }
        Ok(total_ns)
    };
    let total_ns = match arriving_on {
        Some(underlay) => underlay.run_inside(|| run_all(&mut || {}))??,
        None => run_all(&mut || while events.next().is_some() {})?,
    };
    let took_path = h.datapath.counters()?.verdict(expected) - before;
    let total_runs = u64::from(calls) * u64::from(RUNS_PER_CALL);
    anyhow::ensure!(
        took_path == total_runs,
        "{program}: {took_path} of {total_runs} runs ended in {}",
        expected.name()
    );
    #[allow(clippy::cast_precision_loss, reason = "run counts far below 2^52")]
    Ok(total_ns / total_runs as f64)
}

/// A test underlay whose neighbour entry for node 2 has `a_mac`, and a
/// frame from node 2's pod to `ips.1` arriving on it. After the first run
/// rewrites the MACs for the destination (A's swapped), the frame still
/// comes from node 2 (the frame's type, unicast to this host, is computed
/// once per call).
fn arrival_from_node2(
    h: &mut crate::bpf_run::BpfHarness,
    a_mac: [u8; 6],
    ips: (Ipv4Addr, Ipv4Addr),
    payload: &[u8],
) -> anyhow::Result<(crate::bpf_run::TestUnderlay, Vec<u8>)> {
    let node2 = Ipv4Addr::new(192, 168, 100, 12);
    h.datapath.upsert_node_address(node2)?;
    let underlay_mac = [2, 0x11, 0, 0, 0, 0x11];
    let underlay = crate::bpf_run::TestUnderlay::new(
        "cost",
        underlay_mac,
        (Ipv4Addr::new(192, 168, 100, 11), 24),
        &[(node2, a_mac)],
    )?;
    let frame = crate::frames::ipv4_udp(underlay_mac, a_mac, ips.0, ips.1, COST_FRAME_TTL, payload);
    Ok((underlay, frame))
}

/// Per-run cost of each podnet program path measured with
/// BPF_PROG_TEST_RUN (about `runs` runs each, hot caches): the program
/// alone, without bpf_stats' clock reads (which on this VM cost more than
/// the programs themselves).
pub fn bpf_cost_test_run(runs: u32) -> anyhow::Result<Vec<(String, f64)>> {
    use podnet_common::{
        EndpointInfo, NodeConfig, Verdict,
        names::{PROG_FROM_POD, PROG_FROM_UNDERLAY},
        node,
    };

    let mut h = crate::bpf_run::BpfHarness::new("cost")?;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    let (a, b) = (Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3));
    let (a_mac, a_host) = ([2, 0xaa, 0, 0, 0, 2], [2, 0xaa, 0xff, 0, 0, 2]);
    h.datapath.upsert_endpoint(
        a,
        EndpointInfo {
            host_ifindex: lo,
            flags: 0,
            pod_mac: a_mac,
            host_mac: a_host,
        },
    )?;
    // B's MACs are A's swapped, so the frame from_pod rewrites for B is
    // again a valid frame from A: every repeated run passes the source check.
    h.datapath.upsert_endpoint(
        b,
        EndpointInfo {
            host_ifindex: 4242,
            flags: 0,
            pod_mac: a_host,
            host_mac: a_mac,
        },
    )?;
    h.datapath
        .upsert_remote("10.244.1.0/24".parse()?, Ipv4Addr::new(192, 168, 100, 12))?;
    let mut config = NodeConfig {
        node_ip: u32::from_ne_bytes([192, 168, 100, 11]),
        mode: node::MODE_VXLAN,
        tunnel_ifindex: lo,
        underlay_ifindex: lo,
        vni: 1,
        vxlan_port: 0,
        ..podnet_common::NodeConfig::default()
    };
    h.datapath.set_config(config)?;
    let payload = [0u8; 1400];
    let local = crate::frames::ipv4_udp(a_host, a_mac, a, b, COST_FRAME_TTL, &payload);
    let remote_ip = Ipv4Addr::new(10, 244, 1, 7);
    let remote = crate::frames::ipv4_udp(a_host, a_mac, a, remote_ip, COST_FRAME_TTL, &payload);
    let (underlay, arriving) = arrival_from_node2(&mut h, a_mac, (remote_ip, b), &payload)?;
    // The last path is the floor under all the others: test-run's own
    // loop plus the shortest path there is (one EtherType read, a counter).
    let mut not_ip = crate::frames::ethernet([2; 6], [3; 6], crate::frames::ETH_P_IPV6);
    not_ip.extend_from_slice(&payload);
    let paths = [
        (
            "from_pod local (redirect_peer)",
            PROG_FROM_POD,
            &local,
            node::MODE_VXLAN,
            Verdict::RedirectPeer,
        ),
        (
            "from_pod remote (vxlan encap)",
            PROG_FROM_POD,
            &remote,
            node::MODE_VXLAN,
            Verdict::VxlanEncap,
        ),
        (
            "from_pod remote (redirect_neigh)",
            PROG_FROM_POD,
            &remote,
            node::MODE_DIRECT,
            Verdict::RedirectNeigh,
        ),
        // from_overlay's delivery cannot be measured here: a test run
        // cannot attach the tunnel metadata its sender check reads. It runs
        // the same code as from_underlay after that check; the traffic
        // phases measure it for real (bpf_stats).
        (
            "from_underlay deliver",
            PROG_FROM_UNDERLAY,
            &arriving,
            node::MODE_DIRECT,
            Verdict::UnderlayDeliver,
        ),
        (
            "floor: from_underlay non-IP pass",
            PROG_FROM_UNDERLAY,
            &not_ip,
            node::MODE_DIRECT,
            Verdict::PassToStack,
        ),
    ];
    let mut figures = Vec::new();
    for (path, program, frame, mode, verdict) in paths {
        config.mode = mode;
        config.underlay_ifindex = if program == PROG_FROM_UNDERLAY {
            underlay.ifindex
        } else {
            lo
        };
        h.datapath.set_config(config)?;
        let arriving_on = (program == PROG_FROM_UNDERLAY).then_some(&underlay);
        figures.push((
            path.to_owned(),
            cost(&mut h, runs, program, frame, verdict, arriving_on)?,
        ));
    }
    // (The mode does not matter: the source check comes first.)
    figures.extend(drop_costs(&mut h, runs, config, (a_host, a_mac, b))?);
    Ok(figures)
}

/// The drop path of from_pod (a forged source from the endpoint with MACs
/// `a_host`/`a_mac`, to `b`), with its event sent (no rate limit: every run
/// gets a token) and suppressed (a rate of 1/s: after the first run none
/// does).
fn drop_costs(
    h: &mut crate::bpf_run::BpfHarness,
    runs: u32,
    mut config: podnet_common::NodeConfig,
    (a_host, a_mac, b): ([u8; 6], [u8; 6], Ipv4Addr),
) -> anyhow::Result<Vec<(String, f64)>> {
    let spoofed = crate::frames::ipv4_udp(
        a_host,
        a_mac,
        Ipv4Addr::new(10, 244, 0, 99),
        b,
        COST_FRAME_TTL,
        &[0u8; 1400],
    );
    let mut figures = Vec::new();
    for (path, rate) in [
        ("from_pod drop, event sent (spoofed source)", u32::MAX),
        ("from_pod drop, event suppressed (spoofed source)", 1),
    ] {
        config.drop_events_per_sec = rate;
        h.datapath.set_config(config)?;
        let ns = cost(
            h,
            runs,
            podnet_common::names::PROG_FROM_POD,
            &spoofed,
            podnet_common::Verdict::Drop,
            None,
        )?;
        figures.push((path.to_owned(), ns));
    }
    Ok(figures)
}

/// The pinned drop-events ring buffer of the harness's datapath.
fn drop_events_ring(
    h: &crate::bpf_run::BpfHarness,
) -> anyhow::Result<aya::maps::RingBuf<aya::maps::MapData>> {
    let pin = h.datapath.pin_dir().join(podnet_common::names::MAP_EVENTS);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&pin)?)?;
    Ok(aya::maps::RingBuf::try_from(map)?)
}

// ------------------------------------------------------------ topologies

/// The physical limit on one node: a veth pair straight between two pods.
pub struct VethPair {
    pub a: NetNs,
    pub b: NetNs,
}

impl VethPair {
    pub fn new() -> anyhow::Result<Self> {
        let (a, b) = (NetNs::new("bveth")?, NetNs::new("bveth")?);
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ]))?;
        a.ip(&["addr", "add", "10.250.0.1/24", "dev", "eth0"])?;
        b.ip(&["addr", "add", "10.250.0.2/24", "dev", "eth0"])?;
        a.ip(&["link", "set", "eth0", "up"])?;
        b.ip(&["link", "set", "eth0", "up"])?;
        Ok(Self { a, b })
    }

    /// The pair with IPv4 BIG TCP on both ends ([`set_ipv4_big_tcp`]).
    pub fn with_big_tcp() -> anyhow::Result<Self> {
        let me = Self::new()?;
        set_ipv4_big_tcp(&me.a)?;
        set_ipv4_big_tcp(&me.b)?;
        Ok(me)
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.a.name().into(),
            server_ns: self.b.name().into(),
            server_ip: Ipv4Addr::new(10, 250, 0, 2),
        }
    }
}

/// IPv4 BIG TCP on every link of `netns` but `lo` (a reference setup's
/// veths and bridge), with the sizes podnet's `ipv4BigTcp` sets, so that
/// `podnet-bigtcp` is compared with the same configuration elsewhere.
/// Over netlink: iproute2 before 6.3 (6.1 here) has no `gso_ipv4_max_size`.
pub fn set_ipv4_big_tcp(netns: &NetNs) -> anyhow::Result<()> {
    let size = podnet::cni::config::IPV4_BIG_TCP_MAX_SIZE;
    podnet::netlink::with_netlink(Some(&netns.path()), move |h| async move {
        for name in podnet::netlink::links_named(&h, "").await? {
            if name == "lo" {
                continue;
            }
            if let Some(link) = podnet::netlink::link_by_name(&h, &name).await? {
                podnet::netlink::set_ipv4_big_tcp(&h, link.index, size).await?;
            }
        }
        Ok(())
    })
    .with_context(|| format!("IPv4 BIG TCP in {}", netns.name()))
}

/// A node whose pods are attached by a reference CNI plugin (`bridge` or
/// `ptp`) with `host-local`, run exactly as a runtime would.
pub struct ReferenceNode {
    pub node: NetNs,
    pub pods: Vec<NetNs>,
    pub ips: Vec<Ipv4Addr>,
    conf: Value,
    _dir: TempDir,
}

impl ReferenceNode {
    pub fn new(plugin: &str, subnet: &str, pods: usize) -> anyhow::Result<Self> {
        let node = NetNs::new(&format!("b{plugin}"))?;
        let dir = TempDir::new(plugin)?;
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("bench-{plugin}"),
            "type": plugin,
            "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": dir.path().join("ipam")}
        });
        if plugin == "bridge" {
            conf["bridge"] = json!("cni0");
            conf["isGateway"] = json!(true);
            conf["isDefaultGateway"] = json!(true);
        }
        let mut me = Self {
            node,
            pods: Vec::new(),
            ips: Vec::new(),
            conf,
            _dir: dir,
        };
        for _ in 0..pods {
            me.add_pod()?;
        }
        Ok(me)
    }

    fn cni(&self, command: &str, pod: &NetNs) -> anyhow::Result<Value> {
        let plugin = self.conf["type"].as_str().unwrap_or("bridge").to_owned();
        let path = pod.path().display().to_string();
        let out = crate::run_cni_plugin(
            self.node.command(format!("/usr/lib/cni/{plugin}"))?,
            "/usr/lib/cni",
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", pod.name()),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            self.conf.to_string().as_bytes(),
        )?;
        anyhow::ensure!(
            out.status.success(),
            "{plugin} {command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    pub fn add_pod(&mut self) -> anyhow::Result<Ipv4Addr> {
        let pod = NetNs::new("bpod")?;
        let result = self.cni("ADD", &pod)?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .context("no IP from the reference plugin")?;
        self.pods.push(pod);
        self.ips.push(ip);
        Ok(ip)
    }

    /// IPv4 BIG TCP on the node's links (bridge, host veths) and the pods'
    /// ([`set_ipv4_big_tcp`]).
    pub fn set_ipv4_big_tcp(&self) -> anyhow::Result<()> {
        set_ipv4_big_tcp(&self.node)?;
        for pod in &self.pods {
            set_ipv4_big_tcp(pod)?;
        }
        Ok(())
    }

    /// Sets `net.bridge.bridge-nf-call-iptables` in the node's netns (per
    /// netns on this kernel: checked, setting it in a new netns leaves the
    /// root namespace's at 1). With it at 1 (the default, br_netfilter is
    /// built in here) every bridged packet goes through the iptables hooks.
    pub fn set_bridge_nf_call_iptables(&self, on: bool) -> anyhow::Result<()> {
        run(self.node.command("sysctl")?.args([
            "-qw",
            if on {
                "net.bridge.bridge-nf-call-iptables=1"
            } else {
                "net.bridge.bridge-nf-call-iptables=0"
            },
        ]))
        .with_context(|| format!("bridge-nf-call-iptables in {}", self.node.name()))?;
        Ok(())
    }

    /// Times ADD of a fresh pod and its DEL (seconds each).
    pub fn time_add_del(&self) -> anyhow::Result<(f64, f64)> {
        let pod = NetNs::new("bcni")?;
        let t = Instant::now();
        self.cni("ADD", &pod)?;
        let add = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.cni("DEL", &pod)?;
        Ok((add, t.elapsed().as_secs_f64()))
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.pods[0].name().into(),
            server_ns: self.pods[1].name().into(),
            server_ip: self.ips[1],
        }
    }
}

/// Times CNI ADD and DEL of a fresh pod with podnet (seconds each).
pub fn podnet_add_del(node: &Node, tag: usize) -> anyhow::Result<(f64, f64)> {
    let pod = NetNs::new("pcni")?;
    let path = pod.path().display().to_string();
    let cid = format!("bench-cni-{tag}");
    let conf = node.conf("1.1.0", &Value::Null).to_string();
    let env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid.as_str()),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let t = Instant::now();
    let out = node.cni(&env("ADD"), conf.as_bytes())?;
    anyhow::ensure!(out.success, "podnet ADD: {out:?}");
    let add = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = node.cni(&env("DEL"), conf.as_bytes())?;
    anyhow::ensure!(out.success, "podnet DEL: {out:?}");
    Ok((add, t.elapsed().as_secs_f64()))
}

/// Two nodes and a pod each on kernel VXLAN programmed the way flannel's
/// vxlan backend does it: `flannel.1` (VNI 1, learning off), pods on a
/// bridge via the `bridge` plugin, and per remote node a route
/// (`10.247.X.0/24 via 10.247.X.0 dev flannel.1 onlink`), a permanent
/// neighbour and an FDB entry to the remote node's underlay address.
pub struct FlannelCluster {
    pub fabric: NetNs,
    pub nodes: Vec<ReferenceNode>,
}

impl FlannelCluster {
    #[allow(
        clippy::too_many_lines,
        reason = "one linear recipe, as flannel's docs give it"
    )]
    pub fn new() -> anyhow::Result<Self> {
        let fabric = NetNs::new("bflfab")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let node = ReferenceNode::new("bridge", &format!("10.247.{i}.0/24"), 0)?;
            let (ns, fab) = (node.node.name().to_owned(), fabric.name().to_owned());
            let port = format!("n{i}");
            run(Command::new("ip").args([
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &fab,
            ]))?;
            fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
            node.node
                .ip(&["addr", "add", &format!("192.168.101.{i}/24"), "dev", "eth0"])?;
            node.node.ip(&["link", "set", "eth0", "up"])?;
            node.node.ip(&[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &format!("192.168.101.{i}"),
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ])?;
            node.node.ip(&[
                "addr",
                "add",
                &format!("10.247.{i}.0/32"),
                "dev",
                "flannel.1",
            ])?;
            node.node.ip(&["link", "set", "flannel.1", "up"])?;
            run(node
                .node
                .command("sysctl")?
                .args(["-qw", "net.ipv4.ip_forward=1"]))?;
            flannel_ip_masq(&node.node, &format!("10.247.{i}.0/24"), "10.247.0.0/16")?;
            nodes.push(node);
        }
        let macs: Vec<String> = nodes
            .iter()
            .map(|n| {
                let out = n.node.ip(&["-j", "link", "show", "flannel.1"])?;
                let v: Value = serde_json::from_slice(&out.stdout)?;
                v[0]["address"]
                    .as_str()
                    .map(str::to_owned)
                    .context("flannel.1 MAC")
            })
            .collect::<anyhow::Result<_>>()?;
        for (i, node) in nodes.iter().enumerate() {
            for (j, mac) in macs.iter().enumerate() {
                if i == j {
                    continue;
                }
                let remote = j + 1;
                let gw = format!("10.247.{remote}.0");
                node.node.ip(&[
                    "route",
                    "add",
                    &format!("10.247.{remote}.0/24"),
                    "via",
                    &gw,
                    "dev",
                    "flannel.1",
                    "onlink",
                ])?;
                node.node.ip(&[
                    "neigh",
                    "add",
                    &gw,
                    "lladdr",
                    mac,
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ])?;
                run(node.node.command("bridge")?.args([
                    "fdb",
                    "append",
                    mac,
                    "dev",
                    "flannel.1",
                    "dst",
                    &format!("192.168.101.{remote}"),
                ]))?;
            }
        }
        let mut me = Self { fabric, nodes };
        for node in &mut me.nodes {
            node.add_pod()?;
            // MTU: the overlay's, as flannel sets it.
            let pod = node.pods.last().context("pod")?;
            pod.ip(&["link", "set", "eth0", "mtu", "1450"])?;
        }
        Ok(me)
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.nodes[0].pods[0].name().into(),
            server_ns: self.nodes[1].pods[0].name().into(),
            server_ip: self.nodes[1].ips[0],
        }
    }

    #[must_use]
    pub fn underlay_pair(&self) -> Pair {
        Pair {
            client_ns: self.nodes[0].node.name().into(),
            server_ns: self.nodes[1].node.name().into(),
            server_ip: Ipv4Addr::new(192, 168, 101, 2),
        }
    }
}

/// What flanneld with `--ip-masq` (its default in the kube-flannel
/// manifest) installs on a node: the nat POSTROUTING chain that
/// masquerades pod traffic leaving the cluster, and the FORWARD accepts for
/// the cluster CIDR (flannel's `MasqRules` and `ForwardRules`, IPv4).
/// Conntrack then sees the pods' and the VXLAN traffic, as on podnet's
/// nodes with their nft masquerade.
fn flannel_ip_masq(node: &NetNs, pod_subnet: &str, cluster: &str) -> anyhow::Result<()> {
    let rules = format!(
        "*nat\n\
         :FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod_subnet} -d {cluster} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {cluster} -d {pod_subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {cluster} -d {pod_subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {cluster} ! -d 224.0.0.0/4 -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {cluster} -d {cluster} -j MASQUERADE --random-fully\n\
         COMMIT\n\
         *filter\n\
         :FLANNEL-FWD - [0:0]\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s {cluster} -j ACCEPT\n\
         -A FLANNEL-FWD -d {cluster} -j ACCEPT\n\
         COMMIT\n"
    );
    let mut child = node
        .command("iptables-restore")?
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(
        child.wait()?.success(),
        "flannel's masquerade rules in {}",
        node.name()
    );
    Ok(())
}

/// A two-node podnet lab with one pod each; with `bin_dir`, running the
/// agents and the CNI plugin from there (the baseline), under its own
/// namespace prefix so it coexists with this build's lab of the same mode.
pub fn podnet_cluster(mode: &str, bin_dir: Option<&Path>) -> anyhow::Result<(LabGuard, Pair)> {
    podnet_cluster_with(mode, &[], bin_dir)
}

/// [`podnet_cluster`] whose agents get `agent_args` too (another lab
/// prefix when there are any, so it coexists with the plain one).
pub fn podnet_cluster_with(
    mode: &str,
    agent_args: &[&str],
    bin_dir: Option<&Path>,
) -> anyhow::Result<(LabGuard, Pair)> {
    let tag = match (mode == "vxlan", bin_dir.is_some(), agent_args.is_empty()) {
        (true, false, true) => "bvx",
        (false, false, true) => "bdr",
        (true, true, true) => "bvxb",
        (false, true, true) => "bdrb",
        (true, _, false) => "bvxa",
        (false, _, false) => "bdra",
    };
    podnet_lab(tag, mode, agent_args, bin_dir)
}

/// A two-node lab of `mode` under namespace prefix tag `tag`, its agents
/// with `agent_args` too, from `bin_dir` when given.
pub fn podnet_lab(
    tag: &str,
    mode: &str,
    agent_args: &[&str],
    bin_dir: Option<&Path>,
) -> anyhow::Result<(LabGuard, Pair)> {
    let options = crate::lab::LabOptions {
        bin_dir: bin_dir.map(Path::to_path_buf),
        agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        ..crate::lab::LabOptions::default()
    };
    let guard = LabGuard::up_with(tag, 2, 1, mode, LabDatastore::File, options)?;
    let pair = Pair {
        client_ns: guard.layout.pods[0].netns.clone(),
        server_ns: guard.layout.pods[1].netns.clone(),
        server_ip: guard.layout.pods[1].ip,
    };
    Ok((guard, pair))
}

/// Resident memory of a process, KiB.
#[must_use]
pub fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// --------------------------------------------------------------- the run

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Suffix of a dataplane built from the baseline binaries: `X-baseline` is
/// compared round by round with `X`.
pub const BASELINE_SUFFIX: &str = "-baseline";

/// The order of `pairs` in one round: a fresh shuffle from `rng`, so that no
/// dataplane is always measured first or right after the same neighbour
/// (the per-round ratios are what the comparisons rest on).
fn round_order(pairs: &[(&str, Pair)], rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    rng.shuffle(&mut order);
    order
}

impl BenchOptions {
    /// The generator of one part of the run: its own stream, from the seed.
    fn rng(&self, part: &str) -> Rng {
        let mut h = self.seed;
        for b in part.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
        Rng::new(h)
    }
}

/// Measures throughput, latency and connection rate of every `(name, pair)`
/// in interleaved rounds with `kernel.bpf_stats_enabled` off, then, in a
/// phase of its own with it on, the podnet programs' bpf_stats cost over a
/// short throughput run of each podnet dataplane (`baseline_programs`, by
/// ID, are reported apart as the baseline's); adds the figures to `out`.
fn measure_dataplanes(
    scenario: &str,
    pairs: &[(&str, Pair)],
    baseline_programs: &BTreeSet<u64>,
    opts: &BenchOptions,
    out: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let stats_off = BpfStatsSwitch::set(false)?;
    let mut runs: BTreeMap<(String, &'static str), Vec<f64>> = BTreeMap::new();
    let mut rng = opts.rng(scenario);
    for round in 1..=opts.rounds {
        for (name, pair) in round_order(pairs, &mut rng).into_iter().map(|i| &pairs[i]) {
            progress(&format!(
                "{scenario}: round {round}/{}: {name}",
                opts.rounds
            ));
            let (gbps, cpu_s_per_gb) = throughput_and_cpu(pair, opts.seconds)
                .with_context(|| format!("{name} throughput"))?;
            let (p50, p99) =
                latency(pair, opts.seconds).with_context(|| format!("{name} latency"))?;
            let rate = connection_rate(pair, opts.seconds.min(2))
                .with_context(|| format!("{name} connection rate"))?;
            for (metric, value) in [
                ("tcp_throughput", gbps),
                ("cpu_s_per_gb", cpu_s_per_gb),
                ("latency_p50", p50),
                ("latency_p99", p99),
                ("conn_rate", rate),
            ] {
                runs.entry(((*name).to_owned(), metric))
                    .or_default()
                    .push(value);
            }
        }
    }
    for ((name, metric), values) in runs {
        let unit = match metric {
            "tcp_throughput" => "Gbit/s",
            "cpu_s_per_gb" => "CPU-s/GB",
            "conn_rate" => "conn/s",
            _ => "us",
        };
        out.push(figure(scenario, &name, metric, unit, values));
    }
    drop(stats_off);
    let stats_on = BpfStatsSwitch::set(true)?;
    let before = bpf_stats();
    for (name, pair) in pairs.iter().filter(|(n, _)| n.starts_with("podnet")) {
        progress(&format!("{scenario}: bpf_stats phase: {name}"));
        throughput(pair, opts.seconds.min(2))
            .with_context(|| format!("{name} throughput (bpf_stats phase)"))?;
    }
    add_bpf_cost(scenario, &before, &bpf_stats(), baseline_programs, out);
    drop(stats_on);
    Ok(())
}

/// The same-node part: podnet (with and without IPv4 BIG TCP), the
/// baseline when given, and the references (bridge with and without
/// br_netfilter and with BIG TCP, ptp, a veth pair with and without).
fn measure_same_node(
    podnet: &Node,
    pods: &[crate::node::Pod; 2],
    bridge: &ReferenceNode,
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let podnet_pair = Pair {
        client_ns: pods[0].netns.name().into(),
        server_ns: pods[1].netns.name().into(),
        server_ip: pods[1].ip,
    };
    // The same node's pods with `ipv4BigTcp`; held until the
    // measurement is done.
    let big_tcp = podnet.conf("1.1.0", &json!({"ipv4BigTcp": true}));
    let big_pods = [
        podnet.add_pod_with("bench-big-a", &big_tcp)?,
        podnet.add_pod_with("bench-big-b", &big_tcp)?,
    ];
    let mut dataplanes = vec![
        ("podnet", podnet_pair),
        (
            "podnet-bigtcp",
            Pair {
                client_ns: big_pods[0].netns.name().into(),
                server_ns: big_pods[1].netns.name().into(),
                server_ip: big_pods[1].ip,
            },
        ),
    ];
    // Baseline node: the older agent and plugin, its own CIDR. Held
    // here until the measurement is done (its pods go with it).
    let mut baseline = None;
    let mut baseline_programs = BTreeSet::new();
    if let Some(dir) = &opts.baseline_bin_dir {
        progress(&format!(
            "same node: building podnet-baseline from {}",
            dir.display()
        ));
        let ((pods, node), ids) = with_new_programs(|| {
            let node = Node::start_with_bins("benchbase", "10.244.7.0/24", Some(dir))?;
            let pods = [node.add_pod("base-a")?, node.add_pod("base-b")?];
            // Pods first in the tuple: they go before their node on
            // drop, as this build's do.
            Ok((pods, node))
        })
        .context("building the podnet-baseline node")?;
        // Measured in the same rounds as podnet (shuffled order).
        dataplanes.push((
            "podnet-baseline",
            Pair {
                client_ns: pods[0].netns.name().into(),
                server_ns: pods[1].netns.name().into(),
                server_ip: pods[1].ip,
            },
        ));
        baseline = Some((pods, node));
        baseline_programs = ids;
    }
    let ptp = ReferenceNode::new("ptp", "10.246.0.0/24", 2)?;
    let veth = VethPair::new()?;
    // The same bridge without br_netfilter's iptables hooks.
    let bridge_nf_off = ReferenceNode::new("bridge", "10.248.0.0/24", 2)?;
    bridge_nf_off.set_bridge_nf_call_iptables(false)?;
    // The references with the same BIG TCP sizes as podnet-bigtcp.
    let veth_big = VethPair::with_big_tcp()?;
    let bridge_big = ReferenceNode::new("bridge", "10.249.0.0/24", 2)?;
    bridge_big.set_ipv4_big_tcp()?;
    dataplanes.extend([
        ("bridge", bridge.pair()),
        ("bridge-nf-off", bridge_nf_off.pair()),
        ("ptp", ptp.pair()),
        ("veth", veth.pair()),
        ("veth-bigtcp", veth_big.pair()),
        ("bridge-bigtcp", bridge_big.pair()),
    ]);
    measure_dataplanes("same-node", &dataplanes, &baseline_programs, opts, figures)?;
    // The baseline's programs must not run during cni / scale.
    drop(baseline);
    drop(big_pods);
    Ok(())
}

/// An unlimited pod's same-node throughput with and without pods with
/// bandwidth limits (100 Mbit/s and 1 Gbit/s both ways, idle) on the node:
/// the limited pods are added before and deleted after each "beside" run,
/// and which of the two conditions goes first is drawn every round (paired
/// ratios).
fn measure_shaping(
    podnet: &Node,
    pods: &[crate::node::Pod],
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let pair = Pair {
        client_ns: pods[0].netns.name().into(),
        server_ns: pods[1].netns.name().into(),
        server_ip: pods[1].ip,
    };
    let limits = |rate: u64| {
        podnet.conf(
            "1.1.0",
            &serde_json::json!({"capabilities": {"bandwidth": true},
                "runtimeConfig": {"bandwidth": {"ingressRate": rate, "ingressBurst": rate / 100,
                                                "egressRate": rate, "egressBurst": rate / 100}}}),
        )
    };
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    let mut rng = opts.rng("shaping");
    for round in 1..=opts.rounds {
        let shaped_first = rng.below(2) == 1;
        for with_shaped in [shaped_first, !shaped_first] {
            progress(&format!(
                "shaping: round {round}/{}: podnet {}",
                opts.rounds,
                if with_shaped {
                    "beside limited pods"
                } else {
                    "alone"
                }
            ));
            if with_shaped {
                let shaped = [
                    podnet.add_pod_with(&format!("shaped-{round}-slow"), &limits(100_000_000))?,
                    podnet.add_pod_with(&format!("shaped-{round}-fast"), &limits(1_000_000_000))?,
                ];
                beside.push(throughput(&pair, opts.seconds)?);
                for pod in &shaped {
                    podnet.del_pod(pod)?;
                }
            } else {
                alone.push(throughput(&pair, opts.seconds)?);
            }
        }
    }
    figures.push(figure(
        "shaping",
        "podnet",
        "tcp_throughput",
        "Gbit/s",
        alone,
    ));
    figures.push(figure(
        "shaping",
        "podnet beside limited pods",
        "tcp_throughput",
        "Gbit/s",
        beside,
    ));
    Ok(())
}

/// Runs `f` `parallel` at a time, `waves` times; ADD and DEL times in ms.
fn parallel_times(
    waves: usize,
    parallel: usize,
    f: impl Fn(usize) -> anyhow::Result<(f64, f64)> + Sync,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for wave in 0..waves {
        let results: Vec<anyhow::Result<(f64, f64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..parallel)
                .map(|k| {
                    let f = &f;
                    s.spawn(move || f(wave * parallel + k))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("CNI timing thread panicked")))
                })
                .collect()
        });
        for r in results {
            let (a, d) = r?;
            adds.push(a * 1e3);
            dels.push(d * 1e3);
        }
    }
    Ok((adds, dels))
}

/// CNI ADD/DEL latency, podnet vs bridge + host-local.
fn measure_cni(
    podnet: &Node,
    bridge: &ReferenceNode,
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    progress("CNI: ADD/DEL timings, podnet vs bridge + host-local");
    let (mut add, mut del, mut badd, mut bdel) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.cni_pods {
        let (a, d) = podnet_add_del(podnet, i)?;
        add.push(a * 1e3);
        del.push(d * 1e3);
        let (a, d) = bridge.time_add_del()?;
        badd.push(a * 1e3);
        bdel.push(d * 1e3);
    }
    // 16 runtimes' worth of pods at once, podnet and bridge in separate waves.
    let waves = opts.cni_pods.div_ceil(16);
    let (podnet_par_add, podnet_par_del) =
        parallel_times(waves, 16, |tag| podnet_add_del(podnet, 10_000 + tag))?;
    let (bridge_par_add, bridge_par_del) = parallel_times(waves, 16, |_| bridge.time_add_del())?;
    for (dp, metric, v) in [
        ("podnet", "cni_add", add),
        ("podnet", "cni_del", del),
        ("bridge", "cni_add", badd),
        ("bridge", "cni_del", bdel),
        ("podnet", "cni_add_parallel16", podnet_par_add),
        ("podnet", "cni_del_parallel16", podnet_par_del),
        ("bridge", "cni_add_parallel16", bridge_par_add),
        ("bridge", "cni_del_parallel16", bridge_par_del),
    ] {
        let mut f = figure("cni", dp, metric, "ms", v);
        // For CNI the interesting spread is p99: report it as max.
        f.max = percentile(&f.runs, 0.99);
        figures.push(f);
    }
    Ok(())
}

impl BenchOptions {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Cross node: podnet VXLAN (the default BPF datapath with its baseline
/// beside it, and the VXLAN device's), podnet direct (with its baseline beside it),
/// flannel-style kernel VXLAN and the underlay, in interleaved rounds.
fn measure_cross_node(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress(
        "cross node: building podnet vxlan (bpf and kernel datapaths), podnet direct, \
         flannel-style kernel VXLAN",
    );
    let mut labs = Vec::new();
    let mut dataplanes = Vec::new();
    let mut baseline_programs = BTreeSet::new();
    for (mode, name, baseline_name) in [
        ("vxlan", "podnet-vxlan", "podnet-vxlan-baseline"),
        ("direct", "podnet-direct", "podnet-direct-baseline"),
    ] {
        let (lab, pair) = podnet_cluster(mode, None)?;
        labs.push(lab);
        dataplanes.push((name, pair));
        if let Some(dir) = &opts.baseline_bin_dir {
            progress(&format!(
                "cross node: building {baseline_name} from {}",
                dir.display()
            ));
            let ((lab, pair), ids) = with_new_programs(|| podnet_cluster(mode, Some(dir)))
                .with_context(|| format!("building the {baseline_name} lab"))?;
            // Measured in the same rounds as its podnet (shuffled order).
            dataplanes.push((baseline_name, pair));
            labs.push(lab);
            baseline_programs.extend(ids);
        }
    }
    // The other VXLAN datapath (`--vxlan-datapath kernel`, the VXLAN
    // device), in the same rounds. Not built from the baseline binaries,
    // which may not have the flag.
    let (lab, pair) = podnet_cluster_with("vxlan", &["--vxlan-datapath", "kernel"], None)?;
    labs.push(lab);
    dataplanes.push(("podnet-vxlan-kernel", pair));
    let flannel = FlannelCluster::new()?;
    dataplanes.extend([
        ("kernel-vxlan", flannel.pair()),
        ("underlay", flannel.underlay_pair()),
    ]);
    measure_dataplanes("cross-node", &dataplanes, &baseline_programs, opts, figures)?;
    drop((labs, flannel));
    Ok(())
}

/// Runs every scenario (or those `opts.only` names); returns all figures.
pub fn run_all(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    progress(&format!(
        "seed {} (--seed {} replays this run's order), {} round(s)",
        opts.seed, opts.seed, opts.rounds
    ));
    let mut figures = Vec::new();

    if ["same-node", "shaping", "cni"]
        .iter()
        .any(|part| opts.runs(part))
    {
        progress("same node: building podnet, bridge, ptp and a direct veth pair");
        let podnet = Node::start("bench", "10.244.0.0/24")?;
        let pods = [podnet.add_pod("bench-a")?, podnet.add_pod("bench-b")?];
        let bridge = ReferenceNode::new("bridge", "10.245.0.0/24", 2)?;
        if opts.runs("same-node") {
            measure_same_node(&podnet, &pods, &bridge, opts, &mut figures)?;
        }
        if opts.runs("shaping") {
            measure_shaping(&podnet, &pods, opts, &mut figures)?;
        }
        if opts.runs("cni") {
            measure_cni(&podnet, &bridge, opts, &mut figures)?;
        }
    }

    if opts.runs("scale") {
        scale::measure_trie(opts, &mut figures)?;
        scale::measure_endpoints(opts, &mut figures)?;
    }

    if opts.runs("cross-node") {
        measure_cross_node(opts, &mut figures)?;
    }

    if opts.runs("bpf") {
        progress("BPF cost per run of each program path (BPF_PROG_TEST_RUN)");
        let runs = if opts.quick { 10_000 } else { 1_000_000 };
        for (path, ns) in bpf_cost_test_run(runs)? {
            figures.push(figure("bpf", &path, "bpf_ns_per_packet", "ns", vec![ns]));
        }
    }
    Ok(figures)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index into a short list"
    )]
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// bpf_stats cost per run between `before` and `after`, per program name
/// (all of this build's programs of a name together, the baseline's apart).
fn add_bpf_cost(
    scenario: &str,
    before: &BTreeMap<u64, ProgStats>,
    after: &BTreeMap<u64, ProgStats>,
    baseline_programs: &BTreeSet<u64>,
    out: &mut Vec<Figure>,
) {
    let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, (name, cnt, ns)) in after {
        let (cnt0, ns0) = before.get(id).map_or((0, 0), |(_, c, n)| (*c, *n));
        let dataplane = if baseline_programs.contains(id) {
            format!("podnet{BASELINE_SUFFIX} {name}")
        } else {
            format!("podnet {name}")
        };
        let total = totals.entry(dataplane).or_default();
        total.0 += cnt.saturating_sub(cnt0);
        total.1 += ns.saturating_sub(ns0);
    }
    for (dataplane, (runs, ns)) in totals {
        if runs > 0 {
            #[allow(clippy::cast_precision_loss, reason = "nanosecond totals")]
            let per = ns as f64 / runs as f64;
            out.push(figure(
                scenario,
                &dataplane,
                "bpf_stats_ns_per_run",
                "ns",
                vec![per],
            ));
        }
    }
}

// -------------------------------------------------------------- reports

fn find<'a>(
    figures: &'a [Figure],
    scenario: &str,
    dataplane: &str,
    metric: &str,
) -> Option<&'a Figure> {
    figures
        .iter()
        .find(|f| f.scenario == scenario && f.dataplane == dataplane && f.metric == metric)
}

/// The metrics compared with the baseline, and which way is better.
const BASELINE_METRICS: [(&str, Better); 5] = [
    ("tcp_throughput", Better::Higher),
    ("cpu_s_per_gb", Better::Lower),
    ("latency_p50", Better::Lower),
    ("latency_p99", Better::Lower),
    ("conn_rate", Better::Higher),
];

/// Which way a ratio is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Throughput, connection rate: a ratio above 1 is better.
    Higher,
    /// Latency: a ratio below 1 is better.
    Lower,
}

/// podnet / its baseline for one metric, round by round: round i of the
/// one divided by round i of the other (measured next to each other, so the
/// machine's drift between rounds cancels out of each ratio).
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRatio {
    pub scenario: String,
    pub dataplane: String,
    pub baseline: String,
    pub metric: String,
    pub better: Better,
    /// Median of the per-round ratios.
    pub median: f64,
    /// Percentile bootstrap 95 % interval of that median (as for the
    /// targets: [`bootstrap_median_ci`], [`BOOTSTRAP_SEED`]).
    pub ci95: (f64, f64),
    pub per_round: Vec<f64>,
}

/// Every dataplane `X-baseline` against `X`, per metric, from the rounds'
/// raw figures.
#[must_use]
pub fn baseline_ratios(figures: &[Figure]) -> Vec<BaselineRatio> {
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    let mut ratios = Vec::new();
    for base in figures {
        let Some(ours) = base.dataplane.strip_suffix(BASELINE_SUFFIX) else {
            continue;
        };
        let Some(&(_, better)) = BASELINE_METRICS.iter().find(|(m, _)| *m == base.metric) else {
            continue;
        };
        let Some(f) = find(figures, &base.scenario, ours, &base.metric) else {
            continue;
        };
        let per_round: Vec<f64> = f.runs.iter().zip(&base.runs).map(|(a, b)| a / b).collect();
        let ci95 = bootstrap_median_ci(&per_round, BOOTSTRAP_RESAMPLES, &mut rng);
        ratios.push(BaselineRatio {
            scenario: base.scenario.clone(),
            dataplane: ours.to_owned(),
            baseline: base.dataplane.clone(),
            metric: base.metric.clone(),
            better,
            median: median(&per_round),
            ci95,
            per_round,
        });
    }
    ratios
}

/// Bootstrap resamples behind every target's interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// The bootstrap's seed: fixed, so the same raw figures always give the same
/// intervals (the report can be recomputed from the JSON).
pub const BOOTSTRAP_SEED: u64 = 0x706f_646e_6574;

/// Percentile bootstrap 95 % confidence interval of the median of `sample`:
/// `resamples` resamples with replacement, the 2.5th and 97.5th percentiles
/// of their medians.
#[must_use]
pub fn bootstrap_median_ci(sample: &[f64], resamples: usize, rng: &mut Rng) -> (f64, f64) {
    if sample.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut buf = vec![0.0; sample.len()];
    let mut medians: Vec<f64> = (0..resamples)
        .map(|_| {
            for x in &mut buf {
                *x = sample[rng.below(sample.len())];
            }
            median(&buf)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (percentile(&medians, 0.025), percentile(&medians, 0.975))
}

/// One target of issue 14: `ours` / `peer` for `metric`, round by round.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub scenario: &'static str,
    pub ours: &'static str,
    /// The peer's scenario and dataplane.
    pub peer: (&'static str, &'static str),
    pub metric: &'static str,
    pub better: Better,
    /// The ratio to reach: at least this (`Higher`), at most (`Lower`).
    pub bound: f64,
}

const fn target(
    scenario: &'static str,
    ours: &'static str,
    peer: (&'static str, &'static str),
    metric: &'static str,
    better: Better,
    bound: f64,
) -> Target {
    Target {
        scenario,
        ours,
        peer,
        metric,
        better,
        bound,
    }
}

/// Every target, in one place (issue 14, "Targets"; the bridge one also
/// against the bridge without br_netfilter's iptables hooks).
#[rustfmt::skip]
pub const TARGETS: [Target; 15] = [
    target("same-node", "podnet", ("same-node", "veth"), "tcp_throughput", Better::Higher, 1.00),
    target("same-node", "podnet", ("same-node", "bridge"), "tcp_throughput", Better::Higher, 1.15),
    target("same-node", "podnet", ("same-node", "bridge"), "cpu_s_per_gb", Better::Lower, 0.85),
    target("same-node", "podnet", ("same-node", "bridge-nf-off"), "tcp_throughput", Better::Higher, 1.15),
    target("cross-node", "podnet-vxlan", ("cross-node", "kernel-vxlan"), "tcp_throughput", Better::Higher, 1.15),
    target("cross-node", "podnet-vxlan", ("cross-node", "kernel-vxlan"), "latency_p50", Better::Lower, 0.90),
    target("cross-node", "podnet-direct", ("cross-node", "underlay"), "tcp_throughput", Better::Higher, 0.97),
    target("scale-trie", scale::TRIE_FULL, ("scale-trie", scale::TRIE_ONE), "tcp_throughput", Better::Higher, 0.97),
    target("scale-endpoints", scale::ENDPOINTS_MANY, ("scale-endpoints", scale::ENDPOINTS_ONE), "udp_kpps", Better::Higher, 0.97),
    target("same-node", "podnet", ("same-node", "bridge"), "conn_rate", Better::Higher, 1.00),
    // IPv4 BIG TCP against the same configuration elsewhere, and whether
    // it beats podnet without it (what decides its default).
    target("same-node", "podnet-bigtcp", ("same-node", "veth-bigtcp"), "tcp_throughput", Better::Higher, 1.00),
    target("same-node", "podnet-bigtcp", ("same-node", "bridge-bigtcp"), "tcp_throughput", Better::Higher, 1.15),
    target("same-node", "podnet-bigtcp", ("same-node", "podnet"), "tcp_throughput", Better::Higher, 1.00),
    // The BPF VXLAN datapath against the VXLAN device (what decides the
    // --vxlan-datapath default).
    target("cross-node", "podnet-vxlan", ("cross-node", "podnet-vxlan-kernel"), "tcp_throughput", Better::Higher, 1.00),
    target("cross-node", "podnet-vxlan", ("cross-node", "podnet-vxlan-kernel"), "latency_p50", Better::Lower, 1.00),
];

/// Whether a target is reached, judged on the 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// The whole interval is on the right side of the bound.
    #[serde(rename = "met")]
    Met,
    /// The bound is inside the interval: cannot be told apart.
    #[serde(rename = "within noise")]
    WithinNoise,
    /// The whole interval is on the wrong side.
    #[serde(rename = "missed")]
    Missed,
}

impl Status {
    #[must_use]
    pub fn of(better: Better, bound: f64, (lo, hi): (f64, f64)) -> Self {
        let (reached, failed) = match better {
            Better::Higher => (lo >= bound, hi < bound),
            Better::Lower => (hi <= bound, lo > bound),
        };
        if reached {
            Self::Met
        } else if failed {
            Self::Missed
        } else {
            Self::WithinNoise
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::WithinNoise => "within noise",
            Self::Missed => "missed",
        }
    }
}

/// One target's paired ratios and where they stand.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRatio {
    pub scenario: String,
    pub dataplane: String,
    pub peer_scenario: String,
    pub peer: String,
    pub metric: String,
    pub better: Better,
    pub target: f64,
    /// Median of the per-round ratios (round i over round i).
    pub median: f64,
    /// Percentile bootstrap 95 % interval of that median.
    pub ci95: (f64, f64),
    pub status: Status,
    pub per_round: Vec<f64>,
}

/// Every target whose two figures were measured, with its interval.
#[must_use]
pub fn target_ratios(figures: &[Figure]) -> Vec<TargetRatio> {
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    TARGETS
        .iter()
        .filter_map(|t| {
            let ours = find(figures, t.scenario, t.ours, t.metric)?;
            let peer = find(figures, t.peer.0, t.peer.1, t.metric)?;
            let per_round: Vec<f64> = ours
                .runs
                .iter()
                .zip(&peer.runs)
                .map(|(a, b)| a / b)
                .collect();
            let ci95 = bootstrap_median_ci(&per_round, BOOTSTRAP_RESAMPLES, &mut rng);
            Some(TargetRatio {
                scenario: t.scenario.into(),
                dataplane: t.ours.into(),
                peer_scenario: t.peer.0.into(),
                peer: t.peer.1.into(),
                metric: t.metric.into(),
                better: t.better,
                target: t.bound,
                median: median(&per_round),
                ci95,
                status: Status::of(t.better, t.bound, ci95),
                per_round,
            })
        })
        .collect()
}

/// The "against the targets" section of the table.
fn targets_table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let ratios = target_ratios(figures);
    if ratios.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\nAGAINST THE TARGETS (per-round ratios podnet / peer, round i over round i: median \
         [95 % percentile bootstrap CI of the median, {BOOTSTRAP_RESAMPLES} resamples];\n  \
         met = the whole interval clears the target, missed = none of it does)"
    );
    for r in &ratios {
        let (op, peer) = match r.better {
            Better::Higher => (">=", &r.peer),
            Better::Lower => ("<=", &r.peer),
        };
        let _ = writeln!(
            out,
            "  {:<11} {:<20} vs {:<13} {:<15} {:>6.3}x [{:.3}, {:.3}]  target {op} {:.2}x  {}",
            r.scenario,
            r.dataplane,
            peer,
            r.metric,
            r.median,
            r.ci95.0,
            r.ci95.1,
            r.target,
            r.status.name()
        );
    }
    out
}

/// The baseline section of the table (empty without a baseline).
fn baseline_table(figures: &[Figure]) -> String {
    let ratios = baseline_ratios(figures);
    let mut out = String::new();
    if ratios.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\npodnet vs its baseline (same run, per-round ratios)\n  \
         ratio = podnet / podnet-baseline of the same round, the two measured next to each other;\n  \
         interval = 95 % percentile bootstrap CI of the median ratio ({BOOTSTRAP_RESAMPLES} resamples);\n  \
         throughput, conn rate: > 1 is better; latency, CPU per GB: < 1 is better",
    );
    let _ = writeln!(
        out,
        "  {:<11} {:<14} {:<16} {:<9} {:>7} {:>7} {:>7}  PER ROUND",
        "SCENARIO", "DATAPLANE", "METRIC", "BETTER", "MEDIAN", "CI LOW", "CI HIGH"
    );
    for r in &ratios {
        let better = match r.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
        };
        let rounds: Vec<String> = r.per_round.iter().map(|x| format!("{x:.3}")).collect();
        let _ = writeln!(
            out,
            "  {:<11} {:<14} {:<16} {:<9} {:>6.3}x {:>6.3}x {:>6.3}x  {}",
            r.scenario,
            r.dataplane,
            r.metric,
            better,
            r.median,
            r.ci95.0,
            r.ci95.1,
            rounds.join(" ")
        );
    }
    out
}

/// The metrics of every traffic run, as the table compares them.
const TRAFFIC_METRICS: [&str; 5] = [
    "tcp_throughput",
    "cpu_s_per_gb",
    "latency_p50",
    "latency_p99",
    "conn_rate",
];

/// podnet against each peer in the table: scenario, podnet, peers, metrics.
const PEER_RATIOS: [(&str, &str, &[&str], &[&str]); 5] = [
    (
        "same-node",
        "podnet",
        &["veth", "bridge", "bridge-nf-off", "ptp"],
        &TRAFFIC_METRICS,
    ),
    (
        "same-node",
        "podnet-bigtcp",
        &["veth-bigtcp", "bridge-bigtcp", "podnet"],
        &TRAFFIC_METRICS,
    ),
    (
        "cross-node",
        "podnet-vxlan",
        &["kernel-vxlan", "podnet-vxlan-kernel", "underlay"],
        &TRAFFIC_METRICS,
    ),
    (
        "cross-node",
        "podnet-direct",
        &["underlay", "kernel-vxlan"],
        &TRAFFIC_METRICS,
    ),
    (
        "cni",
        "podnet",
        &["bridge"],
        &[
            "cni_add",
            "cni_del",
            "cni_add_parallel16",
            "cni_del_parallel16",
        ],
    ),
];

/// The table: every figure, and podnet's ratios to each peer.
#[must_use]
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<22} {:<18} {:>10} {:>10} {:>10} {:<7}",
        "SCENARIO", "DATAPLANE", "METRIC", "MEDIAN", "MIN", "MAX", "UNIT"
    );
    for f in figures {
        let _ = writeln!(
            out,
            "{:<11} {:<22} {:<18} {:>10.2} {:>10.2} {:>10.2} {:<7}",
            f.scenario, f.dataplane, f.metric, f.median, f.min, f.max, f.unit
        );
    }
    let _ = writeln!(
        out,
        "\nRATIOS (podnet / peer, medians; throughput and conn rate: higher is better, latency and CNI time: lower is better)"
    );
    for (scenario, ours, peers, metrics) in PEER_RATIOS {
        for peer in peers {
            for metric in metrics {
                if let (Some(a), Some(b)) = (
                    find(figures, scenario, ours, metric),
                    find(figures, scenario, peer, metric),
                ) {
                    let _ = writeln!(
                        out,
                        "  {scenario:<11} {ours:<14} vs {peer:<13} {metric:<16} {:>6.2}x",
                        a.median / b.median
                    );
                }
            }
        }
    }
    if let (Some(beside), Some(alone)) = (
        find(
            figures,
            "shaping",
            "podnet beside limited pods",
            "tcp_throughput",
        ),
        find(figures, "shaping", "podnet", "tcp_throughput"),
    ) {
        // Paired per round: each "beside" run against its round's "alone".
        let mut ratios: Vec<f64> = beside
            .runs
            .iter()
            .zip(&alone.runs)
            .map(|(b, a)| b / a)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "  shaping     unlimited pod beside limited pods vs alone tcp_throughput {:>6.2}x (per round {:.2}..{:.2})",
            percentile(&ratios, 0.5),
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
        );
    }
    out.push_str(&targets_table(figures));
    out.push_str(&baseline_table(figures));
    out
}

/// What differs between the dataplanes besides the datapath, stated in the
/// JSON report (and in BENCHMARKS.md's Method).
pub const CONDITIONS: [&str; 4] = [
    "bridge: net.bridge.bridge-nf-call-iptables=1 (br_netfilter built in, the default); \
     bridge-nf-off: the same bridge with it set to 0 in its node's netns (per netns on this kernel)",
    "podnet nodes run podnet's nft masquerade (with notrack for the VXLAN UDP between nodes); \
     the flannel-style kernel-vxlan nodes run flanneld's --ip-masq rules (nat FLANNEL-POSTRTG, \
     filter FLANNEL-FWD), so conntrack runs on both (for the VXLAN UDP too on the flannel-style \
     nodes)",
    "podnet-bigtcp: podnet's pods with ipv4BigTcp (gso/gro_ipv4_max_size 196608 on both veth \
     ends); veth-bigtcp and bridge-bigtcp: the same sizes on every link of the reference",
    "kernel.bpf_stats_enabled is 0 during every traffic run, 1 only in the bpf_stats phase",
];

/// `{"machine": {...}, "results": [...]}`.
#[must_use]
pub fn json_report(figures: &[Figure], opts: &BenchOptions) -> Value {
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "machine": {"kernel": uname, "cpus": cpus, "cpu": cpu_model, "rounds": opts.rounds, "seconds_per_run": opts.seconds, "quick": opts.quick, "seed": opts.seed},
        "results": figures,
        "baseline_bin_dir": opts.baseline_bin_dir,
        "conditions": CONDITIONS,
        // podnet / podnet-baseline per round; see BaselineRatio.
        "baseline_ratios": baseline_ratios(figures),
        // Each target: per-round ratios, median, 95 % bootstrap CI, status.
        "targets": target_ratios(figures),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
    })
}

/// Bar charts of the main figures (throughput and p50 latency per scenario).
#[must_use]
#[allow(clippy::cast_precision_loss, reason = "a handful of bars")]
pub fn svg(figures: &[Figure]) -> String {
    let charts = [
        (
            "same-node",
            "tcp_throughput",
            "Same node: TCP throughput (Gbit/s)",
        ),
        (
            "same-node",
            "latency_p50",
            "Same node: latency p50 (us, one-way)",
        ),
        (
            "cross-node",
            "tcp_throughput",
            "Cross node: TCP throughput (Gbit/s)",
        ),
        (
            "cross-node",
            "latency_p50",
            "Cross node: latency p50 (us, one-way)",
        ),
    ];
    let (w, chart_h, bar_h) = (720.0, 150.0, 22.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        chart_h * charts.len() as f64 + 20.0
    );
    for (k, (scenario, metric, title)) in charts.iter().enumerate() {
        let y0 = 20.0 + chart_h * k as f64;
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{y0}\" font-weight=\"bold\">{title}</text>"
        );
        let bars: Vec<&Figure> = figures
            .iter()
            .filter(|f| f.scenario == *scenario && f.metric == *metric)
            .collect();
        let top = bars.iter().map(|f| f.max).fold(0.0_f64, f64::max).max(1e-9);
        for (i, f) in bars.iter().enumerate() {
            let y = y0 + 10.0 + i as f64 * (bar_h + 6.0);
            let len = (f.median / top) * (w - 380.0);
            let color = if f.dataplane.starts_with("podnet") {
                "#2b7bb9"
            } else {
                "#9a9a9a"
            };
            let _ = writeln!(
                out,
                "<text x=\"10\" y=\"{}\">{}</text>",
                y + 15.0,
                f.dataplane
            );
            let _ = writeln!(
                out,
                "<rect x=\"130\" y=\"{y}\" width=\"{len:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>"
            );
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\">{:.2} (min {:.2}, max {:.2})</text>",
                135.0 + len,
                y + 15.0,
                f.median,
                f.min,
                f.max
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// Writes `content` to `path`, creating its directory.
pub fn write(path: &Path, content: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_orders_each_a_permutation_and_they_vary() {
        let orders = |seed| {
            let mut rng = Rng::new(seed);
            (0..10)
                .map(|_| {
                    let mut o: Vec<usize> = (0..5).collect();
                    rng.shuffle(&mut o);
                    o
                })
                .collect::<Vec<_>>()
        };
        let a = orders(42);
        assert_eq!(a, orders(42), "replayable");
        for o in &a {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "{o:?} is a permutation");
        }
        let firsts: BTreeSet<usize> = a.iter().map(|o| o[0]).collect();
        assert!(firsts.len() > 1, "not always the same one first: {a:?}");
        assert_ne!(a, orders(43));
    }

    #[test]
    fn the_bootstrap_interval_of_a_known_sample() {
        // No spread: the interval is the point.
        let mut rng = Rng::new(1);
        assert_eq!(bootstrap_median_ci(&[1.2; 10], 1_000, &mut rng), (1.2, 1.2));
        // 1..=10 (median 5.5): resampled medians of 10 draws stay well
        // inside the extremes and around the median; seeded, so replayable.
        let sample: Vec<f64> = (1..=10).map(f64::from).collect();
        let (lo, hi) = bootstrap_median_ci(&sample, 10_000, &mut Rng::new(7));
        assert!((2.5..=4.5).contains(&lo), "lo {lo}");
        assert!((6.5..=8.5).contains(&hi), "hi {hi}");
        assert_eq!(
            (lo, hi),
            bootstrap_median_ci(&sample, 10_000, &mut Rng::new(7))
        );
        assert!(bootstrap_median_ci(&[], 10, &mut rng).0.is_nan());
    }

    #[test]
    fn a_target_counts_as_met_only_when_the_whole_interval_clears_it() {
        use Better::{Higher, Lower};
        assert_eq!(Status::of(Higher, 1.0, (1.01, 1.2)), Status::Met);
        assert_eq!(Status::of(Higher, 1.0, (0.98, 1.2)), Status::WithinNoise);
        assert_eq!(Status::of(Higher, 1.0, (0.8, 0.99)), Status::Missed);
        assert_eq!(Status::of(Lower, 0.9, (0.7, 0.89)), Status::Met);
        assert_eq!(Status::of(Lower, 0.9, (0.85, 0.95)), Status::WithinNoise);
        assert_eq!(Status::of(Lower, 0.9, (0.91, 1.0)), Status::Missed);
    }

    #[test]
    fn target_ratios_pair_round_i_with_round_i() {
        let figures = vec![
            figure(
                "same-node",
                "podnet",
                "tcp_throughput",
                "Gbit/s",
                vec![20.0, 10.0, 30.0],
            ),
            figure(
                "same-node",
                "veth",
                "tcp_throughput",
                "Gbit/s",
                vec![10.0, 10.0, 10.0],
            ),
        ];
        let ratios = target_ratios(&figures);
        assert_eq!(
            ratios.len(),
            1,
            "only the target with both figures: {ratios:?}"
        );
        assert_eq!(ratios[0].per_round, vec![2.0, 1.0, 3.0]);
        assert!((ratios[0].median - 2.0).abs() < 1e-12);
        let table = table(&figures);
        assert!(table.contains("AGAINST THE TARGETS"), "{table}");
    }
}
