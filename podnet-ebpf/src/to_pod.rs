//! `to_pod`: TC egress of a pod's host-side veth, i.e. what the host stack
//! delivers to a pod (`bpf_redirect_peer` from the fast path never passes
//! here; its redirects to a pod with an ingress limit do, marked). A packet from a pod that reaches another pod through the stack
//! belongs to a flow the stack handles (a Service DNAT, a hostPort, a
//! NodePort, ...): its replies must take the stack too, so their direction
//! is recorded. The packet itself always goes on.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::tc::TC_ACT_UNSPEC;

use crate::{
    flows,
    lookup::{endpoint, remote_node},
    packet::{self, L3},
};

#[classifier]
pub fn to_pod(mut ctx: TcContext) -> i32 {
    // A packet the fast path hands to a shaped pod through this egress
    // (see `forward::to_endpoint`) never went through the stack.
    if flows::take_fast_path_mark(&mut ctx) {
        return TC_ACT_UNSPEC;
    }
    // Only flows whose replies the fast path would take: from a pod of
    // this node or of another node (from_pod redirects replies to both).
    if let L3::Ipv4(ip) = packet::parse(&mut ctx) {
        // Charged to the local pod that sent it, else to this veth's pod
        // (the destination), which remote senders then share.
        if endpoint(ip.src).is_some() {
            flows::track_reply(&ctx, &ip, ip.src);
        } else if remote_node(ip.src).is_some() {
            flows::track_reply(&ctx, &ip, ip.dst);
        }
    }
    TC_ACT_UNSPEC
}
