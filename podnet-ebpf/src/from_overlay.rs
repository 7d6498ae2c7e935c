//! `from_overlay`: TC ingress of the node's collect-metadata VXLAN device,
//! i.e. packets other nodes encapsulated for this node, already decapsulated.
//! A packet for a local pod goes straight into it.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::{DropReason, Verdict};

use crate::{
    counters::{drop_packet, pass_to_stack},
    forward,
    packet::{self, L3},
};

#[classifier]
pub fn from_overlay(mut ctx: TcContext) -> i32 {
    deliver_local(&mut ctx, Verdict::OverlayDeliver)
}

/// A packet for a local endpoint is delivered, anything else goes to the
/// host stack. Shared with from_underlay.
#[inline(always)]
pub fn deliver_local(ctx: &mut TcContext, verdict: Verdict) -> i32 {
    let ip = match packet::parse(ctx) {
        L3::Ipv4(ip) => ip,
        L3::Other => return pass_to_stack(),
        L3::MalformedIpv4 => return drop_packet(DropReason::MalformedIpv4),
    };
    match forward::endpoint(ip.dst) {
        Some(dst) => forward::to_endpoint(ctx, &ip, &dst, verdict),
        None => pass_to_stack(),
    }
}
