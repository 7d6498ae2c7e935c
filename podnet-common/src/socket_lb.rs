//! Service translation at the socket (`podnetd --socket-lb-cgroup`): cgroup
//! `sock_addr` programs on one cgroup v2 directory translate a ClusterIP
//! frontend to a backend when a process of that cgroup connects (TCP,
//! connected UDP) or sends an unconnected UDP datagram, with the frontends
//! and backend slots of [`crate::service`] and the same choice of slot.
//! The pod's packets then carry the backend's address from the start: the
//! per-packet translation in from_pod never sees a frontend, and no reply
//! needs a rewrite. What the socket's owner reads back must still name the
//! frontend: a UDP datagram's source (`recvmsg`) and the peer of a
//! connected socket (`getpeername`). Both come from the reverse LRU,
//! [`SocketReverseKey`] (the socket's cookie, the backend) ->
//! [`SocketFrontend`], as Cilium's `cilium_lb4_reverse_sk`.
//!
//! Only frontends in the Service CIDR and NodePorts of the node's own
//! address are translated here (the latter for the node's own processes,
//! whose connections to it cross no TC hook; other nodes' NodePorts stay
//! with the per-packet path), and only while Services are the datapath's
//! (`NODE_F_SERVICES_BPF`).

use crate::counters::counter_index;

/// Key of the socket LB's reverse LRU: a translated socket and the backend
/// it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SocketReverseKey {
    /// `bpf_get_socket_cookie`: the socket's id for as long as it lives
    /// (never reused while the kernel runs).
    pub cookie: u64,
    /// The backend's address, network byte order.
    pub address: u32,
    /// The backend's port, network byte order.
    pub port: u16,
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<SocketReverseKey>() == 16);

/// Value of the socket LB's reverse LRU: the frontend the socket's owner
/// asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SocketFrontend {
    /// The ClusterIP, network byte order.
    pub address: u32,
    /// The Service port, network byte order.
    pub port: u16,
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<SocketFrontend>() == 8);

counter_index! {
    /// What the socket programs did; index into their own per-CPU counters
    /// (not the packet verdicts: a socket operation is no packet). Stable
    /// numbering: append, never renumber.
    pub enum SocketLbCounter {
        /// A `connect` (TCP, UDP) to a frontend, sent to the backend picked.
        ConnectTranslated = 0 => "connect_translated",
        /// An unconnected UDP datagram to a frontend, sent to the backend
        /// picked (one pick per datagram).
        SendmsgTranslated = 1 => "sendmsg_translated",
        /// A `connect` or datagram to a frontend without backends, refused
        /// with `ECONNREFUSED` (the per-packet path drops these as
        /// `service_no_backend`, kube-proxy rejects them).
        NoBackend = 2 => "no_backend",
        /// A UDP datagram from a backend whose source was made the frontend
        /// the socket sent to again (`recvmsg`).
        RecvmsgReversed = 3 => "recvmsg_reversed",
        /// A `getpeername` of a translated socket that answered the frontend.
        PeernameReversed = 4 => "peername_reversed",
        /// A translated socket whose reverse entry could not be written (the
        /// kernel refused the LRU update): its owner sees the backend's
        /// address in `recvmsg` / `getpeername`.
        ReverseNotRecorded = 5 => "reverse_not_recorded",
    }
}

/// The client identity a socket's `sessionAffinity: ClientIP` is keyed by
/// in the affinity LRU ([`crate::AffinityKey::client`]): the per-packet
/// path keys it by the pod's address, which a socket does not have yet at
/// `connect` (the route picks it later). The socket programs use the
/// socket's network namespace instead (a pod's, as Cilium's socket LB
/// does), as an address in 0.0.0.0/8, which no pod sends from (from_pod
/// drops a source that is not the pod's own), so the two kinds of key
/// never meet. Namespaces whose cookies agree in the low 24 bits share an
/// affinity (they are numbered from 1 as they are created: 16 million
/// apart).
#[must_use]
pub const fn affinity_client(netns_cookie: u64) -> u32 {
    // Network byte order: the first octet is the lowest byte of the u32
    // as stored (little-endian BPF), so the cookie goes above it.
    #[allow(clippy::cast_possible_truncation)] // the low 24 bits, on purpose
    let low = (netns_cookie & 0x00ff_ffff) as u32;
    if cfg!(target_endian = "little") {
        low << 8
    } else {
        low
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integer fields only, padding spelled out (the
    // size asserts above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SocketReverseKey {}
    // SAFETY: as above: u32 + two u16.
    unsafe impl aya::Pod for super::SocketFrontend {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_affinity_client_is_in_0_0_0_0_slash_8() {
        for cookie in [1_u64, 2, 4096, 0x00ff_ffff, 0x1234_5678_9abc] {
            let client = affinity_client(cookie);
            assert_eq!(client.to_ne_bytes()[0], 0, "cookie {cookie}: first octet 0");
        }
        assert_ne!(affinity_client(1), affinity_client(2));
    }
}
