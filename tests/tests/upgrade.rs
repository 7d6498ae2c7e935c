//! An upgrade to a different build loses nothing: the lab runs podnet as
//! of [`UPGRADE_FROM`] (node config of layout 1, 24 bytes, and no map
//! migration), ping floods run between pods (same node, cross node both
//! ways), every agent is replaced by this build's, which migrates the
//! pinned maps whose layout changed (the node config grew to 36 bytes) and
//! re-points every program. Every ping is answered; the counters carry on;
//! the old CNI plugin keeps working against the new agent.

use std::time::Duration;

use podnet::api::{AgentStatus, Client, CounterTotals, Request};
use podnet_common::names;
use podnet_tests::{
    bins,
    lab::{LabDatastore, LabGuard, LabNode},
    privileged,
    traffic::LabFloods,
};

/// The last commit before the node config's layout changed.
const UPGRADE_FROM: &str = "9c8e0d45577159ea087a06fb6ef509c98d7273cf";
const PINGS: u32 = 3_000;

fn redirects(node: &LabNode) -> u64 {
    let c: CounterTotals = Client::new(&node.agent_socket)
        .call(&Request::Counters)
        .expect("counters");
    c.verdicts.get("redirect_peer").copied().unwrap_or(0)
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
            result.received, result.sent,
            "{mode} {path}: every ping answered across the upgrade"
        );
    }
    for (node, before) in lab.layout.nodes.iter().zip(before) {
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
        assert!(
            redirects(node) >= before,
            "{}: the counters carry on across the upgrade",
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
