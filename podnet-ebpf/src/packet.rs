//! Ethernet/IPv4 headers by direct packet access. Every helper call costs a
//! call and a return, and on this class of machine (AMD with the Safe-RET
//! mitigation, `/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow`)
//! a return is dear: reading and rewriting the headers through `skb->data`
//! replaced six helper calls per forwarded packet (three loads, a store, a
//! checksum replace, a second store) with plain loads and stores.
//!
//! Writing through `skb->data` makes the verifier add a prologue that
//! unclones a cloned skb before the program runs (`bpf_unclone_prologue`,
//! kernel/bpf/verifier.c); `bpf_skb_store_bytes` made the same check per
//! call. For TCP's own clones the header is private (`skb_header_release`),
//! so neither copies anything.

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_ALEN: usize = 6;
/// `ETH_P_IP` as it appears on the wire.
const ETH_P_IP_WIRE: [u8; 2] = 0x0800_u16.to_be_bytes();
const ETH_P_ARP_WIRE: [u8; 2] = 0x0806_u16.to_be_bytes();
const ETH_P_IPV6_WIRE: [u8; 2] = 0x86dd_u16.to_be_bytes();
const IPV4_MIN_IHL: u8 = 5;
/// More-fragments flag and fragment-offset mask of `frag_off` (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Ethernet header followed by the fixed part of an IPv4 header, as on the
/// wire. Byte arrays only: alignment 1, because the IPv4 header sits at
/// offset 14 and `skb->data` has no alignment the program may rely on.
#[repr(C)]
pub struct EthIpv4 {
    pub dst_mac: [u8; ETH_ALEN],
    pub src_mac: [u8; ETH_ALEN],
    pub ethertype: [u8; 2],
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

const ETH_IPV4_LEN: usize = core::mem::size_of::<EthIpv4>();
const _: () = assert!(ETH_IPV4_LEN == ETH_HLEN + 20);
const _: () = assert!(core::mem::align_of::<EthIpv4>() == 1);

/// The fields of an IPv4 packet the forwarding decision needs. Addresses
/// stay in network byte order, as the maps key them.
pub struct Ipv4Fields {
    pub src: u32,
    pub dst: u32,
    pub ttl: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_offset: usize,
    /// A fragment (more-fragments set or a non-zero offset): only the first
    /// carries the L4 header.
    pub fragment: bool,
    /// A fragment other than the first (no L4 header).
    pub later_fragment: bool,
    pub src_mac: [u8; ETH_ALEN],
}

pub enum L3 {
    Ipv4(Ipv4Fields),
    /// `EtherType` ARP.
    Arp,
    /// `EtherType` IPv6.
    Ipv6,
    /// Anything else: VLAN (802.1Q) or QinQ (802.1ad) tags, ...
    Other,
    /// `EtherType` IPv4 but not a valid IPv4 header.
    MalformedIpv4,
}

/// `T` at the start of the packet, if the linear data holds all of it.
#[inline(always)]
fn at_start<T>(ctx: &TcContext) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // This comparison is what lets the verifier accept the accesses through
    // the pointer (packet range check on `data` against `data_end`).
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}

/// The Ethernet + IPv4 header, writable, or `None` if the packet is shorter
/// than both. Used after [`parse`], which pulled them into the linear area.
/// Takes the context mutably so that no two references to the packet exist.
#[inline(always)]
pub fn header_mut(ctx: &mut TcContext) -> Option<&mut EthIpv4> {
    let header = at_start::<EthIpv4>(ctx)?;
    // SAFETY: `at_start` checked that all `EthIpv4` bytes lie inside the
    // packet's linear data; `EthIpv4` has alignment 1 and no invalid bit
    // patterns; the reference lives only until the next helper call of the
    // caller, none of which moves packet data (map lookups, redirects).
    Some(unsafe { &mut *header })
}

#[inline(always)]
pub fn parse(ctx: &mut TcContext) -> L3 {
    // TC never sees a frame shorter than the Ethernet header on a veth, and
    // the Ethernet header is always in the linear data.
    let Some(eth) = at_start::<[u8; ETH_HLEN]>(ctx) else {
        return L3::Other;
    };
    // SAFETY: in bounds (checked by `at_start`), byte array: any alignment.
    let ethertype = unsafe { [(*eth)[12], (*eth)[13]] };
    match ethertype {
        ETH_P_IP_WIRE => {}
        ETH_P_ARP_WIRE => return L3::Arp,
        ETH_P_IPV6_WIRE => return L3::Ipv6,
        _ => return L3::Other,
    }
    // Headers split over fragments (seldom: GRO'd or tunnelled skbs): pull
    // them into the linear area once. Fails on frames shorter than an IPv4
    // header.
    if ctx.data() + ETH_IPV4_LEN > ctx.data_end() && ctx.pull_data(ETH_IPV4_LEN as u32).is_err() {
        return L3::MalformedIpv4;
    }
    let packet_len = ctx.len() as usize;
    let Some(header) = header_mut(ctx) else {
        return L3::MalformedIpv4;
    };
    let version = header.version_ihl >> 4;
    let ihl = header.version_ihl & 0x0f;
    // The header (options included) must fit in the frame; forwarding a
    // packet whose header is cut off would hand garbage to the next hop.
    let header_end = ETH_HLEN + usize::from(ihl) * 4;
    if version != 4 || ihl < IPV4_MIN_IHL || header_end > packet_len {
        return L3::MalformedIpv4;
    }
    // Flags and fragment offset; the DF bit (0x4000) is not a fragment.
    let frag = u16::from_be_bytes(header.frag_off) & (IP_MF | IP_OFFSET);
    L3::Ipv4(Ipv4Fields {
        src: u32::from_ne_bytes(header.src),
        dst: u32::from_ne_bytes(header.dst),
        ttl: header.ttl,
        proto: header.proto,
        l4_offset: header_end,
        fragment: frag != 0,
        later_fragment: frag & IP_OFFSET != 0,
        src_mac: header.src_mac,
    })
}

/// Decrements the TTL and updates the header checksum incrementally, exactly
/// as the kernel's `ip_decrease_ttl()` (include/net/ip.h) does for a routed
/// packet: the TTL is the high byte of its 16-bit checksum word, so the sum
/// grows by `htons(0x0100)`, with the end-around carry folded back in.
#[inline(always)]
pub fn decrement_ttl(header: &mut EthIpv4) {
    let check = u32::from(u16::from_ne_bytes(header.check)) + u32::from(0x0100_u16.to_be());
    let folded = check + u32::from(check >= 0xffff);
    // Truncating to 16 bits is the one's-complement fold's last step.
    #[allow(clippy::cast_possible_truncation)]
    let folded = folded as u16;
    header.check = folded.to_ne_bytes();
    header.ttl -= 1;
}

/// `N` bytes at `offset` of the frame: by direct packet access when they
/// are in the linear data (the common case: the kernel pulls the headers
/// of what it forwards), otherwise by `bpf_skb_load_bytes`.
#[inline(always)]
pub fn bytes_at<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    // The offsets passed here are at most 14 + 60 + 8 + 60 (an ICMP error's
    // embedded header); the bound keeps the verifier's range finite.
    if offset > 256 {
        return None;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + N <= end {
        // SAFETY: in bounds of the linear data (checked just above against
        // `data_end`); a byte array has alignment 1.
        return Some(unsafe { *((start + offset) as *const [u8; N]) });
    }
    ctx.load::<[u8; N]>(offset).ok()
}
