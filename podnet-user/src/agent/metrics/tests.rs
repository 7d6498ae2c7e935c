use super::*;

fn exposition(f: impl Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static) -> String {
    struct Fixed<F>(F);
    impl<F> fmt::Debug for Fixed<F> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Fixed")
        }
    }
    impl<F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static> Collector for Fixed<F> {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            (self.0)(&mut encoder)
        }
    }
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Fixed(f)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text
}

#[test]
fn cni_operations_are_exposed_by_verb_and_result_with_latency() {
    let ops = CniOps::default();
    let metrics = AgentMetrics::new(
        &AgentInfo {
            version: "1.2.3".into(),
            mode: "vxlan".into(),
            node: "n1".into(),
            datastore: "etcd".into(),
        },
        &ops,
    );
    let owner = Owner {
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    let subject = OpSubject {
        owner: Some(owner),
        network: Some("podnet".into()),
    };
    ops.record(CniOp::Add, &subject, None, Duration::from_millis(3));
    ops.record(CniOp::Add, &subject, None, Duration::from_millis(5));
    ops.record(
        CniOp::Del,
        &subject,
        Some("refused"),
        Duration::from_millis(1),
    );
    let text = metrics.encode().expect("encode");
    for line in [
        "# TYPE podnet_cni_operations counter",
        "podnet_cni_operations_total{verb=\"add\",result=\"ok\"} 2",
        "podnet_cni_operations_total{verb=\"add\",result=\"error\"} 0",
        "podnet_cni_operations_total{verb=\"del\",result=\"error\"} 1",
        "podnet_cni_operations_total{verb=\"gc\",result=\"ok\"} 0",
        "# TYPE podnet_cni_operation_duration_seconds histogram",
        "# UNIT podnet_cni_operation_duration_seconds seconds",
        "podnet_cni_operation_duration_seconds_count{verb=\"add\"} 2",
        "podnet_cni_operation_duration_seconds_bucket{le=\"0.004\",verb=\"add\"} 1",
        "podnet_cni_operation_duration_seconds_bucket{le=\"0.008\",verb=\"add\"} 2",
        "podnet_agent_info{version=\"1.2.3\",mode=\"vxlan\",node=\"n1\",datastore=\"etcd\"} 1",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    // Not attached yet: no datapath metrics, and not ready.
    assert!(!text.contains("podnet_datapath_"), "{text}");
    assert!(metrics.readiness().unwrap_err().starts_with("starting"));
}

#[test]
fn datapath_and_agent_state_are_exposed_with_their_labels() {
    let mut c = Counters::default();
    c.verdicts.insert("redirect_peer", 42);
    c.drops.insert("spoofed_source_ip", 7);
    let ep = Endpoint {
        owner: Owner {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        },
        network: "podnet".into(),
        netns: "/var/run/netns/x".into(),
        ip: "10.244.0.5".parse().expect("ip"),
        host_ifname: "pn0123456789ab".into(),
        host_ifindex: 9,
        pod_mac: [2, 0, 0, 0, 0, 1],
        host_mac: [2, 0, 0, 0, 0, 2],
        bandwidth: None,
        pod: None,
    };
    let stats = HashMap::from([(
        9,
        podnet_common::EndpointStats {
            packets: 10,
            bytes: 980,
        },
    )]);
    let datastore = DatastoreStatus {
        backend: "etcd".into(),
        connected: true,
        last_sync_ms: Some(1_000_000),
        ..DatastoreStatus::default()
    };
    let fill = vec![MapFill {
        name: "podnet_endpts",
        entries: 1,
        max_entries: 16_384,
    }];
    let socket_lb = std::collections::BTreeMap::from([("connect_translated", 5_u64)]);
    let text = exposition(move |e| {
        encode_counters(e, &c)?;
        encode_socket_lb(e, &socket_lb)?;
        encode_endpoints(e, std::slice::from_ref(&ep), &stats)?;
        encode_datastore(e, &datastore, Duration::from_secs(1_012))?;
        encode_fill(e, &fill)
    });
    for line in [
        "# HELP podnet_datapath_verdicts Packets podnet's eBPF programs handled, by what they did with them (summed over CPUs).",
        "# TYPE podnet_datapath_verdicts counter",
        "podnet_datapath_verdicts_total{verdict=\"redirect_peer\"} 42",
        "podnet_datapath_drops_total{reason=\"spoofed_source_ip\"} 7",
        "podnet_socket_lb_total{counter=\"connect_translated\"} 5",
        "podnet_endpoint_sent_packets_total{pod_ip=\"10.244.0.5\",container_id=\"abc\",ifname=\"eth0\",network=\"podnet\",host_ifname=\"pn0123456789ab\"} 10",
        "# UNIT podnet_endpoint_sent_bytes bytes",
        "podnet_endpoint_sent_bytes_total{pod_ip=\"10.244.0.5\",container_id=\"abc\",ifname=\"eth0\",network=\"podnet\",host_ifname=\"pn0123456789ab\"} 980",
        "podnet_endpoints 1",
        "podnet_datastore_connected{backend=\"etcd\"} 1",
        "podnet_datastore_nodes{state=\"live\"} 0",
        "podnet_datastore_last_sync_age_seconds 12.0",
        "podnet_map_entries{map=\"podnet_endpts\"} 1",
        "podnet_map_max_entries{map=\"podnet_endpts\"} 16384",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}

#[test]
fn readiness_waits_for_pending_work_and_the_datastore() {
    let mut snapshot = Snapshot {
        endpoints: Vec::new(),
        pending: vec!["node network (overlay/underlay programs, node config)".into()],
        datastore: DatastoreStatus {
            backend: "etcd".into(),
            ..DatastoreStatus::default()
        },
        cluster_objects: None,
        services: crate::api::services::ServicesStatus::default(),
    };
    assert!(snapshot.readiness().unwrap_err().contains("node network"));
    snapshot.pending.clear();
    assert!(
        snapshot
            .readiness()
            .unwrap_err()
            .contains("not been synced")
    );
    snapshot.datastore.last_sync_ms = Some(1);
    assert_eq!(snapshot.readiness(), Ok(()));
    snapshot.datastore = DatastoreStatus {
        backend: "none".into(),
        ..DatastoreStatus::default()
    };
    assert_eq!(snapshot.readiness(), Ok(()));
}

#[test]
fn services_are_exposed_with_their_refused_entries() {
    use crate::api::services::{ServicesMode, ServicesStatus};
    let status = ServicesStatus {
        mode: ServicesMode::Bpf,
        synced: true,
        frontends: 3,
        backends: 7,
        refused: 2,
        syncs: 5,
        ..ServicesStatus::default()
    };
    let text = exposition(move |e| encode_services(e, &status));
    for line in [
        "podnet_services_bpf 1",
        "# TYPE podnet_services_frontends gauge",
        "podnet_services_frontends 3",
        "podnet_services_backends 7",
        "podnet_services_refused_entries 2",
        "podnet_services_synced 1",
        "podnet_services_syncs_total 5",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let text = exposition(|e| encode_services(e, &ServicesStatus::default()));
    assert!(text.lines().any(|l| l == "podnet_services_bpf 0"), "{text}");
}

#[test]
fn cluster_objects_are_exposed_by_kind_with_revision_and_resyncs() {
    let status = ClusterObjectsStatus {
        backend: "etcd".into(),
        connected: true,
        revision: 123,
        counts: [("namespaces", 3), ("pods", 9), ("services", 0)]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
        pod_records: 8,
        resyncs: 2,
        ..ClusterObjectsStatus::default()
    };
    let text = exposition(move |e| encode_cluster_objects(e, &status));
    for line in [
        "# TYPE podnet_cluster_objects gauge",
        "podnet_cluster_objects{kind=\"namespaces\"} 3",
        "podnet_cluster_objects{kind=\"pods\"} 9",
        "podnet_cluster_objects{kind=\"services\"} 0",
        "podnet_cluster_objects{kind=\"podendpoints\"} 8",
        "podnet_cluster_objects_revision 123",
        "# TYPE podnet_cluster_objects_resyncs counter",
        "podnet_cluster_objects_resyncs_total 2",
        "podnet_cluster_objects_watching 1",
        "podnet_pod_records_published 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}
