//! The run: each part (same node, shaping, CNI, scale, cross node, BPF) builds
//! its dataplanes and measures them in interleaved rounds, the order drawn
//! afresh every round.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use serde_json::json;

use super::{
    BenchOptions, Figure,
    bpf_cost::{BpfStatsSwitch, add_bpf_cost, bpf_cost_test_run, bpf_stats, with_new_programs},
    figure, policy, scale, services, services_scale,
    stats::{Rng, percentile},
    targets::{baseline_ratios, target_ratios},
    tools::{Pair, connection_rate, latency, throughput, throughput_and_cpu},
    topology::{
        FlannelCluster, ReferenceNode, VethPair, podnet_add_del, podnet_cluster,
        podnet_cluster_with,
    },
};
use crate::node::Node;

pub(super) fn progress(msg: &str) {
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
        dial: None,
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
                dial: None,
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
                dial: None,
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
        dial: None,
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

    if opts.runs("policy") {
        policy::measure(opts, &mut figures)?;
    }

    if opts.runs("services") {
        services::measure(opts, &mut figures)?;
    }

    if opts.runs("services-scale") {
        services_scale::measure(opts, &mut figures)?;
    }

    if opts.runs("bpf") {
        progress("BPF cost per run of each program path (BPF_PROG_TEST_RUN)");
        let runs = if opts.quick { 10_000 } else { 1_000_000 };
        for (path, ns) in bpf_cost_test_run(runs)? {
            figures.push(figure("bpf", &path, "bpf_ns_per_packet", "ns", vec![ns]));
        }
    }
    // Every target and baseline ratio of what ran must be computable: a
    // figure a target needs that is missing, or rounds that cannot be paired,
    // fail the run here rather than drop out of the report.
    target_ratios(&figures)?;
    baseline_ratios(&figures)?;
    Ok(figures)
}
