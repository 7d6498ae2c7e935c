//! `to_overlay`: TC egress of the node's VXLAN device: what this node
//! sends to other nodes through the overlay. Flows the stack routed there
//! from a local pod are tracked so their replies come back through the
//! stack, and judged by the pod's egress policy (see
//! `flows::track_node_egress`).

use aya_ebpf::{macros::classifier, programs::TcContext};

use podnet_common::Program;

use crate::flows;

#[classifier]
pub fn to_overlay(mut ctx: TcContext) -> i32 {
    flows::track_node_egress(&mut ctx, Program::ToOverlay)
}
