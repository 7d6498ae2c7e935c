//! `bench --quick` end to end: every scenario builds and measures (no
//! assertion on speed: timings on a shared machine are not test material).

use podnet_tests::{
    bench::{
        self,
        scale::{ENDPOINTS_MANY, ENDPOINTS_ONE, TRIE_FULL, TRIE_ONE},
        services_scale::{CLUSTER_IP_BPF, KUBE_PROXY_IPTABLES, KUBE_PROXY_NFT},
    },
    privileged,
};

/// The conditions of the Services-at-scale part.
const SCALE_CONDITIONS: [&str; 3] = [CLUSTER_IP_BPF, KUBE_PROXY_IPTABLES, KUBE_PROXY_NFT];

/// The one value of a count figure of the scale part.
fn count(figures: &[bench::Figure], scenario: &str, dataplane: &str, metric: &str) -> f64 {
    figures
        .iter()
        .find(|f| f.scenario == scenario && f.dataplane == dataplane && f.metric == metric)
        .unwrap_or_else(|| panic!("{scenario}/{dataplane}/{metric} reported"))
        .median
}

#[test]
fn every_benchmark_scenario_builds_and_measures() {
    if !privileged("every_benchmark_scenario_builds_and_measures") {
        return;
    }
    let opts = bench::BenchOptions::quick();
    let figures = bench::run_all(&opts).expect("bench --quick");
    for (scenario, dataplanes) in [
        (
            "same-node",
            &[
                "podnet",
                "podnet-bigtcp",
                "bridge",
                "bridge-nf-off",
                "bridge-bigtcp",
                "ptp",
                "veth",
                "veth-bigtcp",
            ][..],
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
        ("scale-trie", &[TRIE_ONE, TRIE_FULL][..]),
        ("services-scale-cross-node-1", &SCALE_CONDITIONS[..]),
        ("services-scale-cross-node-50", &SCALE_CONDITIONS[..]),
        (
            "scale-endpoints",
            &[
                ENDPOINTS_ONE,
                ENDPOINTS_MANY,
                "podnetd idle",
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
    assert_scale_exercised(&figures, opts.seconds);
    // The Services reached both agents' maps through the datastore: 49
    // with a frontend each, the measured one with one per port.
    let frontends = count(
        &figures,
        "services-scale",
        "podnet, 50 Services",
        "svc_entries",
    );
    assert!((frontends - 52.0).abs() < 0.5, "frontends: {frontends}");
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
    let table = bench::table(&figures).expect("every target of the run computed");
    assert!(table.contains("vs veth"), "{table}");
    let svg = bench::svg(&figures);
    assert!(svg.starts_with("<svg") && svg.contains("podnet"));
}

/// The scale runs went where they claim (counters and the receiver's
/// notes, not speed).
fn assert_scale_exercised(figures: &[bench::Figure], seconds: u64) {
    #[allow(clippy::cast_precision_loss, reason = "a few seconds")]
    let seconds = seconds as f64;
    // The scale runs went where they claim: the trie was full and the
    // destination sat under a prefix of every length while node1 routed
    // the transfer (redirect_neigh: the path that looks the trie up)...
    let trie_entries = count(figures, "scale-trie", TRIE_FULL, "trie_entries");
    assert!(trie_entries >= 4_096.0, "trie entries: {trie_entries}");
    assert!(
        (count(figures, "scale-trie", TRIE_FULL, "prefixes_on_path") - 32.0).abs() < 0.5,
        "the destination under /1 .. /32"
    );
    let trie_packets = count(figures, "scale-trie", TRIE_FULL, "path_packets");
    assert!(
        trie_packets > 1_000.0,
        "packets routed through the full trie: {trie_packets}"
    );
    // ...and every one of the many endpoints received datagrams through
    // redirect_peer (each a lookup of another endpoint entry).
    let endpoints = count(
        figures,
        "scale-endpoints",
        ENDPOINTS_MANY,
        "endpoint_entries",
    );
    assert!(endpoints >= 512.0, "endpoints: {endpoints}");
    let reached = count(
        figures,
        "scale-endpoints",
        ENDPOINTS_MANY,
        "endpoints_reached",
    );
    assert!(
        (reached - endpoints).abs() < 0.5,
        "{reached} of {endpoints} endpoints received datagrams"
    );
    let received_kpps = figures
        .iter()
        .find(|f| {
            f.scenario == "scale-endpoints"
                && f.dataplane == ENDPOINTS_MANY
                && f.metric == "udp_kpps"
        })
        .map_or(0.0, |f| f.median);
    let peer_packets = count(figures, "scale-endpoints", ENDPOINTS_MANY, "path_packets");
    assert!(
        peer_packets >= received_kpps * 1e3 * seconds * 0.99,
        "redirect_peer moved {peer_packets}, {received_kpps} kpps received over {seconds} s"
    );
}
