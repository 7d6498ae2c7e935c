//! ARP from pods. A pod may only speak ARP as itself: sender IP and MAC (and
//! the frame's source MAC) must be its own, or the frame is dropped (a forged
//! sender would poison the node's neighbour cache). Its requests (for its
//! gateway, the only address it has a link route to) are answered in place
//! with the MAC of its host veth, the way Cilium does it. The pod's
//! permanent neighbour entry makes requests rare, but that entry goes away
//! whenever the pod changes its MAC or flushes its neighbours; without an
//! answer the pod would be cut off.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};

use crate::packet::{ETH_ALEN, ETH_HLEN};

const ARP_LEN: usize = 28;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// An ARP request or reply for IPv4 over Ethernet.
pub struct Arp {
    /// Source MAC of the Ethernet frame.
    pub eth_src: [u8; ETH_ALEN],
    pub op: u16,
    pub sender_mac: [u8; ETH_ALEN],
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

impl Arp {
    /// A request that asks for another address (gratuitous ARP and
    /// duplicate address detection announce the sender's own: nothing to
    /// answer).
    #[must_use]
    pub fn asks_for_another(&self) -> bool {
        self.op == ARPOP_REQUEST && self.target_ip != self.sender_ip
    }
}

/// The frame (`EtherType` ARP) as an Ethernet/IPv4 ARP request or reply;
/// `None` for anything else (other hardware or protocol types, other
/// operations, truncated).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Arp> {
    let eth_src = ctx.load::<[u8; ETH_ALEN]>(ETH_ALEN).ok()?;
    let arp = ctx.load::<[u8; ARP_LEN]>(ETH_HLEN).ok()?;
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    if arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([arp[6], arp[7]]);
    if op != ARPOP_REQUEST && op != ARPOP_REPLY {
        return None;
    }
    let mut parsed = Arp {
        eth_src,
        op,
        sender_mac: [0; ETH_ALEN],
        sender_ip: [0; 4],
        target_ip: [0; 4],
    };
    parsed.sender_mac.copy_from_slice(&arp[8..14]);
    parsed.sender_ip.copy_from_slice(&arp[14..18]);
    parsed.target_ip.copy_from_slice(&arp[24..28]);
    Some(parsed)
}

/// Turns the request into the reply "target_ip is at `host_mac`" and sends
/// it back out of the host veth (egress: into the pod). Returns the TC code.
#[inline(always)]
pub fn reply(
    ctx: &TcContext,
    request: &Arp,
    host_mac: &[u8; ETH_ALEN],
    ifindex: u32,
) -> Result<i32, i64> {
    let mut frame = [0u8; ETH_HLEN + ARP_LEN];
    frame[0..6].copy_from_slice(&request.sender_mac);
    frame[6..12].copy_from_slice(host_mac);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    frame[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    frame[20..22].copy_from_slice(&ARPOP_REPLY.to_be_bytes());
    frame[22..28].copy_from_slice(host_mac);
    frame[28..32].copy_from_slice(&request.target_ip);
    frame[32..38].copy_from_slice(&request.sender_mac);
    frame[38..42].copy_from_slice(&request.sender_ip);
    ctx.store(0, &frame, 0)?;
    // SAFETY: plain helper call; redirecting to the egress of the device
    // the packet came in on sends it back to the veth peer, the pod.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
