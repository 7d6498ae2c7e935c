//! What the figures are judged against: the targets of issue 14 and the
//! baseline build, as per-round ratios with bootstrap intervals.

use serde::Serialize;

use super::{
    Figure,
    rounds::BASELINE_SUFFIX,
    scale,
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
