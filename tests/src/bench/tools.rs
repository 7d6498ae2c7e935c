//! The traffic tools a measurement runs between two namespaces (iperf3,
//! sockperf, an in-process connection-rate loop) and what is read from
//! /proc around them, with the parsing of their output kept apart so that it
//! is tested without root.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    lab::{LabLayout, LabPod},
    netns::{command_in, run_in},
};

/// Two namespaces that can talk: what every dataplane boils down to.
#[derive(Debug, Clone)]
pub struct Pair {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
    /// Where the client connects when not straight to the server's own
    /// ports (5201, 11111, 19000).
    pub dial: Option<Dial>,
}

/// Another way to the server: an address (a Service's ClusterIP whose
/// ports map 1:1 onto the server's) and a shift of every port, on both
/// sides. Conditions compared on one server use ports of their own: a
/// client's connections to a ClusterIP and to the pod behind it have
/// TCP timestamps of unrelated offsets (the kernel derives them from the
/// destination address), so one reusing the 4-tuple a closed one left in
/// the server's TIME_WAIT would have its SYN refused and wait a second.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub address: Ipv4Addr,
    pub port_shift: u16,
}

impl Pair {
    /// What the client connects to.
    #[must_use]
    pub fn dial_ip(&self) -> Ipv4Addr {
        self.dial.map_or(self.server_ip, |d| d.address)
    }

    /// The port a tool uses for `base`, on both sides.
    #[must_use]
    pub fn port(&self, base: u16) -> u16 {
        base + self.dial.map_or(0, |d| d.port_shift)
    }
}

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
    busy_cpu_seconds_in(&stat)
}

/// [`busy_cpu_seconds`] from the text of /proc/stat.
fn busy_cpu_seconds_in(stat: &str) -> anyhow::Result<f64> {
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
        .args([
            "-s",
            "-1",
            "-B",
            &pair.server_ip.to_string(),
            "-p",
            &pair.port(5201).to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = busy_cpu_seconds();
    let out = command_in(&pair.client_ns, "iperf3")?
        .args([
            "-c",
            &pair.dial_ip().to_string(),
            "-p",
            &pair.port(5201).to_string(),
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
    let (gbps, bytes) = iperf3_figures(&out?.stdout)?;
    let cpu_s_per_gb = (cpu_after? - cpu_before?) / (bytes / 1e9);
    Ok((gbps, cpu_s_per_gb))
}

/// What an iperf3 client's JSON report (`-J`) says: the received throughput
/// in Gbit/s and the bytes of every interval (the omitted ones included).
/// Fails when there is no throughput (iperf3's `error` says why) or no byte
/// moved.
fn iperf3_figures(report: &[u8]) -> anyhow::Result<(f64, f64)> {
    let json: Value = serde_json::from_slice(report).context("iperf3 JSON")?;
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
    Ok((gbps, bytes))
}

/// sockperf TCP ping-pong latency (one-way, as sockperf reports: half the
/// round trip), p50 and p99 in microseconds.
pub fn latency(pair: &Pair, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let ip = pair.server_ip.to_string();
    let mut server = command_in(&pair.server_ns, "sockperf")?
        .args([
            "server",
            "--tcp",
            "-i",
            &ip,
            "-p",
            &pair.port(11_111).to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("sockperf server")?;
    std::thread::sleep(Duration::from_millis(300));
    let dial = pair.dial_ip().to_string();
    let out = command_in(&pair.client_ns, "sockperf")?
        .args([
            "ping-pong",
            "--tcp",
            "-i",
            &dial,
            "-p",
            &pair.port(11_111).to_string(),
            "-t",
            &seconds.to_string(),
        ])
        .output()
        .context("sockperf client")?;
    let _ = server.kill();
    let _ = server.wait();
    sockperf_p50_p99(&String::from_utf8_lossy(&out.stdout))
}

/// p50 and p99 (µs) from a sockperf ping-pong client's output (its
/// `---> percentile 50.000 =    12.345` lines).
fn sockperf_p50_p99(text: &str) -> anyhow::Result<(f64, f64)> {
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
    let addr = SocketAddrV4::new(pair.server_ip, pair.port(19_000));
    let dial = SocketAddrV4::new(pair.dial_ip(), pair.port(19_000));
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
            let mut s = TcpStream::connect_timeout(&dial.into(), Duration::from_secs(2))?;
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

/// Resident memory of a process, KiB.
#[must_use]
pub fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_rss_kib(&status)
}

/// `VmRSS` (KiB) from the text of /proc/PID/status.
fn vm_rss_kib(status: &str) -> Option<f64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs of the paired parts (policy, Services), keyed (scenario,
/// dataplane, metric): one value per round.
pub type PairRuns<'a> = std::collections::BTreeMap<(&'a str, &'a str, &'static str), Vec<f64>>;

/// Measures `pair` the way the paired parts compare conditions: single-
/// stream TCP throughput over `tput_seconds`, p50 latency and connection
/// rate over `seconds` each; adds them to `runs` under (`scenario`,
/// `dataplane`).
pub fn measure_pair<'a>(
    pair: &Pair,
    (tput_seconds, seconds): (u64, u64),
    (scenario, dataplane): (&'a str, &'a str),
    runs: &mut PairRuns<'a>,
) -> anyhow::Result<()> {
    let gbps = throughput(pair, tput_seconds)
        .with_context(|| format!("{scenario} {dataplane} throughput"))?;
    let (p50, _) =
        latency(pair, seconds).with_context(|| format!("{scenario} {dataplane} latency"))?;
    let rate = connection_rate(pair, seconds)
        .with_context(|| format!("{scenario} {dataplane} connection rate"))?;
    for (metric, v) in [
        ("tcp_throughput", gbps),
        ("latency_p50", p50),
        ("conn_rate", rate),
    ] {
        runs.entry((scenario, dataplane, metric))
            .or_default()
            .push(v);
    }
    Ok(())
}

/// The figures of [`measure_pair`]'s runs.
pub fn pair_figures(runs: PairRuns<'_>, figures: &mut Vec<super::Figure>) {
    for ((scenario, name, metric), values) in runs {
        let unit = match metric {
            "tcp_throughput" => "Gbit/s",
            "conn_rate" => "conn/s",
            _ => "us",
        };
        figures.push(super::figure(scenario, name, metric, unit, values));
    }
}

/// A two-node lab's pods by role: the server and a client on node2, a
/// client on node1 (the parts that measure one server from both nodes).
pub struct Roles<'a> {
    pub server: &'a LabPod,
    pub client_same: &'a LabPod,
    pub client_cross: &'a LabPod,
}

impl<'a> Roles<'a> {
    /// The roles in `layout`: node2's first two pods, node1's first.
    pub fn of(layout: &'a LabLayout) -> anyhow::Result<Self> {
        anyhow::ensure!(layout.nodes.len() >= 2, "the part needs two nodes");
        let (node1, node2) = (&layout.nodes[0].name, &layout.nodes[1].name);
        let mut two = layout.pods.iter().filter(|p| &p.node == node2);
        Ok(Self {
            server: two.next().context("node2's first pod")?,
            client_same: two.next().context("node2's second pod")?,
            client_cross: layout
                .pods
                .iter()
                .find(|p| &p.node == node1)
                .context("node1's pod")?,
        })
    }

    /// `client` measured against the server, dialling `dial` (or the
    /// server itself).
    #[must_use]
    pub fn pair(&self, client: &LabPod, dial: Option<Dial>) -> Pair {
        Pair {
            client_ns: client.netns.clone(),
            server_ns: self.server.netns.clone(),
            server_ip: self.server.ip,
            dial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_cpu_time_is_user_system_irq_softirq_in_user_hz() {
        let stat = "cpu  100 7 50 9000 30 5 15 0 0 0\ncpu0 50 3 25 4500 15 2 7 0 0 0\n";
        // user 100 + system 50 + irq 5 + softirq 15 ticks; nice, idle and
        // iowait left out.
        assert!((busy_cpu_seconds_in(stat).expect("parses") - 1.7).abs() < 1e-12);
        assert!(
            busy_cpu_seconds_in("cpu0 1 2 3 4 5 6 7\n").is_err(),
            "no total line"
        );
        assert!(
            busy_cpu_seconds_in("cpu  1 2 3\n").is_err(),
            "too few fields"
        );
        assert!(busy_cpu_seconds_in("cpu  1 x 3 4 5 6 7\n").is_err());
    }

    #[test]
    fn iperf3_report_gives_received_throughput_and_every_intervals_bytes() {
        let report = br#"{
            "intervals": [{"sum": {"bytes": 1.0e9}}, {"sum": {"bytes": 2.5e9}}],
            "end": {"sum_received": {"bits_per_second": 2.0e10}}
        }"#;
        assert_eq!(iperf3_figures(report).expect("parses"), (20.0, 3.5e9));
        let failed = br#"{"error": "unable to connect to server", "end": {}}"#;
        let e = iperf3_figures(failed).expect_err("no throughput");
        assert!(e.to_string().contains("unable to connect"), "{e}");
        let idle = br#"{"intervals": [], "end": {"sum_received": {"bits_per_second": 1.0}}}"#;
        assert!(iperf3_figures(idle).is_err(), "no byte moved");
        assert!(iperf3_figures(b"iperf3: error").is_err(), "not JSON");
    }

    #[test]
    fn sockperf_percentiles_are_read_from_their_lines() {
        let text = "sockperf: ====> avg-latency=13.077 (std-dev=2.1)\n\
                    sockperf: ---> percentile 99.000 =   25.110\n\
                    sockperf: ---> percentile 50.000 =   12.515\n";
        assert_eq!(sockperf_p50_p99(text).expect("parses"), (12.515, 25.110));
        assert!(sockperf_p50_p99("sockperf: ---> percentile 50.000 = 1.0\n").is_err());
        assert!(sockperf_p50_p99("").is_err());
    }

    #[test]
    fn resident_memory_is_read_from_vm_rss() {
        let status = "Name:\tpodnetd\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(vm_rss_kib(status), Some(12_345.0));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
    }
}
