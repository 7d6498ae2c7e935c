//! The short version of the cluster scale run (`cargo xtask bench -- --only
//! cluster-scale` runs the 5,000 nodes): 300 simulated nodes with
//! 5 pods each, 300 Services and 20 NetworkPolicies in a 3-member etcd,
//! three real agents beside them, churned (pods 100/s, a node restart every
//! 2 s, 10 EndpointSlice changes/s). Every agent holds the whole simulated
//! cluster, every change timed reaches every agent, a restarted agent
//! catches up without dropping a pod's identity meanwhile, and the real
//! pods lose no ping during the churn.
//!
//! Tests print `FIGURE` lines with what they measured.

use std::time::Duration;

use podnet_common::names::{MAP_IDENTITIES, MAP_REMOTE, MAP_SERVICES};
use podnet_tests::{
    bench::{
        cluster_scale::{REAL_NODES, run},
        stats::percentile,
    },
    privileged,
    sim_cluster::SimSpec,
};

#[test]
fn a_simulated_cluster_reaches_every_real_agent_under_churn() {
    if !privileged("a_simulated_cluster_reaches_every_real_agent_under_churn") {
        return;
    }
    let spec = SimSpec::short();
    let report = run(spec, Duration::from_secs(15), 3).expect("scale run");

    let entries = |name: &str| {
        report
            .fills
            .iter()
            .find(|f| f.name == name)
            .map_or(0, |f| usize::try_from(f.entries).unwrap_or(0))
    };
    // The real pods, nodes and probes come on top of the simulated ones.
    assert!(entries(MAP_IDENTITIES) >= spec.pods(), "{:?}", report.fills);
    assert!(entries(MAP_REMOTE) >= spec.nodes, "{:?}", report.fills);
    assert!(entries(MAP_SERVICES) >= spec.services, "{:?}", report.fills);
    for kind in ["node join", "pod add", "service add"] {
        let times = &report.propagation[kind];
        assert_eq!(times.len(), 3 * REAL_NODES, "{kind}: {times:?}");
        eprintln!(
            "FIGURE cluster scale (short): {kind} reached every agent p50 {:.0} ms, max {:.0} ms",
            percentile(times, 0.5),
            percentile(times, 1.0)
        );
    }
    // Before the agent waited for the nodes, a restarted agent's first
    // policy sync dropped the pods of nodes it did not know yet.
    assert!(
        usize::try_from(report.restart_fewest_identities).unwrap_or(0) >= spec.pods(),
        "the restarted agent's identity map fell to {} (the cluster has {} pods)",
        report.restart_fewest_identities,
        spec.pods()
    );
    let churn = &report.churn;
    assert!(
        churn.pods_replaced > 0 && churn.nodes_restarted > 0 && churn.slices_changed > 0,
        "{churn:?}"
    );
    assert_eq!(churn.errors, 0, "{churn:?}");
    let (sent, lost) = report.pings;
    assert!(
        sent > 0 && lost == 0,
        "real pods' pings during churn: {lost} of {sent} lost"
    );
    assert!(report.etcd_watchers > 0.0, "no watchers counted");
    eprintln!(
        "FIGURE cluster scale (short): loaded in {:.1} s, agents converged {:.1} s later, restarted agent caught up in {:.2} s; agent RSS {:.0} MiB; churn {churn:?}; {sent} pings, none lost",
        report.load.nodes_s + report.load.pods_s + report.load.services_s + report.load.policies_s,
        report.converge_s,
        report.restart_converge_s,
        report.churning.iter().map(|u| u.0).fold(0.0, f64::max),
    );
}
