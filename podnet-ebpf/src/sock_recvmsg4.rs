//! cgroup `recvmsg4` of the socket LB's cgroup: a UDP datagram from a
//! backend this socket was sent to reads as coming from the frontend its
//! owner sent to (a resolver drops an answer from any other address than
//! it asked). The kernel runs it only when the caller asks for the source
//! (`recvfrom`, `recvmsg` with a name).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use podnet_common::SocketLbCounter;

use crate::socket_lb;

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    socket_lb::to_frontend(&ctx, SocketLbCounter::RecvmsgReversed)
}
