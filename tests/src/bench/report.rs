//! How a run is reported: the table (figures, ratios to the peers, the
//! targets, the baseline), the JSON report and the SVG charts.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    BenchOptions, Figure, policy,
    stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, percentile},
    targets::{Better, baseline_ratios, find, paired_ratios, target_ratios},
};

/// The "against the targets" section of the table.
fn targets_table(figures: &[Figure]) -> anyhow::Result<String> {
    let mut out = String::new();
    let ratios = target_ratios(figures)?;
    if ratios.is_empty() {
        return Ok(out);
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
    Ok(out)
}

/// The baseline section of the table (empty without a baseline).
fn baseline_table(figures: &[Figure]) -> anyhow::Result<String> {
    let ratios = baseline_ratios(figures)?;
    let mut out = String::new();
    if ratios.is_empty() {
        return Ok(out);
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
    Ok(out)
}

/// The metrics of every traffic run, as the table compares them.
const TRAFFIC_METRICS: [&str; 5] = [
    "tcp_throughput",
    "cpu_s_per_gb",
    "latency_p50",
    "latency_p99",
    "conn_rate",
];

/// The metrics of the policy part's traffic runs.
const POLICY_METRICS: [&str; 3] = ["tcp_throughput", "latency_p50", "conn_rate"];

/// podnet against each peer in the table: scenario, podnet, peers, metrics.
const PEER_RATIOS: [(&str, &str, &[&str], &[&str]); 11] = [
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
    (
        "policy-same-node",
        policy::ALLOW_INGRESS,
        &[policy::NO_POLICY],
        &POLICY_METRICS,
    ),
    (
        "policy-same-node",
        policy::ALLOW_BOTH,
        &[policy::NO_POLICY],
        &POLICY_METRICS,
    ),
    (
        "policy-cross-node",
        policy::ALLOW_INGRESS,
        &[policy::NO_POLICY],
        &POLICY_METRICS,
    ),
    (
        "policy-cross-node",
        policy::ALLOW_BOTH,
        &[policy::NO_POLICY],
        &POLICY_METRICS,
    ),
    (
        "policy-rules",
        policy::RULES_1K,
        &[policy::RULES_10],
        &["latency_p50", "conn_rate"],
    ),
    (
        "policy-rules",
        policy::RULES_10K,
        &[policy::RULES_10],
        &["latency_p50", "conn_rate"],
    ),
];

/// The table: every figure, and podnet's ratios to each peer. Fails when a
/// target or a baseline ratio of the measured scenarios cannot be computed
/// ([`target_ratios`], [`baseline_ratios`]).
pub fn table(figures: &[Figure]) -> anyhow::Result<String> {
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
        let mut ratios = paired_ratios(beside, alone)?;
        ratios.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "  shaping     unlimited pod beside limited pods vs alone tcp_throughput {:>6.2}x (per round {:.2}..{:.2})",
            percentile(&ratios, 0.5),
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
        );
    }
    out.push_str(&targets_table(figures)?);
    out.push_str(&baseline_table(figures)?);
    Ok(out)
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

/// `{"machine": {...}, "results": [...]}`. Fails as [`table`] does.
pub fn json_report(figures: &[Figure], opts: &BenchOptions) -> anyhow::Result<Value> {
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
    Ok(json!({
        "machine": {"kernel": uname, "cpus": cpus, "cpu": cpu_model, "rounds": opts.rounds, "seconds_per_run": opts.seconds, "quick": opts.quick, "seed": opts.seed},
        "results": figures,
        "baseline_bin_dir": opts.baseline_bin_dir,
        "conditions": CONDITIONS,
        // podnet / podnet-baseline per round; see BaselineRatio.
        "baseline_ratios": baseline_ratios(figures)?,
        // Each target: per-round ratios, median, 95 % bootstrap CI, status.
        "targets": target_ratios(figures)?,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
    }))
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
