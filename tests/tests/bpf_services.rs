//! Service translation in the datapath (`--services bpf`) on crafted
//! frames (BPF_PROG_TEST_RUN): a pod's connection to a frontend is
//! rewritten to a backend at its first packet and stays with it, the
//! backend's replies come back from the frontend, the checksums hold, a
//! frontend without backends drops with its own reason, and NetworkPolicy
//! judges the backend. The Service maps are written as the agent writes
//! them: a frontend entry, its backend slots, the backend-ports bitmap.
//!
//! Under test-run the skb arrives on loopback, so the sender of from_pod is
//! whichever pod is registered with loopback's ifindex as its veth.

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, Map, MapData};
use podnet_common::{
    Backend, BackendKey, DropReason, EndpointInfo, PolicyKey, PolicyRule, ServiceEntry, ServiceKey,
    Verdict,
    endpoint::ENDPOINT_F_POLICY_EGRESS,
    names::{MAP_SERVICE_BACKENDS, MAP_SERVICE_PORTS, MAP_SERVICES, PROG_FROM_POD, PROG_TO_POD},
    node::{MODE_VXLAN, NODE_F_SERVICES_BPF},
    policy::{DIRECTION_EGRESS, IDENTITY_FIRST_POD, POLICY_PREFIX_ANY_PORT},
    service::{HAIRPIN_SOURCE, service_port_bit},
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use podnet_tests::{
    bpf_fixture::{
        EXTERNAL, HOST_A_MAC, HOST_B_MAC, POD_A_IP, POD_A_MAC, POD_B, POD_B_IP, POD_B_MAC, POD_C,
        POD_C_IP, counters, loopback_ifindex, node1, node1_config, pod_a,
    },
    bpf_run::BpfHarness,
    frames::{self, IPPROTO_TCP, TCP_ACK, TCP_SYN},
    privileged,
};

const IPPROTO_UDP: u8 = 17;
const FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FRONTEND_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_123;
const SERVICE_ID: u32 = 7;

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn pinned(h: &BpfHarness, name: &str) -> Map {
    let data = MapData::from_pin(h.pin_dir().join(name)).expect("the map's pin");
    Map::from_map_data(data).expect("its type")
}

/// Node 1 with pods A (the client, on loopback) and B, Services in the
/// datapath when `services_bpf`, and frontend FRONTEND:80/`protocol`
/// with `backends` (each on BACKEND_PORT).
fn node(tag: &str, services_bpf: bool, protocol: u8, backends: &[Ipv4Addr]) -> BpfHarness {
    node_with_affinity(tag, services_bpf, protocol, backends, 0)
}

/// [`node`] with `sessionAffinity: ClientIP` for `affinity_timeout_s`
/// (0: none).
fn node_with_affinity(
    tag: &str,
    services_bpf: bool,
    protocol: u8,
    backends: &[Ipv4Addr],
    affinity_timeout_s: u32,
) -> BpfHarness {
    let mut config = node1_config(MODE_VXLAN, loopback_ifindex());
    if services_bpf {
        config.flags |= NODE_F_SERVICES_BPF;
    }
    let h = node1(tag, &[pod_a(), POD_B, POD_C], &[], config);
    let mut services: HashMap<MapData, ServiceKey, ServiceEntry> =
        HashMap::try_from(pinned(&h, MAP_SERVICES)).expect("services map");
    let mut slots: HashMap<MapData, BackendKey, Backend> =
        HashMap::try_from(pinned(&h, MAP_SERVICE_BACKENDS)).expect("backends map");
    let mut ports: Array<MapData, u64> =
        Array::try_from(pinned(&h, MAP_SERVICE_PORTS)).expect("ports map");
    for (slot, backend) in (1..).zip(backends) {
        slots
            .insert(
                BackendKey {
                    service: SERVICE_ID,
                    slot,
                },
                Backend {
                    address: key(*backend),
                    port: BACKEND_PORT.to_be(),
                    pad: 0,
                },
                0,
            )
            .expect("slot");
    }
    let (word, bit) = service_port_bit(BACKEND_PORT);
    ports.set(word, bit, 0).expect("port bit");
    services
        .insert(
            ServiceKey {
                address: key(FRONTEND),
                port: FRONTEND_PORT.to_be(),
                protocol,
                pad: 0,
            },
            ServiceEntry {
                id: SERVICE_ID,
                backends: u32::try_from(backends.len()).expect("few"),
                affinity_timeout_s,
                flags: 0,
            },
            0,
        )
        .expect("frontend");
    h
}

/// Makes pod B the sender on loopback (and A an ordinary local pod).
fn send_as_b(h: &mut BpfHarness) {
    h.datapath
        .upsert_endpoint(
            POD_A_IP,
            EndpointInfo {
                host_ifindex: 4244,
                flags: 0,
                pod_mac: POD_A_MAC,
                host_mac: HOST_A_MAC,
            },
        )
        .expect("A elsewhere");
    h.datapath
        .upsert_endpoint(
            POD_B_IP,
            EndpointInfo {
                host_ifindex: loopback_ifindex(),
                flags: 0,
                pod_mac: POD_B_MAC,
                host_mac: HOST_B_MAC,
            },
        )
        .expect("B on loopback");
}

/// Sets the TCP/UDP checksum of `frame` (IPv4, no options) over the
/// pseudo-header and the segment.
fn with_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let offset = l4_checksum_offset(&frame);
    frame[offset..offset + 2].copy_from_slice(&[0, 0]);
    let sum = l4_sum(&frame);
    frame[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

fn l4_checksum_offset(frame: &[u8]) -> usize {
    if frame[23] == IPPROTO_TCP {
        34 + 16
    } else {
        34 + 6
    }
}

/// The checksum of the pseudo-header and the L4 bytes as they are: 0 when
/// the stored checksum is right.
fn l4_sum(frame: &[u8]) -> u16 {
    let l4 = &frame[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.extend_from_slice(&[0, frame[23]]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).expect("short").to_be_bytes());
    pseudo.extend_from_slice(l4);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    frames::internet_checksum(&pseudo)
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), macs: ([u8; 6], [u8; 6]), flags: u8) -> Vec<u8> {
    with_l4_checksum(frames::ipv4_frame(
        macs,
        (src.0, dst.0),
        IPPROTO_TCP,
        0,
        &frames::tcp_header(src.1, dst.1, flags),
    ))
}

fn a_to_frontend(flags: u8) -> Vec<u8> {
    tcp(
        (POD_A_IP, CLIENT_PORT),
        (FRONTEND, FRONTEND_PORT),
        (HOST_A_MAC, POD_A_MAC),
        flags,
    )
}

fn addresses(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (ip(26), port(34), ip(30), port(36))
}

fn assert_checksums(frame: &[u8], what: &str) {
    assert!(
        frames::ipv4_header_checksum_ok(frame),
        "{what}: IP header checksum"
    );
    assert_eq!(l4_sum(frame), 0, "{what}: L4 checksum");
}

#[test]
fn a_connection_to_a_frontend_goes_to_its_backend_and_back() {
    if !privileged("a_connection_to_a_frontend_goes_to_its_backend_and_back") {
        return;
    }
    let mut h = node("svc-both-ways", true, IPPROTO_TCP, &[POD_B_IP]);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "delivered to the local backend"
    );
    assert_eq!(
        addresses(&out.frame),
        (POD_A_IP, CLIENT_PORT, POD_B_IP, BACKEND_PORT),
        "the destination is the backend"
    );
    assert_checksums(&out.frame, "the translated SYN");
    assert_eq!(counters(&h).verdict(Verdict::ServiceTranslated), 1);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_ACK)).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (POD_A_IP, CLIENT_PORT, POD_B_IP, BACKEND_PORT),
        "later packets keep the backend"
    );
    assert_eq!(counters(&h).verdict(Verdict::ServiceTracked), 1);
    // B answers A: the reply comes from the frontend again.
    send_as_b(&mut h);
    let reply = tcp(
        (POD_B_IP, BACKEND_PORT),
        (POD_A_IP, CLIENT_PORT),
        (HOST_B_MAC, POD_B_MAC),
        TCP_SYN | TCP_ACK,
    );
    let out = h.run(PROG_FROM_POD, &reply).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        addresses(&out.frame),
        (FRONTEND, FRONTEND_PORT, POD_A_IP, CLIENT_PORT),
        "the reply's source is the frontend"
    );
    assert_checksums(&out.frame, "the translated reply");
    // B's own connection to A from the same port number but to another
    // port of A's is no reply: untouched.
    let unrelated = tcp(
        (POD_B_IP, BACKEND_PORT),
        (POD_A_IP, CLIENT_PORT + 1),
        (HOST_B_MAC, POD_B_MAC),
        TCP_SYN,
    );
    let out = h.run(PROG_FROM_POD, &unrelated).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (POD_B_IP, BACKEND_PORT, POD_A_IP, CLIENT_PORT + 1)
    );
}

#[test]
fn udp_keeps_an_absent_checksum_absent() {
    if !privileged("udp_keeps_an_absent_checksum_absent") {
        return;
    }
    let mut h = node("svc-udp", true, IPPROTO_UDP, &[POD_B_IP]);
    let datagram = frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (POD_A_IP, FRONTEND),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(CLIENT_PORT, FRONTEND_PORT, b"dns?"),
    );
    let out = h.run(PROG_FROM_POD, &datagram).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        addresses(&out.frame),
        (POD_A_IP, CLIENT_PORT, POD_B_IP, BACKEND_PORT)
    );
    assert!(frames::ipv4_header_checksum_ok(&out.frame));
    assert_eq!(&out.frame[40..42], &[0, 0], "no UDP checksum stays none");
    // With a checksum, it is kept right.
    let summed = with_l4_checksum(datagram.clone());
    let out = h.run(PROG_FROM_POD, &summed).expect("run");
    assert_checksums(&out.frame, "the translated datagram");
}

#[test]
fn a_frontend_without_backends_drops_and_an_unknown_one_goes_to_the_stack() {
    if !privileged("a_frontend_without_backends_drops_and_an_unknown_one_goes_to_the_stack") {
        return;
    }
    let mut h = node("svc-empty", true, IPPROTO_TCP, &[]);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(counters(&h).drop_count(DropReason::ServiceNoBackend), 1);
    let other_port = tcp(
        (POD_A_IP, CLIENT_PORT),
        (FRONTEND, 443),
        (HOST_A_MAC, POD_A_MAC),
        TCP_SYN,
    );
    let out = h.run(PROG_FROM_POD, &other_port).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK, "no frontend: the stack's");
    assert_eq!(addresses(&out.frame).2, FRONTEND, "untouched");
}

#[test]
fn with_kube_proxy_in_charge_nothing_is_translated() {
    if !privileged("with_kube_proxy_in_charge_nothing_is_translated") {
        return;
    }
    let mut h = node("svc-kube-proxy", false, IPPROTO_TCP, &[POD_B_IP]);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK, "the stack (kube-proxy's rules)");
    assert_eq!(addresses(&out.frame).2, FRONTEND);
    assert_eq!(counters(&h).verdict(Verdict::ServiceTranslated), 0);
}

#[test]
fn policy_judges_the_backend_not_the_frontend() {
    if !privileged("policy_judges_the_backend_not_the_frontend") {
        return;
    }
    let mut h = node("svc-policy", true, IPPROTO_TCP, &[POD_B_IP]);
    let b_identity = IDENTITY_FIRST_POD + 1;
    h.datapath
        .upsert_identity(POD_A_IP, IDENTITY_FIRST_POD)
        .expect("A");
    h.datapath.upsert_identity(POD_B_IP, b_identity).expect("B");
    assert!(
        h.datapath
            .set_policy_flags(POD_A_IP, ENDPOINT_F_POLICY_EGRESS)
            .expect("bits")
    );
    // No rule yet: A's egress denies the backend.
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(counters(&h).drop_count(DropReason::PolicyDeniedEgress), 1);
    // A rule for B's identity on the backend port (not the frontend's).
    h.datapath
        .upsert_policy_rule(
            POLICY_PREFIX_ANY_PORT + 16,
            PolicyKey {
                endpoint: key(POD_A_IP),
                identity: b_identity,
                direction: DIRECTION_EGRESS,
                protocol: IPPROTO_TCP,
                port: BACKEND_PORT.to_be(),
            },
            PolicyRule {
                rule: 3,
                reserved: 0,
            },
        )
        .expect("rule");
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "allowed to the backend");
    assert_eq!(counters(&h).verdict(Verdict::PolicyAllowed), 1);
    // The reply passes A's policy as the tracked connection's and is
    // translated.
    send_as_b(&mut h);
    assert!(
        h.datapath
            .set_policy_flags(POD_A_IP, ENDPOINT_F_POLICY_EGRESS)
            .expect("bits")
    );
    let reply = tcp(
        (POD_B_IP, BACKEND_PORT),
        (POD_A_IP, CLIENT_PORT),
        (HOST_B_MAC, POD_B_MAC),
        TCP_SYN | TCP_ACK,
    );
    let out = h.run(PROG_FROM_POD, &reply).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(addresses(&out.frame).0, FRONTEND);
}

/// Hairpin: A's connection to a frontend whose only backend is A itself
/// reaches A from the hairpin source (A would drop its own address
/// arriving on eth0), A's reply to that source comes back from the
/// frontend, and A's egress policy, which allows nothing, does not judge
/// a pod talking to itself.
#[test]
fn a_pod_that_draws_itself_is_reached_from_the_hairpin_source() {
    if !privileged("a_pod_that_draws_itself_is_reached_from_the_hairpin_source") {
        return;
    }
    let hairpin = Ipv4Addr::from(HAIRPIN_SOURCE);
    let mut h = node("svc-hairpin", true, IPPROTO_TCP, &[POD_A_IP]);
    h.datapath
        .upsert_identity(POD_A_IP, IDENTITY_FIRST_POD)
        .expect("A");
    assert!(
        h.datapath
            .set_policy_flags(POD_A_IP, ENDPOINT_F_POLICY_EGRESS)
            .expect("bits")
    );
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "back into A");
    assert_eq!(
        addresses(&out.frame),
        (hairpin, CLIENT_PORT, POD_A_IP, BACKEND_PORT),
        "from the hairpin source to A's backend port"
    );
    assert_eq!(&out.frame[0..6], &POD_A_MAC, "to A's MAC");
    assert_checksums(&out.frame, "the hairpinned SYN");
    // A answers the hairpin source: the reply comes from the frontend.
    let reply = tcp(
        (POD_A_IP, BACKEND_PORT),
        (hairpin, CLIENT_PORT),
        (HOST_A_MAC, POD_A_MAC),
        TCP_SYN | TCP_ACK,
    );
    let out = h.run(PROG_FROM_POD, &reply).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "back into A");
    assert_eq!(
        addresses(&out.frame),
        (FRONTEND, FRONTEND_PORT, POD_A_IP, CLIENT_PORT),
        "the reply comes from the frontend to A's client port"
    );
    assert_checksums(&out.frame, "the hairpinned reply");
    // The connection's next packet keeps the backend and the source.
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_ACK)).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (hairpin, CLIENT_PORT, POD_A_IP, BACKEND_PORT)
    );
    let counted = counters(&h);
    assert_eq!(counted.verdict(Verdict::ServiceHairpin), 3);
    assert_eq!(counted.drop_count(DropReason::PolicyDeniedEgress), 0);
    // A packet of A's to the hairpin source that answers no connection is
    // not made to come from anywhere.
    let stray = tcp(
        (POD_A_IP, BACKEND_PORT),
        (hairpin, CLIENT_PORT + 1),
        (HOST_A_MAC, POD_A_MAC),
        TCP_ACK,
    );
    let out = h.run(PROG_FROM_POD, &stray).expect("run");
    assert_eq!(addresses(&out.frame).0, POD_A_IP, "untouched");
}

/// The backends `count` new connections of A (each from its own port,
/// counting from `first_port`) went to.
fn backends_of_new_connections(
    h: &mut BpfHarness,
    first_port: u16,
    count: u16,
) -> std::collections::BTreeSet<Ipv4Addr> {
    (0..count)
        .map(|i| {
            let syn = tcp(
                (POD_A_IP, first_port + i),
                (FRONTEND, FRONTEND_PORT),
                (HOST_A_MAC, POD_A_MAC),
                TCP_SYN,
            );
            let out = h.run(PROG_FROM_POD, &syn).expect("run");
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            addresses(&out.frame).2
        })
        .collect()
}

#[test]
fn new_connections_spread_over_backends_unless_the_client_is_affine() {
    if !privileged("new_connections_spread_over_backends_unless_the_client_is_affine") {
        return;
    }
    // Without affinity, 24 connections miss one of two backends with
    // probability 2^-23.
    let mut h = node("svc-spread", true, IPPROTO_TCP, &[POD_B_IP, POD_C_IP]);
    assert_eq!(backends_of_new_connections(&mut h, 50_000, 24).len(), 2);
    // With it, every new connection of the client sticks to one backend,
    // until the timeout has run out since the last one.
    let mut h = node_with_affinity("svc-affine", true, IPPROTO_TCP, &[POD_B_IP, POD_C_IP], 1);
    assert_eq!(
        backends_of_new_connections(&mut h, 50_000, 24).len(),
        1,
        "sticky"
    );
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let after = (0..16)
        .map(|i| {
            std::thread::sleep(std::time::Duration::from_millis(1_100));
            backends_of_new_connections(&mut h, 51_000 + i, 1)
        })
        .fold(std::collections::BTreeSet::new(), |mut all, one| {
            all.extend(one);
            all
        });
    assert_eq!(
        after.len(),
        2,
        "once idle past the timeout, the client is placed afresh (16 tries, each past the \
         timeout: both backends missed with probability 2^-15)"
    );
}

#[test]
fn an_icmp_error_from_the_backend_reaches_the_client_about_the_frontend() {
    if !privileged("an_icmp_error_from_the_backend_reaches_the_client_about_the_frontend") {
        return;
    }
    let mut h = node("svc-icmp", true, IPPROTO_UDP, &[POD_B_IP]);
    let datagram = frames::ipv4_frame(
        (HOST_A_MAC, POD_A_MAC),
        (POD_A_IP, FRONTEND),
        IPPROTO_UDP,
        0,
        &frames::udp_datagram(CLIENT_PORT, FRONTEND_PORT, b"dns?"),
    );
    let out = h.run(PROG_FROM_POD, &datagram).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    // B has nothing on the port: its port unreachable embeds what it got
    // (A -> B:8080).
    let embedded = out.frame[14..14 + 28].to_vec();
    send_as_b(&mut h);
    let error = frames::ipv4_frame(
        (HOST_B_MAC, POD_B_MAC),
        (POD_B_IP, POD_A_IP),
        frames::IPPROTO_ICMP,
        0,
        &frames::icmp_message(3, 3, [0; 4], &embedded),
    );
    let out = h.run(PROG_FROM_POD, &error).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "delivered to A");
    let f = &out.frame;
    assert_eq!(&f[26..30], &FRONTEND.octets(), "outer source: the frontend");
    assert!(frames::ipv4_header_checksum_ok(f), "outer IP checksum");
    assert_eq!(
        frames::internet_checksum(&f[34..]),
        0,
        "the ICMP checksum over the rewritten message"
    );
    let inner = &f[42..];
    assert_eq!(&inner[16..20], &FRONTEND.octets(), "embedded destination");
    assert_eq!(
        u16::from_be_bytes([inner[22], inner[23]]),
        FRONTEND_PORT,
        "embedded destination port"
    );
    assert_eq!(
        frames::internet_checksum(&inner[..20]),
        0,
        "embedded IP header checksum"
    );
}

#[test]
fn a_segment_of_a_connection_the_table_lost_is_dropped_and_counted() {
    if !privileged("a_segment_of_a_connection_the_table_lost_is_dropped_and_counted") {
        return;
    }
    // An ACK to the frontend with no tracked connection (its entry
    // expired or was evicted): re-balanced it would only earn an RST from
    // another backend.
    let mut h = node("svc-lost", true, IPPROTO_TCP, &[POD_B_IP]);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_ACK)).expect("run");
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(
        counters(&h).drop_count(DropReason::ServiceConnectionUnknown),
        1
    );
    assert_eq!(counters(&h).verdict(Verdict::ServiceTranslated), 0);
    // A SYN opens it; then the ACK is the connection's.
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_ACK)).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
}

#[test]
fn a_backend_outside_the_pod_network_answers_through_the_stack_from_the_frontend() {
    if !privileged("a_backend_outside_the_pod_network_answers_through_the_stack_from_the_frontend")
    {
        return;
    }
    let mut h = node("svc-external", true, IPPROTO_TCP, &[EXTERNAL]);
    let out = h.run(PROG_FROM_POD, &a_to_frontend(TCP_SYN)).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK, "the stack routes it out");
    assert_eq!(
        addresses(&out.frame),
        (POD_A_IP, CLIENT_PORT, EXTERNAL, BACKEND_PORT)
    );
    // The stack delivers the answer (masquerade undone) on A's veth.
    let reply = tcp(
        (EXTERNAL, BACKEND_PORT),
        (POD_A_IP, CLIENT_PORT),
        (POD_A_MAC, HOST_A_MAC),
        TCP_SYN | TCP_ACK,
    );
    let out = h.run(PROG_TO_POD, &reply).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (FRONTEND, FRONTEND_PORT, POD_A_IP, CLIENT_PORT),
        "the reply reaches A from the frontend"
    );
    assert_checksums(&out.frame, "the translated reply");
}

#[test]
fn a_direct_connection_on_a_translated_ones_tuple_is_not_translated() {
    if !privileged("a_direct_connection_on_a_translated_ones_tuple_is_not_translated") {
        return;
    }
    // Straight to B from A's veth.
    clashing_connection_is_not_translated("svc-clash", PROG_FROM_POD);
}

#[test]
fn a_stack_translated_connection_on_a_translated_ones_tuple_is_not_translated() {
    if !privileged("a_stack_translated_connection_on_a_translated_ones_tuple_is_not_translated") {
        return;
    }
    // To another ClusterIP that the stack's rules translate to B: podnet
    // sees it on B's veth as the stack delivers it.
    clashing_connection_is_not_translated("svc-clash-stack", PROG_TO_POD);
}

/// A's connection through the frontend, closed; then A's kernel reuses
/// the client port for a connection that reaches B as A -> B (seen by
/// `program`): B's answers are that connection's and keep B's address.
fn clashing_connection_is_not_translated(tag: &str, program: &'static str) {
    let mut h = node(tag, true, IPPROTO_TCP, &[POD_B_IP]);
    for flags in [TCP_SYN, TCP_ACK | 0x01] {
        let out = h.run(PROG_FROM_POD, &a_to_frontend(flags)).expect("run");
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
    }
    let syn = tcp(
        (POD_A_IP, CLIENT_PORT),
        (POD_B_IP, BACKEND_PORT),
        (HOST_A_MAC, POD_A_MAC),
        TCP_SYN,
    );
    let out = h.run(program, &syn).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (POD_A_IP, CLIENT_PORT, POD_B_IP, BACKEND_PORT)
    );
    send_as_b(&mut h);
    let reply = tcp(
        (POD_B_IP, BACKEND_PORT),
        (POD_A_IP, CLIENT_PORT),
        (HOST_B_MAC, POD_B_MAC),
        TCP_SYN | TCP_ACK,
    );
    let out = h.run(PROG_FROM_POD, &reply).expect("run");
    assert_eq!(
        addresses(&out.frame),
        (POD_B_IP, BACKEND_PORT, POD_A_IP, CLIENT_PORT),
        "not made the frontend's"
    );
}
