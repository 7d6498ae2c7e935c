//! DEL never fails because something is already gone, and leaves nothing.

use podnet_tests::{
    netns::NetNs,
    node::{Node, Pod},
    privileged,
};
use serde_json::Value;

fn del(node: &Node, cid: &str, netns: &str) -> podnet_tests::node::CniOutput {
    node.cni(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ],
        node.conf("1.1.0", &Value::Null).to_string().as_bytes(),
    )
    .expect("run DEL")
}

fn assert_clean(node: &Node) {
    assert!(
        node.ipam_records().is_empty(),
        "addresses left: {:?}",
        node.ipam_records()
    );
    assert!(node.host_veths().expect("links").is_empty(), "veths left");
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    assert_eq!(
        endpoints.as_array().map(Vec::len),
        Some(0),
        "endpoints left: {endpoints}"
    );
    let status = node.podnetctl(&["status"]).expect("status");
    assert_eq!(status["endpoints"], 0);
}

fn netns_path(pod: &Pod) -> String {
    pod.netns.path().display().to_string()
}

#[test]
fn del_matrix() {
    if !privileged("del_matrix") {
        return;
    }
    let mut node = Node::start("del", "10.244.11.0/24").expect("node");

    // Twice.
    let pod = node.add_pod("del-twice").expect("ADD");
    for round in 0..2 {
        let out = del(&node, "del-twice", &netns_path(&pod));
        assert!(out.success, "DEL #{round}: {out:?}");
    }
    assert_clean(&node);

    // A container nobody ever added.
    assert!(del(&node, "never-added", "/var/run/netns/never-added").success);

    // Netns gone before DEL (the runtime tore the sandbox down first).
    let pod = node.add_pod("del-netns-gone").expect("ADD");
    let path = netns_path(&pod);
    drop(pod);
    let out = del(&node, "del-netns-gone", &path);
    assert!(out.success, "{out:?}");
    assert!(
        del(&node, "del-netns-gone", "").success,
        "DEL without CNI_NETNS"
    );
    assert_clean(&node);

    // After a failed ADD: the pod already has an eth0, ADD rolls back.
    let pod_ns = NetNs::new("delfail").expect("netns");
    pod_ns
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ])
        .expect("occupy eth0");
    let path = pod_ns.path().display().to_string();
    let out = node
        .cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "del-failed-add"),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            node.conf("1.1.0", &Value::Null).to_string().as_bytes(),
        )
        .expect("ADD");
    assert!(!out.success, "ADD into a netns that has eth0 fails");
    assert_clean(&node);
    assert!(del(&node, "del-failed-add", &path).success);
    assert_clean(&node);

    // Agent down: DEL still succeeds and releases the address; the agent
    // drops the endpoint when it is back.
    let pod = node.add_pod("del-agent-down").expect("ADD");
    node.stop_agent();
    let out = del(&node, "del-agent-down", &netns_path(&pod));
    assert!(out.success, "{out:?}");
    assert!(node.ipam_records().is_empty());
    assert!(node.host_veths().expect("links").is_empty());
    node.start_agent().expect("agent back");
    assert_clean(&node);
}
