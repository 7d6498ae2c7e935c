//! Adding an endpoint is all or nothing, and never at a running pod's
//! expense: an address another IPAM hands out while a live pod of this node
//! holds it (a second network delegating to `host-local` over the same
//! range, a runtime's static IP) is refused and the running pod keeps its
//! traffic; an ADD whose install fails half-way (a test build's fault,
//! after the map entries are written) leaves no record, entry, veth or
//! address behind.

use podnet::failpoint::{FAULT_ENV, Fault};
use podnet_tests::{node::Node, privileged};
use serde_json::json;

#[test]
fn an_address_a_live_pod_holds_is_refused() {
    if !privileged("an_address_a_live_pod_holds_is_refused") {
        return;
    }
    let node = Node::start("addrclash", "10.244.17.0/24").expect("node");
    let a = node.add_pod("clash-a").expect("ADD a");
    let b = node.add_pod("clash-b").expect("ADD b");
    assert!(a.ping(b.ip, 2), "a and b talk before");

    // Another network whose IPAM is host-local over the same range, with
    // only a's address to give.
    let data_dir = node.state.path().join("host-local");
    let ip = a.ip.to_string();
    let conf = node.conf(
        "1.0.0",
        &json!({"ipam": {"type": "host-local", "dataDir": data_dir,
                         "ranges": [[{"subnet": "10.244.17.0/24",
                                      "rangeStart": ip, "rangeEnd": ip}]]}}),
    );
    let Err(refused) = node.add_pod_with("clash-c", &conf) else {
        panic!("an address in use is refused");
    };
    assert!(
        format!("{refused:#}").contains("in use"),
        "the error says why: {refused:#}"
    );

    assert!(a.ping(b.ip, 2), "a keeps its address and its traffic");
    let inventory = node.inventory().expect("inventory");
    assert_eq!(
        inventory.map_endpoints,
        [a.ip, b.ip].into_iter().collect(),
        "{inventory:?}"
    );
    assert_eq!(inventory.endpoints.len(), 2, "{inventory:?}");
    assert_eq!(inventory.veths.len(), 2, "c's veth is gone: {inventory:?}");
    assert!(
        !data_dir.join("podnet").join(&ip).exists(),
        "host-local's reservation for c was released"
    );
}

#[test]
fn a_failed_install_leaves_nothing_behind() {
    if !privileged("a_failed_install_leaves_nothing_behind") {
        return;
    }
    let mut node = Node::start("instfail", "10.244.18.0/24").expect("node");
    let a = node.add_pod("inst-a").expect("ADD a");
    node.stop_agent();
    node.start_agent_with_env(&[(FAULT_ENV, Fault::EndpointInstall.name())])
        .expect("agent with a failing install");
    assert!(
        node.add_pod("inst-b").is_err(),
        "the ADD fails with the install"
    );
    let inventory = node.inventory().expect("inventory");
    assert_eq!(
        inventory.map_endpoints,
        [a.ip].into_iter().collect(),
        "only a's entry: {inventory:?}"
    );
    assert_eq!(inventory.map_veths.len(), 1, "{inventory:?}");
    assert_eq!(inventory.records.len(), 1, "only a's record: {inventory:?}");
    assert_eq!(inventory.endpoints.len(), 1, "{inventory:?}");
    assert_eq!(inventory.veths.len(), 1, "{inventory:?}");
    assert_eq!(
        inventory.ipam,
        [a.ip].into_iter().collect(),
        "b's address is released: {inventory:?}"
    );
}
