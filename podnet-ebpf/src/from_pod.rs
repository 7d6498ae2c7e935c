//! `from_pod`: TC ingress of a pod's host-side veth, i.e. every packet a pod
//! sends. A packet for another pod on this node goes straight into that pod's
//! netns with `bpf_redirect_peer`, skipping the host's routing, netfilter and
//! the second veth hop; a packet for a pod on another node goes straight to
//! the VXLAN device with its tunnel key set, or out of the underlay to that
//! node; everything else goes up the host stack.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::{DropReason, Verdict};

use crate::{
    arp,
    counters::{count, count_endpoint, drop_packet, pass_to_stack},
    forward::{self, endpoint},
    packet::{self, L3},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    // SAFETY: `ctx.skb.skb` is the kernel's `__sk_buff` for this run, valid
    // for the whole program; reading its fields is what the context is for.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    count_endpoint(ifindex, len);

    let ip = match packet::parse(&ctx) {
        L3::Ipv4(ip) => ip,
        L3::Other => return answer_arp(&ctx, ifindex).unwrap_or_else(pass_to_stack),
        L3::MalformedIpv4 => return drop_packet(DropReason::MalformedIpv4),
    };

    // Anti-spoofing: a pod may only send from its own IP and MAC, on its own
    // veth. Without this a pod could impersonate any other pod.
    let Some(src) = endpoint(ip.src) else {
        return drop_packet(DropReason::SpoofedSourceIp);
    };
    if src.host_ifindex != ifindex {
        return drop_packet(DropReason::SpoofedSourceIp);
    }
    if !packet::src_mac(&ctx).is_ok_and(|mac| mac == src.pod_mac) {
        return drop_packet(DropReason::SpoofedSourceMac);
    }

    if let Some(dst) = endpoint(ip.dst) {
        return forward::to_endpoint(&ctx, &ip, &dst, Verdict::RedirectPeer);
    }
    if let Some(remote) = forward::remote_node(ip.dst) {
        return forward::to_remote(&ctx, &ip, &remote);
    }
    // Not a pod of the cluster: the host stack routes (and masquerades) it.
    pass_to_stack()
}

/// Answers an ARP request from the endpoint behind `ifindex`; `None` when
/// the frame is not one (left to the host stack).
#[inline(always)]
fn answer_arp(ctx: &TcContext, ifindex: u32) -> Option<i32> {
    let request = arp::parse_request(ctx)?;
    let sender = endpoint(u32::from_ne_bytes(request.sender_ip))?;
    // Only a pod asking from its own veth, with its own MAC, gets an answer.
    if sender.host_ifindex != ifindex || sender.pod_mac != request.sender_mac {
        return None;
    }
    match arp::reply(ctx, &request, &sender.host_mac, ifindex) {
        Ok(code) => {
            count(Verdict::ArpReply);
            Some(code)
        }
        Err(_) => Some(drop_packet(DropReason::HeaderRewriteFailed)),
    }
}
