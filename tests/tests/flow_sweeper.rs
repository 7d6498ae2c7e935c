//! The agent's stack-flows sweeper, end to end: nothing in the kernel tells
//! the datapath when a stack flow expires, so each endpoint's share of the
//! table (`podnet_flowown`) only comes back because the agent's sweeper
//! thread walks the pinned table every few seconds, removes what expired
//! and recounts. A pod that flooded to its limit and stopped gets its share
//! back without any agent call.
//!
//! The flood itself is `stack_flows_flood.rs`; here the table is filled
//! through the pins (UDP entries expire after 180 s, too long to wait for),
//! as the datapath would have left it: entries charged to pod B, most of
//! them long expired, and B's count at its limit.

use std::{net::Ipv4Addr, time::Duration};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use podnet::{
    api::{Client, FlowShare, Request},
    datapath::monotonic_coarse_ns,
};
use podnet_common::{
    flow::{DEFAULT_STACK_FLOWS_PER_ENDPOINT, FlowKey, FlowOwner, StackFlow},
    names,
};
use podnet_tests::{
    lab::{LabDatastore, LabGuard},
    privileged, wait_up_to,
};

/// `IPPROTO_UDP`.
const UDP: u8 = 17;

fn pinned(dir: &std::path::Path, name: &str) -> Map {
    let data = MapData::from_pin(dir.join(name)).expect("pinned map");
    Map::from_map_data(data).expect("map type")
}

fn share_of(socket: &std::path::Path, ip: Ipv4Addr) -> Option<FlowShare> {
    let shares: Vec<FlowShare> = Client::new(socket)
        .call(&Request::FlowShares)
        .expect("flow shares");
    shares.into_iter().find(|s| s.ip == ip)
}

#[test]
fn a_pod_that_stopped_flooding_gets_its_share_back_from_the_sweeper() {
    if !privileged("a_pod_that_stopped_flooding_gets_its_share_back_from_the_sweeper") {
        return;
    }
    let lab = LabGuard::up("swp", 1, 2, "vxlan", LabDatastore::File).expect("lab up");
    let node = lab.layout.node("node1").expect("node1").clone();
    let b = lab.layout.pod("node1-pod2").expect("pod").clone();
    let owner = u32::from_ne_bytes(b.ip.octets());
    let service = u32::from_ne_bytes([10, 96, 0, 53]);

    let mut flows_map = pinned(&node.bpffs_dir, names::MAP_STACK_FLOWS);
    let mut flows: BpfHashMap<_, FlowKey, StackFlow> =
        BpfHashMap::try_from(&mut flows_map).expect("stack flows");
    let now = monotonic_coarse_ns();
    let (expired, live) = (2_000_u16, 25_u16);
    for port in 0..expired + live {
        let key = FlowKey::new(owner, service, (10_000 + port).to_be(), 53_u16.to_be(), UDP);
        let last_seen_ns = if port < expired { 1 } else { now };
        let flow = StackFlow {
            last_seen_ns,
            flags: 0,
            owner,
        };
        flows.insert(key, flow, 0).expect("insert a flow");
    }
    let mut owners_map = pinned(&node.bpffs_dir, names::MAP_FLOW_OWNERS);
    let mut owners: BpfHashMap<_, u32, FlowOwner> =
        BpfHashMap::try_from(&mut owners_map).expect("flow owners");
    owners
        .insert(
            owner,
            FlowOwner {
                flows: DEFAULT_STACK_FLOWS_PER_ENDPOINT,
                refused: 7,
            },
            0,
        )
        .expect("pod B at its limit");
    assert_eq!(
        share_of(&node.agent_socket, b.ip).map(|s| s.flows),
        Some(DEFAULT_STACK_FLOWS_PER_ENDPOINT),
        "pod B holds its limit"
    );

    // The sweeper runs every 5 s: within two rounds B's count is what is
    // alive, and the expired entries are gone from the table.
    wait_up_to(
        Duration::from_secs(12),
        "the sweeper recounts pod B's share",
        || share_of(&node.agent_socket, b.ip).is_some_and(|s| s.flows == u32::from(live)),
    );
    let left = flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, flow)| flow.owner == owner)
        .count();
    assert_eq!(left, usize::from(live), "the expired entries were removed");
    let share = share_of(&node.agent_socket, b.ip).expect("pod B's share");
    assert_eq!(share.refused, 7, "what was refused stays counted");
}
