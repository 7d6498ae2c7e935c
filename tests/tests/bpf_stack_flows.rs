//! Flows through the host stack, on crafted frames (BPF_PROG_TEST_RUN):
//! to_pod records the reply direction of what the stack delivers from a
//! pod, from_pod / from_overlay hand those replies (and ICMP errors about
//! them, and every fragment) to the stack, and entries end: expired ones
//! and ones whose tuple a new fast-path connection takes.
//!
//! Under test-run the skb arrives on the loopback device, so the pod that
//! sends through from_pod is registered with loopback's ifindex.

use std::net::Ipv4Addr;

use podnet::datapath::{FlowSweeper, ip_key, monotonic_coarse_ns};
use podnet_common::{
    FlowKey, FlowOwner, StackFlow, Verdict,
    flow::{
        DEFAULT_STACK_FLOWS_PER_ENDPOINT, FLOW_F_RST, FLOW_TIMEOUT_CLOSED_S, FLOW_TIMEOUT_OTHER_S,
    },
    names::{MAX_STACK_FLOWS, PROG_FROM_POD, PROG_FROM_UNDERLAY, PROG_TO_OVERLAY, PROG_TO_POD},
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC},
};
use podnet_tests::{
    bpf_fixture::{
        HOST_A_MAC, NODE1_IP, NODE1_MAC, NODE2_IP, NODE2_MAC, NODE2_POD, POD_A_IP, POD_A_MAC,
        POD_B_IP, POD_B_MAC, counters, two_pods,
    },
    bpf_run::{BpfHarness, TestUnderlay},
    frames::{self, IP_MF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, TTL_OFF},
    privileged,
};

/// The client (pod A): sends through from_pod (its veth is loopback under
/// test-run).
const CLIENT_IP: Ipv4Addr = POD_A_IP;
const CLIENT_MAC: [u8; 6] = POD_A_MAC;
const CLIENT_HOST_MAC: [u8; 6] = HOST_A_MAC;
/// A backend pod on the same node (pod B).
const BACKEND_IP: Ipv4Addr = POD_B_IP;
/// The node itself (kubelet probes, NodePort clients after masquerade).
const NODE_IP: Ipv4Addr = NODE1_IP;

const CLIENT_PORT: u16 = 40_123;
const BACKEND_PORT: u16 = 8080;

/// What the stack delivers to the client through its veth's egress: a
/// packet from `src` to the client (e.g. a Service backend's reply after
/// conntrack, or a request DNATed to the client as the backend).
fn delivered_to_client(src: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    frames::ipv4_frame(
        (CLIENT_MAC, CLIENT_HOST_MAC),
        (src, CLIENT_IP),
        proto,
        0,
        l4,
    )
}

/// What the client sends (from_pod) to `dst`.
fn sent_by_client(dst: Ipv4Addr, proto: u8, frag_off: u16, l4: &[u8]) -> Vec<u8> {
    frames::ipv4_frame(
        (CLIENT_HOST_MAC, CLIENT_MAC),
        (CLIENT_IP, dst),
        proto,
        frag_off,
        l4,
    )
}

fn key(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: ip_key(src),
        dst: ip_key(dst),
        src_port: src_port.to_be(),
        dst_port: dst_port.to_be(),
        proto,
        pad: [0; 3],
    }
}

/// The stack delivers a packet from another pod to this one (here: a
/// connection the other pod opened to a Service whose backend this pod is,
/// DNATed on the way). This pod's replies must go back through the stack
/// (conntrack undoes the DNAT), although the fast path could redirect them.
#[test]
fn replies_to_what_the_stack_delivered_go_to_the_stack() {
    if !privileged("replies_to_what_the_stack_delivered_go_to_the_stack") {
        return;
    }
    let mut h = two_pods("sf-reply");
    // The stack delivers the other pod's SYN (sent to a Service IP, DNATed
    // to this pod).
    let request = delivered_to_client(
        BACKEND_IP,
        IPPROTO_TCP,
        &frames::tcp_header(BACKEND_PORT, CLIENT_PORT, TCP_SYN),
    );
    let out = h.run(PROG_TO_POD, &request).expect("run to_pod");
    assert_eq!(out.verdict, TC_ACT_UNSPEC, "to_pod never stops a packet");
    assert_eq!(out.frame, request, "to_pod leaves the packet as it is");
    let flows = h.datapath.stack_flows().expect("read flows");
    let reply_key = key(
        CLIENT_IP,
        BACKEND_IP,
        CLIENT_PORT,
        BACKEND_PORT,
        IPPROTO_TCP,
    );
    assert_eq!(flows.len(), 1, "one flow recorded: {flows:?}");
    assert_eq!(flows[0].0, reply_key, "the reply direction is recorded");
    assert_eq!(counters(&h).verdict(Verdict::StackFlowTracked), 1);

    // The client's SYN-ACK to the backend would be redirect_peer'd; it goes
    // to the stack instead, untouched (no TTL decrement, no MAC rewrite).
    let reply = sent_by_client(
        BACKEND_IP,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, BACKEND_PORT, TCP_SYN | TCP_ACK),
    );
    let out = h.run(PROG_FROM_POD, &reply).expect("run from_pod");
    assert_eq!(out.verdict, TC_ACT_OK, "handed to the host stack");
    assert_eq!(out.frame, reply, "unchanged: the stack routes it");
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::StackFlow), 1);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);

    // Another flow between the same pods (other client port) keeps the
    // fast path.
    let other = sent_by_client(
        BACKEND_IP,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT + 1, BACKEND_PORT, TCP_SYN),
    );
    let out = h.run(PROG_FROM_POD, &other).expect("run from_pod");
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "an untracked flow is redirected"
    );
    assert_eq!(out.frame[TTL_OFF], 63);
    assert_eq!(counters(&h).verdict(Verdict::StackFlow), 1);
}

#[test]
fn what_the_stack_delivers_from_outside_the_pods_is_not_tracked() {
    if !privileged("what_the_stack_delivers_from_outside_the_pods_is_not_tracked") {
        return;
    }
    let mut h = two_pods("sf-node");
    // From the node (a kubelet probe, a masqueraded NodePort client): its
    // replies go to the stack anyway, nothing to track.
    let from_node = delivered_to_client(
        NODE_IP,
        IPPROTO_UDP,
        &frames::udp_datagram(5353, CLIENT_PORT, b"probe"),
    );
    let out = h.run(PROG_TO_POD, &from_node).expect("run to_pod");
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    assert!(h.datapath.stack_flows().expect("flows").is_empty());
    assert_eq!(counters(&h).verdict(Verdict::StackFlowTracked), 0);
}

/// UDP, DNS-shaped: the stack delivered a query from the backend pod to the
/// client; the client's answer and an ICMP error about the flow both go to
/// the stack, so conntrack can undo the NAT of either.
#[test]
fn udp_replies_and_icmp_errors_about_a_tracked_flow_go_to_the_stack() {
    if !privileged("udp_replies_and_icmp_errors_about_a_tracked_flow_go_to_the_stack") {
        return;
    }
    let mut h = two_pods("sf-icmp");
    let query = frames::udp_datagram(BACKEND_PORT, 53, b"dns query");
    let delivered = delivered_to_client(BACKEND_IP, IPPROTO_UDP, &query);
    h.run(PROG_TO_POD, &delivered).expect("run to_pod");

    let answer = sent_by_client(
        BACKEND_IP,
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(53, BACKEND_PORT, b"dns answer"),
    );
    assert_eq!(
        h.run(PROG_FROM_POD, &answer).expect("run").verdict,
        TC_ACT_OK
    );

    // Port unreachable from the client about the query it received: the
    // embedded datagram is the query as delivered (backend -> client:53).
    let embedded = &delivered[14..];
    let error = sent_by_client(
        BACKEND_IP,
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(3, 3, [0; 4], &embedded[..28]),
    );
    let out = h.run(PROG_FROM_POD, &error).expect("run from_pod");
    assert_eq!(out.verdict, TC_ACT_OK, "the ICMP error follows its flow");
    assert_eq!(counters(&h).verdict(Verdict::StackFlow), 2);

    // An ICMP error about a flow that is not tracked keeps the fast path.
    let mut untracked = delivered.clone();
    untracked[14 + 20..14 + 22].copy_from_slice(&(BACKEND_PORT + 1).to_be_bytes());
    let error = sent_by_client(
        BACKEND_IP,
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(3, 3, [0; 4], &untracked[14..14 + 28]),
    );
    let out = h.run(PROG_FROM_POD, &error).expect("run from_pod");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
}

/// ICMP echo through a DNAT (`dnat to` without ports): the echo reply,
/// matched by its identifier, goes to the stack.
#[test]
fn echo_replies_of_a_tracked_ping_go_to_the_stack() {
    if !privileged("echo_replies_of_a_tracked_ping_go_to_the_stack") {
        return;
    }
    let mut h = two_pods("sf-echo");
    let id: [u8; 2] = [0x12, 0x34];
    let request = delivered_to_client(
        BACKEND_IP,
        IPPROTO_ICMP,
        &frames::icmp_message(8, 0, [id[0], id[1], 0, 1], b"ping"),
    );
    h.run(PROG_TO_POD, &request).expect("run to_pod");
    let reply = sent_by_client(
        BACKEND_IP,
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(0, 0, [id[0], id[1], 0, 1], b"ping"),
    );
    assert_eq!(
        h.run(PROG_FROM_POD, &reply).expect("run").verdict,
        TC_ACT_OK
    );
    let other_id = sent_by_client(
        BACKEND_IP,
        IPPROTO_ICMP,
        0,
        &frames::icmp_message(0, 0, [0x43, 0x21, 0, 1], b"ping"),
    );
    assert_eq!(
        h.run(PROG_FROM_POD, &other_id).expect("run").verdict,
        TC_ACT_REDIRECT
    );
}

/// Every fragment goes to the stack: the first alone carries the ports,
/// and conntrack must see all of a datagram or none.
#[test]
fn fragments_go_to_the_stack() {
    if !privileged("fragments_go_to_the_stack") {
        return;
    }
    let mut h = two_pods("sf-frag");
    let first = sent_by_client(
        BACKEND_IP,
        IPPROTO_UDP,
        IP_MF,
        &frames::udp_datagram(CLIENT_PORT, BACKEND_PORT, &[7; 64]),
    );
    let later = sent_by_client(BACKEND_IP, IPPROTO_UDP, 9, &[7; 64]);
    for frame in [first, later] {
        assert_eq!(
            h.run(PROG_FROM_POD, &frame).expect("run").verdict,
            TC_ACT_OK
        );
    }
    let c = counters(&h);
    assert_eq!(c.verdict(Verdict::RedirectPeer), 0);
    assert_eq!(c.verdict(Verdict::PassToStack), 2);
}

/// An entry ends: after its timeout (a closed TCP flow, an idle UDP flow)
/// the tuple is back on the fast path, and the stale entry is removed.
#[test]
fn expired_flows_return_to_the_fast_path() {
    if !privileged("expired_flows_return_to_the_fast_path") {
        return;
    }
    let mut h = two_pods("sf-expiry");
    let now = monotonic_coarse_ns();
    let tcp_key = key(
        CLIENT_IP,
        BACKEND_IP,
        CLIENT_PORT,
        BACKEND_PORT,
        IPPROTO_TCP,
    );
    let udp_key = key(
        CLIENT_IP,
        BACKEND_IP,
        CLIENT_PORT,
        BACKEND_PORT,
        IPPROTO_UDP,
    );
    let tcp_frame = sent_by_client(
        BACKEND_IP,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, BACKEND_PORT, TCP_ACK),
    );
    let udp_frame = sent_by_client(
        BACKEND_IP,
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(CLIENT_PORT, BACKEND_PORT, b"x"),
    );

    // Closed (RST) just now: still followed.
    let closed_now = StackFlow {
        last_seen_ns: now,
        flags: FLOW_F_RST,
        owner: 0,
    };
    h.datapath
        .insert_stack_flow(tcp_key, closed_now)
        .expect("insert");
    assert_eq!(
        h.run(PROG_FROM_POD, &tcp_frame).expect("run").verdict,
        TC_ACT_OK
    );

    // Closed longer ago than the close timeout: fast path, entry gone.
    let closed_long_ago = StackFlow {
        last_seen_ns: now.saturating_sub((FLOW_TIMEOUT_CLOSED_S + 2) * 1_000_000_000),
        ..closed_now
    };
    h.datapath
        .insert_stack_flow(tcp_key, closed_long_ago)
        .expect("insert");
    assert_eq!(
        h.run(PROG_FROM_POD, &tcp_frame).expect("run").verdict,
        TC_ACT_REDIRECT
    );
    assert!(
        h.datapath.stack_flows().expect("flows").is_empty(),
        "the expired entry is removed"
    );

    // UDP idle for longer than its timeout (needs that much uptime).
    let idle = (FLOW_TIMEOUT_OTHER_S + 5) * 1_000_000_000;
    if now > idle {
        h.datapath
            .insert_stack_flow(
                udp_key,
                StackFlow {
                    last_seen_ns: now - idle,
                    flags: 0,
                    owner: 0,
                },
            )
            .expect("insert");
        assert_eq!(
            h.run(PROG_FROM_POD, &udp_frame).expect("run").verdict,
            TC_ACT_REDIRECT
        );
    }
    // UDP seen recently: followed.
    h.datapath
        .insert_stack_flow(
            udp_key,
            StackFlow {
                last_seen_ns: now,
                flags: 0,
                owner: 0,
            },
        )
        .expect("insert");
    assert_eq!(
        h.run(PROG_FROM_POD, &udp_frame).expect("run").verdict,
        TC_ACT_OK
    );
}

/// A new connection opened on the fast path owns its tuple: a live entry
/// left by an older flow through the stack on the same tuple (its replies'
/// direction) is removed by the SYN, so the SYN-ACK is not sent past a NAT
/// that does not apply to it.
#[test]
fn a_fast_path_syn_clears_a_stale_reply_entry() {
    if !privileged("a_fast_path_syn_clears_a_stale_reply_entry") {
        return;
    }
    let mut h = two_pods("sf-syn");
    // The backend's replies to CLIENT_PORT were followed (older flow).
    let stale = key(
        BACKEND_IP,
        CLIENT_IP,
        BACKEND_PORT,
        CLIENT_PORT,
        IPPROTO_TCP,
    );
    h.datapath
        .insert_stack_flow(
            stale,
            StackFlow {
                last_seen_ns: monotonic_coarse_ns(),
                flags: 0,
                owner: 0,
            },
        )
        .expect("insert");
    // A plain ACK on the new tuple leaves it (mid-flow: it may be that
    // flow's own packet).
    let ack = sent_by_client(
        BACKEND_IP,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, BACKEND_PORT, TCP_ACK),
    );
    assert_eq!(
        h.run(PROG_FROM_POD, &ack).expect("run").verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(h.datapath.stack_flows().expect("flows").len(), 1);
    // The SYN of a new connection from the client to the backend directly.
    let syn = sent_by_client(
        BACKEND_IP,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, BACKEND_PORT, TCP_SYN),
    );
    assert_eq!(
        h.run(PROG_FROM_POD, &syn).expect("run").verdict,
        TC_ACT_REDIRECT
    );
    assert!(h.datapath.stack_flows().expect("flows").is_empty());
}

/// Pods A and B with node 2 known (its pod CIDR and its address), and a
/// test underlay on which node 2 is node 1's neighbour: what from_underlay
/// needs to take a frame for node 2's.
fn with_node2(tag: &str) -> (TestUnderlay, BpfHarness) {
    let underlay = TestUnderlay::new(
        &format!("{tag}-ul"),
        NODE1_MAC,
        (NODE_IP, 24),
        &[(NODE2_IP, NODE2_MAC)],
    )
    .expect("test underlay");
    let mut h = two_pods(tag);
    h.datapath
        .upsert_node_address(NODE2_IP)
        .expect("node address");
    h.datapath
        .upsert_remote("10.244.1.0/24".parse().expect("CIDR"), NODE2_IP)
        .expect("remote CIDR");
    (underlay, h)
}

/// The client's SYN to a backend on node 2, as the stack routes it into
/// the VXLAN device after a Service's DNAT.
fn client_syn_to_node2() -> Vec<u8> {
    sent_by_client(
        NODE2_POD,
        IPPROTO_TCP,
        0,
        &frames::tcp_header(CLIENT_PORT, BACKEND_PORT, TCP_SYN),
    )
}

/// That backend's SYN-ACK, arriving from node 2 on the underlay.
fn backend_syn_ack_from_node2() -> Vec<u8> {
    frames::ipv4_frame(
        (NODE1_MAC, NODE2_MAC),
        (NODE2_POD, CLIENT_IP),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(BACKEND_PORT, CLIENT_PORT, TCP_SYN | TCP_ACK),
    )
}

/// to_overlay records what the stack sends from a local pod into the
/// overlay, and a tracked reply from another node goes to the stack. The
/// reply arrives through from_underlay here (from the owning node's MAC):
/// from_overlay runs the same code after its tunnel check, and a test run
/// cannot attach tunnel metadata.
#[test]
fn the_node_programs_follow_stack_flows() {
    if !privileged("the_node_programs_follow_stack_flows") {
        return;
    }
    let (underlay, mut h) = with_node2("sf-overlay");
    let remote_backend = NODE2_POD;
    // The stack DNATed the client's request to a backend on another node
    // and routed it into the VXLAN device.
    let out = h
        .run(PROG_TO_OVERLAY, &client_syn_to_node2())
        .expect("run to_overlay");
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    let flows = h.datapath.stack_flows().expect("flows");
    assert_eq!(
        flows.iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![key(
            remote_backend,
            CLIENT_IP,
            BACKEND_PORT,
            CLIENT_PORT,
            IPPROTO_TCP
        )]
    );
    // The backend's SYN-ACK arrives from its node: to the stack.
    let out = h
        .run_arriving_on(&underlay, PROG_FROM_UNDERLAY, &backend_syn_ack_from_node2())
        .expect("run from_underlay");
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(counters(&h).verdict(Verdict::StackFlow), 1);
    assert_eq!(counters(&h).verdict(Verdict::UnderlayDeliver), 0);
}

/// Pod B's `n`th datagram of a flood to a DNS-like Service whose backend is
/// on node 2, after the stack's DNAT: every one a new flow.
fn flood_datagram(n: u32) -> Vec<u8> {
    frames::ipv4_frame(
        (CLIENT_HOST_MAC, POD_B_MAC),
        (BACKEND_IP, NODE2_POD),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(
            u16::try_from(1024 + n % 60_000).expect("port"),
            u16::try_from(53 + n / 60_000).expect("port"),
            b"q",
        ),
    )
}

/// One pod's flood of new flows through the stack (a busy DNS client,
/// random ports to a UDP Service whose backend is on another node) cannot
/// evict another pod's Service connection from the table: the flooder holds
/// at most its share (`FlowOwner`), the rest of its flows are refused and
/// counted, the other pod's replies still go to the stack. The sweeper's
/// recount gives a share back as the flooder's entries expire.
#[test]
fn one_pods_flood_cannot_evict_another_pods_flows() {
    if !privileged("one_pods_flood_cannot_evict_another_pods_flows") {
        return;
    }
    let (underlay, mut h) = with_node2("sf-flood");
    let limit = DEFAULT_STACK_FLOWS_PER_ENDPOINT;
    // Pod A's long-lived connection to a Service backend on node 2.
    assert_eq!(
        h.run(PROG_TO_OVERLAY, &client_syn_to_node2())
            .expect("run")
            .verdict,
        TC_ACT_UNSPEC
    );
    let victim_reply = key(NODE2_POD, CLIENT_IP, BACKEND_PORT, CLIENT_PORT, IPPROTO_TCP);

    // Pod B: more new flows than the whole table holds.
    let flood = MAX_STACK_FLOWS + 20_000;
    for port in 0..flood {
        h.run(PROG_TO_OVERLAY, &flood_datagram(port)).expect("run");
    }
    let flows = h.datapath.stack_flows().expect("flows");
    assert!(
        flows.iter().any(|(k, _)| *k == victim_reply),
        "pod A's connection is still followed after pod B's {flood} new flows"
    );
    let shares: std::collections::HashMap<Ipv4Addr, FlowOwner> = FlowSweeper::open(h.pin_dir())
        .expect("sweeper")
        .shares()
        .expect("shares")
        .into_iter()
        .collect();
    assert_eq!(shares[&BACKEND_IP].flows, limit, "pod B holds its share");
    assert_eq!(
        shares[&BACKEND_IP].refused,
        flood - limit,
        "the rest is refused"
    );
    assert_eq!(shares[&CLIENT_IP].flows, 1);
    assert_eq!(
        flows
            .iter()
            .filter(|(_, f)| f.owner == ip_key(BACKEND_IP))
            .count(),
        usize::try_from(limit).expect("limit")
    );
    // The backend's reply, arriving from node 2, goes to pod A through the
    // stack (where the NAT is undone), not straight into the pod.
    let out = h
        .run_arriving_on(&underlay, PROG_FROM_UNDERLAY, &backend_syn_ack_from_node2())
        .expect("run from_underlay");
    assert_eq!(out.verdict, TC_ACT_OK, "the reply goes to the stack");

    // One of pod B's entries expires; the recount gives its slot back.
    let (expiring, _) = *flows
        .iter()
        .find(|(_, f)| f.owner == ip_key(BACKEND_IP))
        .expect("a flow of pod B");
    h.datapath
        .insert_stack_flow(
            expiring,
            StackFlow {
                last_seen_ns: 0,
                flags: 0,
                owner: ip_key(BACKEND_IP),
            },
        )
        .expect("age an entry");
    let mut sweeper = FlowSweeper::open(h.pin_dir()).expect("sweeper");
    let report = sweeper.sweep().expect("sweep");
    assert_eq!(report.expired_removed, 1, "{report:?}");
    let tracked = counters(&h).verdict(Verdict::StackFlowTracked);
    h.run(PROG_TO_OVERLAY, &flood_datagram(flood)).expect("run");
    assert_eq!(
        counters(&h).verdict(Verdict::StackFlowTracked),
        tracked + 1,
        "pod B may follow one more flow"
    );
}
