//! VXLAN in BPF (`--vxlan-datapath bpf`): from_pod puts the outer headers
//! on a pod's packet itself and sends it out of the underlay device, and
//! from_underlay takes them off a packet another node sent to a local pod.
//! The node's VXLAN device is skipped both ways, and with it the host's IP
//! output (routing, netfilter: conntrack of every VXLAN datagram in the
//! masquerade table's hook), the UDP socket lookup and gro_cells on receive.
//! The wire format is the kernel device's (RFC 7348, the pod's Ethernet
//! frame inside), so a node of either datapath talks to the other.

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_get_hash_recalc,
    programs::TcContext,
};
use podnet_common::NodeConfig;

use crate::packet::{ETH_ALEN, ETH_HLEN};

/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14); the outer
/// Ethernet header is the frame's own. The same 50 bytes the pod MTU leaves
/// room for: one definition, shared with the agent.
pub const VXLAN_ROOM: usize = podnet_common::node::VXLAN_OVERHEAD as usize;
const IPV4_HLEN: usize = 20;
const VXLAN_HLEN: usize = 8;
/// From the start of the frame to the inner IPv4 header.
pub const INNER_IP_OFFSET: usize = ETH_HLEN + VXLAN_ROOM;
const IPPROTO_UDP: u8 = 17;
/// The VXLAN header's "valid VNI" flag (RFC 7348), first byte.
const VXLAN_FLAG_VNI: u8 = 0x08;
/// TTL of the outer header (what the kernel device uses for a tunnel key
/// without one, `ip4_dst_hoplimit` on a default route: 64).
const TUNNEL_TTL: u8 = 64;
/// Don't fragment, as on the wire. The pods' MTU leaves room for the 50
/// bytes (`podnet_common::node::pod_mtu`), so an outer packet never needs it; one
/// that would (a smaller path MTU) is dropped on the way instead of being
/// reassembled at the other node.
const IP_DF_WIRE: [u8; 2] = 0x4000_u16.to_be_bytes();
/// The source port range of the kernel's `udp_flow_src_port` with the
/// default `ip_local_port_range` (32768-60999): what the kernel device uses.
const SRC_PORT_MIN: u32 = 32768;
const SRC_PORT_SPAN: u64 = 61000 - 32768;

/// The frame once the room is made: outer Ethernet (the pod frame's own
/// header, moved to the front by `bpf_skb_adjust_room`), outer IPv4, UDP,
/// VXLAN and the inner Ethernet header. Byte arrays only: alignment 1.
#[repr(C)]
struct Encap {
    outer_eth: [u8; ETH_HLEN],
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
    src_port: [u8; 2],
    dst_port: [u8; 2],
    udp_len: [u8; 2],
    udp_check: [u8; 2],
    vxlan: [u8; VXLAN_HLEN],
    inner_dst_mac: [u8; ETH_ALEN],
    inner_src_mac: [u8; ETH_ALEN],
    inner_ethertype: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Encap>() == ETH_HLEN + VXLAN_ROOM);
const _: () = assert!(core::mem::align_of::<Encap>() == 1);

/// Why `encapsulate` did not.
pub enum Refused {
    /// The kernel would not make the room; the frame is unchanged and may
    /// go the kernel device's way instead.
    Unchanged,
    /// The room is made but the headers could not be written: drop it.
    Broken,
}

/// Wraps the (already routed: TTL decremented) pod frame in VXLAN to
/// `remote_ip` (network byte order). On `Ok` the frame is an outer
/// Ethernet/IPv4/UDP packet whose skb the kernel treats as a UDP tunnel
/// packet (GSO type `SKB_GSO_UDP_TUNNEL`, inner headers set), ready for
/// `bpf_redirect_neigh`.
#[inline(always)]
pub fn encapsulate(
    ctx: &mut TcContext,
    config: &NodeConfig,
    remote_ip: u32,
    inner_tos: u8,
) -> Result<(), Refused> {
    // The outer IPv4 length must fit its 16 bits, also for a GSO
    // super-packet, whose length receivers check before segmenting it
    // (`ip_rcv_core` trims to it). TCP keeps a pod's GSO packets below
    // 64 KiB minus its header reserve (`sk_gso_max_size`), so only a
    // BIG TCP pod (gso_max_size above 64 KiB) gets here: the device's way.
    if ctx.len() as usize + VXLAN_ROOM - ETH_HLEN > usize::from(u16::MAX) {
        return Err(Refused::Unchanged);
    }
    // The source port spreads flows over the receiver's queues (RSS) and
    // ECMP paths like the kernel's `udp_flow_src_port`: from the inner
    // flow's hash, taken before the outer headers exist.
    // SAFETY: plain helper call on this run's skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let span = (u64::from(hash) * SRC_PORT_SPAN) >> 32;
    // `span` < SRC_PORT_SPAN < 2^16: the sum fits in 16 bits.
    #[allow(clippy::cast_possible_truncation)]
    let src_port = (SRC_PORT_MIN + span as u32) as u16;
    // FIXED_GSO: the inner MSS already fits the underlay (the pod MTU is the
    // underlay's minus 50); without it the kernel would shrink gso_size by
    // the 50 bytes. ENCAP_*: the kernel records the inner headers and marks
    // the skb as a UDP tunnel packet, so that GSO (`skb_udp_tunnel_segment`)
    // segments the inner TCP and repeats the outer headers per segment, and
    // checksum offload (CHECKSUM_PARTIAL at the inner L4) still applies.
    // ENCAP_L2(14): an inner Ethernet header sits before the inner IPv4
    // header (the VXLAN header is between it and the UDP header).
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((ETH_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    #[allow(clippy::cast_possible_wrap)]
    if ctx
        .adjust_room(VXLAN_ROOM as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        // A skb the kernel will not encapsulate (a UDP GSO packet, one
        // already carrying inner headers): unchanged, for the device.
        return Err(Refused::Unchanged);
    }
    let packet_len = ctx.len();
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<Encap>() > end {
        // Cannot happen: the helper makes the new headers linear
        // (`skb_cow_head` + push). The frame is no longer what it was.
        return Err(Refused::Broken);
    }
    // SAFETY: the whole `Encap` lies in the linear data (checked against
    // `data_end` just above); alignment 1; no other reference to the packet
    // exists while this one lives (no helper call below).
    let h = unsafe { &mut *(start as *mut Encap) };
    // The pod's frame header, now at the front, becomes the inner one; the
    // outer one keeps it too (`bpf_redirect_neigh` replaces both MACs and
    // only needs a unicast destination, which the host veth's MAC is).
    h.inner_dst_mac = h.outer_eth[0..6].try_into().unwrap_or([0; 6]);
    h.inner_src_mac = h.outer_eth[6..12].try_into().unwrap_or([0; 6]);
    h.inner_ethertype = [h.outer_eth[12], h.outer_eth[13]];
    // The outer packet's length: for a GSO skb that of the whole
    // super-packet; GSO rewrites it (and the UDP length, the IP checksum)
    // per segment.
    #[allow(clippy::cast_possible_truncation)]
    let ip_len = (packet_len as usize - ETH_HLEN) as u16;
    h.version_ihl = 0x45;
    // ECN as the kernel's `ip_tunnel_ecn_encap` (RFC 6040 normal mode):
    // the inner ECN field, a CE mark as ECT(0).
    h.tos = match inner_tos & 0x03 {
        0x03 => 0x02,
        ecn => ecn,
    };
    h.total_len = ip_len.to_be_bytes();
    h.id = [0, 0];
    h.frag_off = IP_DF_WIRE;
    h.ttl = TUNNEL_TTL;
    h.proto = IPPROTO_UDP;
    h.check = [0, 0];
    h.src = config.node_ip.to_ne_bytes();
    h.dst = remote_ip.to_ne_bytes();
    h.check = ipv4_checksum(h).to_be_bytes();
    h.src_port = src_port.to_be_bytes();
    h.dst_port = config.vxlan_port.to_ne_bytes();
    h.udp_len = (ip_len - IPV4_HLEN as u16).to_be_bytes();
    // No UDP checksum (RFC 7348 allows 0 over IPv4); the kernel device's
    // default too (no `udpcsum`).
    h.udp_check = [0, 0];
    let vni = config.vni.to_be_bytes();
    h.vxlan = [VXLAN_FLAG_VNI, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    Ok(())
}

/// The outer IPv4 header's checksum (RFC 1071; the checksum field counts
/// as 0), as a number: stored big-endian.
#[inline(always)]
fn ipv4_checksum(h: &Encap) -> u16 {
    let words: [[u8; 2]; 10] = [
        [h.version_ihl, h.tos],
        h.total_len,
        h.id,
        h.frag_off,
        [h.ttl, h.proto],
        [0, 0],
        [h.src[0], h.src[1]],
        [h.src[2], h.src[3]],
        [h.dst[0], h.dst[1]],
        [h.dst[2], h.dst[3]],
    ];
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < words.len() {
        sum += u32::from(u16::from_be_bytes(words[i]));
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Folded twice: fits in 16 bits.
    #[allow(clippy::cast_possible_truncation)]
    !(sum as u16)
}

/// A VXLAN packet from another node on the underlay, as from_underlay
/// sees it before deciding.
pub struct Arrived {
    /// The outer source: the sending node's address (network byte order).
    pub node_ip: u32,
    /// The inner IPv4 packet's fields, offsets from the start of the frame
    /// as it is now (outer headers included).
    pub inner: crate::packet::Ipv4Fields,
}

/// `Some` when the frame is VXLAN to this node's port and address with
/// this node's VNI, carrying Ethernet/IPv4 (header without options, not
/// needed to tell): the packets from_underlay may take off the outer
/// headers of. Anything else is `None` (the stack, and the node's VXLAN
/// device, have it).
#[inline(always)]
pub fn arrived(ctx: &mut TcContext, config: &NodeConfig) -> Option<Arrived> {
    const LEN: usize = INNER_IP_OFFSET + IPV4_HLEN;
    let outer = match crate::packet::parse(ctx) {
        crate::packet::L3::Ipv4(ip) => ip,
        _ => return None,
    };
    if outer.proto != IPPROTO_UDP
        || outer.fragment
        || outer.l4_offset != ETH_HLEN + IPV4_HLEN
        || outer.dst != config.node_ip
    {
        return None;
    }
    if ctx.data() + LEN > ctx.data_end() && ctx.pull_data(LEN as u32).is_err() {
        return None;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + LEN > end {
        return None;
    }
    // SAFETY: `LEN` bytes of linear data (checked just above), alignment 1.
    let h = unsafe { &*(start as *const Encap) };
    let vni = config.vni.to_be_bytes();
    if h.dst_port != config.vxlan_port.to_ne_bytes()
        || h.vxlan[0] & VXLAN_FLAG_VNI == 0
        || h.vxlan[4..7] != vni[1..4]
        || h.inner_ethertype != 0x0800_u16.to_be_bytes()
    {
        return None;
    }
    // SAFETY: as above: the inner IPv4 header's fixed part is in `LEN`.
    let inner = unsafe { &*((start + INNER_IP_OFFSET) as *const [u8; IPV4_HLEN]) };
    let ihl = usize::from(inner[0] & 0x0f);
    if inner[0] >> 4 != 4 || ihl < 5 {
        return None;
    }
    let frag = u16::from_be_bytes([inner[6], inner[7]]) & 0x3fff;
    Some(Arrived {
        node_ip: outer.src,
        inner: crate::packet::Ipv4Fields {
            src: u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]),
            dst: u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]),
            ttl: inner[8],
            proto: inner[9],
            l4_offset: INNER_IP_OFFSET + ihl * 4,
            fragment: frag != 0,
            later_fragment: frag & 0x1fff != 0,
            src_mac: h.inner_src_mac,
        },
    })
}

/// Takes the outer IPv4/UDP/VXLAN and the inner Ethernet header off: the
/// frame is the outer Ethernet header followed by the inner IPv4 packet.
///
/// Linux 6.18 has no flag to clear a GSO packet's tunnel state (the
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` of later kernels): a GSO packet keeps
/// `skb->encapsulation` and `SKB_GSO_UDP_TUNNEL`, which the kernel device
/// would clear (`iptunnel_pull_offloads`). That state only matters to
/// segmentation, and the packet goes straight into a pod's socket layer
/// (`bpf_redirect_peer`) or a veth's tbf, neither of which segments it.
/// FIXED_GSO keeps gso_size, the inner MSS (without it the kernel would
/// add the 50 bytes to it).
#[inline(always)]
pub fn decapsulate(ctx: &mut TcContext) -> bool {
    #[allow(clippy::cast_possible_wrap)]
    ctx.adjust_room(
        -(VXLAN_ROOM as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
    )
    .is_ok()
}
