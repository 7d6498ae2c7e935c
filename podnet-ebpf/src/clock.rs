//! The datapath's clock for timeouts of tracked flows and connections.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// `CLOCK_MONOTONIC_COARSE`, nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments (Linux >= 5.11). The
    // coarse clock (tick resolution) is plenty for timeouts of seconds and
    // cheaper than bpf_ktime_get_ns.
    unsafe { bpf_ktime_get_coarse_ns() }
}
