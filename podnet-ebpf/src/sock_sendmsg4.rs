//! cgroup `sendmsg4` of the socket LB's cgroup: an unconnected UDP
//! datagram (`sendto`, `sendmsg` with an address) to a ClusterIP frontend
//! goes to a backend instead, picked per datagram as Cilium's socket LB
//! does (a connected socket is translated once, at `connect`).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use podnet_common::SocketLbCounter;

use crate::socket_lb;

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    socket_lb::to_backend(&ctx, SocketLbCounter::SendmsgTranslated)
}
