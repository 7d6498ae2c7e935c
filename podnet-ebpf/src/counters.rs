//! Counting instead of logging: one log event per packet costs more than the
//! whole forwarding decision, a per-CPU increment costs a few nanoseconds.

use aya_ebpf::programs::TcContext;
use podnet_common::{DropReason, Program, Verdict};

use crate::{
    events,
    maps::{DROPS, VERDICTS},
};

// TC return codes (include/uapi/linux/pkt_cls.h). Spelled here as i32
// because the bindings' type differs between the bpf and host targets.
pub const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// "No decision": the next filter (cls_bpf) or the next program (TCX,
/// where it is `TCX_NEXT`) runs; at the end of the chain the packet goes on.
pub const TC_ACT_UNSPEC: i32 = -1;

#[inline(always)]
pub fn bump(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u32) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot is only touched by this CPU while the
        // program runs (no preemption inside a BPF program), and the pointer
        // comes from a successful lookup.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count(verdict: Verdict) {
    bump(&VERDICTS, verdict as u32);
}

/// Counts the drop, reports it (rate-limited, see `events`) and returns the
/// TC code that drops the packet. `program` is the program running.
#[inline(always)]
pub fn drop_packet(ctx: &TcContext, program: Program, reason: DropReason) -> i32 {
    bump(&DROPS, reason as u32);
    count(Verdict::Drop);
    events::report_drop(ctx.skb.skb, program, reason);
    TC_ACT_SHOT
}

/// Counts and returns the TC code that leaves the packet to the host stack.
#[inline(always)]
pub fn pass_to_stack() -> i32 {
    count(Verdict::PassToStack);
    TC_ACT_OK
}
