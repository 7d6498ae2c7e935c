//! NetworkPolicy in the datapath on crafted frames (BPF_PROG_TEST_RUN):
//! the rules' lookups, the CIDR sets with their holes, the connection
//! tracking that lets replies and ICMP errors through, the node's own
//! traffic, and the Service CIDR judged after the DNAT, with the maps
//! written as the agent writes them.
//!
//! Under test-run the skb arrives on the loopback device, so pod A (the
//! sender of from_pod) is registered with loopback's ifindex as its veth.

use std::net::Ipv4Addr;

use podnet_common::{
    DropReason, PolicyCidrKey, PolicyKey, PolicyRule, Verdict,
    endpoint::{ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    names::{PROG_FROM_POD, PROG_TO_POD},
    node::MODE_VXLAN,
    policy::{
        DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_FIRST_CIDR_SET,
        IDENTITY_FIRST_POD, IDENTITY_HOST, IDENTITY_UNKNOWN, POLICY_CIDR_PREFIX_BASE,
        POLICY_KEY_BITS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
    },
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
};
use podnet_tests::{
    bpf_fixture::{
        EXTERNAL, HOST_A_MAC, NODE1_IP, POD_A_IP, POD_A_MAC, POD_B, POD_B_IP, POD_B_MAC, counters,
        node1, node1_config, pod_a, two_pods,
    },
    bpf_run::BpfHarness,
    frames::{self, IPPROTO_ICMP, IPPROTO_TCP, TCP_ACK, TCP_SYN},
    privileged,
};

const IPPROTO_UDP: u8 = 17;
const A_IDENTITY: u32 = IDENTITY_FIRST_POD;
const B_IDENTITY: u32 = IDENTITY_FIRST_POD + 1;
const CLIENT_PORT: u16 = 40_123;

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Pods A and B with their identities.
fn pods(tag: &str) -> BpfHarness {
    let mut h = two_pods(tag);
    h.datapath
        .upsert_identity(POD_A_IP, A_IDENTITY)
        .expect("A's identity");
    h.datapath
        .upsert_identity(POD_B_IP, B_IDENTITY)
        .expect("B's identity");
    h
}

fn select(h: &mut BpfHarness, pod: Ipv4Addr, flags: u32) {
    assert!(
        h.datapath
            .set_policy_flags(pod, flags)
            .expect("policy bits"),
        "{pod} is a local endpoint"
    );
}

fn allow(
    h: &mut BpfHarness,
    (endpoint, direction): (Ipv4Addr, u8),
    identity: u32,
    (prefix, protocol, port): (u32, u8, u16),
) {
    h.datapath
        .upsert_policy_rule(
            prefix,
            PolicyKey {
                endpoint: key(endpoint),
                identity,
                direction,
                protocol,
                port: port.to_be(),
            },
            PolicyRule {
                rule: 7,
                reserved: 0,
            },
        )
        .expect("rule");
}

/// A's TCP segment to `dst`:`port` with `flags`, as from_pod sees it.
fn tcp_from_a(dst: Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (POD_A_IP, dst),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, port, flags),
    )
}

/// B's TCP segment from `port` back to A's client port, as the stack
/// hands it to A (to_pod).
fn tcp_b_to_a(port: u16, flags: u8) -> Vec<u8> {
    frames::ipv4_frame(
        (POD_A_MAC, HOST_A_MAC),
        (POD_B_IP, POD_A_IP),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(port, CLIENT_PORT, flags),
    )
}

/// A UDP datagram `src` -> `dst`:`port` (with pod A's MACs, which is
/// what from_pod checks when A sends it; to_pod reads no MAC).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (src, dst),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(CLIENT_PORT, port, b"policy"),
    )
}

fn run(h: &mut BpfHarness, program: &'static str, frame: &[u8]) -> i32 {
    h.run(program, frame).expect("test-run").verdict
}

fn denied(h: &BpfHarness, reason: DropReason) -> u64 {
    counters(h).drop_count(reason)
}

#[test]
fn an_isolated_pod_gets_only_what_its_rules_allow() {
    if !privileged("an_isolated_pod_gets_only_what_its_rules_allow") {
        return;
    }
    let mut h = pods("pol-ingress");
    select(&mut h, POD_B_IP, ENDPOINT_F_POLICY_INGRESS);
    allow(
        &mut h,
        (POD_B_IP, DIRECTION_INGRESS),
        A_IDENTITY,
        (POLICY_KEY_BITS, IPPROTO_TCP, 80),
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 80, TCP_SYN)),
        TC_ACT_REDIRECT,
        "TCP 80 from A's identity is allowed"
    );
    assert_eq!(counters(&h).verdict(Verdict::PolicyAllowed), 1);
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 81, TCP_SYN)),
        TC_ACT_SHOT,
        "TCP 81: no rule"
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &udp(POD_A_IP, POD_B_IP, 80)),
        TC_ACT_SHOT,
        "UDP 80: no rule"
    );
    assert_eq!(denied(&h, DropReason::PolicyDeniedIngress), 2);
    // Every port of TCP: a shorter prefix.
    allow(
        &mut h,
        (POD_B_IP, DIRECTION_INGRESS),
        A_IDENTITY,
        (POLICY_PREFIX_ANY_PORT, IPPROTO_TCP, 0),
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 81, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &udp(POD_A_IP, POD_B_IP, 80)),
        TC_ACT_SHOT,
        "still no UDP"
    );
    // Unselected again: everything passes, no lookup of any rule.
    select(&mut h, POD_B_IP, 0);
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &udp(POD_A_IP, POD_B_IP, 80)),
        TC_ACT_REDIRECT
    );
}

#[test]
fn a_port_range_is_a_set_of_prefixes() {
    if !privileged("a_port_range_is_a_set_of_prefixes") {
        return;
    }
    let mut h = pods("pol-range");
    select(&mut h, POD_B_IP, ENDPOINT_F_POLICY_INGRESS);
    // 80-81 is the prefix 80/15 of the port.
    allow(
        &mut h,
        (POD_B_IP, DIRECTION_INGRESS),
        IDENTITY_ANY,
        (POLICY_PREFIX_ANY_PORT + 15, IPPROTO_TCP, 80),
    );
    for (port, verdict) in [
        (79, TC_ACT_SHOT),
        (80, TC_ACT_REDIRECT),
        (81, TC_ACT_REDIRECT),
        (82, TC_ACT_SHOT),
    ] {
        assert_eq!(
            run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, port, TCP_SYN)),
            verdict,
            "port {port}"
        );
    }
}

#[test]
fn replies_and_icmp_errors_of_an_allowed_connection_pass() {
    if !privileged("replies_and_icmp_errors_of_an_allowed_connection_pass") {
        return;
    }
    let mut h = pods("pol-replies");
    // A is isolated both ways and may only open TCP 80 to B's identity.
    select(
        &mut h,
        POD_A_IP,
        ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS,
    );
    allow(
        &mut h,
        (POD_A_IP, DIRECTION_EGRESS),
        B_IDENTITY,
        (POLICY_KEY_BITS, IPPROTO_TCP, 80),
    );
    // Before A opens it, B's "reply" is a new connection to A: denied.
    assert_eq!(
        run(&mut h, PROG_TO_POD, &tcp_b_to_a(80, TCP_SYN | TCP_ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        run(&mut h, PROG_TO_POD, &tcp_b_to_a(80, TCP_SYN | TCP_ACK)),
        TC_ACT_UNSPEC,
        "the reply of A's allowed connection"
    );
    // The connection passes A's egress again (tracked); it goes up the
    // stack because to_pod saw B's segment come through the stack (the
    // stack-flows rule), not because of the policy.
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 80, TCP_ACK)),
        TC_ACT_OK
    );
    assert!(counters(&h).verdict(Verdict::PolicyTracked) >= 1);
    assert_eq!(
        run(&mut h, PROG_TO_POD, &tcp_b_to_a(81, TCP_SYN)),
        TC_ACT_SHOT,
        "another connection from B: A's ingress allows nothing"
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 81, TCP_SYN)),
        TC_ACT_SHOT,
        "A's egress allows 80 only"
    );
    assert_eq!(denied(&h, DropReason::PolicyDeniedEgress), 1);
    // An ICMP error about A's segment to B:80 (what a router or B sends
    // back) belongs to the connection.
    let embedded = tcp_from_a(POD_B_IP, 80, TCP_ACK)[14..14 + 28].to_vec();
    let error = frames::ipv4_frame(
        (POD_A_MAC, HOST_A_MAC),
        (POD_B_IP, POD_A_IP),
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(3, 4, [0, 0, 0x05, 0x78], &embedded),
    );
    assert_eq!(run(&mut h, PROG_TO_POD, &error), TC_ACT_UNSPEC);
    // The same error about a connection A never had: denied.
    let stray = tcp_from_a(POD_B_IP, 82, TCP_ACK)[14..14 + 28].to_vec();
    let error = frames::ipv4_frame(
        (POD_A_MAC, HOST_A_MAC),
        (POD_B_IP, POD_A_IP),
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(3, 4, [0, 0, 0x05, 0x78], &stray),
    );
    assert_eq!(run(&mut h, PROG_TO_POD, &error), TC_ACT_SHOT);
}

#[test]
fn an_egress_only_pod_answers_what_reaches_it() {
    if !privileged("an_egress_only_pod_answers_what_reaches_it") {
        return;
    }
    // B may send nothing new; A connects to it (B's ingress is open).
    let mut h = pods("pol-egress-answers");
    select(&mut h, POD_B_IP, ENDPOINT_F_POLICY_EGRESS);
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(POD_B_IP, 80, TCP_SYN)),
        TC_ACT_REDIRECT
    );
    // B's answer through the stack side (to_pod of A sees B as a local
    // sender with an egress policy): tracked, so it passes.
    assert_eq!(
        run(&mut h, PROG_TO_POD, &tcp_b_to_a(80, TCP_SYN | TCP_ACK)),
        TC_ACT_UNSPEC
    );
    // A new connection from B: its egress denies it.
    assert_eq!(
        run(&mut h, PROG_TO_POD, &tcp_b_to_a(443, TCP_SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(denied(&h, DropReason::PolicyDeniedEgress), 1);
}

#[test]
fn ip_blocks_match_with_their_except_holes() {
    if !privileged("ip_blocks_match_with_their_except_holes") {
        return;
    }
    let mut h = node1(
        "pol-cidr",
        &[pod_a(), POD_B],
        &[],
        node1_config(MODE_VXLAN, 1),
    );
    select(&mut h, POD_A_IP, ENDPOINT_F_POLICY_EGRESS);
    let set = IDENTITY_FIRST_CIDR_SET;
    let cidr = |h: &mut BpfHarness, network: Ipv4Addr, len: u32, value: u32| {
        h.datapath
            .upsert_policy_cidr(
                POLICY_CIDR_PREFIX_BASE + len,
                PolicyCidrKey {
                    endpoint: key(POD_A_IP),
                    direction: u32::from(DIRECTION_EGRESS),
                    address: key(network),
                },
                value,
            )
            .expect("CIDR entry");
    };
    // ipBlock 198.51.100.0/24 except 198.51.100.7/32, every port.
    cidr(&mut h, Ipv4Addr::new(198, 51, 100, 0), 24, set);
    cidr(&mut h, EXTERNAL, 32, IDENTITY_UNKNOWN);
    allow(
        &mut h,
        (POD_A_IP, DIRECTION_EGRESS),
        set,
        (POLICY_PREFIX_ANY_PROTOCOL, 0, 0),
    );
    let to = |dst: Ipv4Addr| {
        frames::ipv4_frame(
            (HOST_A_MAC, POD_A_MAC),
            (POD_A_IP, dst),
            IPPROTO_UDP,
            0,
            &frames::udp_datagram(CLIENT_PORT, 53, b"q"),
        )
    };
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &to(Ipv4Addr::new(198, 51, 100, 8))),
        TC_ACT_OK,
        "in the block: up the stack"
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &to(EXTERNAL)),
        TC_ACT_SHOT,
        "the except"
    );
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &to(Ipv4Addr::new(192, 0, 2, 10))),
        TC_ACT_SHOT,
        "outside the block"
    );
    // Pod IPs match ipBlocks too.
    cidr(&mut h, POD_B_IP, 32, set);
    let to_b = frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (POD_A_IP, POD_B_IP),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(CLIENT_PORT, 53, b"q"),
    );
    assert_eq!(run(&mut h, PROG_FROM_POD, &to_b), TC_ACT_REDIRECT);
}

#[test]
fn service_addresses_are_judged_after_the_dnat_and_the_node_always_reaches_its_pods() {
    if !privileged(
        "service_addresses_are_judged_after_the_dnat_and_the_node_always_reaches_its_pods",
    ) {
        return;
    }
    let mut h = node1(
        "pol-service",
        &[pod_a(), POD_B],
        &[],
        node1_config(MODE_VXLAN, 1),
    );
    h.datapath
        .upsert_identity(NODE1_IP, IDENTITY_HOST)
        .expect("the node's identity");
    // A may send nothing, B receive nothing.
    select(
        &mut h,
        POD_A_IP,
        ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS,
    );
    select(&mut h, POD_B_IP, ENDPOINT_F_POLICY_INGRESS);
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    assert_eq!(
        run(&mut h, PROG_FROM_POD, &tcp_from_a(cluster_ip, 80, TCP_SYN)),
        TC_ACT_OK,
        "to a ClusterIP: up the stack, judged after its DNAT"
    );
    // After the DNAT the stack hands it to B: A's egress denies it there.
    let dnat = frames::ipv4_frame(
        (POD_B_MAC, HOST_A_MAC),
        (POD_A_IP, POD_B_IP),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, 8080, TCP_SYN),
    );
    assert_eq!(run(&mut h, PROG_TO_POD, &dnat), TC_ACT_SHOT);
    assert_eq!(denied(&h, DropReason::PolicyDeniedEgress), 1);
    // The reply from the ClusterIP (DNAT undone) reaches A: its own
    // connection.
    let reply = frames::ipv4_frame(
        (POD_A_MAC, HOST_A_MAC),
        (cluster_ip, POD_A_IP),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(80, CLIENT_PORT, TCP_SYN | TCP_ACK),
    );
    assert_eq!(run(&mut h, PROG_TO_POD, &reply), TC_ACT_UNSPEC);
    // The node's own traffic (kubelet's probes) reaches an isolated pod;
    // the world's does not.
    assert_eq!(
        run(&mut h, PROG_TO_POD, &udp(NODE1_IP, POD_B_IP, 8080)),
        TC_ACT_UNSPEC
    );
    assert_eq!(
        run(&mut h, PROG_TO_POD, &udp(EXTERNAL, POD_B_IP, 8080)),
        TC_ACT_SHOT
    );
    assert_eq!(denied(&h, DropReason::PolicyDeniedIngress), 1);
}
