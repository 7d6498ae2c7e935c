//! `from_overlay`: TC ingress of the node's collect-metadata VXLAN device,
//! i.e. packets other nodes encapsulated for this node, already decapsulated.
//! A packet for a local pod goes straight into it; with `--services bpf`, one
//! for the node's own address at a NodePort (or a reply to one the node
//! SNATed) is translated and sent on (`node_port`).

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{
    forward::{self, Arrival},
    node_port,
};

#[classifier]
pub fn from_overlay(mut ctx: TcContext) -> i32 {
    match forward::deliver_local(&mut ctx, Arrival::Overlay) {
        forward::FOR_NODE_PORTS => node_port::from_elsewhere(&mut ctx, Arrival::Overlay),
        code => code,
    }
}
