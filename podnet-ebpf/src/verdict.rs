//! What a program returns, counted: a drop is counted by reason and
//! reported (rate-limited, see `events`), a packet left to the stack is
//! counted as such. A module of its own so that the counters (`counters`)
//! and the drop events (`events`, which counts what it suppresses) do not
//! import each other.

use aya_ebpf::programs::TcContext;
use podnet_common::{
    DropReason, Program, Verdict,
    tc::{TC_ACT_OK, TC_ACT_SHOT},
};

use crate::{
    counters::{bump, count},
    events,
    maps::DROPS,
};

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
