//! `from_pod`: TC ingress of a pod's host-side veth, i.e. every packet a pod
//! sends. A packet for another pod on this node goes straight into that pod's
//! netns with `bpf_redirect_peer`, skipping the host's routing, netfilter and
//! the second veth hop; a packet for a pod on another node goes straight to
//! the VXLAN device with its tunnel key set, or out of the underlay to that
//! node; everything else goes up the host stack. So does a packet of a flow
//! whose other direction went through the stack (a reply from a Service
//! backend: conntrack must undo the DNAT), see `flows`. With `--services
//! bpf` a connection to a Service frontend is translated here first
//! (`service`), including one that picks the sending pod itself (hairpin:
//! it goes back into the pod from a link-local source).

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::{
    DropReason, Program, Verdict, VethEndpoint,
    endpoint::{ENDPOINT_F_POLICY, ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    node::{NODE_F_SERVICES_BPF, REMOTE_NODE_ADDRESS},
};

use crate::{
    arp,
    counters::count,
    flows, forward,
    lookup::{endpoint, remote_node},
    maps::{CONFIG, VETHS},
    node_port,
    packet::{self, Ipv4Fields, L3},
    policy::{self, Judged},
    service,
    verdict::{drop_packet, pass_to_stack},
};

#[classifier]
pub fn from_pod(mut ctx: TcContext) -> i32 {
    // SAFETY: `ctx.skb.skb` is the kernel's `__sk_buff` for this run, valid
    // for the whole program; reading its fields is what the context is for.
    let (ifindex, len, vlan_present) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ifindex, skb.len, skb.vlan_present)
    };

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

    // A veth without an entry is not (or no longer) an endpoint the agent
    // knows: nothing it sends is anyone's.
    let Some(veth) = veth else {
        return drop_packet(&ctx, Program::FromPod, DropReason::UnknownSender);
    };
    // A tagged frame: the veth's receive path moves the (outer) 802.1Q or
    // 802.1ad tag out of the frame into the skb before TC ingress runs
    // (`skb_vlan_untag` in `__netif_receive_skb_core`), so the frame below
    // looks untagged. A priority tag (VLAN 0) would otherwise be delivered
    // like an untagged frame.
    if vlan_present != 0 {
        return drop_packet(&ctx, Program::FromPod, DropReason::UnsupportedEthertype);
    }
    let mut ip = match packet::parse(&mut ctx) {
        L3::Ipv4(ip) => ip,
        L3::Arp => return arp_from_pod(&ctx, veth, ifindex),
        // podnet carries IPv4 only: IPv6 from a pod would reach the node
        // unchecked (router advertisements configure the node's routes and
        // addresses, CVE-2020-10749's class; link-local talk passes IPv4-only
        // firewalls).
        L3::Ipv6 => return drop_packet(&ctx, Program::FromPod, DropReason::Ipv6FromPod),
        // VLAN and QinQ tags (the stack would strip them and route the inner
        // packet unchecked), and every other ethertype.
        L3::Other => return drop_packet(&ctx, Program::FromPod, DropReason::UnsupportedEthertype),
        L3::MalformedIpv4 => return drop_packet(&ctx, Program::FromPod, DropReason::MalformedIpv4),
    };

    // Anti-spoofing: a pod may only send from its own IP and MAC, on its own
    // veth. Without this a pod could impersonate any other pod.
    if ip.src != veth.pod_ip {
        return drop_packet(&ctx, Program::FromPod, DropReason::SpoofedSourceIp);
    }
    if ip.src_mac != veth.pod_mac {
        return drop_packet(&ctx, Program::FromPod, DropReason::SpoofedSourceMac);
    }

    // Services in the datapath: a connection to a frontend goes to its
    // backend from here on (everything below sees the backend), and a
    // backend's reply is noted to come from the frontend again, which it
    // does once policy has judged it as the backend's.
    let mut new_service_connection = None;
    let mut reply_from_frontend = None;
    if let Some(config) = CONFIG.get(0)
        && config.flags & NODE_F_SERVICES_BPF != 0
    {
        // A pod's own node's NodePorts are frontends of the node's address.
        let to_node = ip.dst == config.node_ip;
        if config.in_service_cidr(ip.dst) || to_node {
            match service::pod_to_backend(ctx.skb.skb, &mut ip, to_node).outcome() {
                Ok(new) => new_service_connection = new,
                Err(reason) => return drop_packet(&ctx, Program::FromPod, reason),
            }
        } else {
            service::clear_clashing(&ctx, &ip);
            reply_from_frontend = service::reply_source(&ctx, &ip);
            // A hairpin connection's reply (see below) is translated at
            // once: its destination, the pod itself, is what the lookups
            // below need.
            if let Some(frontend) = &reply_from_frontend
                && ip.dst == service::hairpin_address()
            {
                if let Err(reason) = service::hairpin_reply(&mut ctx, &mut ip, frontend) {
                    return drop_packet(&ctx, Program::FromPod, reason);
                }
                reply_from_frontend = None;
            }
        }
    }
    // Hairpin: the pod's connection to a Service that picked the pod
    // itself, either way (from `HAIRPIN_SOURCE` to the pod, or from the
    // frontend to the pod), the only packets whose source is not the
    // pod's own any more. It goes back into the pod. Policy does not judge
    // it: it is the pod talking to itself, which NetworkPolicy cannot
    // restrict on the pod's loopback either (a limit Kubernetes
    // documents; Cilium skips policy for it too). Nor does the pod's
    // egress shaper take it: the shaper hands to the stack, whose
    // reverse-path check would drop the source on a veth.
    let hairpin = ip.src != veth.pod_ip;

    // Where the packet would go: a local pod, or another node's pod or
    // address (one lookup each, the second only when the first misses).
    let local = endpoint(ip.dst);
    let remote = match local {
        Some(_) => None,
        None => remote_node(ip.dst),
    };
    // UDP to the VXLAN port of a node (this one, another one, or any host
    // outside the pod network): every node's VXLAN device listens on all
    // its addresses. Pod-to-pod UDP on that port is ordinary traffic.
    let to_a_pod = local.is_some() || remote.is_some_and(|r| r.flags & REMOTE_NODE_ADDRESS == 0);
    if !to_a_pod && is_vxlan(&ctx, &ip) {
        return drop_packet(&ctx, Program::FromPod, DropReason::VxlanFromPod);
    }
    // NetworkPolicy: one flag test each for pods no policy selects. A
    // receiver's bits only matter when it is local (another node's pod is
    // judged by its own node). Before the shaper: what the shaper hands to
    // the stack may leave masqueraded, past any later judgement.
    let receiver_flags = match local {
        Some(dst) => dst.flags & ENDPOINT_F_POLICY,
        None => 0,
    };
    if !hairpin
        && (veth.policy_flags | receiver_flags) & ENDPOINT_F_POLICY != 0
        && let Some(code) = judge_sent(&ctx, &ip, veth.policy_flags, receiver_flags, to_a_pod)
    {
        return code;
    }
    if let Some(new) = &new_service_connection {
        service::record(&ctx, &ip, new);
    }
    if let Some(frontend) = &reply_from_frontend {
        if let Err(reason) = service::from_frontend(&mut ctx, &mut ip, frontend) {
            return drop_packet(&ctx, Program::FromPod, reason);
        }
        // A reply to a NodePort client outside the pod network: its
        // source is the node's address now, which the stack would drop as
        // a martian. (Past the pod's egress shaper, which hands to the
        // stack: a shaped backend's NodePort replies are not limited.)
        if frontend.is_node_address() && local.is_none() && remote.is_none() {
            return node_port::to_outside(&ctx, &ip, Program::FromPod);
        }
    }
    // An egress bandwidth limit: every packet the pod sends, whatever its
    // destination, queues in the pod's shaper. Checked above like any other.
    if veth.egress_shaper_ifindex != 0 && !hairpin {
        return forward::to_shaper(veth.egress_shaper_ifindex);
    }
    if let Some(dst) = local {
        if let Some(code) = flows::divert_to_stack(&ctx, &ip) {
            return code;
        }
        return forward::to_endpoint(&mut ctx, &ip, &dst, Verdict::RedirectPeer);
    }
    if let Some(remote) = remote {
        if let Some(code) = flows::divert_to_stack(&ctx, &ip) {
            return code;
        }
        return forward::to_remote(&mut ctx, ip.ttl, &remote);
    }
    // Not a pod of the cluster: the host stack routes (and masquerades) it.
    pass_to_stack()
}

/// The policy verdict on what a pod sends, when the sender or the (local)
/// receiver is selected by a policy: `Some(drop code)` or `None` to go on.
/// Every packet of a selected pod is tracked (allowed connections both
/// ways), so that the replies pass its policy in the other direction. A
/// destination in the Service CIDR is judged after the stack's DNAT,
/// against the backend (to_pod, or the overlay/underlay egress); its
/// connection is tracked as the pod's own meanwhile, for the replies the
/// stack delivers from the ClusterIP.
#[inline(always)]
fn judge_sent(
    ctx: &TcContext,
    ip: &Ipv4Fields,
    sender_flags: u32,
    receiver_flags: u32,
    to_a_pod: bool,
) -> Option<i32> {
    if !to_a_pod
        && CONFIG
            .get(0)
            .is_some_and(|config| config.in_service_cidr(ip.dst))
    {
        policy::track_own(ctx, ip);
        return None;
    }
    let judged = Judged {
        egress_of: (sender_flags & ENDPOINT_F_POLICY_EGRESS != 0).then_some(ip.src),
        ingress_of: (receiver_flags & ENDPOINT_F_POLICY_INGRESS != 0).then_some(ip.dst),
    };
    policy::enforce(ctx, ip, judged)
        .err()
        .map(|reason| drop_packet(ctx, Program::FromPod, reason))
}

/// UDP to the cluster's VXLAN port.
#[inline(always)]
fn is_vxlan(ctx: &TcContext, ip: &Ipv4Fields) -> bool {
    const IPPROTO_UDP: u8 = 17;
    if ip.proto != IPPROTO_UDP || ip.later_fragment {
        return false;
    }
    let Some(vxlan_port) = CONFIG
        .get(0)
        .map(|config| config.vxlan_port)
        .filter(|&port| port != 0)
    else {
        return false;
    };
    packet::bytes_at::<4>(ctx, ip.l4_offset)
        .is_some_and(|ports| u16::from_ne_bytes([ports[2], ports[3]]) == vxlan_port)
}

/// ARP from the endpoint on this veth: only as itself (sender IP, sender MAC
/// and frame source the pod's own); a request for another address (its
/// gateway) is answered in place, the rest (replies, announcements) goes to
/// the host stack.
#[inline(always)]
fn arp_from_pod(ctx: &TcContext, veth: &VethEndpoint, ifindex: u32) -> i32 {
    let Some(arp) = arp::parse(ctx) else {
        return drop_packet(ctx, Program::FromPod, DropReason::ForgedArp);
    };
    if arp.sender_ip != veth.pod_ip.to_ne_bytes()
        || arp.sender_mac != veth.pod_mac
        || arp.eth_src != veth.pod_mac
    {
        return drop_packet(ctx, Program::FromPod, DropReason::ForgedArp);
    }
    if !arp.asks_for_another() {
        return pass_to_stack();
    }
    match arp::reply(ctx, &arp, &veth.host_mac, ifindex) {
        Ok(code) => {
            count(Verdict::ArpReply);
            code
        }
        Err(_) => drop_packet(ctx, Program::FromPod, DropReason::HeaderRewriteFailed),
    }
}
