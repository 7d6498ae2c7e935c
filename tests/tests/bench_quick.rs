//! `bench --quick` end to end: every scenario builds and measures (no
//! assertion on speed: timings on a shared machine are not test material).

use podnet_tests::{bench, privileged};

#[test]
fn every_benchmark_scenario_builds_and_measures() {
    if !privileged("every_benchmark_scenario_builds_and_measures") {
        return;
    }
    let figures = bench::run_all(&bench::BenchOptions::quick()).expect("bench --quick");
    for (scenario, dataplanes) in [
        (
            "same-node",
            &["podnet", "bridge", "bridge-nf-off", "ptp", "veth"][..],
        ),
        (
            "cross-node",
            &[
                "podnet-vxlan",
                "podnet-vxlan-kernel",
                "podnet-direct",
                "kernel-vxlan",
                "underlay",
            ][..],
        ),
        ("shaping", &["podnet", "podnet beside limited pods"][..]),
        ("cni", &["podnet", "bridge"][..]),
        (
            "scale",
            &[
                "podnetd idle",
                "podnet (scaled maps)",
                "podnetd holding the endpoints",
            ][..],
        ),
    ] {
        for dataplane in dataplanes {
            let ours: Vec<_> = figures
                .iter()
                .filter(|f| f.scenario == scenario && f.dataplane == *dataplane)
                .collect();
            assert!(!ours.is_empty(), "{scenario}/{dataplane} measured");
            for f in ours {
                assert!(
                    f.median.is_finite() && f.median > 0.0,
                    "{scenario}/{dataplane}/{}: {f:?}",
                    f.metric
                );
            }
        }
    }
    let bpf_costs: Vec<_> = figures
        .iter()
        .filter(|f| f.metric == "bpf_ns_per_packet")
        .collect();
    assert_eq!(
        bpf_costs.len(),
        7,
        "BPF cost of four program paths, the floor and the drop path with its event sent and \
         suppressed measured: {bpf_costs:?}"
    );
    assert!(
        bpf_costs
            .iter()
            .all(|f| f.median.is_finite() && f.median > 0.0),
        "{bpf_costs:?}"
    );
    let table = bench::table(&figures);
    assert!(table.contains("vs veth"), "{table}");
    let svg = bench::svg(&figures);
    assert!(svg.starts_with("<svg") && svg.contains("podnet"));
}
