//! What podnet's programs cost per packet: BPF_PROG_TEST_RUN of each program
//! path on crafted frames, and the kernel's bpf_stats (run count and time
//! per program) around traffic runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Command,
};

use anyhow::Context as _;
use serde_json::Value;

use super::{Figure, figure, rounds::BASELINE_SUFFIX};

/// One loaded podnet program: name, run_cnt, run_time_ns.
type ProgStats = (String, u64, u64);

/// podnet's loaded programs by program ID, with run_cnt / run_time_ns
/// (needs kernel.bpf_stats_enabled). By ID, not by name: the baseline's
/// programs have the same names as this build's.
pub(super) fn bpf_stats() -> BTreeMap<u64, ProgStats> {
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
pub(super) fn bpf_program_ids() -> BTreeSet<u64> {
    bpf_stats().into_keys().collect()
}

/// Builds a fixture with the baseline binaries and returns it with the IDs
/// of the programs its agents loaded (those that appeared meanwhile: the
/// fixtures are built one after the other), so bpf_stats can tell its
/// programs from this build's.
pub(super) fn with_new_programs<T>(
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
pub(super) struct BpfStatsSwitch(Option<String>);

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsSwitch {
    pub(super) fn set(on: bool) -> anyhow::Result<Self> {
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

/// bpf_stats cost per run between `before` and `after`, per program name
/// (all of this build's programs of a name together, the baseline's apart).
pub(super) fn add_bpf_cost(
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
