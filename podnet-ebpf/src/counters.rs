//! Counting instead of logging: one log event per packet costs more than the
//! whole forwarding decision, a per-CPU increment costs a few nanoseconds.

use podnet_common::Verdict;

use crate::maps::VERDICTS;

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
