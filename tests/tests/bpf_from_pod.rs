//! from_pod on crafted frames (BPF_PROG_TEST_RUN): the forwarding decision,
//! the header rewrite and the counters, without any interface.
//!
//! Under test-run the skb arrives on the loopback device, so the sending
//! endpoint is registered with loopback's ifindex as its host veth.

use std::net::Ipv4Addr;

use podnet_common::{
    DropReason, EndpointInfo, EndpointStats, Verdict,
    names::PROG_FROM_POD,
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use podnet_tests::{
    bpf_fixture::{
        HOST_A_MAC, HOST_B_MAC, NODE1_IP, NODE2_IP, NODE2_POD, POD_A_IP, POD_A_MAC, POD_B_IFINDEX,
        POD_B_IP, POD_B_MAC, counters, loopback_ifindex, two_pods,
    },
    bpf_run::{BpfHarness, RunOutcome},
    frames::{self, ETH_P_ARP, ETH_P_IPV6, IP_CSUM_OFF, IP_ID_OFF, TTL_OFF},
    privileged,
};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The ifb a limited pod's sends go to (any ifindex: test-run does not
/// follow the redirect).
const SHAPER_IFINDEX: u32 = 4343;

fn from_pod_a(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    frames::ipv4_udp(
        HOST_A_MAC,
        POD_A_MAC,
        POD_A_IP,
        dst,
        ttl,
        b"podnet test payload",
    )
}

fn run(h: &mut BpfHarness, frame: &[u8]) -> RunOutcome {
    h.run(PROG_FROM_POD, frame)
        .expect("BPF_PROG_TEST_RUN of from_pod")
}

#[test]
fn local_destination_is_redirected_to_the_peer_with_rewritten_headers() {
    if !privileged("local_destination_is_redirected_to_the_peer_with_rewritten_headers") {
        return;
    }
    let mut h = two_pods("redirect");
    let frame = from_pod_a(POD_B_IP, 64);
    let out = run(&mut h, &frame);

    assert_eq!(out.verdict, TC_ACT_REDIRECT, "bpf_redirect_peer's verdict");
    assert_eq!(out.frame.len(), frame.len());
    assert_eq!(
        &out.frame[0..6],
        &POD_B_MAC,
        "destination MAC = the destination pod's"
    );
    assert_eq!(
        &out.frame[6..12],
        &HOST_B_MAC,
        "source MAC = the destination's host veth"
    );
    assert_eq!(out.frame[TTL_OFF], 63, "a routed hop decrements the TTL");
    assert!(
        frames::ipv4_header_checksum_ok(&out.frame),
        "IPv4 checksum fixed after the TTL change"
    );
    assert_ne!(
        out.frame[IP_CSUM_OFF..IP_CSUM_OFF + 2],
        frame[IP_CSUM_OFF..IP_CSUM_OFF + 2]
    );
    // Everything else untouched.
    assert_eq!(&out.frame[12..TTL_OFF], &frame[12..TTL_OFF]);
    assert_eq!(
        &out.frame[TTL_OFF + 1..IP_CSUM_OFF],
        &frame[TTL_OFF + 1..IP_CSUM_OFF]
    );
    assert_eq!(&out.frame[IP_CSUM_OFF + 2..], &frame[IP_CSUM_OFF + 2..]);

    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 1);
    assert_eq!(c.verdict(Verdict::PassToStack), 0);
    assert_eq!(c.verdict(Verdict::Drop), 0);
    let stats = h
        .datapath
        .endpoint_stats(loopback_ifindex())
        .expect("read endpoint stats");
    assert_eq!(
        stats,
        Some(EndpointStats {
            packets: 1,
            bytes: frame.len() as u64
        }),
        "the sender's per-endpoint counters"
    );
}

/// The per-veth entry (who may send, and the counters) follows the agent's
/// view: re-adding the same endpoint (an agent restart) keeps the counters;
/// a veth that now belongs to a different pod identity starts afresh and
/// only that identity may send; a removed endpoint's veth may not send.
#[test]
fn veth_identity_follows_the_endpoint() {
    if !privileged("veth_identity_follows_the_endpoint") {
        return;
    }
    let mut h = two_pods("identity");
    let lo = loopback_ifindex();
    let frame = from_pod_a(POD_B_IP, 64);
    assert_eq!(run(&mut h, &frame).verdict, TC_ACT_REDIRECT);
    let a = EndpointInfo {
        host_ifindex: lo,
        flags: 0,
        pod_mac: POD_A_MAC,
        host_mac: HOST_A_MAC,
    };
    h.datapath.upsert_endpoint(POD_A_IP, a).expect("re-add A");
    let packets = |h: &BpfHarness| {
        h.datapath
            .endpoint_stats(lo)
            .expect("stats")
            .map(|s| s.packets)
    };
    assert_eq!(packets(&h), Some(1), "counters kept across a re-add");

    // The veth now carries pod A with a new MAC: the old MAC is refused.
    let new_mac = [0x02, 0xaa, 0, 0, 0, 0x99];
    h.datapath
        .upsert_endpoint(
            POD_A_IP,
            EndpointInfo {
                pod_mac: new_mac,
                ..a
            },
        )
        .expect("A with a new MAC");
    assert_eq!(packets(&h), Some(0), "a new identity starts from zero");
    assert_eq!(run(&mut h, &frame).verdict, TC_ACT_SHOT);
    let mut new_frame = frame.clone();
    new_frame[6..12].copy_from_slice(&new_mac);
    assert_eq!(run(&mut h, &new_frame).verdict, TC_ACT_REDIRECT);

    // Removed: the veth's packets are no longer anyone's.
    h.datapath.remove_endpoint(POD_A_IP).expect("remove A");
    assert_eq!(packets(&h), None);
    assert_eq!(run(&mut h, &new_frame).verdict, TC_ACT_SHOT);
    assert_eq!(counters(&h).drop_count(DropReason::UnknownSender), 1);
    assert_eq!(counters(&h).drop_count(DropReason::SpoofedSourceIp), 0);
    assert_eq!(counters(&h).drop_count(DropReason::SpoofedSourceMac), 1);
}

#[test]
fn unknown_destination_passes_to_the_host_stack_unchanged() {
    if !privileged("unknown_destination_passes_to_the_host_stack_unchanged") {
        return;
    }
    let mut h = two_pods("miss");
    for dst in [OUTSIDE_IP, Ipv4Addr::new(10, 244, 0, 99)] {
        let frame = from_pod_a(dst, 64);
        let out = run(&mut h, &frame);
        assert_eq!(
            out.verdict, TC_ACT_OK,
            "{dst}: not a local endpoint -> host stack"
        );
        assert_eq!(out.frame, frame, "{dst}: frame left untouched");
    }
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::PassToStack), 2);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);
}

#[test]
fn expiring_ttl_is_left_to_the_host_stack() {
    if !privileged("expiring_ttl_is_left_to_the_host_stack") {
        return;
    }
    let mut h = two_pods("ttl");
    let frame = from_pod_a(POD_B_IP, 1);
    let out = run(&mut h, &frame);
    assert_eq!(
        out.verdict, TC_ACT_OK,
        "TTL 1: the host answers with ICMP time exceeded"
    );
    assert_eq!(out.frame, frame);
    assert_eq!(counters(&h).verdict(Verdict::RedirectPeer), 0);
}

fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr, op: u8) -> Vec<u8> {
    let mut arp = frames::ethernet([0xff; 6], sender_mac, ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, op]);
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip.octets());
    arp
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

#[test]
fn arp_request_from_a_pod_is_answered_with_its_host_veth_mac() {
    if !privileged("arp_request_from_a_pod_is_answered_with_its_host_veth_mac") {
        return;
    }
    let mut h = two_pods("arp");
    let out = run(&mut h, &arp_request(POD_A_MAC, POD_A_IP, GATEWAY, 1));
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back to the pod");
    let mut expected = frames::ethernet(POD_A_MAC, HOST_A_MAC, ETH_P_ARP);
    expected.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    expected.extend_from_slice(&HOST_A_MAC);
    expected.extend_from_slice(&GATEWAY.octets());
    expected.extend_from_slice(&POD_A_MAC);
    expected.extend_from_slice(&POD_A_IP.octets());
    assert_eq!(
        out.frame, expected,
        "a reply: the gateway is at the host veth's MAC"
    );
    assert_eq!(counters(&h).verdict(Verdict::ArpReply), 1);
}

/// A pod speaks ARP only as itself: its own replies and announcements go to
/// the host stack unchanged; ARP with a forged sender IP or MAC (neighbour
/// cache poisoning), IPv6 (router advertisements would configure the node)
/// and tagged frames (the stack would strip the tags and route the inner
/// packet unchecked) are dropped, each under its own reason; and nothing at
/// all passes from a veth that is no endpoint's.
#[test]
fn pods_speak_arp_only_as_themselves_and_nothing_but_ipv4_and_arp() {
    if !privileged("pods_speak_arp_only_as_themselves_and_nothing_but_ipv4_and_arp") {
        return;
    }
    let mut h = two_pods("nonip");
    let reply = arp_request(POD_A_MAC, POD_A_IP, GATEWAY, 2);
    let gratuitous = arp_request(POD_A_MAC, POD_A_IP, POD_A_IP, 1);
    for (what, frame) in [("ARP reply", reply), ("gratuitous ARP", gratuitous)] {
        let out = run(&mut h, &frame);
        assert_eq!(out.verdict, TC_ACT_OK, "{what} goes to the host stack");
        assert_eq!(out.frame, frame, "{what} is not modified");
    }

    let forged_ip = arp_request(POD_A_MAC, Ipv4Addr::new(10, 244, 0, 77), GATEWAY, 1);
    let forged_mac = arp_request([2, 9, 9, 9, 9, 9], POD_A_IP, GATEWAY, 1);
    let forged_reply = arp_request(POD_A_MAC, POD_B_IP, GATEWAY, 2);
    // Sender fields right, the frame's source MAC another's.
    let mut forged_frame_src = arp_request(POD_A_MAC, POD_A_IP, GATEWAY, 1);
    forged_frame_src[6..12].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    let mut not_ipv4_arp = arp_request(POD_A_MAC, POD_A_IP, GATEWAY, 1);
    not_ipv4_arp[14 + 2..14 + 4].copy_from_slice(&[0x86, 0xdd]);
    let mut ipv6 = frames::ethernet([0x33, 0x33, 0, 0, 0, 1], POD_A_MAC, ETH_P_IPV6);
    // A router advertisement (ICMPv6 134) to all nodes.
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 58, 255]);
    ipv6.extend_from_slice(&[0xfe; 32]);
    ipv6.extend_from_slice(&[134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let udp = from_pod_a(POD_B_IP, 64);
    let tagged = |tpids: &[[u8; 2]]| {
        let mut frame = udp[..12].to_vec();
        for tpid in tpids {
            frame.extend_from_slice(tpid);
            frame.extend_from_slice(&[0, 0]); // VID 0: priority tag
        }
        frame.extend_from_slice(&udp[12..]);
        frame
    };
    let vlan = tagged(&[[0x81, 0x00]]);
    let qinq = tagged(&[[0x88, 0xa8], [0x81, 0x00]]);
    for (what, frame, reason) in [
        (
            "ARP request with a forged sender IP",
            forged_ip,
            DropReason::ForgedArp,
        ),
        (
            "ARP request with a forged sender MAC",
            forged_mac,
            DropReason::ForgedArp,
        ),
        (
            "ARP reply for another pod's IP",
            forged_reply,
            DropReason::ForgedArp,
        ),
        (
            "ARP from another source MAC",
            forged_frame_src,
            DropReason::ForgedArp,
        ),
        (
            "ARP for another protocol",
            not_ipv4_arp,
            DropReason::ForgedArp,
        ),
        ("IPv6 router advertisement", ipv6, DropReason::Ipv6FromPod),
        ("802.1Q-tagged IPv4", vlan, DropReason::UnsupportedEthertype),
        ("QinQ-tagged IPv4", qinq, DropReason::UnsupportedEthertype),
    ] {
        let before = counters(&h).drop_count(reason);
        assert_eq!(
            run(&mut h, &frame).verdict,
            TC_ACT_SHOT,
            "{what} is dropped"
        );
        assert_eq!(
            counters(&h).drop_count(reason),
            before + 1,
            "{what} is counted as {}",
            reason.name()
        );
    }
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::PassToStack), 2);
    assert_eq!(c.verdict(Verdict::ArpReply), 0);
    assert_eq!(c.verdict(Verdict::Drop), 8);

    // A veth that is no endpoint's: not even ARP passes.
    h.datapath.remove_endpoint(POD_A_IP).expect("remove A");
    for frame in [arp_request(POD_A_MAC, POD_A_IP, GATEWAY, 1), udp] {
        assert_eq!(run(&mut h, &frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(counters(&h).drop_count(DropReason::UnknownSender), 2);
}

#[test]
fn truncated_frames_never_fault() {
    if !privileged("truncated_frames_never_fault") {
        return;
    }
    let mut h = two_pods("truncated");
    // Shorter than an Ethernet header: the kernel refuses the run itself
    // (bpf_test_init: size < ETH_HLEN -> EINVAL); a veth never delivers such
    // a frame to TC either. The program is not involved.
    for len in [0usize, 13] {
        let err = h
            .run(PROG_FROM_POD, &vec![0u8; len])
            .expect_err("frames shorter than 14 bytes are refused by the kernel");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{len} bytes: {err}");
    }
    let c = counters(&h);
    assert!(
        c.verdicts.values().chain(c.drops.values()).all(|&n| n == 0),
        "no run happened: {c:?}"
    );

    let full = from_pod_a(POD_B_IP, 64);
    let mut arp_type = full.clone();
    arp_type[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let mut expected_drops = 0;
    for len in [14usize, 33] {
        // An ARP frame too short for an ARP header is no ARP a pod may send.
        let out = run(&mut h, &arp_type[..len]);
        assert_eq!(
            out.verdict, TC_ACT_SHOT,
            "{len}-byte ARP-type frame is dropped"
        );
        assert_eq!(out.frame, arp_type[..len]);
        // An IPv4 EtherType with no (14) or a cut (33) IPv4 header: Linux
        // 6.18's test-run refuses to build such an skb (EINVAL) before the
        // program runs; where a kernel accepts it, the program must drop it
        // as malformed. Either way: no fault, no forwarding.
        match h.run(PROG_FROM_POD, &full[..len]) {
            Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{len} bytes: {err}"),
            Ok(out) => {
                assert_eq!(
                    out.verdict, TC_ACT_SHOT,
                    "{len}-byte IPv4 frame is malformed"
                );
                assert_eq!(out.frame, full[..len], "{len} bytes: not modified");
                expected_drops += 1;
            }
        }
    }
    // A complete fixed header whose IHL claims options beyond the frame.
    let mut ihl_past_end = full[..34].to_vec();
    ihl_past_end[14] = 0x46;
    // IHL below the minimum of 5 words.
    let mut ihl_too_small = full.clone();
    ihl_too_small[14] = 0x44;
    // Not version 4.
    let mut wrong_version = full.clone();
    wrong_version[14] = 0x65;
    for (what, frame) in [
        ("IHL past the end", &ihl_past_end),
        ("IHL < 5", &ihl_too_small),
        ("version 6 in an IPv4 frame", &wrong_version),
    ] {
        let out = run(&mut h, frame);
        assert_eq!(out.verdict, TC_ACT_SHOT, "{what}: dropped as malformed");
        assert_eq!(&out.frame, frame, "{what}: not modified");
        expected_drops += 1;
    }

    let c = counters(&h);
    assert_eq!(c.drop_count(DropReason::MalformedIpv4), expected_drops);
    assert_eq!(c.drop_count(DropReason::ForgedArp), 2);
    assert_eq!(c.verdict(Verdict::Drop), expected_drops + 2);
    assert_eq!(c.verdict(Verdict::PassToStack), 0);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    if !privileged("spoofed_sources_are_dropped_and_counted") {
        return;
    }
    let mut h = two_pods("spoof");
    // Pod A claims pod B's address (B's host veth is not the one it sends on).
    let as_b = frames::ipv4_udp(HOST_A_MAC, POD_A_MAC, POD_B_IP, OUTSIDE_IP, 64, b"x");
    // Pod A claims an address that is nobody's.
    let unknown = frames::ipv4_udp(
        HOST_A_MAC,
        POD_A_MAC,
        Ipv4Addr::new(10, 9, 9, 9),
        POD_B_IP,
        64,
        b"x",
    );
    // Pod A's address with a forged source MAC.
    let forged_mac = frames::ipv4_udp(
        HOST_A_MAC,
        [0x02, 0xde, 0xad, 0, 0, 1],
        POD_A_IP,
        POD_B_IP,
        64,
        b"x",
    );
    for frame in [&as_b, &unknown, &forged_mac] {
        assert_eq!(run(&mut h, frame).verdict, TC_ACT_SHOT);
    }
    let c = counters(&h);
    assert_eq!(c.drop_count(DropReason::SpoofedSourceIp), 2);
    assert_eq!(c.drop_count(DropReason::SpoofedSourceMac), 1);
    assert_eq!(c.verdict(Verdict::Drop), 3);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);
}

/// The TTL decrement patches the checksum incrementally (RFC 1624, as the
/// kernel's `ip_decrease_ttl`); the one's-complement end-around carry is
/// where such code goes wrong. Every checksum value a sender computes is hit
/// by sweeping the 16-bit IP ID (the checksum moves with it), plus 0xffff,
/// the other spelling of zero that only incremental updates produce.
#[test]
fn ttl_decrement_keeps_every_checksum_valid() {
    if !privileged("ttl_decrement_keeps_every_checksum_valid") {
        return;
    }
    let mut h = two_pods("checksum");
    let mut frame = from_pod_a(POD_B_IP, 64);
    let mut checksums_seen = std::collections::HashSet::new();
    for id in 0..=u16::MAX {
        frame[IP_ID_OFF..IP_ID_OFF + 2].copy_from_slice(&id.to_be_bytes());
        frame[IP_CSUM_OFF..IP_CSUM_OFF + 2].fill(0);
        let computed = frames::internet_checksum(&frame[14..34]);
        let spellings: &[u16] = if computed == 0 {
            &[0, 0xffff]
        } else {
            &[computed]
        };
        for &csum in spellings {
            frame[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&csum.to_be_bytes());
            assert!(frames::ipv4_header_checksum_ok(&frame));
            checksums_seen.insert(csum);

            let out = run(&mut h, &frame);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "IP ID {id:#06x}");
            assert_eq!(out.frame[TTL_OFF], 63);
            assert!(
                frames::ipv4_header_checksum_ok(&out.frame),
                "checksum {csum:#06x} (IP ID {id:#06x}) invalid after the TTL decrement: {:02x?}",
                &out.frame[IP_CSUM_OFF..IP_CSUM_OFF + 2]
            );
        }
    }
    assert_eq!(
        checksums_seen.len(),
        0x1_0000,
        "the sweep covers every checksum value"
    );
}

#[test]
fn remote_destinations_are_encapsulated_or_routed_per_the_node_config() {
    if !privileged("remote_destinations_are_encapsulated_or_routed_per_the_node_config") {
        return;
    }
    let mut h = two_pods("remote");
    let remote_pod = NODE2_POD;
    let node2 = NODE2_IP;
    h.datapath
        .upsert_remote("10.244.1.0/24".parse().expect("cidr"), node2)
        .expect("remote CIDR");
    let frame = from_pod_a(remote_pod, 64);

    // No node config yet: the packet cannot be forwarded and is counted.
    assert_eq!(run(&mut h, &frame).verdict, TC_ACT_SHOT);
    assert_eq!(counters(&h).drop_count(DropReason::NoNodeConfig), 1);

    // VXLAN: tunnel key set, redirected to the tunnel device, TTL - 1.
    let lo = loopback_ifindex();
    let mut config = podnet_common::NodeConfig {
        node_ip: u32::from_ne_bytes([192, 168, 100, 11]),
        mode: podnet_common::node::MODE_VXLAN,
        tunnel_ifindex: lo,
        underlay_ifindex: lo,
        vni: 1,
        vxlan_port: 0,
        ..podnet_common::NodeConfig::default()
    };
    h.datapath.set_config(config).expect("config");
    let out = run(&mut h, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame[TTL_OFF], 63);
    assert!(frames::ipv4_header_checksum_ok(&out.frame));
    assert_eq!(counters(&h).verdict(Verdict::VxlanEncap), 1);

    // Direct: redirect_neigh towards the remote node.
    config.mode = podnet_common::node::MODE_DIRECT;
    h.datapath.set_config(config).expect("config");
    assert_eq!(run(&mut h, &frame).verdict, TC_ACT_REDIRECT);
    assert_eq!(counters(&h).verdict(Verdict::RedirectNeigh), 1);

    // Outside the cluster: still the host stack.
    assert_eq!(run(&mut h, &from_pod_a(OUTSIDE_IP, 64)).verdict, TC_ACT_OK);
}

/// A pod cannot talk VXLAN to a node: UDP to the cluster's VXLAN port of
/// anything but a pod is dropped (the node's VXLAN device would deliver the
/// inner packet, whatever source it claims). UDP on that port between pods
/// is ordinary pod traffic; without an overlay (port 0) nothing is checked.
#[test]
fn vxlan_from_a_pod_to_a_node_is_dropped() {
    if !privileged("vxlan_from_a_pod_to_a_node_is_dropped") {
        return;
    }
    let mut h = two_pods("vxlan-inject");
    let lo = loopback_ifindex();
    let vxlan_port: u16 = 4789;
    let config = podnet_common::NodeConfig {
        node_ip: u32::from_ne_bytes([192, 168, 100, 11]),
        mode: podnet_common::node::MODE_VXLAN,
        tunnel_ifindex: lo,
        underlay_ifindex: lo,
        vni: 1,
        vxlan_port: vxlan_port.to_be(),
        ..podnet_common::NodeConfig::default()
    };
    h.datapath.set_config(config).expect("config");
    // Node 2's address is in the remote trie: pods reach it through the
    // tunnel, all but its VXLAN port.
    let node2 = NODE2_IP;
    h.datapath.upsert_node_address(node2).expect("node address");
    // A VXLAN header (I flag, VNI 1) and an inner frame claiming pod B.
    let inner = frames::ipv4_udp(HOST_B_MAC, POD_B_MAC, POD_B_IP, POD_A_IP, 64, b"forged");
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vxlan.extend_from_slice(&inner);
    let udp = frames::udp_datagram(40_000, vxlan_port, &vxlan);
    let to = |dst: Ipv4Addr| {
        frames::ipv4_frame(
            (HOST_A_MAC, POD_A_MAC),
            (POD_A_IP, dst),
            frames::IPPROTO_UDP,
            0,
            &udp,
        )
    };
    for node in [NODE1_IP, NODE2_IP, OUTSIDE_IP] {
        assert_eq!(
            run(&mut h, &to(node)).verdict,
            TC_ACT_SHOT,
            "VXLAN to {node}"
        );
    }
    assert_eq!(counters(&h).drop_count(DropReason::VxlanFromPod), 3);
    let to_node2 = frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (POD_A_IP, node2),
        frames::IPPROTO_UDP,
        0,
        &frames::udp_datagram(40_000, 8472, b"not vxlan"),
    );
    assert_eq!(run(&mut h, &to_node2).verdict, TC_ACT_REDIRECT);
    assert_eq!(
        counters(&h).verdict(Verdict::VxlanEncap),
        1,
        "other UDP to node 2 goes through the tunnel"
    );
    assert_eq!(
        run(&mut h, &to(POD_B_IP)).verdict,
        TC_ACT_REDIRECT,
        "UDP 4789 between pods is pod traffic"
    );
    h.datapath
        .set_config(podnet_common::NodeConfig {
            vxlan_port: 0,
            ..config
        })
        .expect("config");
    assert_eq!(
        run(&mut h, &to(OUTSIDE_IP)).verdict,
        TC_ACT_OK,
        "no overlay, no check"
    );
}

/// An egress-limited pod's packets are checked like any other's first
/// (a forged one never reaches the shaper), then every one of them,
/// whatever its destination, is handed to its shaper.
#[test]
fn a_limited_pods_packets_are_checked_then_handed_to_its_shaper() {
    if !privileged("a_limited_pods_packets_are_checked_then_handed_to_its_shaper") {
        return;
    }
    let mut h = two_pods("shaper");
    h.datapath
        .upsert_shaped_endpoint(
            POD_A_IP,
            EndpointInfo {
                host_ifindex: loopback_ifindex(),
                flags: 0,
                pod_mac: POD_A_MAC,
                host_mac: HOST_A_MAC,
            },
            SHAPER_IFINDEX,
        )
        .expect("pod A with an egress limit");
    for dst in [POD_B_IP, OUTSIDE_IP] {
        let out = run(&mut h, &from_pod_a(dst, 64));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "to the shaper: {dst}");
        assert_eq!(
            out.frame,
            from_pod_a(dst, 64),
            "handed over as sent: the stack routes it after the shaper"
        );
    }
    let forged = frames::ipv4_udp(
        HOST_A_MAC,
        POD_A_MAC,
        Ipv4Addr::new(10, 244, 0, 99),
        POD_B_IP,
        64,
        b"forged",
    );
    assert_eq!(run(&mut h, &forged).verdict, TC_ACT_SHOT);
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::ToShaper), 2);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);
    assert_eq!(c.verdict(Verdict::PassToStack), 0);
    assert_eq!(c.drop_count(DropReason::SpoofedSourceIp), 1);
}

/// A pod with an ingress limit still gets its packets as a routed hop
/// (through its host veth's egress, where the tbf is; the lab test
/// measures the limit).
#[test]
fn a_pod_with_an_ingress_limit_gets_routed_hops() {
    if !privileged("a_pod_with_an_ingress_limit_gets_routed_hops") {
        return;
    }
    let mut h = two_pods("shapedin");
    h.datapath
        .upsert_endpoint(
            POD_B_IP,
            EndpointInfo {
                host_ifindex: POD_B_IFINDEX,
                flags: podnet_common::endpoint::ENDPOINT_F_SHAPED_INGRESS,
                pod_mac: POD_B_MAC,
                host_mac: HOST_B_MAC,
            },
        )
        .expect("pod B with an ingress limit");
    let out = run(&mut h, &from_pod_a(POD_B_IP, 64));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.frame[0..6], &POD_B_MAC);
    assert_eq!(&out.frame[6..12], &HOST_B_MAC);
    assert_eq!(out.frame[TTL_OFF], 63);
    assert_eq!(counters(&h).verdict(Verdict::RedirectPeer), 1);
}

/// `--vxlan-datapath bpf`: from_pod writes the VXLAN packet itself, as the
/// kernel device would put it on the wire (RFC 7348): outer IPv4 from this
/// node to the remote one (DF, TTL 64, valid checksum), UDP to the VXLAN
/// port from a port of the kernel's range, checksum 0, VXLAN header with
/// the VNI, then the pod's frame (TTL - 1) unchanged. from_underlay on the
/// other node takes the same bytes back off.
#[test]
fn vxlan_bpf_encapsulation_writes_the_outer_headers_and_decap_removes_them() {
    if !privileged("vxlan_bpf_encapsulation_writes_the_outer_headers_and_decap_removes_them") {
        return;
    }
    let mut h = two_pods("vxlan-bpf");
    let lo = loopback_ifindex();
    let remote_pod = NODE2_POD;
    let (node1, node2) = ([192, 168, 100, 11], NODE2_IP);
    h.datapath
        .upsert_remote("10.244.1.0/24".parse().expect("cidr"), node2)
        .expect("remote CIDR");
    h.datapath.upsert_node_address(node2).expect("node address");
    let config = podnet_common::NodeConfig {
        node_ip: u32::from_ne_bytes(node1),
        mode: podnet_common::node::MODE_VXLAN,
        tunnel_ifindex: lo,
        underlay_ifindex: lo,
        vni: 0x12_3456,
        vxlan_port: 4789u16.to_be(),
        flags: podnet_common::node::NODE_F_VXLAN_BPF,
        ..podnet_common::NodeConfig::default()
    };
    h.datapath.set_config(config).expect("config");
    let frame = from_pod_a(remote_pod, 64);
    let out = run(&mut h, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let f = &out.frame;
    assert_eq!(f.len(), frame.len() + 50, "50 bytes of VXLAN");
    let be16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    // Outer Ethernet: IPv4 (bpf_redirect_neigh fills in the MACs).
    assert_eq!(be16(12), 0x0800);
    // Outer IPv4.
    assert_eq!(f[14], 0x45);
    assert_eq!(usize::from(be16(16)), f.len() - 14, "total length");
    assert_eq!(be16(20), 0x4000, "DF, no fragment offset");
    assert_eq!((f[22], f[23]), (64, 17), "TTL 64, UDP");
    assert!(frames::ipv4_header_checksum_ok(f), "outer header checksum");
    assert_eq!(f[26..30], node1, "from this node");
    assert_eq!(f[30..34], node2.octets(), "to the remote node");
    // UDP.
    let src_port = be16(34);
    assert!(
        (32768..61000).contains(&src_port),
        "source port {src_port} in the kernel's range"
    );
    assert_eq!(be16(36), 4789);
    assert_eq!(usize::from(be16(38)), f.len() - 34, "UDP length");
    assert_eq!(be16(40), 0, "no UDP checksum");
    // VXLAN: I flag, VNI.
    assert_eq!(f[42..50], [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    // The pod's frame, routed: TTL - 1, header checksum still valid.
    let inner = &f[50..];
    let mut routed = frame.clone();
    routed[TTL_OFF] = 63;
    assert!(
        frames::ipv4_header_checksum_ok(inner),
        "inner header checksum"
    );
    routed[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&inner[IP_CSUM_OFF..IP_CSUM_OFF + 2]);
    assert_eq!(inner, routed.as_slice(), "the pod's frame, TTL - 1");
    // The same flow, the same source port (RSS/ECMP see one flow).
    assert_eq!(run(&mut h, &frame).frame[34..36], f[34..36]);
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::VxlanEncapBpf), 2);
    assert_eq!(c.verdict(Verdict::VxlanEncap), 0, "not the VXLAN device");

    // The other way: node2 sent this to pod A. from_underlay decapsulates
    // and delivers (redirect_peer): pod A's frame, MACs of its veth, TTL - 1.
    let from_node2 = |inner_src: Ipv4Addr| {
        let inner = frames::ipv4_udp(POD_B_MAC, HOST_B_MAC, inner_src, POD_A_IP, 64, b"back");
        let mut vxlan = vec![0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0];
        vxlan.extend_from_slice(&inner);
        let udp = frames::udp_datagram(50_000, 4789, &vxlan);
        let outer = frames::ipv4_frame(
            (HOST_A_MAC, POD_B_MAC),
            (node2, Ipv4Addr::from(node1)),
            frames::IPPROTO_UDP,
            0,
            &udp,
        );
        (outer, inner)
    };
    let (outer, sent) = from_node2(remote_pod);
    let out = h
        .run(podnet_common::names::PROG_FROM_UNDERLAY, &outer)
        .expect("test run of from_underlay");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "delivered");
    assert_eq!(out.frame.len(), sent.len(), "outer headers gone");
    assert_eq!(out.frame[0..6], POD_A_MAC);
    assert_eq!(out.frame[6..12], HOST_A_MAC);
    assert_eq!(out.frame[TTL_OFF], 63);
    assert!(frames::ipv4_header_checksum_ok(&out.frame));
    assert_eq!(out.frame[34..], sent[34..], "UDP datagram untouched");
    assert_eq!(counters(&h).verdict(Verdict::VxlanDecapBpf), 1);
    // node2 speaking for a source that is not its own: dropped, counted.
    let (forged, _) = from_node2(POD_B_IP);
    let out = h
        .run(podnet_common::names::PROG_FROM_UNDERLAY, &forged)
        .expect("test run of from_underlay");
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(counters(&h).drop_count(DropReason::TunnelSourceMismatch), 1);
    // Another VNI: not this overlay's, left to the stack untouched.
    let mut other_vni = outer.clone();
    other_vni[46] ^= 1;
    let out = h
        .run(podnet_common::names::PROG_FROM_UNDERLAY, &other_vni)
        .expect("test run of from_underlay");
    assert_eq!(
        (out.verdict, out.frame.as_slice()),
        (TC_ACT_OK, other_vni.as_slice())
    );
}
