//! Counting instead of logging: one log event per packet costs more than the
//! whole forwarding decision, a per-CPU increment costs a few nanoseconds.

use aya_ebpf::programs::TcContext;
use podnet_common::{DropReason, Program, Verdict};

use crate::{
    events,
    maps::{DROPS, VERDICTS},
};

// The TC return codes have one home, shared with the tests that compare them;
// re-exported here for the programs that already take them from `counters`.
use podnet_common::tc::TC_ACT_SHOT;
pub use podnet_common::tc::{TC_ACT_OK, TC_ACT_UNSPEC};

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
