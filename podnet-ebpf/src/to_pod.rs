//! `to_pod`: TC egress of a pod's host-side veth, i.e. what the host stack
//! delivers to a pod (`bpf_redirect_peer` from the fast path never passes
//! here; its redirects to a pod with an ingress limit do, marked). A packet from a pod that reaches another pod through the stack
//! belongs to a flow the stack handles (a Service DNAT, a hostPort, a
//! NodePort, ...): its replies must take the stack too, so their direction
//! is recorded. The packet goes on unless NetworkPolicy drops it.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podnet_common::{
    Program,
    endpoint::{ENDPOINT_F_POLICY, ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    tc::TC_ACT_UNSPEC,
};

use crate::{
    flows, forward,
    lookup::{endpoint, remote_node},
    packet::{self, L3},
    policy::{self, Judged},
    service,
    verdict::drop_packet,
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
    if let L3::Ipv4(mut ip) = packet::parse(&mut ctx) {
        // Plain values out of each match: a copied `Option` held across
        // the checks has its `None` payload read by what LLVM hoists,
        // which the verifier rejects.
        let (sender_local, sender_flags) = match endpoint(ip.src) {
            Some(sender) => (true, sender.flags & ENDPOINT_F_POLICY),
            None => (false, 0),
        };
        let receiver_flags = match endpoint(ip.dst) {
            Some(receiver) => receiver.flags & ENDPOINT_F_POLICY,
            None => 0,
        };
        // NetworkPolicy on what the stack delivers (a Service's backend
        // after the DNAT, a NodePort, a hostPort, this node's own traffic):
        // the receiver's ingress, and a local sender's egress.
        if (sender_flags | receiver_flags) != 0 {
            let judged = Judged {
                egress_of: (sender_flags & ENDPOINT_F_POLICY_EGRESS != 0).then_some(ip.src),
                ingress_of: (receiver_flags & ENDPOINT_F_POLICY_INGRESS != 0).then_some(ip.dst),
            };
            if let Err(reason) = policy::enforce(&ctx, &ip, judged) {
                return drop_packet(&ctx, Program::ToPod, reason);
            }
        }
        // Charged to the local pod that sent it, else to this veth's pod
        // (the destination), which remote senders then share.
        if sender_local {
            flows::track_reply(&ctx, &ip, ip.src);
            // A local pod's connection the stack translated may reuse a
            // reply tuple podnet translated (see `service`).
            service::clear_clashing(&ctx, &ip);
        } else if remote_node(ip.src).is_some() {
            flows::track_reply(&ctx, &ip, ip.dst);
        }
        // A Service backend outside the pod network answers through the
        // stack: its reply comes from the frontend again here.
        if let Some(code) = forward::translate_reply(&mut ctx, &mut ip, Program::ToPod) {
            return code;
        }
    }
    TC_ACT_UNSPEC
}
