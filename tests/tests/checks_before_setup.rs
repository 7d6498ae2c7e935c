//! The datapath's checks are in force from the moment a starting agent's
//! programs run, not only once the node network's setup succeeds. node1's
//! agent is stopped and its pinned node config loses what an older layout
//! did not have (VXLAN port, pod and cluster CIDR zeroed: what a config
//! migrated on an upgrade holds), then it restarts with a node-network setup
//! that keeps failing (a test build's fault). While it fails, with the
//! programs of this build in place: the config holds the checks' fields, a
//! pod's VXLAN to its node's port is dropped (`vxlan_from_pod`), and pods
//! still talk.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use aya::maps::{Array, MapData};
use podnet::{
    api::{AgentStatus, Client, Request},
    failpoint::{FAULT_ENV, Fault},
};
use podnet_common::{DropReason, NodeConfig, names};
use podnet_tests::{
    counters,
    lab::{self, LabDatastore, LabGuard},
    privileged, spoof,
};

const VXLAN_PORT: u16 = 4789;

fn config_map(bpffs_dir: &Path) -> Array<MapData, NodeConfig> {
    let map = MapData::from_pin(bpffs_dir.join(names::MAP_CONFIG)).expect("pinned node config");
    Array::try_from(aya::maps::Map::Array(map)).expect("node config array")
}

#[test]
fn the_checks_hold_while_the_node_network_setup_keeps_failing() {
    if !privileged("the_checks_hold_while_the_node_network_setup_keeps_failing") {
        return;
    }
    let mut lab = LabGuard::up("chkfirst", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let node1 = lab.layout.node("node1").expect("node1").clone();
    let pod = lab.layout.pod("node1-pod1").expect("pod").clone();
    let remote = lab.layout.pod("node2-pod1").expect("pod").ip;
    assert!(lab::ping(&pod.netns, remote), "pods talk before");

    lab.layout.stop_agent("node1").expect("stop");
    let mut map = config_map(&node1.bpffs_dir);
    let old = map.get(&0, 0).expect("config");
    assert_eq!(old.vxlan_port, VXLAN_PORT.to_be(), "the first agent set it");
    let migrated = NodeConfig {
        vxlan_port: 0,
        pod_cidr_network: 0,
        pod_cidr_mask: 0,
        cluster_cidr_network: 0,
        cluster_cidr_mask: 0,
        ..old
    };
    map.set(0, migrated, 0).expect("write the migrated config");
    drop(map);

    lab.layout
        .start_agent_with_env("node1", &[(FAULT_ENV, Fault::NodeNetwork.name())])
        .expect("start with a failing node network");
    std::thread::sleep(Duration::from_secs(2));
    let status: AgentStatus = Client::new(&node1.agent_socket)
        .call(&Request::Status)
        .expect("status");
    assert!(
        status.pending.iter().any(|p| p.starts_with("node network")),
        "the setup keeps failing: {:?}",
        status.pending
    );
    let now = config_map(&node1.bpffs_dir).get(&0, 0).expect("config");
    assert_eq!(
        (
            now.vxlan_port,
            now.pod_cidr_mask,
            now.cluster_cidr_mask,
            now.mode,
            now.tunnel_ifindex
        ),
        (
            old.vxlan_port,
            old.pod_cidr_mask,
            old.cluster_cidr_mask,
            old.mode,
            old.tunnel_ifindex
        ),
        "the checks' fields are written, the forwarding ones left as they were"
    );

    // A pod's VXLAN to its own node: dropped, not decapsulated.
    let before = counters::read(&node1.agent_socket, DropReason::VxlanFromPod);
    let pod_mac = spoof::mac_of(&pod.netns, "eth0").expect("pod MAC");
    let gateway_mac = spoof::host_veth_mac(&pod.netns, &node1.netns).expect("gateway MAC");
    let inner = spoof::udp_frame(
        (gateway_mac, pod_mac),
        (remote, Ipv4Addr::from(u32::from(pod.ip) + 1)),
        7001,
        b"forged-inner",
    );
    let vxlan = spoof::udp_frame(
        (gateway_mac, pod_mac),
        (pod.ip, node1.node_ip),
        VXLAN_PORT,
        &spoof::vxlan_payload(1, &inner),
    );
    spoof::send_raw(&pod.netns, "eth0", &[vxlan]).expect("send from the pod");
    podnet_tests::wait_up_to(Duration::from_secs(5), "vxlan_from_pod counted", || {
        counters::read(&node1.agent_socket, DropReason::VxlanFromPod) > before
    });
    assert!(lab::ping(&pod.netns, remote), "pods talk meanwhile");
}
