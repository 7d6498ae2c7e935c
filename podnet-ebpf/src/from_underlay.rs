//! `from_underlay`: TC ingress of the node's underlay device in direct
//! mode. Pod traffic routed here by other nodes goes straight into the local
//! pod; everything else (the node's own traffic) is left to the host.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::forward::{self, Arrival};

#[classifier]
pub fn from_underlay(mut ctx: TcContext) -> i32 {
    forward::deliver_local(&mut ctx, Arrival::Underlay)
}
