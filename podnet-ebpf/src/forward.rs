//! Where a parsed IPv4 packet goes: a local endpoint (`bpf_redirect_peer`)
//! or a remote node (VXLAN encapsulation, or native routing on the
//! underlay). Shared by from_pod, from_overlay and from_underlay.

use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use podnet_common::{
    DropReason, EndpointInfo, RemoteNode, Verdict,
    node::{MODE_DIRECT, MODE_VXLAN},
};

use crate::{
    counters::{count, drop_packet, pass_to_stack},
    maps::{CONFIG, ENDPOINTS, REMOTE},
    packet::{self, Ipv4Fields},
};

/// `AF_INET` for `bpf_redir_neigh.nh_family`.
const AF_INET: u32 = 2;
/// TTL of the outer (VXLAN) header.
const TUNNEL_TTL: u8 = 64;

#[inline(always)]
pub fn endpoint(ip: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole (map update), so a concurrent update yields the old or the new
    // endpoint, both of which are valid at that moment.
    unsafe { ENDPOINTS.get(ip) }.copied()
}

#[inline(always)]
pub fn remote_node(ip: u32) -> Option<RemoteNode> {
    REMOTE.get(Key::new(32, ip)).copied()
}

/// Delivers to a local endpoint as a routed hop: TTL - 1, source MAC = the
/// destination's host veth, destination MAC = the pod's. Since Linux 6.15
/// `bpf_redirect_peer` scrubs the skb to PACKET_HOST anyway, but the MACs are
/// what tcpdump inside the pod shows and what older kernels check.
/// `verdict` says which way the packet came.
#[inline(always)]
pub fn to_endpoint(ctx: &TcContext, ip: &Ipv4Fields, dst: &EndpointInfo, verdict: Verdict) -> i32 {
    if ip.ttl <= 1 {
        // Let the host stack answer with ICMP time exceeded.
        return pass_to_stack();
    }
    if packet::decrement_ttl(ctx, ip).is_err()
        || packet::set_macs(ctx, &dst.pod_mac, &dst.host_mac).is_err()
    {
        return drop_packet(DropReason::HeaderRewriteFailed);
    }
    count(verdict);
    // SAFETY: plain helper call; `bpf_redirect_peer` works from TC ingress
    // towards a device whose peer is in another netns: every caller runs at
    // TC ingress, and an endpoint's host veth has its peer in the pod.
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}

/// Sends a pod's packet to the node that owns its destination.
#[inline(always)]
pub fn to_remote(ctx: &TcContext, ip: &Ipv4Fields, remote: &RemoteNode) -> i32 {
    if ip.ttl <= 1 {
        return pass_to_stack();
    }
    let Some(config) = CONFIG.get(0).copied() else {
        return drop_packet(DropReason::NoNodeConfig);
    };
    if packet::decrement_ttl(ctx, ip).is_err() {
        return drop_packet(DropReason::HeaderRewriteFailed);
    }
    match config.mode {
        MODE_VXLAN if config.tunnel_ifindex != 0 => {
            // SAFETY: all-zero is a valid bpf_tunnel_key (plain integers).
            let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
            key.tunnel_id = config.vni;
            // The helper takes the remote address in host byte order
            // (kernel selftests, test_tunnel_kern.c); the map holds it as on
            // the wire.
            key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote.node_ip);
            key.tunnel_ttl = TUNNEL_TTL;
            // SAFETY: `key` lives on this stack frame for the call; the size
            // is that of the struct the kernel's UAPI defines.
            let set = unsafe {
                bpf_skb_set_tunnel_key(
                    ctx.skb.skb,
                    &raw mut key,
                    core::mem::size_of::<bpf_tunnel_key>() as u32,
                    0,
                )
            };
            if set != 0 {
                return drop_packet(DropReason::TunnelKeyFailed);
            }
            count(Verdict::VxlanEncap);
            // SAFETY: plain helper call; the collect-metadata VXLAN device
            // encapsulates with the key set above.
            unsafe { bpf_redirect(config.tunnel_ifindex, 0) as i32 }
        }
        MODE_DIRECT if config.underlay_ifindex != 0 => {
            // SAFETY: all-zero is a valid bpf_redir_neigh.
            let mut params: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            params.nh_family = AF_INET;
            params.__bindgen_anon_1.ipv4_nh = remote.node_ip;
            count(Verdict::RedirectNeigh);
            // SAFETY: `params` lives for the call; the kernel fills in the
            // MACs from the neighbour table (resolving it if needed).
            unsafe {
                bpf_redirect_neigh(
                    config.underlay_ifindex,
                    &raw mut params,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                ) as i32
            }
        }
        _ => drop_packet(DropReason::NoNodeConfig),
    }
}
