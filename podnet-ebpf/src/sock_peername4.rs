//! cgroup `getpeername4` of the socket LB's cgroup: a socket connected
//! through a frontend names the frontend as its peer, not the backend the
//! connection really went to (what the application asked for, as with
//! kube-proxy's DNAT).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use podnet_common::SocketLbCounter;

use crate::socket_lb;

#[cgroup_sock_addr(getpeername4)]
pub fn sock_peername4(ctx: SockAddrContext) -> i32 {
    socket_lb::to_frontend(&ctx, SocketLbCounter::PeernameReversed)
}
