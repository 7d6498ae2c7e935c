//! `to_underlay`: TC egress of the node's underlay device in direct mode:
//! what this node sends on the underlay. Flows the stack routed there from
//! a local pod are tracked so their replies come back through the stack
//! (see `flows::track_node_egress`).

use aya_ebpf::{macros::classifier, programs::TcContext};

use podnet_common::Program;

use crate::flows;

#[classifier]
pub fn to_underlay(mut ctx: TcContext) -> i32 {
    flows::track_node_egress(&mut ctx, Program::ToUnderlay)
}
