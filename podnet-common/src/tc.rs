//! TC verdict codes: what a classifier program returns to the kernel.
//!
//! These are the kernel's values from `include/uapi/linux/pkt_cls.h`
//! (`TC_ACT_*`, and `TCX_NEXT` for programs attached with tcx). They are
//! spelled here as `i32` because the generated bindings' type differs between
//! the bpf and host targets; the datapath returns them and the tests compare
//! a test run's return value against them, so both sides take them from here.

/// "No decision": the next filter (cls_bpf) runs; at the end of the chain the
/// packet goes on. The same value as [`TCX_NEXT`].
pub const TC_ACT_UNSPEC: i32 = -1;
/// The packet goes on to the host stack.
pub const TC_ACT_OK: i32 = 0;
/// The packet is dropped.
pub const TC_ACT_SHOT: i32 = 2;
/// The packet goes to the device a `bpf_redirect*` helper named (the helper
/// returns this code).
pub const TC_ACT_REDIRECT: i32 = 7;
/// tcx's name for "no decision": the next program in the tcx chain runs
/// (`include/uapi/linux/bpf.h`, `enum tcx_action_base`).
pub const TCX_NEXT: i32 = -1;

// tcx defines TCX_NEXT as TC_ACT_UNSPEC so that cls_bpf programs mean the same
// thing under both attach modes; the datapath relies on that.
const _: () = assert!(TCX_NEXT == TC_ACT_UNSPEC);
