//! Where a parsed IPv4 packet goes: a local endpoint (`bpf_redirect_peer`)
//! or a remote node (VXLAN encapsulation, or native routing on the
//! underlay). Shared by from_pod, from_overlay and from_underlay.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use podnet_common::{
    DropReason, EndpointInfo, NodeConfig, Program, RemoteNode, Verdict,
    endpoint::{ENDPOINT_F_POLICY, ENDPOINT_F_POLICY_INGRESS, ENDPOINT_F_SHAPED_INGRESS},
    node::{MODE_DIRECT, MODE_VXLAN, NODE_F_SERVICES_BPF, NODE_F_VXLAN_BPF, REMOTE_NODE_ADDRESS},
};

use crate::{
    counters::count,
    flows,
    lookup::{self, endpoint, remote_node},
    maps::CONFIG,
    packet::{self, Ipv4Fields, L3},
    policy::{self, Judged},
    sender, service,
    verdict::{drop_packet, pass_to_stack},
    vxlan,
};

/// `AF_INET` for `bpf_redir_neigh.nh_family`.
const AF_INET: u32 = 2;
/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;
/// TTL of the outer (VXLAN) header.
const TUNNEL_TTL: u8 = 64;

/// What arrived from another node (from_overlay, from_underlay): a packet
/// from a pod of another node for a local endpoint is delivered, unless its
/// flow went through this node's stack the other way; anything else goes
/// to the host stack. Before either, the sender is checked (`Arrival`):
/// the fast path skips the stack's own checks, and the stack would deliver
/// a forged packet just the same.
///
/// Only pod-to-pod traffic takes the fast path here because only there do
/// both directions: the endpoint's replies to anything that is not a pod
/// (another node, a NodePort client, a masqueraded Service flow) go up this
/// node's stack, so their requests must too, or conntrack sees a reply
/// without its request and calls it INVALID (kube-proxy drops those in
/// KUBE-FORWARD).
#[inline(always)]
pub fn deliver_local(ctx: &mut TcContext, arrival: Arrival) -> i32 {
    // Read before parsing: the tunnel metadata is the only trace of who
    // sent a decapsulated packet.
    let tunnel_source = match arrival {
        Arrival::Overlay => match sender::tunnel_source(ctx) {
            Some(source) => source,
            None => return drop_packet(ctx, arrival.program(), DropReason::UnknownTunnelSource),
        },
        Arrival::Underlay => 0,
    };
    let mut ip = match packet::parse(ctx) {
        L3::Ipv4(ip) => ip,
        L3::Arp | L3::Ipv6 | L3::Other => {
            if matches!(arrival, Arrival::Overlay) && !is_node(tunnel_source) {
                return drop_packet(ctx, arrival.program(), DropReason::UnknownTunnelSource);
            }
            return arrival.to_stack(ctx, pass_to_stack());
        }
        L3::MalformedIpv4 => return drop_packet(ctx, arrival.program(), DropReason::MalformedIpv4),
    };
    // By reference into the map, held across the checks below (a copied
    // `Option` held there has its `None` payload read by what LLVM hoists,
    // which the verifier rejects): one lookup of the sender per packet.
    let sender = lookup::remote_node_entry(ip.src);
    if matches!(arrival, Arrival::Overlay) {
        // Whatever its destination (the stack routes what is not a local
        // pod's): a node speaks for its pods and itself, nobody else.
        match sender {
            Some(node) if node.node_ip == tunnel_source => {}
            _ if is_node(tunnel_source) => {
                return drop_packet(ctx, arrival.program(), DropReason::TunnelSourceMismatch);
            }
            _ => return drop_packet(ctx, arrival.program(), DropReason::UnknownTunnelSource),
        }
    }
    // The underlay's sender check holds whatever the destination: a
    // pod-network source aimed at the node itself, a Service or a NodePort
    // would reach a backend after the stack's DNAT just the same. (Two
    // arms rather than one test on a copied `Option` held across the
    // check: the verifier rejects the read of a `None` payload LLVM keeps
    // in a register there.)
    let Some(dst) = endpoint(ip.dst) else {
        if matches!(arrival, Arrival::Underlay)
            && pod_network_source(ip.src)
            && let Some(code) = check_underlay_sender(ctx, &ip, sender)
        {
            return code;
        }
        if for_node_ports(&ip) {
            return FOR_NODE_PORTS;
        }
        return arrival.to_stack(ctx, pass_to_stack());
    };
    if matches!(arrival, Arrival::Underlay)
        && let Some(code) = check_underlay_sender(ctx, &ip, sender)
    {
        return code;
    }
    if sender.is_none() {
        return arrival.to_stack(ctx, pass_to_stack());
    }
    if let Some(code) = flows::divert_to_stack(ctx, &ip) {
        return arrival.to_stack(ctx, code);
    }
    if let Some(code) = judge_arrival(ctx, &ip, &dst, arrival.program()) {
        return code;
    }
    if let Some(code) = translate_reply(ctx, &mut ip, arrival.program()) {
        return code;
    }
    to_endpoint(ctx, &ip, &dst, arrival.verdict())
}

/// What [`deliver_local`] and [`decapsulate_local`] answer (no TC code is
/// negative) for a packet that reached this node's own address from
/// elsewhere while the datapath translates Services: the program runs
/// `node_port::from_elsewhere` on it, once (a copy inlined in each of
/// these would not fit the program's stack).
pub const FOR_NODE_PORTS: i32 = -2_000;

/// Whether `ip` is for this node's own address, and the datapath
/// translates Services (its NodePorts, and replies to them).
#[inline(always)]
fn for_node_ports(ip: &Ipv4Fields) -> bool {
    CONFIG
        .get(0)
        .is_some_and(|config| config.flags & NODE_F_SERVICES_BPF != 0 && config.node_ip == ip.dst)
}

/// A backend's reply to a local client's translated Service connection
/// comes from the frontend again (`--services bpf`), after policy judged
/// it as the backend's: `Some(drop code)` when the rewrite failed, else
/// `None` to go on. Called where such a reply reaches a local client from
/// elsewhere than a local pod: from another node, and from the stack (a
/// backend outside the pod network, routed and masqueraded by the node).
#[inline(always)]
pub fn translate_reply(ctx: &mut TcContext, ip: &mut Ipv4Fields, program: Program) -> Option<i32> {
    if !CONFIG
        .get(0)
        .is_some_and(|config| config.flags & NODE_F_SERVICES_BPF != 0)
    {
        return None;
    }
    let frontend = service::reply_source(ctx, ip)?;
    service::from_frontend(ctx, ip, &frontend)
        .err()
        .map(|reason| drop_packet(ctx, program, reason))
}

/// The policy verdict on a packet from another node for local endpoint
/// `dst` (what goes to the stack instead is judged where the stack
/// delivers it, in to_pod): `Some(drop code)` or `None` to go on. A
/// receiver selected only for egress is not judged, but its connections
/// are tracked, so its replies pass its egress.
#[inline(always)]
pub fn judge_arrival(
    ctx: &TcContext,
    ip: &Ipv4Fields,
    dst: &EndpointInfo,
    program: Program,
) -> Option<i32> {
    if dst.flags & ENDPOINT_F_POLICY == 0 {
        return None;
    }
    let judged = Judged {
        egress_of: None,
        ingress_of: (dst.flags & ENDPOINT_F_POLICY_INGRESS != 0).then_some(ip.dst),
    };
    policy::enforce(ctx, ip, judged)
        .err()
        .map(|reason| drop_packet(ctx, program, reason))
}

/// Whether `ip` (network byte order) is another node's address, as the
/// agent programmed it.
#[inline(always)]
fn is_node(ip: u32) -> bool {
    remote_node(ip).is_some_and(|node| node.flags & REMOTE_NODE_ADDRESS != 0 && node.node_ip == ip)
}

/// Direct mode, a packet on the underlay for a local pod: only unicast to
/// this node, and a source inside the pod network only from the node it
/// belongs to (the underlay is a LAN: anyone on it can put any source in a
/// frame). A source outside the pod network (a client routed to the pod)
/// passes: the underlay is trusted for those, as it is for the node's own
/// traffic. `sender` is the node whose pod CIDR holds the source, if any.
/// Returns the drop code, or `None` to go on.
#[inline(always)]
fn check_underlay_sender(
    ctx: &TcContext,
    ip: &Ipv4Fields,
    sender: Option<&RemoteNode>,
) -> Option<i32> {
    // SAFETY: `ctx.skb.skb` is this run's `__sk_buff`, valid for the whole
    // program.
    let (pkt_type, ifindex) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).ifindex) };
    if pkt_type != PACKET_HOST {
        return Some(drop_packet(
            ctx,
            Program::FromUnderlay,
            DropReason::UnderlayNotUnicast,
        ));
    }
    let forged = match sender {
        Some(node) => !sender::sent_by_node(ctx, ifindex, &ip.src_mac, node.node_ip),
        // No node's: this node's own pod addresses never arrive from the
        // underlay, nor do addresses of the pod network that no node owns.
        None => endpoint(ip.src).is_some() || pod_network_source(ip.src),
    };
    forged.then(|| {
        drop_packet(
            ctx,
            Program::FromUnderlay,
            DropReason::UnderlaySourceMismatch,
        )
    })
}

/// Whether `src` (network byte order) belongs to the pod network: the
/// cluster CIDR, this node's pod CIDR or another node's. Other nodes' own
/// addresses are not: node-to-node traffic is the nodes' business. Every
/// pod CIDR lies in the cluster CIDR (the agent checks records for it), so
/// the trie is only asked while the config has no cluster CIDR (a config
/// migrated from an older layout): one mask test per packet otherwise.
#[inline(always)]
fn pod_network_source(src: u32) -> bool {
    match CONFIG.get(0) {
        Some(config) if config.cluster_cidr_mask != 0 => {
            config.in_cluster_cidr(src) || config.in_pod_cidr(src)
        }
        Some(config) => config.in_pod_cidr(src) || lookup::in_remote_pod_cidr(src),
        None => lookup::in_remote_pod_cidr(src),
    }
}

/// vxlan mode, a packet on the underlay that is not VXLAN for this node:
/// no node sends pod traffic unencapsulated (what the stack routes from a
/// pod to another node is masqueraded), so a source of the pod network
/// here is forged by whoever is on the underlay, and would otherwise be
/// routed to a pod, a Service backend or the node itself. Dropped
/// (`underlay_source_mismatch`); anything else goes on to the stack.
#[inline(always)]
pub fn check_unencapsulated(ctx: &mut TcContext) -> i32 {
    match packet::parse(ctx) {
        L3::Ipv4(ip) if pod_network_source(ip.src) => drop_packet(
            ctx,
            Program::FromUnderlay,
            DropReason::UnderlaySourceMismatch,
        ),
        // A host on the underlay to a NodePort, or to the node itself.
        L3::Ipv4(ip) if for_node_ports(&ip) => FOR_NODE_PORTS,
        _ => pass_to_stack(),
    }
}

/// How a packet from another node arrived.
#[derive(Clone, Copy)]
pub enum Arrival {
    /// Decapsulated by the node's VXLAN device (from_overlay).
    Overlay,
    /// Routed to this node on the underlay (from_underlay, direct mode).
    Underlay,
}

impl Arrival {
    #[inline(always)]
    pub fn program(self) -> Program {
        match self {
            Self::Overlay => Program::FromOverlay,
            Self::Underlay => Program::FromUnderlay,
        }
    }

    #[inline(always)]
    fn verdict(self) -> Verdict {
        match self {
            Self::Overlay => Verdict::OverlayDeliver,
            Self::Underlay => Verdict::UnderlayDeliver,
        }
    }

    /// Leaves the packet to the stack (returns `code`). The inner frame of
    /// a VXLAN packet is addressed to whatever MAC the sending node's veth
    /// or VXLAN device had (from_pod leaves the pod's MACs alone), so the
    /// stack would take it for another host's (PACKET_OTHERHOST) and drop
    /// it in ip_rcv; everything the overlay carries to this node is for this
    /// host. The underlay is a real L2 segment: its frames keep the type
    /// their MAC gave them.
    #[inline(always)]
    pub fn to_stack(self, ctx: &TcContext, code: i32) -> i32 {
        if matches!(self, Self::Overlay) {
            let _ = ctx.change_type(PACKET_HOST);
        }
        code
    }
}

/// Delivers to a local endpoint as a routed hop: TTL - 1, source MAC = the
/// destination's host veth, destination MAC = the pod's. Since Linux 6.15
/// `bpf_redirect_peer` scrubs the skb to PACKET_HOST anyway, but the MACs are
/// what tcpdump inside the pod shows and what older kernels check.
/// `verdict` says which way the packet came.
#[inline(always)]
pub fn to_endpoint(
    ctx: &mut TcContext,
    ip: &Ipv4Fields,
    dst: &EndpointInfo,
    verdict: Verdict,
) -> i32 {
    if ip.ttl <= 1 {
        // Let the host stack answer with ICMP time exceeded.
        return pass_to_stack();
    }
    let Some(header) = packet::header_mut(ctx) else {
        return drop_packet(ctx, program_of(verdict), DropReason::HeaderRewriteFailed);
    };
    packet::decrement_ttl(header);
    header.dst_mac = dst.pod_mac;
    header.src_mac = dst.host_mac;
    count(verdict);
    if dst.flags & ENDPOINT_F_SHAPED_INGRESS != 0 {
        // Through the host veth's egress, where the pod's tbf queues it
        // (`bpf_redirect_peer` would skip every qdisc). to_pod runs there
        // first: the mark tells it this packet never saw the stack.
        flows::mark_fast_path(ctx);
        // SAFETY: plain helper call; redirecting to a device's egress
        // works from any TC hook.
        return unsafe { bpf_redirect(dst.host_ifindex, 0) as i32 };
    }
    // SAFETY: plain helper call; `bpf_redirect_peer` works from TC ingress
    // towards a device whose peer is in another netns: every caller runs at
    // TC ingress, and an endpoint's host veth has its peer in the pod.
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}

/// The program that delivers with `verdict` (for drop events).
#[inline(always)]
fn program_of(verdict: Verdict) -> Program {
    match verdict {
        Verdict::OverlayDeliver => Program::FromOverlay,
        Verdict::UnderlayDeliver | Verdict::VxlanDecapBpf => Program::FromUnderlay,
        _ => Program::FromPod,
    }
}

/// Hands a pod's packet to its egress shaper: the ifb device's egress,
/// where a tbf queues it. ifb gives the packet back to the host veth's
/// receive path, past TC ingress (`tc_skip_classify`), so the host stack
/// routes it from there: shaped traffic leaves the fast path, which is
/// what a queue needs (the fast path's redirects skip every qdisc on the
/// way). ifb accepts only redirected packets; `bpf_redirect` marks them
/// so since Linux 5.13 (`skb_set_redirected` in `skb_do_redirect`).
#[inline(always)]
pub fn to_shaper(shaper_ifindex: u32) -> i32 {
    count(Verdict::ToShaper);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(shaper_ifindex, 0) as i32 }
}

/// Sends a pod's packet (its IPv4 TTL `ttl`) to the node that owns its
/// destination.
#[inline(always)]
pub fn to_remote(ctx: &mut TcContext, ttl: u8, remote: &RemoteNode) -> i32 {
    send_to_node(ctx, ttl, remote)
        .unwrap_or_else(|reason| drop_packet(ctx, Program::FromPod, reason))
}

/// [`to_remote`]'s work, its failure returned for the caller to drop (a
/// subprogram's caller, where the drop event's frame would not fit below).
#[inline(always)]
pub fn send_to_node(ctx: &mut TcContext, ttl: u8, remote: &RemoteNode) -> Result<i32, DropReason> {
    if ttl <= 1 {
        return Ok(pass_to_stack());
    }
    let Some(config) = CONFIG.get(0).copied() else {
        return Err(DropReason::NoNodeConfig);
    };
    let Some(header) = packet::header_mut(ctx) else {
        return Err(DropReason::HeaderRewriteFailed);
    };
    packet::decrement_ttl(header);
    let inner_tos = header.tos;
    // Tells the egress program of the overlay/underlay device that this
    // packet never went through the stack (nothing to track).
    flows::mark_fast_path(ctx);
    match config.mode {
        MODE_VXLAN if config.flags & NODE_F_VXLAN_BPF != 0 && config.underlay_ifindex != 0 => {
            match vxlan::encapsulate(ctx, &config, remote.node_ip, inner_tos) {
                Ok(()) => {
                    count(Verdict::VxlanEncapBpf);
                    Ok(redirect_neigh(config.underlay_ifindex, remote.node_ip))
                }
                // What the kernel will not encapsulate here (a UDP GSO
                // packet) takes the device's way, unchanged.
                Err(vxlan::Refused::Unchanged) if config.tunnel_ifindex != 0 => {
                    to_tunnel_device(ctx, &config, remote)
                }
                Err(_) => Err(DropReason::HeaderRewriteFailed),
            }
        }
        MODE_VXLAN if config.tunnel_ifindex != 0 => to_tunnel_device(ctx, &config, remote),
        MODE_DIRECT if config.underlay_ifindex != 0 => {
            count(Verdict::RedirectNeigh);
            Ok(redirect_neigh(config.underlay_ifindex, remote.node_ip))
        }
        _ => Err(DropReason::NoNodeConfig),
    }
}

/// Out of `ifindex` to the next hop `node_ip` (network byte order), whose
/// MAC the kernel fills in from the neighbour table (resolving it if
/// needed).
#[inline(always)]
fn redirect_neigh(ifindex: u32, node_ip: u32) -> i32 {
    let mut params = MaybeUninit::uninit();
    write_redir_neigh_v4(&mut params, node_ip);
    // SAFETY: `params` lives for the call and is fully written.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            params.as_mut_ptr(),
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// Hands the packet to the collect-metadata VXLAN device with the tunnel
/// key for `remote`: the device encapsulates it.
#[inline(always)]
fn to_tunnel_device(
    ctx: &mut TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
) -> Result<i32, DropReason> {
    let mut key = MaybeUninit::uninit();
    write_tunnel_key(&mut key, config.vni, remote.node_ip);
    // SAFETY: `key` lives on this stack frame for the call and is
    // fully written (`write_tunnel_key`); the size is that of the
    // struct the kernel's UAPI defines.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            key.as_mut_ptr(),
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if set != 0 {
        return Err(DropReason::TunnelKeyFailed);
    }
    count(Verdict::VxlanEncap);
    // SAFETY: plain helper call; the collect-metadata VXLAN device
    // encapsulates with the key set above.
    Ok(unsafe { bpf_redirect(config.tunnel_ifindex, 0) as i32 })
}

// The two helper arguments below are built with one volatile store per
// word. A plain struct literal (or `mem::zeroed()`) lets LLVM merge the zero
// words into a `memset` call, and the memset bpf-linker links in is a
// subprogram storing one byte per loop turn: 36 turns per VXLAN packet.

/// Fills every field of the tunnel key for `remote_node_ip` (network byte
/// order, as in the map).
#[inline(always)]
fn write_tunnel_key(key: &mut MaybeUninit<bpf_tunnel_key>, vni: u32, remote_node_ip: u32) {
    let k = key.as_mut_ptr();
    // SAFETY: raw-pointer writes into `key`'s own storage, which is valid
    // and aligned for a `bpf_tunnel_key`; every field is written.
    unsafe {
        write_volatile(&raw mut (*k).tunnel_id, vni);
        // The helper takes the remote address in host byte order (kernel
        // selftests, test_tunnel_kern.c); the map holds it as on the wire.
        store_words(
            &raw mut (*k).__bindgen_anon_1.remote_ipv6,
            [u32::from_be(remote_node_ip), 0, 0, 0],
        );
        write_volatile(&raw mut (*k).tunnel_tos, 0);
        write_volatile(&raw mut (*k).tunnel_ttl, TUNNEL_TTL);
        write_volatile(&raw mut (*k).__bindgen_anon_2.tunnel_ext, 0);
        write_volatile(&raw mut (*k).tunnel_label, 0);
        store_words(&raw mut (*k).__bindgen_anon_3.local_ipv6, [0; 4]);
    }
}

/// Fills `params` with the IPv4 next hop `node_ip` (network byte order) for
/// `bpf_redirect_neigh`.
#[inline(always)]
fn write_redir_neigh_v4(params: &mut MaybeUninit<bpf_redir_neigh>, node_ip: u32) {
    let p = params.as_mut_ptr();
    // SAFETY: as in `write_tunnel_key`; the IPv4 next hop is the first word
    // of the union, the other three are zeroed.
    unsafe {
        write_volatile(&raw mut (*p).nh_family, AF_INET);
        store_words(&raw mut (*p).__bindgen_anon_1.ipv6_nh, [node_ip, 0, 0, 0]);
    }
}

/// Stores `words` at `dst` one volatile 32-bit store each (a volatile store
/// of the whole array becomes a volatile memset when it is all zeroes).
///
/// # Safety
/// `dst` must be valid for writes of 16 bytes, aligned to 4.
#[inline(always)]
unsafe fn store_words(dst: *mut [u32; 4], words: [u32; 4]) {
    let dst = dst.cast::<u32>();
    // SAFETY: the caller guarantees 4 writable, aligned words at `dst`.
    unsafe {
        write_volatile(dst, words[0]);
        write_volatile(dst.add(1), words[1]);
        write_volatile(dst.add(2), words[2]);
        write_volatile(dst.add(3), words[3]);
    }
}

/// VXLAN mode with the BPF datapath, on the underlay: a VXLAN packet from
/// another node for a local endpoint is decapsulated and delivered here,
/// after the checks from_overlay makes (the inner source must be the
/// sending node's: its pod CIDR or its address). Everything else goes to
/// the stack untouched, where the node's VXLAN device and from_overlay
/// handle it as in the kernel datapath: VXLAN from an unknown host (dropped
/// there), for the node itself or a non-local address, and the packets of
/// flows that go through the stack (`flows::divert_to_stack`).
#[inline(always)]
pub fn decapsulate_local(ctx: &mut TcContext, config: &NodeConfig) -> i32 {
    let Some(arrived) = vxlan::arrived(ctx, config) else {
        return check_unencapsulated(ctx);
    };
    if !is_node(arrived.node_ip) {
        return pass_to_stack();
    }
    let inner = arrived.inner;
    // The tunnel's remote address speaks for its node's pods and itself,
    // nobody else: what from_overlay checks (`deliver_local`).
    match remote_node(inner.src) {
        Some(node) if node.node_ip == arrived.node_ip => {}
        _ => {
            return drop_packet(ctx, Program::FromUnderlay, DropReason::TunnelSourceMismatch);
        }
    }
    let Some(dst) = endpoint(inner.dst) else {
        return pass_to_stack();
    };
    // Decided before the outer headers come off: what goes to the stack
    // goes there whole, for the VXLAN device (a decapsulated frame would
    // arrive as another host's and die in ip_rcv).
    if inner.ttl <= 1 || inner.fragment {
        return pass_to_stack();
    }
    if let Some(code) = flows::divert_to_stack(ctx, &inner) {
        return code;
    }
    // A GSO packet keeps its tunnel state through the decapsulation (see
    // `vxlan::decapsulate`), harmless in a socket but not where something
    // segments it: the tbf of a pod with an ingress limit does
    // (`tbf_segment`). Those go through the device, which clears it.
    // SAFETY: `ctx.skb.skb` is this run's `__sk_buff`, valid for the whole
    // program.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso && dst.flags & ENDPOINT_F_SHAPED_INGRESS != 0 {
        return pass_to_stack();
    }
    if !vxlan::decapsulate(ctx) {
        return pass_to_stack();
    }
    let mut inner = Ipv4Fields {
        l4_offset: inner.l4_offset - vxlan::VXLAN_ROOM,
        ..inner
    };
    // Judged decapsulated: a drop's event then shows the pods' tuple, not
    // the tunnel's.
    if let Some(code) = judge_arrival(ctx, &inner, &dst, Program::FromUnderlay) {
        return code;
    }
    if let Some(code) = translate_reply(ctx, &mut inner, Program::FromUnderlay) {
        return code;
    }
    to_endpoint(ctx, &inner, &dst, Verdict::VxlanDecapBpf)
}
