//! `cargo xtask bench`: podnet against the real alternatives, measured in one
//! run on this machine, rounds interleaved, the dataplanes in a fresh random
//! order every round (seeded; the seed is printed and `--seed` replays it), so
//! that drift and position hit every dataplane alike. Every figure is reported
//! as median/min/max over the rounds, and podnet's as ratios to its peers.

pub mod bpf_cost;
pub mod policy;
pub mod report;
pub mod rounds;
pub mod scale;
pub mod services;
pub mod services_scale;
pub mod stats;
pub mod targets;
pub mod tools;
pub mod topology;

use std::path::PathBuf;

use serde::Serialize;

// The bench's public paths as they were before the split (`bench::run_all`,
// `bench::table`, ...), for the binary, xtask and the tests.
pub use bpf_cost::bpf_cost_test_run;
pub use report::{CONDITIONS, json_report, svg, table, write};
pub use rounds::{BASELINE_SUFFIX, run_all};
pub use stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Rng, bootstrap_median_ci, clock_seed};
pub use targets::{
    BaselineRatio, Better, Status, TARGETS, Target, TargetRatio, baseline_ratios, target_ratios,
};
pub use tools::{Pair, connection_rate, latency, rss_kib, throughput, throughput_and_cpu};
pub use topology::{
    FlannelCluster, ReferenceNode, VethPair, podnet_add_del, podnet_cluster, podnet_cluster_with,
    podnet_lab, set_ipv4_big_tcp,
};

use stats::median;

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

/// The parts of a run, in the order they run.
pub const PARTS: [&str; 9] = [
    "same-node",
    "shaping",
    "cni",
    "scale",
    "cross-node",
    "policy",
    "services",
    "services-scale",
    "bpf",
];

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

/// A figure from its runs (one per round): median, min and max.
pub(crate) fn figure(
    scenario: &str,
    dataplane: &str,
    metric: &str,
    unit: &str,
    runs: Vec<f64>,
) -> Figure {
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

impl BenchOptions {
    /// The generator of one part of the run: its own stream, from the seed.
    pub(crate) fn rng(&self, part: &str) -> Rng {
        let mut h = self.seed;
        for b in part.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
        Rng::new(h)
    }

    /// Whether the run includes `part` (see [`PARTS`]).
    pub(crate) fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}
