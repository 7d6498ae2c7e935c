//! from_overlay and from_underlay on crafted frames (BPF_PROG_TEST_RUN):
//! what arrives from other nodes reaches a local pod only from the node it
//! claims to come from.
//!
//! from_underlay runs "on" a veth in a test namespace (the run's context
//! names the device), so the frame's type (unicast to this host or not) and
//! the neighbour entries the sender check reads are that namespace's.
//! from_overlay needs tunnel metadata, which a test run cannot attach: here
//! it must drop everything; the lab tests (`isolation.rs`) send real VXLAN.

use std::net::Ipv4Addr;

use podnet_common::{
    DropReason, Verdict,
    names::{PROG_FROM_OVERLAY, PROG_FROM_UNDERLAY},
    node::{MODE_DIRECT, MODE_VXLAN},
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use podnet_tests::{
    bpf_fixture::{
        self, EXTERNAL, HOST_B_MAC, NODE1_IP, NODE1_MAC, NODE2, NODE2_IP, NODE2_MAC, NODE2_POD,
        NODE3, NODE3_POD, POD_B, POD_B_IP, POD_B_MAC, POD_C, POD_C_IP, counters, node1_config,
    },
    bpf_run::{BpfHarness, TestUnderlay},
    frames::{self, ETH_P_ARP, TTL_OFF},
    privileged,
};

/// Another host on the underlay (not a node).
const FABRIC_MAC: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x01];
/// The local pod the frames from other nodes are for (pod B).
const LOCAL_POD: Ipv4Addr = POD_B_IP;
const LOCAL_POD_MAC: [u8; 6] = POD_B_MAC;
const LOCAL_HOST_MAC: [u8; 6] = HOST_B_MAC;
const OTHER_LOCAL_POD: Ipv4Addr = POD_C_IP;

/// Node 1's datapath: two local pods, nodes 2 and 3 with their pod CIDRs
/// and addresses.
fn node1(tag: &str, mode: u32, underlay_ifindex: u32) -> BpfHarness {
    bpf_fixture::node1(
        tag,
        &[POD_B, POD_C],
        &[NODE2, NODE3],
        node1_config(mode, underlay_ifindex),
    )
}

fn udp(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    frames::ipv4_udp(dst_mac, src_mac, src, dst, 63, b"x")
}

#[test]
fn from_overlay_delivers_nothing_without_tunnel_metadata() {
    if !privileged("from_overlay_delivers_nothing_without_tunnel_metadata") {
        return;
    }
    let mut h = node1("overlay-nometa", MODE_VXLAN, 0);
    let mut arp = frames::ethernet([0xff; 6], NODE2_MAC, ETH_P_ARP);
    arp.extend_from_slice(&[0; 28]);
    let frames = [
        udp(NODE1_MAC, NODE2_MAC, NODE2_POD, LOCAL_POD),
        udp(NODE1_MAC, NODE2_MAC, NODE2_IP, LOCAL_POD),
        udp(NODE1_MAC, NODE2_MAC, NODE2_POD, NODE1_IP),
        udp(NODE1_MAC, NODE2_MAC, EXTERNAL, LOCAL_POD),
        arp,
    ];
    for frame in &frames {
        let out = h.run(PROG_FROM_OVERLAY, frame).expect("test run");
        assert_eq!(out.verdict, TC_ACT_SHOT, "without a tunnel source: dropped");
    }
    let c = counters(&h);
    assert_eq!(
        c.drop_count(DropReason::UnknownTunnelSource),
        frames.len() as u64
    );
    assert_eq!(c.verdict(Verdict::OverlayDeliver), 0);
    assert_eq!(c.verdict(Verdict::PassToStack), 0);
}

#[test]
fn from_underlay_delivers_to_local_pods_only_from_the_owning_node() {
    if !privileged("from_underlay_delivers_to_local_pods_only_from_the_owning_node") {
        return;
    }
    let underlay = TestUnderlay::new(
        "underlay",
        NODE1_MAC,
        (NODE1_IP, 24),
        &[(NODE2_IP, NODE2_MAC)],
    )
    .expect("test underlay");
    let mut h = node1("underlay", MODE_DIRECT, underlay.ifindex);
    let run = |h: &mut BpfHarness, frame: &[u8]| {
        h.run_arriving_on(&underlay, PROG_FROM_UNDERLAY, frame)
            .expect("test run")
    };

    // Node 2's pod and node 2 itself, in frames from node 2: delivered as a
    // routed hop.
    for src in [NODE2_POD, NODE2_IP] {
        let out = run(&mut h, &udp(NODE1_MAC, NODE2_MAC, src, LOCAL_POD));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{src} from node 2: delivered");
        assert_eq!(&out.frame[0..6], &LOCAL_POD_MAC);
        assert_eq!(&out.frame[6..12], &LOCAL_HOST_MAC);
        assert_eq!(out.frame[TTL_OFF], 62);
    }

    // The same sources from another host on the underlay, a local pod's
    // address from anywhere, a node whose neighbour is unknown: forged.
    let forged = [
        udp(NODE1_MAC, FABRIC_MAC, NODE2_POD, LOCAL_POD),
        udp(NODE1_MAC, FABRIC_MAC, NODE2_IP, LOCAL_POD),
        udp(NODE1_MAC, NODE2_MAC, OTHER_LOCAL_POD, LOCAL_POD),
        udp(NODE1_MAC, FABRIC_MAC, OTHER_LOCAL_POD, LOCAL_POD),
        // An address of this node's pod CIDR no pod has (yet).
        udp(
            NODE1_MAC,
            NODE2_MAC,
            Ipv4Addr::new(10, 244, 0, 99),
            LOCAL_POD,
        ),
        udp(NODE1_MAC, FABRIC_MAC, NODE3_POD, LOCAL_POD),
    ];
    for frame in &forged {
        assert_eq!(
            run(&mut h, frame).verdict,
            TC_ACT_SHOT,
            "forged source dropped"
        );
    }

    // Not unicast to this node: broadcast, multicast, another host's MAC.
    let not_unicast = [
        udp([0xff; 6], NODE2_MAC, NODE2_POD, LOCAL_POD),
        udp([0x01, 0, 0x5e, 0, 0, 1], NODE2_MAC, NODE2_POD, LOCAL_POD),
        udp(FABRIC_MAC, NODE2_MAC, NODE2_POD, LOCAL_POD),
    ];
    for frame in &not_unicast {
        assert_eq!(
            run(&mut h, frame).verdict,
            TC_ACT_SHOT,
            "not unicast: dropped"
        );
    }

    // A client outside the pod network routed to a pod, and the node's own
    // traffic: the host stack's, as before.
    for frame in [
        udp(NODE1_MAC, FABRIC_MAC, EXTERNAL, LOCAL_POD),
        udp(NODE1_MAC, FABRIC_MAC, EXTERNAL, NODE1_IP),
        udp(NODE1_MAC, NODE2_MAC, NODE2_IP, NODE1_IP),
    ] {
        assert_eq!(run(&mut h, &frame).verdict, TC_ACT_OK, "to the host stack");
    }

    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::UnderlayDeliver), 2);
    assert_eq!(
        c.drop_count(DropReason::UnderlaySourceMismatch),
        forged.len() as u64
    );
    assert_eq!(
        c.drop_count(DropReason::UnderlayNotUnicast),
        not_unicast.len() as u64
    );
    assert_eq!(c.verdict(Verdict::PassToStack), 3);
}
