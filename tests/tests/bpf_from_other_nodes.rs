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

use podnet::datapath::Counters;
use podnet_common::{
    DropReason, EndpointInfo, NodeConfig, Verdict,
    names::{PROG_FROM_OVERLAY, PROG_FROM_UNDERLAY},
    node::{MODE_DIRECT, MODE_VXLAN},
};
use podnet_tests::{
    bpf_run::{BpfHarness, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestUnderlay},
    frames::{self, ETH_P_ARP, TTL_OFF},
    privileged,
};

const NODE1_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
const NODE1_MAC: [u8; 6] = [0x02, 0x11, 0, 0, 0, 0x11];
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 12);
const NODE2_MAC: [u8; 6] = [0x02, 0x12, 0, 0, 0, 0x12];
/// In the cluster, but the underlay has no neighbour entry for it.
const NODE3_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 13);
/// Another host on the underlay (not a node).
const FABRIC_MAC: [u8; 6] = [0x02, 0xfa, 0, 0, 0, 0x01];
const NODE2_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const NODE3_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 7);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
const LOCAL_POD_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x03];
const LOCAL_HOST_MAC: [u8; 6] = [0x02, 0xbb, 0xff, 0, 0, 0x03];
const OTHER_LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 4);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Node 1's datapath: two local pods, nodes 2 and 3 with their pod CIDRs
/// and addresses.
fn node1(tag: &str, mode: u32, underlay_ifindex: u32) -> BpfHarness {
    let mut h = BpfHarness::new(tag).expect("load the datapath into a private bpffs");
    for (ip, ifindex) in [(LOCAL_POD, 4242), (OTHER_LOCAL_POD, 4243)] {
        h.datapath
            .upsert_endpoint(
                ip,
                EndpointInfo {
                    host_ifindex: ifindex,
                    flags: 0,
                    pod_mac: LOCAL_POD_MAC,
                    host_mac: LOCAL_HOST_MAC,
                },
            )
            .expect("add a local pod");
    }
    for (cidr, node) in [("10.244.1.0/24", NODE2_IP), ("10.244.3.0/24", NODE3_IP)] {
        h.datapath
            .upsert_remote(cidr.parse().expect("CIDR"), node)
            .expect("remote CIDR");
        h.datapath.upsert_node_address(node).expect("node address");
    }
    h.datapath
        .set_config(NodeConfig {
            node_ip: u32::from_ne_bytes(NODE1_IP.octets()),
            mode,
            tunnel_ifindex: 0,
            underlay_ifindex,
            vni: 1,
            vxlan_port: if mode == MODE_VXLAN {
                4789u16.to_be()
            } else {
                0
            },
            reserved: 0,
            pod_cidr_network: u32::from_ne_bytes([10, 244, 0, 0]),
            pod_cidr_mask: u32::from_ne_bytes([255, 255, 255, 0]),
            drop_events_per_sec: 0,
            flags: 0,
        })
        .expect("config");
    h
}

fn counters(h: &BpfHarness) -> Counters {
    h.datapath.counters().expect("read counters")
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
