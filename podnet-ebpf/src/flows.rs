//! Flows that crossed the host stack follow it in both directions (see
//! `podnet_common::flow`). The egress programs record the reply direction
//! of what the stack sends ([`track_reply`]); the programs that would
//! redirect a packet ask [`divert_to_stack`] first.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use podnet_common::{
    FlowKey, FlowOwner, NodeConfig, StackFlow, Verdict,
    flow::{
        DEFAULT_STACK_FLOWS_PER_ENDPOINT, FAST_PATH_TC_INDEX, FLOW_F_FIN_FORWARD, FLOW_F_FIN_REPLY,
        FLOW_F_RST,
    },
    tc::{TC_ACT_OK, TC_ACT_UNSPEC},
};

use crate::{
    counters::count,
    lookup,
    maps::{CONFIG, FLOW_OWNERS, STACK_FLOWS},
    packet::{self, Ipv4Fields, L3},
    verdict::pass_to_stack,
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
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
struct L4 {
    /// The packet's own tuple, or for an ICMP error the tuple of the flow
    /// direction the error travels with (the embedded packet reversed).
    key: FlowKey,
    tcp_flags: u8,
    /// An ICMP error or an ICMP message other than echo: never starts a flow.
    icmp_other: bool,
}

#[inline(always)]
fn key(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    FlowKey::new(src, dst, src_port, dst_port, proto)
}

/// The tuple of the other direction. ICMP echo keeps the identifier in
/// `src_port` both ways, so only the addresses swap.
#[inline(always)]
fn reversed(k: &FlowKey) -> FlowKey {
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

#[inline(always)]
fn l4(ctx: &TcContext, ip: &Ipv4Fields) -> Option<L4> {
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

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments (Linux >= 5.11). The
    // coarse clock (tick resolution) is plenty for timeouts of seconds and
    // cheaper than bpf_ktime_get_ns.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Flag bits a TCP packet adds in the given direction.
#[inline(always)]
fn closing_flags(tcp_flags: u8, fin_flag: u32) -> u32 {
    let mut flags = 0;
    if tcp_flags & TCP_RST != 0 {
        flags |= FLOW_F_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        flags |= fin_flag;
    }
    flags
}

/// For a packet the fast path would redirect: `Some(TC code)` when it must
/// go to the host stack instead (counted), `None` to go on.
///
/// Every fragment goes to the stack: only the first carries the ports,
/// and the fragments of one datagram must take one path (conntrack
/// reassembles them; one half redirected and one half there would never
/// meet).
#[inline(always)]
pub fn divert_to_stack(ctx: &TcContext, ip: &Ipv4Fields) -> Option<i32> {
    if ip.fragment {
        return Some(pass_to_stack());
    }
    let l4 = l4(ctx, ip)?;
    if let Some(flow) = STACK_FLOWS.get_ptr_mut(l4.key) {
        let now = now_ns();
        // SAFETY: pointer to a live map value from a successful lookup; a
        // concurrent update of the same entry from another CPU can only
        // race on the timestamp and flag bits, which are advisory.
        let flow = unsafe { &mut *flow };
        if !flow.expired(l4.key.proto, now) {
            flow.last_seen_ns = now;
            flow.flags |= closing_flags(l4.tcp_flags, FLOW_F_FIN_REPLY);
            count(Verdict::StackFlow);
            return Some(TC_ACT_OK);
        }
        let _ = STACK_FLOWS.remove(l4.key);
    }
    // A connection opened on the fast path: its replies belong to it, not
    // to an older flow through the stack that used the same tuple (whose
    // entry would send them past a NAT that does not apply).
    if l4.key.proto == IPPROTO_TCP && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let _ = STACK_FLOWS.remove(reversed(&l4.key));
    }
    None
}

/// The stack sent this packet towards a pod or another node: its replies
/// must come back through the stack, so their direction is recorded (or
/// refreshed). A new entry is charged to `owner`, the local endpoint (pod
/// IP, network byte order) whose flow it is: one that holds its limit gets
/// no more (counted as refused), so one pod's traffic cannot turn the LRU
/// over and evict other pods' flows.
#[inline(always)]
pub fn track_reply(ctx: &TcContext, ip: &Ipv4Fields, owner: u32) {
    let Some(l4) = l4(ctx, ip) else {
        return;
    };
    if l4.icmp_other {
        return;
    }
    let reply = reversed(&l4.key);
    let now = now_ns();
    let flags = closing_flags(l4.tcp_flags, FLOW_F_FIN_FORWARD);
    if let Some(flow) = STACK_FLOWS.get_ptr_mut(reply) {
        // SAFETY: as in `divert_to_stack`.
        let flow = unsafe { &mut *flow };
        if !flow.expired(reply.proto, now) {
            flow.last_seen_ns = now;
            flow.flags |= flags;
            count(Verdict::StackFlowTracked);
            return;
        }
    }
    let quota = owner_quota(owner);
    if let Some(quota) = quota {
        let limit = CONFIG.get(0).map_or(
            DEFAULT_STACK_FLOWS_PER_ENDPOINT,
            NodeConfig::stack_flows_limit,
        );
        // SAFETY: pointer to a live map value from a successful lookup.
        // Several CPUs may pass the test at once, and increments lost to
        // a race undercount (`add_shared`): a pod flooding from several
        // CPUs may overshoot its limit until the agent's next recount.
        if unsafe { (*quota).flows } >= limit {
            // SAFETY: as above; the field is a naturally aligned u32 of
            // the map value.
            add_shared(unsafe { &raw mut (*quota).refused }, 1);
            return;
        }
    }
    let fresh = StackFlow {
        last_seen_ns: now,
        flags,
        owner: if quota.is_some() { owner } else { 0 },
    };
    // An LRU map makes room by evicting the least recently used entry;
    // an insert fails only on a broken map, and then the flow stays as it
    // was before podnet tracked flows.
    if STACK_FLOWS.insert(reply, fresh, 0).is_ok() {
        if let Some(quota) = quota {
            // SAFETY: as above.
            add_shared(unsafe { &raw mut (*quota).flows }, 1);
        }
        count(Verdict::StackFlowTracked);
    }
}

/// The flow-owners entry of `owner` (created on its first flow), or
/// `None` for no owner or a full map (then the flow is tracked uncharged,
/// as before flows were charged).
#[inline(always)]
fn owner_quota(owner: u32) -> Option<*mut FlowOwner> {
    if owner == 0 {
        return None;
    }
    if let Some(quota) = FLOW_OWNERS.get_ptr_mut(owner) {
        return Some(quota);
    }
    // BPF_NOEXIST: another CPU may have created it meanwhile; either way
    // the lookup below finds one.
    let _ = FLOW_OWNERS.insert(owner, FlowOwner::default(), u64::from(BPF_NOEXIST));
    FLOW_OWNERS.get_ptr_mut(owner)
}

/// Adds `n` to the u32 at `counter`, a field of a map value every CPU
/// shares. Not atomic (core has no atomics for the BPF target): an
/// increment lost to another CPU's at the same instant undercounts, which
/// the agent's recount (every 5 s) corrects; one pod's overshoot is bounded
/// by what it can insert between two recounts while racing itself.
#[inline(always)]
fn add_shared(counter: *mut u32, n: u32) {
    // SAFETY: callers pass a pointer into a live map value, aligned for a
    // u32; the kernel's map memory outlives the program run.
    unsafe { *counter = (*counter).wrapping_add(n) };
}

/// The egress of the node's overlay or underlay device: everything this
/// node sends to other nodes. What the fast path redirected there carries
/// [`FAST_PATH_TC_INDEX`] and is left alone; what the stack sends from one
/// of this node's pods is tracked, since its replies would otherwise be
/// delivered by from_overlay / from_underlay past this node's conntrack.
/// Always lets the packet go on (`TCX_NEXT`).
#[inline(always)]
pub fn track_node_egress(ctx: &mut TcContext) -> i32 {
    if take_fast_path_mark(ctx) {
        return TC_ACT_UNSPEC;
    }
    if let L3::Ipv4(ip) = packet::parse(ctx)
        && lookup::endpoint(ip.src).is_some()
    {
        track_reply(ctx, &ip, ip.src);
    }
    TC_ACT_UNSPEC
}

/// Whether the fast path marked this packet ([`mark_fast_path`]); clears
/// the mark.
#[inline(always)]
pub fn take_fast_path_mark(ctx: &mut TcContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the kernel's `__sk_buff` for this run; TC programs
    // may read and write `tc_index` (the verifier rewrites the access).
    let marked = unsafe { (*skb).tc_index == FAST_PATH_TC_INDEX };
    if marked {
        // SAFETY: as above.
        unsafe { (*skb).tc_index = 0 };
    }
    marked
}

/// Marks a packet the fast path hands to the overlay or underlay device
/// (see [`track_node_egress`]) or to a shaped pod's host veth egress.
#[inline(always)]
pub fn mark_fast_path(ctx: &mut TcContext) {
    // SAFETY: as in `take_fast_path_mark`.
    unsafe { (*ctx.skb.skb).tc_index = FAST_PATH_TC_INDEX };
}
