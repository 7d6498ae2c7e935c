//! Service translation at the socket (`podnetd --socket-lb-cgroup`, see
//! `podnet_common::socket_lb`): the logic of the cgroup `sock_addr`
//! programs (`sock_connect4.rs`, `sock_sendmsg4.rs`, `sock_recvmsg4.rs`,
//! `sock_peername4.rs`). A frontend's backend is picked by the per-packet
//! path's own [`service::pick_backend`] (slots, session affinity), so a
//! Service behaves alike wherever it is translated.
//!
//! The context's fields are read and written with volatile 4-byte
//! accesses: the verifier rewrites each access to a `bpf_sock_addr` field
//! into a load or store of the kernel's `sockaddr`, and refuses a wider
//! access that spans two fields (which the compiler may otherwise merge
//! neighbouring reads into).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use podnet_common::{
    ServiceKey, SocketFrontend, SocketLbCounter, SocketReverseKey, node::NODE_F_SERVICES_BPF,
    socket_lb::affinity_client,
};

use crate::{
    clock::now_ns,
    counters::bump,
    l4::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{CONFIG, SERVICES, SOCKET_LB_COUNTERS, SOCKET_LB_REVERSE},
    service::{self, FOUND_NEW, FOUND_NO_BACKEND},
};

/// A cgroup `sock_addr` program's answer: the syscall goes on (with the
/// address as the program left it).
pub const SOCK_ALLOW: i32 = 1;
/// The syscall fails, with the error `bpf_set_retval` set (`EPERM`
/// without one).
const SOCK_REFUSE: i32 = 0;
/// What a `connect` / `sendto` to a frontend without backends fails with:
/// as a kube-proxy `REJECT` answers (an ICMP port unreachable the client's
/// kernel turns into `ECONNREFUSED`), and as Cilium's socket LB does.
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn count(counter: SocketLbCounter) {
    bump(&SOCKET_LB_COUNTERS, counter as u32);
}

/// The destination the socket's owner gave (`connect`, `sendto`) or the
/// peer the kernel reports (`recvmsg`, `getpeername`): address and port,
/// network byte order.
#[inline(always)]
fn user_address(ctx: &SockAddrContext) -> (u32, u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context, valid while the program runs; 4-byte
    // loads of two fields every sock_addr attach type may read.
    let (address, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    // `user_port` holds the sockaddr's 16-bit port (network order) in its
    // low half.
    #[allow(clippy::cast_possible_truncation)]
    (address, port as u16)
}

/// Replaces the address the syscall goes on with.
#[inline(always)]
fn set_user_address(ctx: &SockAddrContext, address: u32, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `user_address`; both fields are writable for every
    // attach type that calls this (connect4, sendmsg4, recvmsg4,
    // getpeername4).
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), address);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port));
    }
}

/// The socket's protocol (`IPPROTO_*`; a socket created with protocol 0
/// has its real one here, `inet_create` fills it in).
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as in `user_address`: a 4-byte load of a readable field.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) }
}

/// connect4 / sendmsg4: a destination that is a ClusterIP frontend, or a
/// NodePort of this node's address, goes to a backend picked from its
/// slots, and the socket remembers the frontend for `recvmsg` /
/// `getpeername`; `counter` counts the translation. A frontend without
/// backends refuses the syscall with `ECONNREFUSED`. Anything else goes on
/// untouched.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext, counter: SocketLbCounter) -> i32 {
    let (address, port) = user_address(ctx);
    let Some(config) = CONFIG.get(0) else {
        return SOCK_ALLOW;
    };
    // Nothing is translated while kube-proxy has the Services. Besides
    // ClusterIPs, this node's own NodePorts: a connection from the node
    // itself (a hostNetwork pod) to its own address is delivered through
    // `lo` and never crosses a TC hook of podnet's, so only the socket can
    // translate it (NodePort frontends are keyed by the node's address).
    if config.flags & NODE_F_SERVICES_BPF == 0
        || !(config.in_service_cidr(address) || address == config.node_ip)
    {
        return SOCK_ALLOW;
    }
    let protocol = protocol(ctx);
    if protocol != u32::from(IPPROTO_TCP) && protocol != u32::from(IPPROTO_UDP) {
        return SOCK_ALLOW;
    }
    #[allow(clippy::cast_possible_truncation)] // TCP or UDP: one byte
    let key = ServiceKey {
        address,
        port,
        protocol: protocol as u8,
        pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return SOCK_ALLOW;
    };
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let found = service::pick_backend(service, affinity_client(netns), now_ns());
    #[allow(clippy::cast_possible_truncation)] // unpacking pick_backend's word
    let (backend, backend_port) = (found as u32, (found >> 32) as u16);
    match found >> 56 {
        FOUND_NEW => {
            remember_frontend(ctx, backend, backend_port, address, port);
            set_user_address(ctx, backend, backend_port);
            count(counter);
            SOCK_ALLOW
        }
        FOUND_NO_BACKEND => {
            count(SocketLbCounter::NoBackend);
            // SAFETY: plain helper call; connect4 and sendmsg4 may set
            // the syscall's error (Linux >= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SOCK_REFUSE
        }
        _ => SOCK_ALLOW,
    }
}

/// Notes that this socket's traffic with `backend` is its owner's with the
/// frontend.
#[inline(always)]
fn remember_frontend(
    ctx: &SockAddrContext,
    backend: u32,
    backend_port: u16,
    frontend: u32,
    frontend_port: u16,
) {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SocketReverseKey {
        cookie,
        address: backend,
        port: backend_port,
        pad: 0,
    };
    let frontend = SocketFrontend {
        address: frontend,
        port: frontend_port,
        pad: 0,
    };
    if SOCKET_LB_REVERSE.insert(key, frontend, 0).is_err() {
        count(SocketLbCounter::ReverseNotRecorded);
    }
}

/// recvmsg4 / getpeername4: an address that is the backend this socket was
/// sent to reads as the frontend its owner asked for; `counter` counts it.
/// Always lets the syscall go on (these hooks cannot refuse).
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext, counter: SocketLbCounter) -> i32 {
    let (address, port) = user_address(ctx);
    // Traffic from ports no backend serves on pays one array read.
    if !service::watched_port(port) {
        return SOCK_ALLOW;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SocketReverseKey {
        cookie,
        address,
        port,
        pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = (unsafe { SOCKET_LB_REVERSE.get(key) }).copied() {
        set_user_address(ctx, frontend.address, frontend.port);
        count(counter);
    }
    SOCK_ALLOW
}
