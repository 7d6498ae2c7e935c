//! Properties of every datapath program over random and mutated frames
//! (BPF_PROG_TEST_RUN): truncated headers, bad IHL, every interesting
//! ethertype and random ones, tags, options, fragments, random addresses.
//!
//! - from_pod passes (to the stack) or forwards only what pod A sent as
//!   itself: IPv4 with its address and MAC, or ARP with its own sender.
//! - from_underlay, direct mode: delivers into a pod only unicast IPv4 from
//!   node 2's MAC whose source is node 2's pod CIDR or address, and lets a
//!   pod-network source through to anything only from there.
//! - from_underlay, vxlan mode: nothing with a pod-network source goes on
//!   unencapsulated; with the BPF datapath it decapsulates and delivers
//!   only node 2's VXLAN (its address, node 1's port and VNI) for sources
//!   node 2 owns, into a local pod, as the inner packet.
//! - from_overlay delivers nothing without tunnel metadata.
//! - to_pod, to_overlay and to_underlay never drop, redirect or change a
//!   frame.
//! - The counters account for every run: one verdict each (besides
//!   stack_flow_tracked), one drop reason per drop.
//!
//! The generator is seeded (`PODNET_PROPERTY_SEED` to replay a failure; the
//! seed is printed) and a failure prints the frame.

use std::{collections::BTreeMap, net::Ipv4Addr};

use podnet::datapath::Counters;
use podnet_common::{
    DropReason, NodeConfig, Verdict,
    names::{
        PROG_FROM_OVERLAY, PROG_FROM_POD, PROG_FROM_UNDERLAY, PROG_TO_OVERLAY, PROG_TO_POD,
        PROG_TO_UNDERLAY,
    },
    node::{MODE_DIRECT, MODE_VXLAN, NODE_F_VXLAN_BPF},
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
};
use podnet_tests::{
    bpf_fixture::{
        self, EXTERNAL, HOST_A_MAC, NODE1_IP, NODE1_MAC, NODE2, NODE2_IP, NODE2_MAC, NODE2_POD,
        POD_A_IP, POD_A_MAC, POD_B, POD_B_IP, POD_B_MAC, VXLAN_PORT, counters, loopback_ifindex,
        node1_config, pod_a,
    },
    bpf_run::{BpfHarness, RunOutcome, TestUnderlay},
    frames::{self, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    privileged, spoof,
};

/// Node 1's VNI (`node1_config`).
const VNI: u32 = 1;
/// Outer Ethernet, IPv4, UDP and VXLAN headers in front of the inner frame.
const OUTER: usize = 14 + 20 + 8 + 8;

/// Frames per program (more for the two that decide on senders).
const RUNS_SENDER_CHECKS: usize = 20_000;
const RUNS_OTHERS: usize = 4_000;

const ADDRESSES: [Ipv4Addr; 8] = [
    POD_A_IP,
    POD_B_IP,
    NODE1_IP,
    NODE2_IP,
    NODE2_POD,
    EXTERNAL,
    Ipv4Addr::new(10, 244, 0, 1),
    Ipv4Addr::BROADCAST,
];
const MACS: [[u8; 6]; 7] = [
    POD_A_MAC,
    HOST_A_MAC,
    POD_B_MAC,
    NODE1_MAC,
    NODE2_MAC,
    [0xff; 6],
    [0x01, 0, 0x5e, 0, 0, 1],
];
const ETHERTYPES: [u16; 8] = [
    ETH_P_IP, ETH_P_IP, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, 0x8100, 0x88a8, 0x88cc,
];

/// xorshift64*: small, seedable, good enough to spread frames around.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("fits")
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// A frame built from parts the programs look at, then mutated.
fn random_frame(rng: &mut Rng, (src_mac, src): ([u8; 6], Ipv4Addr)) -> Vec<u8> {
    // Mostly a plausible sender (so the checks pass often enough to test
    // what passes), sometimes anything.
    let src_mac = if rng.chance(70) {
        src_mac
    } else {
        rng.pick(&MACS)
    };
    let src = if rng.chance(70) {
        src
    } else {
        rng.pick(&ADDRESSES)
    };
    let dst_mac = rng.pick(&MACS);
    let dst = rng.pick(&ADDRESSES);
    let mut frame = match rng.pick(&ETHERTYPES) {
        ETH_P_ARP => spoof::arp(
            (dst_mac, src_mac),
            u16::from(rng.byte() % 3),
            (
                if rng.chance(70) {
                    src_mac
                } else {
                    rng.pick(&MACS)
                },
                if rng.chance(70) {
                    src
                } else {
                    rng.pick(&ADDRESSES)
                },
            ),
            ([0; 6], dst),
        ),
        ETH_P_IP => {
            let any = rng.byte();
            let proto = rng.pick(&[IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP, 47, any]);
            let any = u16::from(rng.byte());
            let frag_off = rng.pick(&[0, 0, 0x4000, 0x2000, 0x0001, 0x2010, any]);
            let l4 = match proto {
                IPPROTO_TCP => frames::tcp_header(40_000, 80, rng.byte()),
                IPPROTO_ICMP => frames::icmp_message(rng.pick(&[0, 3, 8, 11]), 0, [0; 4], &[0; 28]),
                _ => frames::udp_datagram(40_000, rng.pick(&[53, 4789, 8472]), &[0; 32]),
            };
            frames::ipv4_frame((dst_mac, src_mac), (src, dst), proto, frag_off, &l4)
        }
        ethertype => {
            let mut f = frames::ethernet(dst_mac, src_mac, ethertype);
            f.extend_from_slice(&frames::ipv4_header(src, dst, IPPROTO_UDP, 0, 8));
            f.extend_from_slice(&[0; 8]);
            f
        }
    };
    mutate(rng, &mut frame);
    frame
}

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    if frame.len() > 14 && rng.chance(15) {
        // Version/IHL: 0..15 for either nibble.
        frame[14] = rng.byte();
    }
    if frame.len() > 14 && rng.chance(10) {
        // IP options: IHL 6..15 with the bytes that follow as options.
        frame[14] = 0x40 | (6 + rng.byte() % 10);
    }
    for _ in 0..rng.below(3) {
        if rng.chance(30) && !frame.is_empty() {
            let i = rng.below(frame.len());
            frame[i] = rng.byte();
        }
    }
    if rng.chance(20) {
        // Truncated anywhere (the kernel refuses < 14 bytes itself).
        let len = 14 + rng.below(frame.len().saturating_sub(13).max(1));
        frame.truncate(len);
    }
    if rng.chance(5) {
        let extra = rng.below(64);
        frame.extend((0..extra).map(|_| rng.byte()));
    }
}

fn seed() -> u64 {
    let seed = std::env::var("PODNET_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x706e_6574_5f70_726f);
    eprintln!("property seed: {seed} (PODNET_PROPERTY_SEED to replay)");
    seed
}

/// The outcome of a run, `None` when the kernel refused the frame before
/// running the program: since Linux 6.x a test run checks that an IPv4 or
/// IPv6 frame holds the fixed network header (EINVAL otherwise), as the
/// receive path would have before TC. Any other error fails the test.
/// `refused` counts the refusals, for [`assert_enough_ran`].
fn ran(result: std::io::Result<RunOutcome>, refused: &mut u64) -> Option<RunOutcome> {
    match result {
        Ok(out) => Some(out),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            *refused += 1;
            None
        }
        Err(e) => panic!("test run: {e}"),
    }
}

/// The share of a program's frames that must really run (not be refused
/// with EINVAL) for its properties to mean something. The generator makes
/// most frames well-formed enough to run (about 85 % of each program's ran
/// on Linux 6.18 with the default seed); far fewer would mean the kernel
/// refuses what it used to run, and the property would hold over little.
const MIN_RAN_PERCENT: u64 = 70;

/// Fails unless at least [`MIN_RAN_PERCENT`] % of `ran + refused` frames ran.
fn assert_enough_ran(program: &str, ran: u64, refused: u64) {
    eprintln!("{program}: {ran} runs, {refused} frames refused (EINVAL)");
    assert!(
        ran * 100 >= (ran + refused) * MIN_RAN_PERCENT,
        "{program}: only {ran} of {} frames ran ({refused} refused with EINVAL); \
         at least {MIN_RAN_PERCENT} % must",
        ran + refused
    );
}

fn hex(frame: &[u8]) -> String {
    use std::fmt::Write as _;
    frame.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn ipv4_src(frame: &[u8]) -> Option<Ipv4Addr> {
    (frame.len() >= 34).then(|| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]))
}

/// How a batch of runs ended, to check the counters against.
#[derive(Default)]
struct Tally {
    by_verdict: BTreeMap<i32, u64>,
    runs: u64,
    /// Frames the kernel refused before the program ran (EINVAL).
    refused: u64,
}

impl Tally {
    fn add(&mut self, out: &RunOutcome) {
        *self.by_verdict.entry(out.verdict).or_default() += 1;
        self.runs += 1;
    }
    fn of(&self, verdict: i32) -> u64 {
        self.by_verdict.get(&verdict).copied().unwrap_or(0)
    }
}

fn delta(before: &Counters, after: &Counters, verdict: Verdict) -> u64 {
    after.verdict(verdict) - before.verdict(verdict)
}

/// The from_* programs count exactly one verdict per run, one drop reason
/// per drop, and their return codes agree with what they counted.
fn assert_accounted(program: &str, before: &Counters, after: &Counters, tally: &Tally) {
    assert_enough_ran(program, tally.runs, tally.refused);
    let counted: u64 = Verdict::ALL
        .iter()
        .filter(|v| **v != Verdict::StackFlowTracked)
        .map(|v| delta(before, after, *v))
        .sum();
    assert_eq!(counted, tally.runs, "{program}: one verdict per run");
    assert_eq!(
        delta(before, after, Verdict::Drop),
        tally.of(TC_ACT_SHOT),
        "{program}: drops"
    );
    let reasons: u64 = DropReason::ALL
        .iter()
        .map(|r| after.drop_count(*r) - before.drop_count(*r))
        .sum();
    assert_eq!(
        reasons,
        tally.of(TC_ACT_SHOT),
        "{program}: a reason per drop"
    );
    assert_eq!(
        delta(before, after, Verdict::PassToStack) + delta(before, after, Verdict::StackFlow),
        tally.of(TC_ACT_OK),
        "{program}: passes"
    );
    assert_eq!(
        tally.runs,
        tally.of(TC_ACT_SHOT) + tally.of(TC_ACT_OK) + tally.of(TC_ACT_REDIRECT),
        "{program}: only drop, pass or redirect: {:?}",
        tally.by_verdict
    );
}

/// Node 1 in VXLAN mode with pods A and B and node 2; its tunnel device is
/// loopback (a test run can name no other) and it has no pod CIDR.
fn node1(tag: &str, underlay_ifindex: u32) -> BpfHarness {
    node1_in(tag, underlay_ifindex, MODE_VXLAN, 0)
}

/// [`node1`] in `mode` with the node flags `flags`.
fn node1_in(tag: &str, underlay_ifindex: u32, mode: u32, flags: u32) -> BpfHarness {
    bpf_fixture::node1(
        tag,
        &[pod_a(), POD_B],
        &[NODE2],
        NodeConfig {
            tunnel_ifindex: loopback_ifindex(),
            pod_cidr_network: 0,
            pod_cidr_mask: 0,
            flags,
            ..node1_config(mode, underlay_ifindex)
        },
    )
}

/// Whether `ip` is in the cluster CIDR the fixture configures
/// (10.244.0.0/16).
fn in_pod_network(ip: Ipv4Addr) -> bool {
    ip.octets()[..2] == [10, 244]
}

/// Node 2's pod CIDR or its address: what node 2 may speak for.
fn node2_may_send_as(ip: Ipv4Addr) -> bool {
    ip == NODE2_IP || ip.octets()[..3] == [10, 244, 1]
}

/// A test underlay for node 1 with node 2 as its neighbour.
fn test_underlay(tag: &str) -> TestUnderlay {
    TestUnderlay::new(tag, NODE1_MAC, (NODE1_IP, 24), &[(NODE2_IP, NODE2_MAC)])
        .expect("test underlay")
}

/// What from_pod may let through: pod A as itself.
fn from_pod_may_pass(frame: &[u8]) -> bool {
    match ethertype(frame) {
        ETH_P_IP => frame[6..12] == POD_A_MAC && ipv4_src(frame) == Some(POD_A_IP),
        ETH_P_ARP => {
            frame.len() >= 42
                && frame[6..12] == POD_A_MAC
                && frame[22..28] == POD_A_MAC
                && frame[28..32] == POD_A_IP.octets()
        }
        _ => false,
    }
}

#[test]
fn from_pod_lets_through_only_the_pod_as_itself() {
    if !privileged("from_pod_lets_through_only_the_pod_as_itself") {
        return;
    }
    let mut rng = Rng(seed());
    let mut h = node1("prop-from-pod", 0);
    let before = counters(&h);
    let mut tally = Tally::default();
    for _ in 0..RUNS_SENDER_CHECKS {
        let frame = random_frame(&mut rng, (POD_A_MAC, POD_A_IP));
        let Some(out) = ran(h.run(PROG_FROM_POD, &frame), &mut tally.refused) else {
            continue;
        };
        if out.verdict != TC_ACT_SHOT {
            assert!(
                from_pod_may_pass(&frame),
                "from_pod let {} through: {}",
                out.verdict,
                hex(&frame)
            );
        }
        if out.verdict == TC_ACT_REDIRECT && ethertype(&out.frame) == ETH_P_IP {
            assert_eq!(ipv4_src(&out.frame), Some(POD_A_IP), "{}", hex(&frame));
        }
        tally.add(&out);
    }
    let after = counters(&h);
    assert_accounted("from_pod", &before, &after, &tally);
    assert!(
        tally.of(TC_ACT_REDIRECT) > 300 && tally.of(TC_ACT_SHOT) > 1_000,
        "the generator reaches both sides: {:?}",
        tally.by_verdict
    );
    eprintln!("from_pod: {:?}", tally.by_verdict);
}

/// Runs from_underlay of node 1 (in `mode`) on random frames from node 2's
/// MAC with node 2's addresses (mostly unicast to node 1), checking each
/// outcome with `check(frame, outcome)`; returns the tally, counters
/// accounted for.
fn underlay_properties(
    tag: &str,
    seed_salt: u64,
    mode: u32,
    mut check: impl FnMut(&[u8], &RunOutcome),
) -> Tally {
    let mut rng = Rng(seed() ^ seed_salt);
    let underlay = test_underlay(&format!("prop-ul-{tag}"));
    let mut h = node1_in(&format!("prop-from-ul-{tag}"), underlay.ifindex, mode, 0);
    let before = counters(&h);
    let mut tally = Tally::default();
    for i in 0..RUNS_SENDER_CHECKS {
        let sender = if i % 2 == 0 { NODE2_POD } else { NODE2_IP };
        let mut frame = random_frame(&mut rng, (NODE2_MAC, sender));
        if rng.chance(60) {
            frame[0..6].copy_from_slice(&NODE1_MAC);
        }
        let Some(out) = ran(
            h.run_arriving_on(&underlay, PROG_FROM_UNDERLAY, &frame),
            &mut tally.refused,
        ) else {
            continue;
        };
        check(&frame, &out);
        tally.add(&out);
    }
    assert_accounted(
        &format!("from_underlay ({tag})"),
        &before,
        &counters(&h),
        &tally,
    );
    eprintln!("from_underlay ({tag}): {:?}", tally.by_verdict);
    tally
}

/// The IPv4 source of `frame`, when it is IPv4.
fn ipv4_source(frame: &[u8]) -> Option<Ipv4Addr> {
    ipv4_src(frame).filter(|_| ethertype(frame) == ETH_P_IP)
}

/// Direct mode.
#[test]
fn from_underlay_delivers_only_the_owning_nodes_unicast() {
    if !privileged("from_underlay_delivers_only_the_owning_nodes_unicast") {
        return;
    }
    let tally = underlay_properties("direct", 1, MODE_DIRECT, |frame, out| {
        let src = ipv4_source(frame);
        let from_node2 = frame[0..6] == NODE1_MAC && frame[6..12] == NODE2_MAC;
        if out.verdict == TC_ACT_REDIRECT {
            assert!(
                from_node2 && src.is_some_and(node2_may_send_as),
                "from_underlay delivered {}",
                hex(frame)
            );
        }
        // Whatever the destination (a pod, the node, a Service): a source
        // of the pod network goes on only from the node that owns it.
        if out.verdict != TC_ACT_SHOT && src.is_some_and(in_pod_network) {
            assert!(
                from_node2 && src.is_some_and(node2_may_send_as),
                "from_underlay let a pod-network source through: {}",
                hex(frame)
            );
        }
    });
    assert!(
        tally.of(TC_ACT_REDIRECT) > 100,
        "the generator reaches delivery: {:?}",
        tally.by_verdict
    );
}

/// VXLAN mode with the kernel's device: from_underlay delivers nothing, and
/// nothing with a pod-network source arrives unencapsulated.
#[test]
fn from_underlay_vxlan_passes_no_unencapsulated_pod_source() {
    if !privileged("from_underlay_vxlan_passes_no_unencapsulated_pod_source") {
        return;
    }
    let tally = underlay_properties("vxlan", 4, MODE_VXLAN, |frame, out| {
        assert_ne!(out.verdict, TC_ACT_REDIRECT, "{}", hex(frame));
        if ipv4_source(frame).is_some_and(in_pod_network) && frame.get(14) == Some(&0x45) {
            assert_eq!(out.verdict, TC_ACT_SHOT, "passed: {}", hex(frame));
        }
    });
    assert!(
        tally.of(TC_ACT_SHOT) > 1_000 && tally.of(TC_ACT_OK) > 1_000,
        "the generator reaches both sides: {:?}",
        tally.by_verdict
    );
}

/// A VXLAN datagram on the underlay around `inner`: mostly from node 2 to
/// node 1's VXLAN port with node 1's VNI, sometimes any of it wrong.
fn random_vxlan(rng: &mut Rng, inner: &[u8]) -> Vec<u8> {
    let src = if rng.chance(80) {
        NODE2_IP
    } else {
        rng.pick(&ADDRESSES)
    };
    let dst = if rng.chance(80) {
        NODE1_IP
    } else {
        rng.pick(&ADDRESSES)
    };
    let vni = if rng.chance(85) {
        VNI
    } else {
        u32::from(rng.byte())
    };
    let mut udp = frames::udp_datagram(
        49_152 + u16::from(rng.byte()),
        if rng.chance(85) { VXLAN_PORT } else { 8472 },
        &spoof::vxlan_payload(vni, inner),
    );
    if rng.chance(5) {
        // The VXLAN flags byte, anything.
        udp[8] = rng.byte();
    }
    let dst_mac = if rng.chance(80) {
        NODE1_MAC
    } else {
        rng.pick(&MACS)
    };
    frames::ipv4_frame((dst_mac, NODE2_MAC), (src, dst), IPPROTO_UDP, 0, &udp)
}

/// VXLAN mode with the BPF datapath: from_underlay decapsulates and
/// delivers only VXLAN from node 2 to node 1's port and VNI whose inner
/// source is node 2's own, into a local pod, and what it delivers is the
/// inner packet.
#[test]
fn from_underlay_decapsulates_only_what_node2_may_send() {
    if !privileged("from_underlay_decapsulates_only_what_node2_may_send") {
        return;
    }
    let mut rng = Rng(seed() ^ 5);
    let underlay = test_underlay("prop-underlay-bx");
    let mut h = node1_in(
        "prop-from-underlay-bx",
        underlay.ifindex,
        MODE_VXLAN,
        NODE_F_VXLAN_BPF,
    );
    let before = counters(&h);
    let mut tally = Tally::default();
    for i in 0..RUNS_SENDER_CHECKS {
        let sender = if i % 2 == 0 { NODE2_POD } else { NODE2_IP };
        let inner = random_frame(&mut rng, (NODE2_MAC, sender));
        let mut frame = random_vxlan(&mut rng, &inner);
        if rng.chance(20) {
            mutate(&mut rng, &mut frame);
        }
        let Some(out) = ran(
            h.run_arriving_on(&underlay, PROG_FROM_UNDERLAY, &frame),
            &mut tally.refused,
        ) else {
            continue;
        };
        if out.verdict == TC_ACT_REDIRECT {
            let outer_ok = frame.len() > OUTER
                && frame[14] == 0x45
                && frame[26..30] == NODE2_IP.octets()
                && frame[30..34] == NODE1_IP.octets()
                && frame[36..38] == VXLAN_PORT.to_be_bytes()
                && frame[46..50] == (VNI << 8).to_be_bytes();
            let inner = &frame[OUTER..];
            let inner_src = ipv4_source(inner);
            let inner_dst = (inner.len() >= 34)
                .then(|| Ipv4Addr::new(inner[30], inner[31], inner[32], inner[33]));
            assert!(
                outer_ok
                    && inner_src.is_some_and(node2_may_send_as)
                    && inner_dst.is_some_and(|d| d == POD_A_IP || d == POD_B_IP),
                "from_underlay delivered {}",
                hex(&frame)
            );
            // Delivered decapsulated: the inner IP packet, nothing else.
            assert_eq!(out.frame.len(), frame.len() - OUTER, "{}", hex(&frame));
            assert_eq!(out.frame[26..34], inner[26..34], "{}", hex(&frame));
        }
        tally.add(&out);
    }
    let after = counters(&h);
    assert_accounted("from_underlay (vxlan, bpf)", &before, &after, &tally);
    assert!(
        tally.of(TC_ACT_REDIRECT) > 100 && tally.of(TC_ACT_SHOT) > 100,
        "the generator reaches delivery and drops: {:?}",
        tally.by_verdict
    );
    assert!(
        delta(&before, &after, Verdict::VxlanDecapBpf) == tally.of(TC_ACT_REDIRECT),
        "every delivery is a BPF decapsulation"
    );
    eprintln!("from_underlay (vxlan, bpf): {:?}", tally.by_verdict);
}

#[test]
fn from_overlay_without_tunnel_metadata_delivers_nothing() {
    if !privileged("from_overlay_without_tunnel_metadata_delivers_nothing") {
        return;
    }
    let mut rng = Rng(seed() ^ 2);
    let mut h = node1("prop-from-overlay", 0);
    let before = counters(&h);
    let mut tally = Tally::default();
    for _ in 0..RUNS_OTHERS {
        let frame = random_frame(&mut rng, (NODE2_MAC, NODE2_POD));
        let Some(out) = ran(h.run(PROG_FROM_OVERLAY, &frame), &mut tally.refused) else {
            continue;
        };
        assert_eq!(out.verdict, TC_ACT_SHOT, "{}", hex(&frame));
        tally.add(&out);
    }
    let after = counters(&h);
    assert_accounted("from_overlay", &before, &after, &tally);
}

#[test]
fn egress_programs_never_drop_redirect_or_change_a_frame() {
    if !privileged("egress_programs_never_drop_redirect_or_change_a_frame") {
        return;
    }
    let mut rng = Rng(seed() ^ 3);
    let mut h = node1("prop-egress", 0);
    let before = counters(&h);
    let mut runs = 0u64;
    for program in [PROG_TO_POD, PROG_TO_OVERLAY, PROG_TO_UNDERLAY] {
        let (mut program_runs, mut refused) = (0u64, 0u64);
        for _ in 0..RUNS_OTHERS {
            let sender = rng.pick(&[(POD_A_MAC, POD_A_IP), (NODE2_MAC, NODE2_POD)]);
            let frame = random_frame(&mut rng, sender);
            let Some(out) = ran(h.run(program, &frame), &mut refused) else {
                continue;
            };
            assert_eq!(out.verdict, TC_ACT_UNSPEC, "{program}: {}", hex(&frame));
            assert_eq!(out.frame, frame, "{program} changed the frame");
            program_runs += 1;
        }
        assert_enough_ran(program, program_runs, refused);
        runs += program_runs;
    }
    let after = counters(&h);
    // They only ever count what they tracked.
    for verdict in Verdict::ALL {
        let moved = delta(&before, &after, verdict);
        if verdict == Verdict::StackFlowTracked {
            assert!(moved <= runs);
        } else {
            assert_eq!(moved, 0, "{}", verdict.name());
        }
    }
}
