//! `from_underlay`: TC ingress of the node's underlay device. Direct mode:
//! pod traffic routed here by other nodes goes straight into the local pod.
//! VXLAN mode with the BPF datapath: VXLAN packets other nodes sent to a
//! local pod are decapsulated here and go straight into it. VXLAN mode
//! (either datapath): a pod-network source never arrives unencapsulated.
//! With `--services bpf`, a packet for the node's own address at a NodePort
//! (or a reply to one the node SNATed) is the datapath's (`node_port`).
//! Everything else (the node's own traffic, VXLAN for anything but a local
//! pod) is left to the host.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::node::{MODE_VXLAN, NODE_F_VXLAN_BPF};

use crate::{
    forward::{self, Arrival},
    maps::CONFIG,
    node_port,
};

#[classifier]
pub fn from_underlay(mut ctx: TcContext) -> i32 {
    match arrived(&mut ctx) {
        forward::FOR_NODE_PORTS => node_port::from_elsewhere(&mut ctx, Arrival::Underlay),
        code => code,
    }
}

/// What the node's mode does with the packet (`forward::FOR_NODE_PORTS`:
/// the NodePorts' to look at).
#[inline(always)]
fn arrived(ctx: &mut TcContext) -> i32 {
    match CONFIG.get(0).copied() {
        Some(config) if config.mode == MODE_VXLAN && config.flags & NODE_F_VXLAN_BPF != 0 => {
            forward::decapsulate_local(ctx, &config)
        }
        // The kernel's VXLAN device decapsulates; what is not VXLAN is
        // checked for forged pod sources all the same.
        Some(config) if config.mode == MODE_VXLAN => forward::check_unencapsulated(ctx),
        // Direct mode (and a node config not written yet): routed pod
        // traffic, checked as in direct mode.
        _ => forward::deliver_local(ctx, Arrival::Underlay),
    }
}
