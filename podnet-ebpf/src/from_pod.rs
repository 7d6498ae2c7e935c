//! `from_pod`: TC ingress of a pod's host-side veth, i.e. every packet a pod
//! sends. A packet for another pod on this node goes straight into that pod's
//! netns with `bpf_redirect_peer`, skipping the host's routing, netfilter and
//! the second veth hop; a packet for a pod on another node goes straight to
//! the VXLAN device with its tunnel key set, or out of the underlay to that
//! node; everything else goes up the host stack. So does a packet of a flow
//! whose other direction went through the stack (a reply from a Service
//! backend: conntrack must undo the DNAT), see `flows`.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::{DropReason, Verdict, VethEndpoint};

use crate::{
    arp,
    counters::{count, drop_packet, pass_to_stack},
    flows,
    forward::{self, endpoint},
    maps::VETHS,
    packet::{self, L3},
};

#[classifier]
pub fn from_pod(mut ctx: TcContext) -> i32 {
    // SAFETY: `ctx.skb.skb` is the kernel's `__sk_buff` for this run, valid
    // for the whole program; reading its fields is what the context is for.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };

    // One lookup gives who may send on this veth and its counters. No entry:
    // the veth is not (or no longer) an endpoint the agent knows.
    // SAFETY: this CPU's copy of an existing per-CPU entry; a BPF program is
    // not preempted by another program on its CPU, so nothing else writes it
    // while the reference lives (the agent replaces entries whole).
    let veth: Option<&VethEndpoint> = VETHS.get_ptr_mut(ifindex).map(|veth| unsafe {
        (*veth).stats.packets += 1;
        (*veth).stats.bytes += u64::from(len);
        &*veth
    });

    let ip = match packet::parse(&mut ctx) {
        L3::Ipv4(ip) => ip,
        L3::Other => {
            return veth
                .and_then(|veth| answer_arp(&ctx, veth, ifindex))
                .unwrap_or_else(pass_to_stack);
        }
        L3::MalformedIpv4 => return drop_packet(DropReason::MalformedIpv4),
    };

    // Anti-spoofing: a pod may only send from its own IP and MAC, on its own
    // veth. Without this a pod could impersonate any other pod.
    let Some(veth) = veth else {
        return drop_packet(DropReason::SpoofedSourceIp);
    };
    if ip.src != veth.pod_ip {
        return drop_packet(DropReason::SpoofedSourceIp);
    }
    if ip.src_mac != veth.pod_mac {
        return drop_packet(DropReason::SpoofedSourceMac);
    }

    if let Some(dst) = endpoint(ip.dst) {
        if let Some(code) = flows::divert_to_stack(&ctx, &ip) {
            return code;
        }
        return forward::to_endpoint(&mut ctx, &ip, &dst, Verdict::RedirectPeer);
    }
    if let Some(remote) = forward::remote_node(ip.dst) {
        if let Some(code) = flows::divert_to_stack(&ctx, &ip) {
            return code;
        }
        return forward::to_remote(&mut ctx, &ip, &remote);
    }
    // Not a pod of the cluster: the host stack routes (and masquerades) it.
    pass_to_stack()
}

/// Answers an ARP request from the endpoint on this veth; `None` when the
/// frame is not one (left to the host stack).
#[inline(always)]
fn answer_arp(ctx: &TcContext, veth: &VethEndpoint, ifindex: u32) -> Option<i32> {
    let request = arp::parse_request(ctx)?;
    // Only the pod itself, asking with its own IP and MAC, gets an answer.
    if request.sender_ip != veth.pod_ip.to_ne_bytes() || request.sender_mac != veth.pod_mac {
        return None;
    }
    match arp::reply(ctx, &request, &veth.host_mac, ifindex) {
        Ok(code) => {
            count(Verdict::ArpReply);
            Some(code)
        }
        Err(_) => Some(drop_packet(DropReason::HeaderRewriteFailed)),
    }
}
