//! cgroup `connect4` of the socket LB's cgroup: a TCP or UDP `connect` to
//! a ClusterIP frontend goes to a backend instead (see `socket_lb`). The
//! connection's packets then carry the backend's address from its first
//! one: from_pod forwards them as any pod-to-pod traffic, and no reply
//! needs translating.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use podnet_common::SocketLbCounter;

use crate::socket_lb;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    socket_lb::to_backend(&ctx, SocketLbCounter::ConnectTranslated)
}
