//! Flows that crossed the host stack follow it in both directions (see
//! `podnet_common::flow`). The egress programs record the reply direction
//! of what the stack sends ([`track_reply`]); the programs that would
//! redirect a packet ask [`divert_to_stack`] first.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use podnet_common::{
    FlowOwner, NodeConfig, Program, StackFlow, Verdict,
    endpoint::{ENDPOINT_F_POLICY, ENDPOINT_F_POLICY_EGRESS},
    flow::{
        DEFAULT_STACK_FLOWS_PER_ENDPOINT, FAST_PATH_TC_INDEX, FLOW_F_FIN_FORWARD, FLOW_F_FIN_REPLY,
        FLOW_F_RST,
    },
    tc::{TC_ACT_OK, TC_ACT_UNSPEC},
};

use crate::{
    clock::now_ns,
    counters::count,
    l4::{self, IPPROTO_TCP, closing_flags, reversed},
    lookup,
    maps::{CONFIG, FLOW_OWNERS, STACK_FLOWS},
    packet::{self, Ipv4Fields, L3},
    policy::{self, Judged},
    service,
    verdict::{drop_packet, pass_to_stack},
};

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
    let l4 = l4::parse(ctx, ip)?;
    if let Some(flow) = STACK_FLOWS.get_ptr_mut(l4.key) {
        let now = now_ns();
        // SAFETY: pointer to a live map value from a successful lookup; a
        // concurrent update of the same entry from another CPU can only
        // race on the timestamp and flag bits, which are advisory.
        let flow = unsafe { &mut *flow };
        if !flow.expired(l4.key.proto, now) {
            flow.last_seen_ns = now;
            flow.flags |= closing_flags(l4.tcp_flags, FLOW_F_RST, FLOW_F_FIN_REPLY);
            count(Verdict::StackFlow);
            return Some(TC_ACT_OK);
        }
        let _ = STACK_FLOWS.remove(l4.key);
    }
    // A connection opened on the fast path: its replies belong to it, not
    // to an older flow through the stack that used the same tuple (whose
    // entry would send them past a NAT that does not apply).
    if l4.key.proto == IPPROTO_TCP && l4::opens(l4.tcp_flags) {
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
    let Some(l4) = l4::parse(ctx, ip) else {
        return;
    };
    if l4.icmp_other {
        return;
    }
    let reply = reversed(&l4.key);
    let now = now_ns();
    let flags = closing_flags(l4.tcp_flags, FLOW_F_RST, FLOW_F_FIN_FORWARD);
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

/// The egress of the node's overlay or underlay device (`program`):
/// everything this node sends to other nodes. What the fast path
/// redirected there carries [`FAST_PATH_TC_INDEX`] and is left alone; what
/// the stack sends from one of this node's pods is judged by the pod's
/// egress policy (after the stack's DNAT: a Service's backend on another
/// node) and tracked, since its replies would otherwise be delivered by
/// from_overlay / from_underlay past this node's conntrack. Lets the packet
/// go on (`TCX_NEXT`) unless the policy drops it.
#[inline(always)]
pub fn track_node_egress(ctx: &mut TcContext, program: Program) -> i32 {
    if take_fast_path_mark(ctx) {
        return TC_ACT_UNSPEC;
    }
    if let L3::Ipv4(ip) = packet::parse(ctx)
        && let Some(sender) = lookup::endpoint(ip.src)
    {
        if sender.flags & ENDPOINT_F_POLICY != 0 {
            let judged = Judged {
                egress_of: (sender.flags & ENDPOINT_F_POLICY_EGRESS != 0).then_some(ip.src),
                ingress_of: None,
            };
            if let Err(reason) = policy::enforce(ctx, &ip, judged) {
                return drop_packet(ctx, program, reason);
            }
        }
        track_reply(ctx, &ip, ip.src);
        // A connection the stack translated (kube-proxy's rules, a DNAT
        // of the node's own) may reuse the reply tuple of one podnet
        // translated: that one's entries go (see `service`).
        service::clear_clashing(ctx, &ip);
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
