//! The agent going away and coming back: traffic between existing pods never
//! stops (maps are pinned, the filters belong to the veths), and the
//! restarted agent swaps its programs in and removes what
//! went stale while it was down.

use std::{net::Ipv4Addr, time::Duration};

use podnet::datapath::Datapath;
use podnet_common::EndpointInfo;
use podnet_tests::{lab::in_netns, node::Node, privileged, traffic::Stream};

#[test]
fn tcp_stream_survives_an_agent_restart_and_stale_state_is_reconciled() {
    if !privileged("tcp_stream_survives_an_agent_restart_and_stale_state_is_reconciled") {
        return;
    }
    let mut node = Node::start("restart", "10.244.14.0/24").expect("node");
    let a = node.add_pod("restart-a").expect("ADD a");
    let b = node.add_pod("restart-b").expect("ADD b");
    let c = node.add_pod("restart-c").expect("ADD c");

    let a_veth = host_veth_of(&node, a.ip);
    let old_program = from_pod_program_on(&node, &a_veth);

    let stream = Stream::start(a.netns.name(), b.netns.name(), b.ip).expect("stream");
    std::thread::sleep(Duration::from_millis(300));
    node.stop_agent();

    // While the agent is down: pods still talk; a pod is deleted; something
    // writes a bogus entry into the pinned map.
    assert!(a.ping(b.ip, 3), "forwarding continues without the agent");
    // podnetctl reads the pinned maps instead.
    let counters = node
        .podnetctl(&["counters"])
        .expect("podnetctl counters from the pins");
    assert!(
        counters["verdicts"]["redirect_peer"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );
    let status = node
        .podnetctl(&["status"])
        .expect("podnetctl status from the pins");
    assert_eq!(status["agent"], "down");
    assert_eq!(status["endpoints_in_datapath"], 3);
    assert!(node.del_pod(&c).expect("DEL").success);
    let bogus = Ipv4Addr::new(10, 244, 14, 250);
    Datapath::load(node.bpffs.path())
        .expect("open the pins")
        .upsert_endpoint(
            bogus,
            EndpointInfo {
                host_ifindex: 9999,
                flags: 0,
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
            },
        )
        .expect("write a stale entry");
    // What a plugin killed mid-ADD leaves: a reservation nobody owns, old
    // enough not to be an ADD in flight; and a fresh one that may be.
    let store = node.state_dir().join("ipam/_node");
    std::fs::write(store.join("10.244.14.200"), "crashed-add\neth0\npodnet\n")
        .expect("orphan record");
    podnet_tests::netns::run(
        std::process::Command::new("touch")
            .args(["-d", "10 minutes ago"])
            .arg(store.join("10.244.14.200")),
    )
    .expect("age it");
    std::fs::write(store.join("10.244.14.201"), "add-in-flight\neth0\npodnet\n")
        .expect("fresh record");
    std::thread::sleep(Duration::from_millis(300));

    node.start_agent().expect("agent restarts");
    std::thread::sleep(Duration::from_millis(300));
    let (sent, received) = stream.finish().expect("stream");
    assert!(sent > 0);
    assert_eq!(sent, received, "every byte of the stream arrived, in order");

    // The veth runs the restarted agent's from_pod, swapped in place (the
    // same filter, a new program), and the old program is gone.
    let new_program = from_pod_program_on(&node, &a_veth);
    assert_ne!(new_program, old_program, "the new program replaced the old");
    assert_unloaded(old_program);

    // Reconciled: only a and b are endpoints, in the agent and in the map.
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    let mut ips: Vec<String> = endpoints
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["endpoint"]["ip"].as_str().unwrap_or_default().to_owned())
        .collect();
    ips.sort();
    let mut expected = vec![a.ip.to_string(), b.ip.to_string()];
    expected.sort();
    assert_eq!(ips, expected);
    let mut in_map: Vec<String> = Datapath::load(node.bpffs.path())
        .expect("open the pins")
        .endpoints()
        .expect("read map")
        .into_iter()
        .map(|(ip, _)| ip.to_string())
        .collect();
    in_map.sort();
    assert_eq!(
        in_map, expected,
        "stale and deleted entries removed from the datapath"
    );
    let mut records = node.ipam_records();
    records.sort();
    let mut expected_records = vec![
        a.ip.to_string(),
        b.ip.to_string(),
        "10.244.14.201".to_owned(),
    ];
    expected_records.sort();
    assert_eq!(
        records, expected_records,
        "c's and the orphan's addresses were released, the in-flight one kept"
    );

    // And the restarted agent serves new pods, reachable from old ones.
    let d = node.add_pod("restart-d").expect("ADD d");
    assert!(a.ping(d.ip, 2));
    assert!(d.ping(b.ip, 2));
}

/// Someone deletes podnet's filter from a pod veth (`tc filter del`): the
/// agent reports the endpoint as not attached (it asks the kernel), and a
/// restarted agent puts the filter back, so the pod is served again.
#[test]
fn a_deleted_filter_is_reported_and_put_back_by_the_restarted_agent() {
    if !privileged("a_deleted_filter_is_reported_and_put_back_by_the_restarted_agent") {
        return;
    }
    let mut node = Node::start("refilter", "10.244.15.0/24").expect("node");
    let a = node.add_pod("refilter-a").expect("ADD a");
    let b = node.add_pod("refilter-b").expect("ADD b");
    let a_veth = host_veth_of(&node, a.ip);
    assert!(a.ping(b.ip, 1));

    podnet_tests::netns::run(
        in_netns(node.netns.name(), "tc")
            .expect("node netns")
            .args(["filter", "del", "dev", &a_veth, "ingress"]),
    )
    .expect("tc filter del");
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    let a_status = endpoints
        .as_array()
        .expect("list")
        .iter()
        .find(|e| e["endpoint"]["ip"] == a.ip.to_string())
        .expect("a listed");
    assert_eq!(a_status["attached"], false, "{a_status}");
    // Without from_pod the packet meets the node's stack. The agent turned
    // forwarding on (the node is its pods' gateway); turned off here, the
    // stack cannot carry a to b, so a cut-off a shows the filter gone
    // (the restarted agent turns forwarding on again).
    let off = node
        .netns
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])
        .expect("sysctl");
    assert!(off.status.success(), "turning forwarding off: {off:?}");
    assert!(!a.ping(b.ip, 1), "a reaches b without its filter");

    node.stop_agent();
    node.start_agent().expect("agent restarts");
    from_pod_program_on(&node, &a_veth);
    assert_eq!(host_veth_of(&node, a.ip), a_veth);
    assert!(a.ping(b.ip, 2), "a served again after the restart");
}

/// The host veth of the endpoint with `ip`, as the agent reports it.
fn host_veth_of(node: &Node, ip: Ipv4Addr) -> String {
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    let endpoint = endpoints
        .as_array()
        .expect("list")
        .iter()
        .find(|e| e["endpoint"]["ip"] == ip.to_string())
        .unwrap_or_else(|| panic!("endpoint {ip} in {endpoints}"));
    assert_eq!(endpoint["attached"], true, "{endpoint}");
    endpoint["endpoint"]["host_ifname"]
        .as_str()
        .expect("host_ifname")
        .to_owned()
}

/// Id of the from_pod program in the (single) bpf filter on `veth`'s
/// ingress, as `tc` shows it.
fn from_pod_program_on(node: &Node, veth: &str) -> u64 {
    let out = podnet_tests::netns::run(
        in_netns(node.netns.name(), "tc")
            .expect("node netns")
            .args(["-j", "filter", "show", "dev", veth, "ingress"]),
    )
    .expect("tc filter show");
    let filters: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tc JSON");
    let programs: Vec<u64> = filters
        .as_array()
        .expect("filter list")
        .iter()
        .filter_map(|f| f["options"]["prog"]["id"].as_u64())
        .collect();
    assert_eq!(programs.len(), 1, "one bpf filter on {veth}: {filters}");
    programs[0]
}

fn assert_unloaded(program_id: u64) {
    let shown = std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &program_id.to_string()])
        .output()
        .expect("bpftool");
    assert!(
        !shown.status.success(),
        "program {program_id} of the old agent still loaded"
    );
}
