//! NodePorts in the datapath (`--services bpf`, see
//! `podnet_common::service`): a connection that reaches this node's own
//! address at a NodePort from elsewhere (a host on the underlay, or a pod
//! of another node through the overlay or the underlay) goes to a backend
//! the frontend's slots give, and the replies go back to the client from
//! the NodePort, all without the node's stack (kube-proxy's NodePort
//! rules are absent in this mode).
//!
//! - A backend on this node gets the client's packet with only its
//!   destination rewritten: the backend sees the client's address (what
//!   `externalTrafficPolicy: Local` promises; the agent gives such a
//!   frontend this node's backends only). Its replies are translated back
//!   in from_pod, as a ClusterIP's are.
//! - A backend on another node gets it from this node's address at an SNAT
//!   port (`NODE_PORT_SNAT_PORTS`), so that its replies come back here,
//!   the only node that knows the connection (DSR would send them from the
//!   backend's node straight to the client, but needs the frontend carried
//!   to that node in the packet: VXLAN has no room for it, and the direct
//!   mode's routed packets none either). Those replies are translated here
//!   (`find_snat_reply`).
//! - What goes to a client outside the pod network leaves by the
//!   underlay's route (`bpf_redirect_neigh`): its source is the node's
//!   own address, which the stack would drop as a martian where it arrived.
//!
//! Only packets for the node's address at a port of the Service ports'
//! bitmap (backend ports and NodePorts) are looked up: the node's other
//! traffic pays one array read.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_prandom_u32, bpf_redirect_neigh},
    programs::TcContext,
};
use podnet_common::{
    DropReason, FlowKey, Program, RemoteNode, ServiceKey, TrackedConnection, Verdict,
    node::NODE_F_SERVICES_BPF,
    policy::{
        CONN_F_FIN, CONN_F_REPLY, CONN_F_RST, CONN_NAT_DST, CONN_NAT_DST_SNAT, CONN_NAT_SRC_SNAT,
    },
    service::NODE_PORT_SNAT_PORTS,
};

use crate::{
    clock::now_ns,
    counters::count,
    flows,
    forward::{self, Arrival},
    l4::{self, IPPROTO_ICMP, IPPROTO_TCP, TCP_SYN, closing_flags},
    lookup::{endpoint, remote_node},
    maps::{CONFIG, CONNTRACK, SERVICES},
    packet::{self, Ipv4Fields, L3},
    service::{self, FOUND_NEW, Side},
    verdict::{drop_packet, pass_to_stack},
};

/// [`find_node_port_backend`]'s SNAT port for a new connection to a local
/// backend (no SNAT; no SNAT port is ever 1): to be entered by the caller.
const NEW_LOCAL_BACKEND: u16 = 1;
/// `BPF_NOEXIST`: insert only where the key is free (claims a port).
const BPF_NOEXIST: u64 = 1;
/// SNAT ports tried for a new connection (from a random one on, in turn).
const SNAT_TRIES: u32 = 8;

/// [`find_node_port_backend`]'s failures (bits 32..40 of a word whose
/// address half is 0).
const NO_BACKEND: u64 = 1;
const UNKNOWN_CONNECTION: u64 = 2;
const SNAT_EXHAUSTED: u64 = 3;

/// A packet for this node's own address that arrived from elsewhere
/// (`forward::FOR_NODE_PORTS`): a NodePort's, or a reply to one, or else
/// the stack's.
#[inline(always)]
pub fn from_elsewhere(ctx: &mut TcContext, arrival: Arrival) -> i32 {
    let L3::Ipv4(mut ip) = packet::parse(ctx) else {
        return arrival.to_stack(ctx, pass_to_stack());
    };
    arrival_of(ctx, &mut ip, arrival.program())
        .unwrap_or_else(|| arrival.to_stack(ctx, pass_to_stack()))
}

/// A packet that reached this node from elsewhere for the node's own
/// address (no local pod's): a NodePort connection's (translated and sent
/// to its backend), or a backend's reply to one translated here with SNAT
/// or an ICMP error about one (translated and sent to its client).
/// `None`: neither, the stack's. `program` is the one that runs (its drops
/// are counted under it).
#[inline(always)]
fn arrival_of(ctx: &mut TcContext, ip: &mut Ipv4Fields, program: Program) -> Option<i32> {
    // One place sends on and one drops: each inlined copy would cost the
    // arriving programs stack they do not have.
    Some(match translate_arrival(ctx, ip)? {
        Ok(()) => onward(ctx, ip, program),
        Err(reason) => drop_packet(ctx, program, reason),
    })
}

/// [`arrival_of`]'s translation, `ip` rewritten: `Ok` to send on, `Err` to
/// drop, `None` for the stack.
#[inline(always)]
fn translate_arrival(ctx: &mut TcContext, ip: &mut Ipv4Fields) -> Option<Result<(), DropReason>> {
    let config = CONFIG.get(0)?;
    if config.flags & NODE_F_SERVICES_BPF == 0 || ip.dst != config.node_ip {
        return None;
    }
    let node_ip = config.node_ip;
    if ip.proto == IPPROTO_ICMP {
        return match icmp_error_to_client(ctx.skb.skb, ip) {
            NOT_A_NODE_PORT_ERROR => None,
            FAILED_HEADER => Some(Err(DropReason::HeaderRewriteFailed)),
            _ => Some(Ok(())),
        };
    }
    let (src_port, dst_port, tcp_flags) = service::ports_of(ctx, ip)?;
    let ports = u64::from(src_port)
        | u64::from(dst_port) << 16
        | u64::from(ip.proto) << 32
        | u64::from(tcp_flags) << 40;
    let addresses = u64::from(ip.src) | u64::from(node_ip) << 32;
    if service::watched_port(src_port) {
        let client = find_snat_reply(addresses, ports);
        if client != 0 {
            return Some(to_client(ctx, ip, client));
        }
    }
    if !service::watched_port(dst_port) {
        return None;
    }
    let found = find_node_port_backend(addresses, ports);
    if found == 0 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)] // unpacking the word
    let (backend, backend_port, mut snat_port) =
        (found as u32, (found >> 32) as u16, (found >> 48) as u16);
    if snat_port == NEW_LOCAL_BACKEND {
        snat_port = 0;
        service::enter(
            addresses,
            ports & 0xffff_ffff
                | u64::from(backend_port) << 32
                | u64::from(ip.proto) << 48
                | u64::from(tcp_flags) << 56,
            u64::from(backend),
        );
    }
    if backend == 0 {
        return Some(Err(match found >> 32 {
            UNKNOWN_CONNECTION => DropReason::ServiceConnectionUnknown,
            SNAT_EXHAUSTED => DropReason::NodePortSnatExhausted,
            _ => DropReason::ServiceNoBackend,
        }));
    }
    let source = match snat_port {
        0 => 0,
        port => u64::from(node_ip) | u64::from(port) << 32,
    };
    let destination = u64::from(backend) | u64::from(backend_port) << 32;
    if !rewrite_both(ctx.skb.skb, ip, source, destination) {
        return Some(Err(DropReason::HeaderRewriteFailed));
    }
    Some(Ok(()))
}

/// Rewrites the source (unless `source` is 0) and the destination of a
/// NodePort connection's packet (each address | port << 32, as on the
/// wire), `ip` updated; `false` when the kernel refused. Out of line with
/// the program's context `skb`: from_underlay's stack has no room for
/// the rewrites inline.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the words
fn rewrite_both(skb: *mut __sk_buff, ip: &mut Ipv4Fields, source: u64, destination: u64) -> bool {
    let mut ctx = TcContext::new(skb);
    if source != 0
        && service::rewrite(
            &mut ctx,
            ip,
            Side::Source,
            source as u32,
            (source >> 32) as u16,
        )
        .is_err()
    {
        return false;
    }
    service::rewrite(
        &mut ctx,
        ip,
        Side::Destination,
        destination as u32,
        (destination >> 32) as u16,
    )
    .is_ok()
}

/// A backend's reply to a NodePort connection translated here with SNAT
/// (`client` from [`find_snat_reply`]): from the NodePort to the client.
#[inline(always)]
fn to_client(ctx: &mut TcContext, ip: &mut Ipv4Fields, client: u64) -> Result<(), DropReason> {
    #[allow(clippy::cast_possible_truncation)] // unpacking the word
    let (address, port, node_port) = (client as u32, (client >> 32) as u16, (client >> 48) as u16);
    let source = u64::from(ip.dst) | u64::from(node_port) << 32;
    let destination = u64::from(address) | u64::from(port) << 32;
    if rewrite_both(ctx.skb.skb, ip, source, destination) {
        Ok(())
    } else {
        Err(DropReason::HeaderRewriteFailed)
    }
}

/// Where a translated NodePort packet goes: a local pod (judged by its
/// policy first), another node's pod or address, or a host outside the
/// pod network.
#[inline(always)]
fn onward(ctx: &mut TcContext, ip: &Ipv4Fields, program: Program) -> i32 {
    if let Some(dst) = endpoint(ip.dst) {
        if let Some(code) = forward::judge_arrival(ctx, ip, &dst, program) {
            return code;
        }
        let verdict = match program {
            Program::FromOverlay => Verdict::OverlayDeliver,
            _ => Verdict::UnderlayDeliver,
        };
        return forward::to_endpoint(ctx, ip, &dst, verdict);
    }
    if let Some(remote) = remote_node(ip.dst) {
        let code = to_node(ctx.skb.skb, ip.ttl, remote.node_ip, remote.flags);
        return dropped_if_failed(ctx, code, program);
    }
    to_outside(ctx, ip, program)
}

/// The failures of the out-of-line senders below, as their return values
/// (no TC code is negative): their callers drop, since `events::send`'s
/// frame would not fit below theirs.
const FAILED_NO_CONFIG: i32 = -1_000;
const FAILED_HEADER: i32 = -1_001;
const FAILED_TUNNEL_KEY: i32 = -1_002;

/// A sender's `code`, or the drop of its failure.
#[inline(always)]
fn dropped_if_failed(ctx: &TcContext, code: i32, program: Program) -> i32 {
    let reason = match code {
        FAILED_NO_CONFIG => DropReason::NoNodeConfig,
        FAILED_HEADER => DropReason::HeaderRewriteFailed,
        FAILED_TUNNEL_KEY => DropReason::TunnelKeyFailed,
        code => return code,
    };
    drop_packet(ctx, program, reason)
}

/// `forward::to_remote` out of line: the encapsulation's headers on
/// from_underlay's and from_overlay's stacks, beside everything else they
/// inline, would not fit. `skb` is the program's context.
#[inline(never)]
fn to_node(skb: *mut __sk_buff, ttl: u8, node_ip: u32, flags: u32) -> i32 {
    let mut ctx = TcContext::new(skb);
    match forward::send_to_node(&mut ctx, ttl, &RemoteNode { node_ip, flags }) {
        Ok(code) => code,
        Err(DropReason::TunnelKeyFailed) => FAILED_TUNNEL_KEY,
        Err(DropReason::HeaderRewriteFailed) => FAILED_HEADER,
        Err(_) => FAILED_NO_CONFIG,
    }
}

/// Sends a NodePort connection's packet (its source this node's address)
/// to a host outside the pod network: out of the underlay, to the next hop
/// the kernel's route gives (`bpf_redirect_neigh` without a next hop does
/// the FIB lookup itself, Linux 5.10+). The stack would drop it as a
/// martian: its source is the node's own address. `program` is the one
/// that runs.
#[inline(always)]
pub fn to_outside(ctx: &TcContext, ip: &Ipv4Fields, program: Program) -> i32 {
    let code = redirect_outside(ctx.skb.skb, ip.ttl);
    dropped_if_failed(ctx, code, program)
}

/// [`to_outside`]'s work, out of line with the program's context `skb`
/// and the packet's `ttl` (from_pod's stack has no room for it inline).
/// Its failures are the caller's to drop.
#[inline(never)]
fn redirect_outside(skb: *mut __sk_buff, ttl: u8) -> i32 {
    let mut ctx = TcContext::new(skb);
    let Some(underlay) = CONFIG
        .get(0)
        .map(|config| config.underlay_ifindex)
        .filter(|&ifindex| ifindex != 0)
    else {
        return FAILED_NO_CONFIG;
    };
    if ttl <= 1 {
        return pass_to_stack();
    }
    let Some(header) = packet::header_mut(&mut ctx) else {
        return FAILED_HEADER;
    };
    packet::decrement_ttl(header);
    flows::mark_fast_path(&mut ctx);
    count(Verdict::ToNodePortClient);
    // SAFETY: plain helper call; a null next hop with length 0 is the
    // documented way to let the kernel look the route up.
    unsafe { bpf_redirect_neigh(underlay, core::ptr::null_mut(), 0, 0) as i32 }
}

/// The backend of a packet for NodePort `ports` of this node (client |
/// node address << 32; client port | NodePort << 16 | protocol << 32 | TCP
/// flags << 40, ports as on the wire): the tracked connection's, or for a
/// new one a slot's, entered in the table at once (nothing on this node
/// judges a connection to another node's backend; a local backend's is
/// judged after, and a connection its policy refuses leaves two entries
/// to age out). Returns backend | backend port << 32 | SNAT port << 48
/// (0: the backend is local, no SNAT; [`NEW_LOCAL_BACKEND`]: the same,
/// for a new connection the caller enters), or a failure << 32, or 0 when
/// the port is no NodePort. A subprogram, as `service::find_backend`.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn find_node_port_backend(addresses: u64, ports: u64) -> u64 {
    let (client, node_ip) = (addresses as u32, (addresses >> 32) as u32);
    let (client_port, node_port) = (ports as u16, (ports >> 16) as u16);
    let (proto, tcp_flags) = ((ports >> 32) as u8, (ports >> 40) as u8);
    let now = now_ns();
    let to_frontend = FlowKey::new(client, node_ip, client_port, node_port, proto);
    if let Some(conn) = CONNTRACK.get_ptr_mut(to_frontend) {
        // SAFETY: a live map value from a successful lookup; another CPU
        // can only race on the advisory timestamp and flag bits.
        let conn = unsafe { &mut *conn };
        if (conn.nat == CONN_NAT_DST || conn.nat == CONN_NAT_DST_SNAT) && !conn.expired(proto, now)
        {
            let (backend, backend_port) = (conn.nat_address, conn.nat_port);
            let snat_port = if conn.nat == CONN_NAT_DST_SNAT {
                conn.reserved as u16
            } else {
                0
            };
            let reply = if snat_port == 0 {
                FlowKey::new(backend, client, backend_port, client_port, proto)
            } else {
                FlowKey::new(backend, node_ip, backend_port, snat_port, proto)
            };
            if proto == IPPROTO_TCP && l4::opens(tcp_flags) {
                // A closed connection's tuple reused (`service::find_backend`).
                conn.flags = 0;
                conn.last_seen_ns = now;
                service::reopen(&reply, now);
            } else {
                service::touch(conn, tcp_flags, now, &reply);
            }
            count(Verdict::ServiceTracked);
            return u64::from(backend) | u64::from(backend_port) << 32 | u64::from(snat_port) << 48;
        }
    }
    let key = ServiceKey {
        address: node_ip,
        port: node_port,
        protocol: proto,
        pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces entries whole.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return 0;
    };
    if proto == IPPROTO_TCP && tcp_flags & TCP_SYN == 0 {
        return UNKNOWN_CONNECTION << 32;
    }
    let picked = service::pick_backend(service, client, now);
    if picked >> 56 != FOUND_NEW {
        return NO_BACKEND << 32;
    }
    let (backend, backend_port) = (picked as u32, (picked >> 32) as u16);
    count(Verdict::ServiceTranslated);
    if endpoint(backend).is_some() {
        // This node's: the caller enters it as a ClusterIP's connection,
        // to the node's address (`service::enter`, a subprogram: called
        // from here the two frames would not fit the stack).
        return u64::from(backend)
            | u64::from(backend_port) << 32
            | u64::from(NEW_LOCAL_BACKEND) << 48;
    }
    let reply = TrackedConnection {
        last_seen_ns: now,
        flags: CONN_F_REPLY,
        nat_address: client,
        nat_port: client_port,
        nat: CONN_NAT_SRC_SNAT,
        service: service.id,
        reserved: u32::from(node_port),
        ..TrackedConnection::default()
    };
    let snat_port = claim_snat_port(backend, node_ip, backend_port, proto, &reply, now);
    if snat_port == 0 {
        return SNAT_EXHAUSTED << 32;
    }
    let forward = TrackedConnection {
        last_seen_ns: now,
        flags: closing_flags(tcp_flags, CONN_F_RST, CONN_F_FIN),
        nat_address: backend,
        nat_port: backend_port,
        nat: CONN_NAT_DST_SNAT,
        service: service.id,
        reserved: u32::from(snat_port),
        ..TrackedConnection::default()
    };
    let _ = CONNTRACK.insert(to_frontend, forward, 0);
    count(Verdict::NodePortSnat);
    u64::from(backend) | u64::from(backend_port) << 32 | u64::from(snat_port) << 48
}

/// A free SNAT port (network byte order) for a connection to `backend`
/// at `backend_port`, its reply entry `reply` entered under it; 0 when
/// none of the ports tried is free. A port is free when no entry holds
/// its reply tuple, or only an expired one (the LRU keeps those until it
/// needs the room).
#[inline(always)]
fn claim_snat_port(
    backend: u32,
    node_ip: u32,
    backend_port: u16,
    proto: u8,
    reply: &TrackedConnection,
    now: u64,
) -> u16 {
    let first = *NODE_PORT_SNAT_PORTS.start();
    let span = u32::from(*NODE_PORT_SNAT_PORTS.end() - first) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT_TRIES {
        #[allow(clippy::cast_possible_truncation)] // below `span`, a u16 range
        let port = (u32::from(first) + (start + i) % span) as u16;
        let port = port.to_be();
        let key = FlowKey::new(backend, node_ip, backend_port, port, proto);
        if CONNTRACK.insert(key, *reply, BPF_NOEXIST).is_ok() {
            return port;
        }
        // SAFETY: copied out at once.
        let expired = unsafe { CONNTRACK.get(key) }.is_none_or(|old| old.expired(proto, now));
        if expired && CONNTRACK.insert(key, *reply, 0).is_ok() {
            return port;
        }
    }
    0
}

/// [`icmp_error_to_client`]: the packet is no ICMP error about a SNATed
/// NodePort connection (the stack's).
const NOT_A_NODE_PORT_ERROR: i32 = 0;
/// [`icmp_error_to_client`]: translated, for the client.
const ERROR_TRANSLATED: i32 = 1;

/// An ICMP error about a NodePort connection this node SNATed to another
/// node's backend (port unreachable from the backend, fragmentation
/// needed or time exceeded on the way), which reached this node, the
/// SNAT's source: it becomes the error the client would have had from
/// the NodePort. Its embedded datagram (SNAT address and port to the
/// backend) is made the client's to the NodePort, the outer destination
/// the client and, when the backend sent it, the outer source this
/// node's address; `ip` updated. Returns [`ERROR_TRANSLATED`],
/// [`NOT_A_NODE_PORT_ERROR`] or `FAILED_HEADER`. Out of line with the
/// program's context `skb`: the arriving programs' stacks have no room
/// for the rewrites.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn icmp_error_to_client(skb: *mut __sk_buff, ip: &mut Ipv4Fields) -> i32 {
    let mut ctx = TcContext::new(skb);
    // The embedded datagram, reversed: the backend's reply tuple to the
    // SNAT address and port.
    let Some(error) = l4::parse(&ctx, ip) else {
        return NOT_A_NODE_PORT_ERROR;
    };
    let reply = error.key;
    if !error.icmp_other
        || !l4::has_ports(reply.proto)
        || reply.dst != ip.dst
        || !service::watched_port(reply.src_port)
    {
        return NOT_A_NODE_PORT_ERROR;
    }
    let client = find_snat_reply(
        u64::from(reply.src) | u64::from(reply.dst) << 32,
        u64::from(reply.src_port) | u64::from(reply.dst_port) << 16 | u64::from(reply.proto) << 32,
    );
    if client == 0 {
        return NOT_A_NODE_PORT_ERROR;
    }
    let (address, port, node_port) = (client as u32, (client >> 32) as u16, (client >> 48) as u16);
    let node_ip = ip.dst;
    let rewritten = service::rewrite_embedded(&mut ctx, ip, Side::Source, address, port)
        .and_then(|_| {
            service::rewrite_embedded(&mut ctx, ip, Side::Destination, node_ip, node_port)
        })
        .and_then(|_| service::rewrite_outer_address(&mut ctx, ip, Side::Destination, address))
        .and_then(|()| {
            if ip.src == reply.src {
                service::rewrite_outer_address(&mut ctx, ip, Side::Source, node_ip)
            } else {
                Ok(())
            }
        });
    if rewritten.is_err() {
        return FAILED_HEADER;
    }
    ERROR_TRANSLATED
}

/// The client of a backend's reply to a NodePort connection translated
/// here with SNAT (backend | node address << 32; backend port | SNAT port
/// << 16 | protocol << 32 | TCP flags << 40): client | client port << 32
/// | NodePort << 48, or 0 when the tuple is no such reply. A subprogram.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn find_snat_reply(addresses: u64, ports: u64) -> u64 {
    let (backend, node_ip) = (addresses as u32, (addresses >> 32) as u32);
    let (backend_port, snat_port) = (ports as u16, (ports >> 16) as u16);
    let (proto, tcp_flags) = ((ports >> 32) as u8, (ports >> 40) as u8);
    let key = FlowKey::new(backend, node_ip, backend_port, snat_port, proto);
    let Some(conn) = CONNTRACK.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: as in `find_node_port_backend`.
    let conn = unsafe { &mut *conn };
    let now = now_ns();
    if conn.nat != CONN_NAT_SRC_SNAT || conn.expired(proto, now) {
        return 0;
    }
    let (client, client_port, node_port) = (conn.nat_address, conn.nat_port, conn.reserved as u16);
    service::touch(
        conn,
        tcp_flags,
        now,
        &FlowKey::new(client, node_ip, client_port, node_port, proto),
    );
    count(Verdict::ServiceTracked);
    u64::from(client) | u64::from(client_port) << 32 | u64::from(node_port) << 48
}
