//! An upgrade to a different build loses nothing: the lab runs podnet as
//! of [`UPGRADE_FROM`] (node config of layout 1, 24 bytes, and no map
//! migration), ping floods run between pods (same node, cross node both
//! ways), every agent is replaced by this build's, which migrates the
//! pinned maps whose layout changed (the node config grew to
//! `size_of::<NodeConfig>()`, 48 bytes) and re-points every program. Every
//! ping is answered; the counters carry on (a counter that nothing moves
//! during the upgrade reads the same, not reset, before and after); the old
//! CNI plugin keeps working against the new agent.
//!
//! The same for Services translated in the datapath (`--services bpf`):
//! from [`SERVICES_UPGRADE_FROM`] (one verdict counter fewer, so the
//! counters' map is migrated) to this build, with long-lived TCP sessions
//! and UDP flows through a ClusterIP (from a pod) and through a NodePort
//! (from a host outside the cluster): none breaks and none moves to
//! another backend, because the connection table and the Service maps are
//! pinned and kept, and the new agent rewrites the Service maps
//! make-before-break.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use podnet::api::{AgentStatus, Client, Request};
use podnet_common::{DropReason, Verdict, names};
use podnet_tests::{
    bins, counters,
    lab::{LabDatastore, LabGuard, LabLayout, LabNode, LabOptions, ServiceKind},
    privileged,
    services::{self, ServiceSessions},
    spoof,
    traffic::LabFloods,
};

/// The last commit before the node config's layout changed.
const UPGRADE_FROM: &str = "9c8e0d45577159ea087a06fb6ef509c98d7273cf";
/// A build that translates Services in the datapath (ClusterIPs and
/// NodePorts), before the hairpin verdict grew the verdict counters from
/// 19 to [`Verdict::COUNT`].
const SERVICES_UPGRADE_FROM: &str = "9b98510e2c280692668a9b336c12dfe725ae7ef7";
const SERVICES_UPGRADE_FROM_VERDICTS: u32 = 19;
const PINGS: u32 = 3_000;
/// Forged frames each node drops before the upgrade: a counter that
/// nothing else moves while the agents are replaced.
const FORGED: usize = 50;

fn redirects(node: &LabNode) -> u64 {
    counters::read(&node.agent_socket, Verdict::RedirectPeer)
}

fn spoofed_drops(node: &LabNode) -> u64 {
    counters::read(&node.agent_socket, DropReason::SpoofedSourceIp)
}

/// Has `node`'s first pod send [`FORGED`] frames with a source that is no
/// pod's to its second pod, and waits until `node`'s datapath counted them
/// as spoofed.
fn forge_drops(layout: &LabLayout, node: &LabNode) {
    let pod = layout
        .pod(&format!("{}-pod1", node.name))
        .expect("the node's first pod");
    let target = layout
        .pod(&format!("{}-pod2", node.name))
        .expect("the node's second pod");
    let gw = spoof::host_veth_mac(&pod.netns, &node.netns).expect("gateway MAC");
    let mac = spoof::mac_of(&pod.netns, "eth0").expect("pod MAC");
    let forged_src = Ipv4Addr::new(10, 244, 250, 9);
    let frames: Vec<Vec<u8>> = (0..FORGED)
        .map(|i| spoof::udp_frame((gw, mac), (forged_src, target.ip), 7012, &i.to_be_bytes()))
        .collect();
    let before = spoofed_drops(node);
    spoof::send_raw(&pod.netns, "eth0", &frames).expect("send forged frames");
    podnet_tests::wait_up_to(
        Duration::from_secs(10),
        &format!("{}: the forged frames counted as spoofed", node.name),
        || spoofed_drops(node) >= before + FORGED as u64,
    );
}

/// A reset would hide behind a counter the floods keep moving: the drops
/// forged before the upgrade (`spoofed_before`, read from the old agent)
/// read the same from the new one.
fn counters_carry_on(mode: &str, node: &LabNode, spoofed_before: u64) {
    assert!(
        spoofed_before >= FORGED as u64,
        "{}: {spoofed_before} spoofed drops before the upgrade",
        node.name
    );
    let spoofed_after = spoofed_drops(node);
    eprintln!(
        "{mode} {}: spoofed_source_ip {spoofed_before} before the upgrade, {spoofed_after} after",
        node.name
    );
    assert_eq!(
        spoofed_after, spoofed_before,
        "{}: the counters carry on across the upgrade (not reset, not moved)",
        node.name
    );
}

fn upgrade_loses_nothing(mode: &str) {
    let old = bins::build_at_commit(UPGRADE_FROM).expect("build the old commit");
    let mut lab = LabGuard::up_with_bins(
        &format!("up{}", &mode[..1]),
        2,
        2,
        mode,
        LabDatastore::File,
        Some(&old),
    )
    .expect("lab up on the old build");
    let config_pin = |node: &LabNode| node.bpffs_dir.join(names::MAP_CONFIG);
    for node in &lab.layout.nodes {
        let info = aya::maps::MapInfo::from_pin(config_pin(node)).expect("config pin");
        assert_eq!(info.value_size(), 24, "the old build's node config");
    }
    for node in &lab.layout.nodes {
        forge_drops(&lab.layout, node);
    }
    // Read from the old agents; nothing forges frames from here on.
    let spoofed_before: Vec<u64> = lab.layout.nodes.iter().map(spoofed_drops).collect();
    let mut floods = LabFloods::start(&lab.layout, PINGS).expect("floods");
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = lab.layout.nodes.iter().map(redirects).collect();

    // The upgrade: this build's agents, one node after the other.
    lab.layout.bin_dir = None;
    for node in ["node1", "node2"] {
        lab.layout.stop_agent(node).expect("stop the old agent");
        lab.layout.start_agent(node).expect("start the new agent");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        floods.ended(),
        None,
        "{mode}: a flood ended before the upgrade did"
    );
    for (path, result) in floods.finish().expect("ping results") {
        eprintln!(
            "{mode} upgrade {path}: {} sent, {} lost",
            result.sent,
            result.sent - result.received
        );
        assert_eq!(
            result.sent,
            u64::from(PINGS),
            "{mode} {path}: ping sent all"
        );
        assert_eq!(
            result.received, result.sent,
            "{mode} {path}: every ping answered across the upgrade"
        );
    }
    for ((node, before), spoofed_before) in lab.layout.nodes.iter().zip(before).zip(spoofed_before)
    {
        let info = aya::maps::MapInfo::from_pin(config_pin(node)).expect("config pin");
        assert_eq!(
            info.value_size() as usize,
            size_of::<podnet_common::NodeConfig>(),
            "{}: migrated to this build's layout",
            node.name
        );
        let status: AgentStatus = Client::new(&node.agent_socket)
            .call(&Request::Status)
            .expect("status");
        assert!(
            status.pending.is_empty(),
            "{}: {:?}",
            node.name,
            status.pending
        );
        let retired: Vec<_> = std::fs::read_dir(&node.bpffs_dir)
            .expect("pin dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(podnet::pinned_maps::RETIRED_SUFFIX))
            .collect();
        assert!(retired.is_empty(), "{}: {retired:?}", node.name);
        counters_carry_on(mode, node, spoofed_before);
        assert!(
            redirects(node) >= before,
            "{}: the floods' counter never goes back",
            node.name
        );
    }
    // The old plugin against the new agent.
    let late = lab
        .layout
        .add_pod("node1", "node1-late")
        .expect("ADD with the old plugin");
    assert!(
        podnet_tests::lab::ping(&late.netns, lab.layout.pod("node2-pod1").expect("pod").ip),
        "{mode}: a pod added after the upgrade reaches node2's pod"
    );
}

#[test]
fn an_upgrade_with_a_map_layout_change_loses_no_packet_vxlan() {
    if !privileged("an_upgrade_with_a_map_layout_change_loses_no_packet_vxlan") {
        return;
    }
    upgrade_loses_nothing("vxlan");
}

#[test]
fn an_upgrade_with_a_map_layout_change_loses_no_packet_direct() {
    if !privileged("an_upgrade_with_a_map_layout_change_loses_no_packet_direct") {
        return;
    }
    upgrade_loses_nothing("direct");
}

/// Long-lived Service connections across an upgrade: the lab runs
/// [`SERVICES_UPGRADE_FROM`] with `--services bpf`, a pod holds a TCP
/// session to each backend and a UDP flow through the ClusterIP, the
/// fabric host the same through node1's NodePorts (one backend on node1,
/// one SNATed to node2), and every agent is replaced by this build's.
fn service_connections_survive_an_upgrade(mode: &str) {
    let old = bins::build_at_commit(SERVICES_UPGRADE_FROM).expect("build the old commit");
    let options = LabOptions {
        service: Some(ServiceKind::Datapath),
        bin_dir: Some(old),
        ..LabOptions::default()
    };
    let mut lab = LabGuard::up_with(
        &format!("us{}", &mode[..1]),
        2,
        2,
        mode,
        LabDatastore::File,
        options,
    )
    .expect("lab up on the old build with Services in the datapath");
    let verdicts_pin = |node: &LabNode| node.bpffs_dir.join(names::MAP_VERDICTS);
    for node in &lab.layout.nodes {
        let info = aya::maps::MapInfo::from_pin(verdicts_pin(node)).expect("verdicts pin");
        assert_eq!(
            info.max_entries(),
            SERVICES_UPGRADE_FROM_VERDICTS,
            "the old build's verdict counters"
        );
    }
    let svc = lab.layout.service.clone().expect("the demo Service");
    let client = lab.layout.pod("node1-pod2").expect("client pod").clone();
    services::wait_for_the_service(
        &client.netns,
        SocketAddrV4::new(svc.cluster_ip, svc.tcp_port),
    );
    let mut through_cluster_ip =
        ServiceSessions::to_cluster_ip(&lab.layout, &client.name).expect("ClusterIP sessions");
    let mut through_node_port =
        ServiceSessions::to_node_port(&lab.layout, "node1").expect("NodePort sessions");
    let mut check = |when: &str| {
        for (what, sessions) in [
            ("ClusterIP", &mut through_cluster_ip),
            ("NodePort", &mut through_node_port),
        ] {
            sessions
                .check(when)
                .unwrap_or_else(|e| panic!("{mode} {what}: {e:#}"));
        }
    };
    check("before the upgrade");

    lab.layout.bin_dir = None;
    for node in ["node1", "node2"] {
        lab.layout.stop_agent(node).expect("stop the old agent");
        check(&format!("with {node}'s old agent stopped"));
        lab.layout.start_agent(node).expect("start the new agent");
        check(&format!("after {node}'s upgrade"));
    }
    for node in &lab.layout.nodes {
        let info = aya::maps::MapInfo::from_pin(verdicts_pin(node)).expect("verdicts pin");
        assert_eq!(
            info.max_entries(),
            Verdict::COUNT,
            "{}: the verdict counters migrated to this build's",
            node.name
        );
    }
    // New connections after the upgrade reach every backend again.
    ServiceSessions::to_cluster_ip(&lab.layout, &client.name)
        .unwrap_or_else(|e| panic!("{mode}: new ClusterIP sessions after the upgrade: {e:#}"));
    ServiceSessions::to_node_port(&lab.layout, "node2")
        .unwrap_or_else(|e| panic!("{mode}: new NodePort sessions after the upgrade: {e:#}"));
}

#[test]
fn service_connections_survive_an_upgrade_vxlan() {
    if !privileged("service_connections_survive_an_upgrade_vxlan") {
        return;
    }
    service_connections_survive_an_upgrade("vxlan");
}

#[test]
fn service_connections_survive_an_upgrade_direct() {
    if !privileged("service_connections_survive_an_upgrade_direct") {
        return;
    }
    service_connections_survive_an_upgrade("direct");
}
