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

/// RFC 1071 checksum of `bytes` (the one `podnetctl explain` builds its
/// frames with).
#[must_use]
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    podnet::explain::checksum(bytes)
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

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// IPv4 `frag_off`: more fragments.
pub const IP_MF: u16 = 0x2000;

/// An IPv4 header (no options) with a valid checksum, carrying `l4`.
#[must_use]
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    frag_off: u16,
    l4_len: usize,
) -> Vec<u8> {
    let total_len = u16::try_from(20 + l4_len).expect("fits an IPv4 packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34]);
    ip.extend_from_slice(&frag_off.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip
}

/// Ethernet + IPv4 (`frag_off` as given) + `l4` bytes.
#[must_use]
pub fn ipv4_frame(
    (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    proto: u8,
    frag_off: u16,
    l4: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(dst_mac, src_mac, ETH_P_IP);
    frame.extend_from_slice(&ipv4_header(src, dst, proto, frag_off, l4.len()));
    frame.extend_from_slice(l4);
    frame
}

/// A TCP header (no options, checksum not computed: the datapath does not
/// check it) with `flags`.
#[must_use]
pub fn tcp_header(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst_port.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp
}

/// A UDP header and `payload` (checksum 0: not computed).
#[must_use]
pub fn udp_datagram(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("fits a UDP datagram");
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    udp
}

/// An ICMP message of `icmp_type`/`code` whose body follows the 4 bytes
/// after the checksum (`rest`: identifier + sequence for echo, unused for
/// errors) with a valid checksum.
#[must_use]
pub fn icmp_message(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(body);
    let csum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    icmp
}
