//! A packet's L4 facts as flow tracking sees them: its tuple (for an ICMP
//! error, the tuple of the flow it belongs to), TCP flags, and whether it
//! may start a flow. Shared by the stack-flows bookkeeping (`flows`) and
//! the policy's connection tracking (`policy`).

use aya_ebpf::programs::TcContext;
use podnet_common::FlowKey;

use crate::packet::{self, Ipv4Fields};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ICMP_ECHOREPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// The ICMP header before an error's embedded datagram.
const ICMP_HLEN: usize = 8;

/// What flow tracking needs of a packet's L4 header.
pub struct L4 {
    /// The packet's own tuple, or for an ICMP error the tuple of the flow
    /// direction the error travels with (the embedded packet reversed).
    pub key: FlowKey,
    pub tcp_flags: u8,
    /// An ICMP error or an ICMP message other than echo: never starts a flow.
    pub icmp_other: bool,
}

#[inline(always)]
fn key(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    FlowKey::new(src, dst, src_port, dst_port, proto)
}

/// The tuple of the other direction. ICMP echo keeps the identifier in
/// `src_port` both ways, so only the addresses swap.
#[inline(always)]
pub fn reversed(k: &FlowKey) -> FlowKey {
    if k.proto == IPPROTO_ICMP {
        key(k.dst, k.src, k.src_port, k.dst_port, k.proto)
    } else {
        key(k.dst, k.src, k.dst_port, k.src_port, k.proto)
    }
}

/// Ports (as on the wire) of the L4 header at `offset`; ICMP echo gives
/// its identifier and 0, protocols without ports 0 and 0.
#[inline(always)]
fn ports(ctx: &TcContext, proto: u8, offset: usize) -> Option<(u16, u16)> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let b = packet::bytes_at::<4>(ctx, offset)?;
            Some((
                u16::from_ne_bytes([b[0], b[1]]),
                u16::from_ne_bytes([b[2], b[3]]),
            ))
        }
        IPPROTO_ICMP => {
            let b = packet::bytes_at::<8>(ctx, offset)?;
            if b[0] == ICMP_ECHO || b[0] == ICMP_ECHOREPLY {
                Some((u16::from_ne_bytes([b[4], b[5]]), 0))
            } else {
                Some((0, 0))
            }
        }
        _ => Some((0, 0)),
    }
}

/// Whether TCP flags `tcp_flags` open a connection: a SYN without ACK.
#[inline(always)]
pub fn opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether `proto`'s header starts with two ports (TCP, UDP, SCTP).
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// The flow key of an ICMP error: the embedded datagram (what the error's
/// sender received, RFC 792: its IP header and at least 8 bytes after it)
/// reversed, i.e. the direction the error travels in.
#[inline(always)]
fn embedded_key(ctx: &TcContext, icmp_offset: usize) -> Option<FlowKey> {
    let inner = icmp_offset + ICMP_HLEN;
    let h = packet::bytes_at::<20>(ctx, inner)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto = h[9];
    let (src_port, dst_port) = ports(ctx, proto, inner + ihl)?;
    let embedded = key(
        u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
        u32::from_ne_bytes([h[16], h[17], h[18], h[19]]),
        src_port,
        dst_port,
        proto,
    );
    Some(reversed(&embedded))
}

/// The L4 facts of `ip`; `None` for a later fragment (no ports) or an L4
/// header cut short.
#[inline(always)]
pub fn parse(ctx: &TcContext, ip: &Ipv4Fields) -> Option<L4> {
    if ip.later_fragment {
        return None;
    }
    let mut tcp_flags = 0;
    let mut icmp_other = false;
    let key = match ip.proto {
        IPPROTO_TCP => {
            let b = packet::bytes_at::<14>(ctx, ip.l4_offset)?;
            tcp_flags = b[13];
            key(
                ip.src,
                ip.dst,
                u16::from_ne_bytes([b[0], b[1]]),
                u16::from_ne_bytes([b[2], b[3]]),
                IPPROTO_TCP,
            )
        }
        IPPROTO_ICMP => {
            let icmp = packet::bytes_at::<ICMP_HLEN>(ctx, ip.l4_offset)?;
            let icmp_type = icmp[0];
            icmp_other = icmp_type != ICMP_ECHO && icmp_type != ICMP_ECHOREPLY;
            if matches!(
                icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
            ) {
                embedded_key(ctx, ip.l4_offset)?
            } else {
                // Echo: the identifier is the "port" both ways.
                let id = if icmp_other {
                    0
                } else {
                    u16::from_ne_bytes([icmp[4], icmp[5]])
                };
                key(ip.src, ip.dst, id, 0, IPPROTO_ICMP)
            }
        }
        proto => {
            let (src_port, dst_port) = ports(ctx, proto, ip.l4_offset)?;
            key(ip.src, ip.dst, src_port, dst_port, proto)
        }
    };
    Some(L4 {
        key,
        tcp_flags,
        icmp_other,
    })
}

/// Flag bits a TCP packet adds in the given direction.
#[inline(always)]
pub fn closing_flags(tcp_flags: u8, rst_flag: u32, fin_flag: u32) -> u32 {
    let mut flags = 0;
    if tcp_flags & TCP_RST != 0 {
        flags |= rst_flag;
    }
    if tcp_flags & TCP_FIN != 0 {
        flags |= fin_flag;
    }
    flags
}
