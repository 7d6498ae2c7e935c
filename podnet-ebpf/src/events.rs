//! Drop events: every drop is counted (`counters`), and also reported to
//! the agent as a [`DropEvent`] in a BPF ring buffer, rate-limited per CPU.
//!
//! Why a ring buffer of typed records and not aya-log: aya-log 0.3 writes
//! into a ring buffer too (`AYA_LOGS`), but serialises every argument with a
//! type tag and length and formats text on the user side; the agent would
//! have to parse that text back into reason, ifindex and 5-tuple to find
//! the pod. A `#[repr(C)]` record costs one reserve, a few stores and a
//! submit, and the agent reads it as is (and aya-log's own ring is not
//! pinned: a restarted agent could not find it).
//!
//! Measured with the test-run cost tooling (`cargo xtask bench --only bpf`,
//! rows `from_pod drop, event sent` / `event suppressed`; 2 vCPU AMD, Linux
//! 6.18, three runs each): from_pod dropping a forged source costs 35-39 ns
//! per run without events, 42-48 ns with the rate check when the event is
//! suppressed (what a flood costs per packet: +~7 ns), 150-162 ns when the
//! event is sent (at most the rate limit's events per second and CPU).
//! The forwarding paths do not change (no code on them).
//!
//! Rate limit: a token bucket per CPU, so CPUs never contend and a flood on
//! one CPU costs it a coarse timestamp, a compare and a few stores per
//! dropped packet; over the limit the drop is only counted (`podnet_evsupp`,
//! by reason). What a pod sends spends a bucket of its own (in its host
//! veth's per-CPU entry): a pod flooding forged frames silences its own
//! events, not the other pods'. The rest (the node's devices, veths
//! without an entry) share one per CPU. The reserve can still fail when
//! the agent does not read (ring full): counted the same way.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use podnet_common::{
    DropEvent, DropReason, EventLimiter, Program,
    event::{DEFAULT_DROP_EVENTS_PER_SEC, EVENT_CREDIT_CAP_NS},
};

use crate::{
    counters::bump,
    maps::{CONFIG, EVENT_LIMIT, EVENTS, EVENTS_SUPPRESSED as SUPPRESSED, VETHS},
    packet::{ETH_HLEN, bytes_at},
};

const NS_PER_SEC: u64 = 1_000_000_000;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// Reports a drop, within this CPU's rate. The rate check is inlined at
/// every drop site (a BPF-to-BPF call and its return cost more than the
/// check on this class of machine, see `packet`): under a flood, almost
/// every drop takes only this path.
#[inline(always)]
pub fn report_drop(skb: *mut __sk_buff, program: Program, reason: DropReason) {
    if take_token(limiter_for(skb, program)) {
        send(skb, program, reason);
    } else {
        bump(&SUPPRESSED, reason as u32);
    }
}

/// Writes the event into the ring buffer. A subprogram (not inlined): the
/// drop sites are many, each would otherwise carry its own copy, and it
/// runs at most at the rate limit.
#[inline(never)]
fn send(skb: *mut __sk_buff, program: Program, reason: DropReason) {
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        bump(&SUPPRESSED, reason as u32);
        return;
    };
    let ctx = TcContext::new(skb);
    // SAFETY: `skb` is this run's `__sk_buff`, valid for the whole program.
    let (ifindex, len) = unsafe { ((*skb).ifindex, (*skb).len) };
    let mut event = DropEvent {
        // SAFETY: plain helper calls without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        reason: reason as u32,
        ifindex,
        program: program as u8,
        len,
        // SAFETY: as above.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ..DropEvent::default()
    };
    five_tuple(&ctx, &mut event);
    entry.write(event);
    entry.submit(0);
}

/// The bucket a drop spends: a pod's (its host veth's entry, this CPU's
/// copy) for what from_pod drops on a known veth, so that one flooding pod
/// drains only its own; the node's (per CPU) for everything else.
#[inline(always)]
fn limiter_for(skb: *mut __sk_buff, program: Program) -> Option<*mut EventLimiter> {
    if matches!(program, Program::FromPod) {
        // SAFETY: `skb` is this run's `__sk_buff`, valid for the whole
        // program.
        let ifindex = unsafe { (*skb).ifindex };
        if let Some(veth) = VETHS.get_ptr_mut(ifindex) {
            // SAFETY: this CPU's copy of a live per-CPU map value.
            return Some(unsafe { &raw mut (*veth).events });
        }
    }
    EVENT_LIMIT.get_ptr_mut(0)
}

/// Takes one event's worth of `limiter`'s credit, if there is enough.
/// The coarse clock (a tick's resolution: plenty for a one-second bucket)
/// is the cheaper one, and the cost of an event is kept with the bucket,
/// so a suppressed drop pays no division.
#[inline(always)]
fn take_token(limiter: Option<*mut EventLimiter>) -> bool {
    let rate = CONFIG.get(0).map_or(0, |config| config.drop_events_per_sec);
    let Some(limiter) = limiter else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU map, from a successful lookup;
    // no other program runs on this CPU while this one does.
    let limiter = unsafe { &mut *limiter };
    // Recomputed when the rate changes (and for no limit, whose cost is 0).
    if limiter.rate != rate || limiter.cost_ns == 0 {
        let per_sec = if rate == 0 {
            DEFAULT_DROP_EVENTS_PER_SEC
        } else {
            rate
        };
        limiter.rate = rate;
        limiter.cost_ns = NS_PER_SEC / u64::from(per_sec);
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let credit = limiter
        .credit_ns
        .saturating_add(now.saturating_sub(limiter.last_ns))
        .min(EVENT_CREDIT_CAP_NS);
    limiter.last_ns = now;
    if credit < limiter.cost_ns {
        limiter.credit_ns = credit;
        return false;
    }
    limiter.credit_ns = credit - limiter.cost_ns;
    true
}

/// Fills the 5-tuple from the frame when it is IPv4 with a valid header.
#[inline(always)]
fn five_tuple(ctx: &TcContext, event: &mut DropEvent) {
    // Ethernet + the fixed IPv4 header.
    let Some(h) = bytes_at::<34>(ctx, 0) else {
        return;
    };
    let ihl = usize::from(h[ETH_HLEN] & 0x0f);
    if h[12..14] != [0x08, 0x00] || h[ETH_HLEN] >> 4 != 4 || ihl < 5 {
        return;
    }
    event.proto = h[ETH_HLEN + 9];
    event.src = u32::from_ne_bytes([h[26], h[27], h[28], h[29]]);
    event.dst = u32::from_ne_bytes([h[30], h[31], h[32], h[33]]);
    let later_fragment = u16::from_be_bytes([h[ETH_HLEN + 6], h[ETH_HLEN + 7]]) & 0x1fff != 0;
    if later_fragment || !matches!(event.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return;
    }
    if let Some(ports) = bytes_at::<4>(ctx, ETH_HLEN + ihl * 4) {
        event.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
        event.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    }
}
