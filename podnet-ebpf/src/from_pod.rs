//! `from_pod`: TC ingress of a pod's host-side veth, i.e. every packet a pod
//! sends. A packet for another pod on this node goes straight into that pod's
//! netns with `bpf_redirect_peer`, skipping the host's routing, netfilter and
//! the second veth hop; everything else goes up the host stack.

use aya_ebpf::{helpers::bpf_redirect_peer, macros::classifier, programs::TcContext};
use podnet_common::{DropReason, EndpointInfo, Verdict};

use crate::{
    arp,
    counters::{count, count_endpoint, drop_packet, pass_to_stack},
    maps::ENDPOINTS,
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

    let Some(dst) = endpoint(ip.dst) else {
        return pass_to_stack();
    };

    // TTL expiring here: let the host stack answer with ICMP time exceeded.
    if ip.ttl <= 1 {
        return pass_to_stack();
    }
    redirect_to_endpoint(&ctx, &ip, &dst)
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

#[inline(always)]
fn endpoint(ip: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole (map update), so a concurrent update yields the old or the new
    // endpoint, both of which are valid at that moment.
    unsafe { ENDPOINTS.get(ip) }.copied()
}

/// Delivers to a local endpoint as a routed hop: TTL - 1, source MAC = the
/// destination's host veth, destination MAC = the pod's. Since Linux 6.15
/// `bpf_redirect_peer` scrubs the skb to PACKET_HOST anyway, but the MACs are
/// what tcpdump inside the pod shows and what older kernels check.
#[inline(always)]
fn redirect_to_endpoint(ctx: &TcContext, ip: &packet::Ipv4Fields, dst: &EndpointInfo) -> i32 {
    if packet::decrement_ttl(ctx, ip).is_err()
        || packet::set_macs(ctx, &dst.pod_mac, &dst.host_mac).is_err()
    {
        return drop_packet(DropReason::HeaderRewriteFailed);
    }
    count(Verdict::RedirectPeer);
    // SAFETY: plain helper call; `bpf_redirect_peer` only works from TC
    // ingress towards a device whose peer is in another netns, which is how
    // from_pod is attached and what an endpoint's host veth is.
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}
