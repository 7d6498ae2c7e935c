//! Crafted Ethernet frames for BPF program runs.

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_UDP: u8 = 17;

/// Offsets in an Ethernet + IPv4 frame (no options): identification, TTL,
/// header checksum.
pub const IP_ID_OFF: usize = 14 + 4;
pub const TTL_OFF: usize = 14 + 8;
pub const IP_CSUM_OFF: usize = 14 + 10;

/// Ethernet header.
#[must_use]
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// RFC 1071 checksum of `bytes`.
#[must_use]
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[allow(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// A UDP-over-IPv4 frame with a valid header checksum and `payload`.
#[must_use]
pub fn ipv4_udp(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(dst_mac, src_mac, ETH_P_IP);
    let udp_len = u16::try_from(8 + payload.len()).expect("payload fits a UDP datagram");
    let total_len = 20 + udp_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, IPPROTO_UDP, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&5201u16.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // UDP checksum 0: "not computed" (IPv4 only)
    frame.extend_from_slice(payload);
    frame
}

/// True when the IPv4 header (no options) of `frame` has a valid checksum.
#[must_use]
pub fn ipv4_header_checksum_ok(frame: &[u8]) -> bool {
    frame.len() >= 34 && internet_checksum(&frame[14..34]) == 0
}
