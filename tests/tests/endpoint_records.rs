//! The agent's endpoint records across an upgrade and a corrupted disk: a
//! record the previous release wrote (no `version`) is read and its pod
//! keeps its datapath entry; a record the agent cannot read is kept aside
//! under `endpoints/unreadable/`, reported by `podnetctl status`, and never
//! deleted, and its pod's address stays held while its veth lives.

use podnet_tests::{node::Node, privileged};

#[test]
fn old_records_load_and_unreadable_ones_are_kept_aside_and_reported() {
    if !privileged("old_records_load_and_unreadable_ones_are_kept_aside_and_reported") {
        return;
    }
    let mut node = Node::start("records", "10.244.31.0/24").expect("node");
    let a = node.add_pod("records-a").expect("ADD a");
    let b = node.add_pod("records-b").expect("ADD b");
    let records = node.state_dir().join("endpoints");
    let record_of = |container_id: &str| records.join(format!("{container_id}:eth0.json"));

    node.stop_agent();
    // b's record as the previous release wrote it: the same fields, no
    // version.
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record_of("records-b")).expect("b's record"))
            .expect("b's record is JSON");
    assert_eq!(old["version"], 1, "this release writes version 1: {old}");
    old.as_object_mut().expect("object").remove("version");
    std::fs::write(
        record_of("records-b"),
        serde_json::to_vec_pretty(&old).expect("json"),
    )
    .expect("write the old record");
    // a's record damaged.
    std::fs::write(
        record_of("records-a"),
        b"{\"owner\": {\"container_id\": \"rec",
    )
    .expect("damage");

    node.start_agent().expect("agent restarts");
    let status = node.podnetctl(&["status"]).expect("status");
    let kept = records.join("unreadable").join("records-a:eth0.json");
    assert_eq!(
        status["unreadable_records"],
        serde_json::json!([kept.display().to_string()]),
        "{status}"
    );
    assert_eq!(status["endpoints"], 1, "b's old record loaded: {status}");
    assert_eq!(
        std::fs::read(&kept).expect("kept aside, not deleted"),
        b"{\"owner\": {\"container_id\": \"rec"
    );
    assert!(!record_of("records-a").exists());
    // b is still a pod of the datapath; a's address is not handed out
    // again while its veth exists.
    let c = node.add_pod("records-c").expect("ADD c");
    assert!(
        c.ping(b.ip, 3),
        "c reaches b, whose record was the old release's"
    );
    assert_ne!(c.ip, a.ip, "a's address stays held");
    assert!(
        node.ipam_records().contains(&a.ip.to_string()),
        "{:?}",
        node.ipam_records()
    );
    // Still reported by the next start.
    node.stop_agent();
    node.start_agent().expect("agent restarts again");
    let status = node.podnetctl(&["status"]).expect("status");
    assert_eq!(
        status["unreadable_records"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}
