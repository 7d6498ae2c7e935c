//! What the figures are judged against: the targets of issue 14 and the
//! baseline build, as per-round ratios with bootstrap intervals.

use anyhow::Context as _;
use serde::Serialize;

use super::{
    Figure, policy,
    rounds::BASELINE_SUFFIX,
    scale, services, services_scale,
    stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Rng, bootstrap_median_ci, median},
};

pub(super) fn find<'a>(
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

/// `ours` / `peer` round by round: round i of the one over round i of the
/// other. Fails unless both have the same number of rounds (at least one)
/// and every ratio is a number: a pairing that cannot be made is an error,
/// never a shorter list.
pub fn paired_ratios(ours: &Figure, peer: &Figure) -> anyhow::Result<Vec<f64>> {
    let name = |f: &Figure| format!("{}/{}/{}", f.scenario, f.dataplane, f.metric);
    anyhow::ensure!(
        ours.runs.len() == peer.runs.len(),
        "{} has {} round(s), {} has {}: the rounds cannot be paired",
        name(ours),
        ours.runs.len(),
        name(peer),
        peer.runs.len()
    );
    anyhow::ensure!(!ours.runs.is_empty(), "{} has no rounds", name(ours));
    let per_round: Vec<f64> = ours
        .runs
        .iter()
        .zip(&peer.runs)
        .map(|(a, b)| a / b)
        .collect();
    anyhow::ensure!(
        per_round.iter().all(|r| r.is_finite()),
        "{} / {} per round is not a number: {:?} / {:?}",
        name(ours),
        name(peer),
        ours.runs,
        peer.runs
    );
    Ok(per_round)
}

/// The figure of `scenario`/`dataplane`/`metric`, or an error naming it.
fn required<'a>(
    figures: &'a [Figure],
    scenario: &str,
    dataplane: &str,
    metric: &str,
) -> anyhow::Result<&'a Figure> {
    find(figures, scenario, dataplane, metric)
        .with_context(|| format!("no figure {scenario}/{dataplane}/{metric}"))
}

/// Every dataplane `X-baseline` against `X`, per metric, from the rounds'
/// raw figures. Fails when `X` has no figure of a metric its baseline has, or
/// the two cannot be paired round by round ([`paired_ratios`]).
pub fn baseline_ratios(figures: &[Figure]) -> anyhow::Result<Vec<BaselineRatio>> {
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    let mut ratios = Vec::new();
    for base in figures {
        let Some(ours) = base.dataplane.strip_suffix(BASELINE_SUFFIX) else {
            continue;
        };
        let Some(&(_, better)) = BASELINE_METRICS.iter().find(|(m, _)| *m == base.metric) else {
            continue;
        };
        let f = required(figures, &base.scenario, ours, &base.metric)
            .with_context(|| format!("comparing {} with its baseline", base.dataplane))?;
        let per_round = paired_ratios(f, base)?;
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
    Ok(ratios)
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
pub const TARGETS: [Target; 47] = [
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
    // NetworkPolicy: an allowed pod against the same pod with no policy
    // (throughput and p50 latency within 3 %, connection rate within 10 %),
    // and the cost with 1,000 and 10,000 rules against 10 (within 5 %).
    target("policy-same-node", policy::ALLOW_INGRESS, ("policy-same-node", policy::NO_POLICY), "tcp_throughput", Better::Higher, 0.97),
    target("policy-same-node", policy::ALLOW_INGRESS, ("policy-same-node", policy::NO_POLICY), "latency_p50", Better::Lower, 1.03),
    target("policy-same-node", policy::ALLOW_INGRESS, ("policy-same-node", policy::NO_POLICY), "conn_rate", Better::Higher, 0.90),
    target("policy-same-node", policy::ALLOW_BOTH, ("policy-same-node", policy::NO_POLICY), "tcp_throughput", Better::Higher, 0.97),
    target("policy-same-node", policy::ALLOW_BOTH, ("policy-same-node", policy::NO_POLICY), "latency_p50", Better::Lower, 1.03),
    target("policy-same-node", policy::ALLOW_BOTH, ("policy-same-node", policy::NO_POLICY), "conn_rate", Better::Higher, 0.90),
    target("policy-cross-node", policy::ALLOW_INGRESS, ("policy-cross-node", policy::NO_POLICY), "tcp_throughput", Better::Higher, 0.97),
    target("policy-cross-node", policy::ALLOW_INGRESS, ("policy-cross-node", policy::NO_POLICY), "latency_p50", Better::Lower, 1.03),
    target("policy-cross-node", policy::ALLOW_INGRESS, ("policy-cross-node", policy::NO_POLICY), "conn_rate", Better::Higher, 0.90),
    target("policy-cross-node", policy::ALLOW_BOTH, ("policy-cross-node", policy::NO_POLICY), "tcp_throughput", Better::Higher, 0.97),
    target("policy-cross-node", policy::ALLOW_BOTH, ("policy-cross-node", policy::NO_POLICY), "latency_p50", Better::Lower, 1.03),
    target("policy-cross-node", policy::ALLOW_BOTH, ("policy-cross-node", policy::NO_POLICY), "conn_rate", Better::Higher, 0.90),
    target("policy-rules", policy::RULES_1K, ("policy-rules", policy::RULES_10), "conn_rate", Better::Higher, 0.95),
    target("policy-rules", policy::RULES_1K, ("policy-rules", policy::RULES_10), "latency_p50", Better::Lower, 1.05),
    target("policy-rules", policy::RULES_10K, ("policy-rules", policy::RULES_10), "conn_rate", Better::Higher, 0.95),
    target("policy-rules", policy::RULES_10K, ("policy-rules", policy::RULES_10), "latency_p50", Better::Lower, 1.05),
    // Services in the datapath (issue 24): a ClusterIP podnet translates
    // against the pod IP behind it, and against a DNAT in the stack.
    target("services-same-node", services::CLUSTER_IP_BPF, ("services-same-node", services::POD_IP), "tcp_throughput", Better::Higher, 0.97),
    target("services-same-node", services::CLUSTER_IP_BPF, ("services-same-node", services::POD_IP), "latency_p50", Better::Lower, 1.03),
    target("services-same-node", services::CLUSTER_IP_BPF, ("services-same-node", services::POD_IP), "conn_rate", Better::Higher, 0.95),
    target("services-cross-node", services::CLUSTER_IP_BPF, ("services-cross-node", services::POD_IP), "tcp_throughput", Better::Higher, 0.97),
    target("services-cross-node", services::CLUSTER_IP_BPF, ("services-cross-node", services::POD_IP), "latency_p50", Better::Lower, 1.03),
    target("services-cross-node", services::CLUSTER_IP_BPF, ("services-cross-node", services::POD_IP), "conn_rate", Better::Higher, 0.95),
    target("services-same-node", services::CLUSTER_IP_BPF, ("services-same-node", services::CLUSTER_IP_NFT), "conn_rate", Better::Higher, 1.0),
    target("services-cross-node", services::CLUSTER_IP_BPF, ("services-cross-node", services::CLUSTER_IP_NFT), "conn_rate", Better::Higher, 1.0),
    // Services at scale (issue 24): podnet's cost with 10,000 Services
    // against 1 (flat: within 5 %), and its connection rate against
    // kube-proxy's iptables mode at 10,000 (at least 1.3x).
    target(services_scale::SAME_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::SAME_NODE_1, services_scale::CLUSTER_IP_BPF), "conn_rate", Better::Higher, 0.95),
    target(services_scale::SAME_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::SAME_NODE_1, services_scale::CLUSTER_IP_BPF), "latency_p50", Better::Lower, 1.05),
    target(services_scale::SAME_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::SAME_NODE_1, services_scale::CLUSTER_IP_BPF), "tcp_throughput", Better::Higher, 0.95),
    target(services_scale::CROSS_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::CROSS_NODE_1, services_scale::CLUSTER_IP_BPF), "conn_rate", Better::Higher, 0.95),
    target(services_scale::CROSS_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::CROSS_NODE_1, services_scale::CLUSTER_IP_BPF), "latency_p50", Better::Lower, 1.05),
    target(services_scale::CROSS_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::CROSS_NODE_1, services_scale::CLUSTER_IP_BPF), "tcp_throughput", Better::Higher, 0.95),
    target(services_scale::SAME_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::SAME_NODE_10K, services_scale::KUBE_PROXY_IPTABLES), "conn_rate", Better::Higher, 1.3),
    target(services_scale::CROSS_NODE_10K, services_scale::CLUSTER_IP_BPF, (services_scale::CROSS_NODE_10K, services_scale::KUBE_PROXY_IPTABLES), "conn_rate", Better::Higher, 1.3),
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

    pub(super) fn name(self) -> &'static str {
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

/// Every target of the scenarios the run measured, with its interval. A
/// target one of whose two scenarios was left out of the run (`--only`,
/// or a size `--quick` does not measure) is not reported; one whose
/// scenarios were measured but that lacks one of its two
/// figures, or whose figures cannot be paired round by round
/// ([`paired_ratios`]), cannot be computed: an error naming it.
pub fn target_ratios(figures: &[Figure]) -> anyhow::Result<Vec<TargetRatio>> {
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    let measured = |scenario: &str| figures.iter().any(|f| f.scenario == scenario);
    TARGETS
        .iter()
        .filter(|t| measured(t.scenario) && measured(t.peer.0))
        .map(|t| {
            let what = || {
                format!(
                    "target {}/{} vs {}/{} {}",
                    t.scenario, t.ours, t.peer.0, t.peer.1, t.metric
                )
            };
            let ours = required(figures, t.scenario, t.ours, t.metric).with_context(what)?;
            let peer = required(figures, t.peer.0, t.peer.1, t.metric).with_context(what)?;
            let per_round = paired_ratios(ours, peer).with_context(what)?;
            let ci95 = bootstrap_median_ci(&per_round, BOOTSTRAP_RESAMPLES, &mut rng);
            Ok(TargetRatio {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{figure, report::table};

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

    /// Every figure the targets compare, each with `runs`.
    fn every_target_figure(runs: &[f64]) -> Vec<Figure> {
        let mut figures: Vec<Figure> = Vec::new();
        for t in &TARGETS {
            for (scenario, dataplane) in [(t.scenario, t.ours), t.peer] {
                if find(&figures, scenario, dataplane, t.metric).is_none() {
                    figures.push(figure(scenario, dataplane, t.metric, "x", runs.to_vec()));
                }
            }
        }
        figures
    }

    fn set_runs(figures: &mut [Figure], dataplane: &str, metric: &str, runs: Vec<f64>) {
        let f = figures
            .iter_mut()
            .find(|f| f.scenario == "same-node" && f.dataplane == dataplane && f.metric == metric)
            .expect("the figure is there");
        *f = figure("same-node", dataplane, metric, "x", runs);
    }

    #[test]
    fn target_ratios_pair_round_i_with_round_i() {
        let mut figures = every_target_figure(&[10.0, 10.0, 10.0]);
        set_runs(
            &mut figures,
            "podnet",
            "tcp_throughput",
            vec![20.0, 10.0, 30.0],
        );
        let ratios = target_ratios(&figures).expect("every target computed");
        assert_eq!(ratios.len(), TARGETS.len());
        let vs_veth = ratios
            .iter()
            .find(|r| r.dataplane == "podnet" && r.peer == "veth")
            .expect("podnet vs veth");
        assert_eq!(vs_veth.per_round, vec![2.0, 1.0, 3.0]);
        assert!((vs_veth.median - 2.0).abs() < 1e-12);
        let table = table(&figures).expect("table");
        assert!(table.contains("AGAINST THE TARGETS"), "{table}");
    }

    #[test]
    fn a_target_of_a_measured_scenario_without_its_figure_is_an_error() {
        let mut figures = every_target_figure(&[1.0, 1.0]);
        figures.retain(|f| f.dataplane != "bridge-nf-off");
        let e = target_ratios(&figures).expect_err("bridge-nf-off is missing");
        let message = format!("{e:#}");
        assert!(
            message.contains("same-node/bridge-nf-off/tcp_throughput"),
            "{message}"
        );
        assert!(table(&figures).is_err(), "the report fails too");
    }

    #[test]
    fn unequal_rounds_are_an_error_not_a_shorter_pairing() {
        let mut figures = every_target_figure(&[1.0, 1.0, 1.0]);
        set_runs(&mut figures, "veth", "tcp_throughput", vec![1.0, 1.0]);
        let e = target_ratios(&figures).expect_err("3 rounds against 2");
        assert!(format!("{e:#}").contains("cannot be paired"), "{e:#}");
        let mut figures = every_target_figure(&[1.0]);
        set_runs(&mut figures, "bridge", "conn_rate", vec![0.0]);
        assert!(target_ratios(&figures).is_err(), "a ratio over zero");
    }

    #[test]
    fn targets_of_scenarios_left_out_of_the_run_are_not_reported() {
        let figures: Vec<Figure> = every_target_figure(&[1.0])
            .into_iter()
            .filter(|f| f.scenario == "cross-node")
            .collect();
        let ratios = target_ratios(&figures).expect("the cross-node targets");
        assert!(!ratios.is_empty());
        assert!(
            ratios.iter().all(|r| r.scenario == "cross-node"),
            "{ratios:?}"
        );
        assert!(target_ratios(&[]).expect("nothing ran").is_empty());
    }

    #[test]
    fn a_baseline_needs_its_build_and_as_many_rounds() {
        let podnet = figure("same-node", "podnet", "tcp_throughput", "x", vec![2.0, 3.0]);
        let baseline = figure(
            "same-node",
            "podnet-baseline",
            "tcp_throughput",
            "x",
            vec![1.0, 2.0],
        );
        let ratios = baseline_ratios(&[podnet, baseline.clone()]).expect("paired");
        assert_eq!(ratios.len(), 1);
        assert_eq!(ratios[0].per_round, vec![2.0, 1.5]);
        assert!(
            baseline_ratios(std::slice::from_ref(&baseline)).is_err(),
            "podnet missing"
        );
        let short = figure("same-node", "podnet", "tcp_throughput", "x", vec![2.0]);
        assert!(
            baseline_ratios(&[short, baseline]).is_err(),
            "2 rounds against 1"
        );
    }
}
