//! Ethernet/IPv4 access through `bpf_skb_load_bytes`/`bpf_skb_store_bytes`
//! (`TcContext::load`/`store`): bounds are checked by the helper, so a short
//! frame is an `Err`, never a verifier problem, and helper calls cannot
//! invalidate packet pointers we hold (we hold none).

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_ALEN: usize = 6;
const ETH_TYPE_OFF: usize = 12;
/// `ETH_P_IP` as it appears on the wire (big endian), read as a native u16.
const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();

const IPV4_MIN_HLEN: usize = 20;
const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;

/// The fields of an IPv4 packet the forwarding decision needs. Addresses
/// stay in network byte order, as the maps key them.
pub struct Ipv4Fields {
    pub src: u32,
    pub dst: u32,
    pub ttl: u8,
    pub proto: u8,
}

pub enum L3 {
    Ipv4(Ipv4Fields),
    /// ARP, IPv6, VLAN, ...: not ours to decide.
    Other,
    /// EtherType IPv4 but not a valid IPv4 header.
    MalformedIpv4,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> L3 {
    // TC never sees a frame shorter than the Ethernet header on a veth; if it
    // did, the load fails and the frame is simply not ours.
    let Ok(ethertype) = ctx.load::<u16>(ETH_TYPE_OFF) else {
        return L3::Other;
    };
    if ethertype != ETH_P_IP_WIRE {
        return L3::Other;
    }
    // One load for the fixed header: fails on any frame shorter than 34 bytes.
    let Ok(header) = ctx.load::<[u8; IPV4_MIN_HLEN]>(ETH_HLEN) else {
        return L3::MalformedIpv4;
    };
    let version = header[0] >> 4;
    let ihl = header[0] & 0x0f;
    // The header (options included) must fit in the frame; forwarding a
    // packet whose header is cut off would hand garbage to the next hop.
    let header_end = ETH_HLEN + usize::from(ihl) * 4;
    if version != 4 || ihl < 5 || header_end > ctx.len() as usize {
        return L3::MalformedIpv4;
    }
    L3::Ipv4(Ipv4Fields {
        src: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
        dst: u32::from_ne_bytes([header[16], header[17], header[18], header[19]]),
        ttl: header[8],
        proto: header[9],
    })
}

const SRC_MAC_OFF: usize = ETH_ALEN;

/// Writes destination and source MAC in one store.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; ETH_ALEN], src: &[u8; ETH_ALEN]) -> Result<(), i64> {
    let mut macs = [0u8; 2 * ETH_ALEN];
    macs[..ETH_ALEN].copy_from_slice(dst);
    macs[ETH_ALEN..].copy_from_slice(src);
    ctx.store(0, &macs, 0)
}

/// Reads the source MAC.
#[inline(always)]
pub fn src_mac(ctx: &TcContext) -> Result<[u8; ETH_ALEN], i64> {
    ctx.load::<[u8; ETH_ALEN]>(SRC_MAC_OFF)
}

/// Decrements the TTL and fixes the header checksum incrementally, as a
/// router hop does (the host stack would have done it for routed traffic).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: &Ipv4Fields) -> Result<(), i64> {
    // TTL and protocol share one 16-bit checksum word.
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new_word = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    ctx.store(IPV4_TTL_OFF, &(ip.ttl - 1), 0)?;
    ctx.l3_csum_replace(IPV4_CSUM_OFF, u64::from(old_word), u64::from(new_word), 2)
}
