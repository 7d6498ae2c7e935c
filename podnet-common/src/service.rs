//! Service translation in the datapath (the agent's `--services bpf`):
//! kube-proxy's job done in from_pod, on the same connection table as
//! NetworkPolicy ([`crate::TrackedConnection`]).
//!
//! - [`ServiceKey`] -> [`ServiceEntry`]: a frontend (ClusterIP, port,
//!   protocol) and how many backend slots it has.
//! - [`BackendKey`] (frontend id, slot 1..=n) -> [`Backend`]: the slots hold
//!   the ready endpoints, or the serving terminating ones when none is ready
//!   (kube-proxy's rule), chosen by the agent.
//! - A connection's first packet to a frontend picks a slot; the connection
//!   table then holds three entries: the client's tuple to the frontend
//!   (`CONN_NAT_DST`: rewrite the destination to the backend), and the two
//!   directions of the translated tuple, the reply one `CONN_NAT_SRC`
//!   (rewrite the source back to the frontend). Later packets and replies
//!   cost one lookup each; a backend removed from the slots keeps the
//!   connections it has (kube-proxy's conntrack does the same for TCP).
//! - `sessionAffinity: ClientIP`: [`AffinityKey`] (frontend, client) ->
//!   [`Affinity`] in an LRU; a new connection of the client within the
//!   timeout goes to the same backend while its slot still holds it.
//! - [`MAP_SERVICE_PORTS`](crate::names::MAP_SERVICE_PORTS): one bit per
//!   port that some backend serves on. Only a packet from such a port (or
//!   an ICMP error) looks for a reply translation, so traffic no Service
//!   translates pays one array read.
//! - NodePorts: a frontend keyed by this node's own address (the agent
//!   writes its NodePorts under it), translated where the packet reaches
//!   the node from outside (the underlay, the overlay). A backend on this
//!   node gets the client's packet as it is (the client's address kept, as
//!   `externalTrafficPolicy: Local` needs); a backend on another node gets
//!   it from this node's address at a port of [`NODE_PORT_SNAT_PORTS`],
//!   so that the replies come back here to be translated
//!   (`CONN_NAT_DST_SNAT` / `CONN_NAT_SRC_SNAT`).

/// Key of the Services map: a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// The ClusterIP, network byte order.
    pub address: u32,
    /// The Service port, network byte order.
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    pub pad: u8,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// Value of the Services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceEntry {
    /// The frontend's id (never 0): the backend slots' key, and what the
    /// connection table records.
    pub id: u32,
    /// Backend slots 1..=`backends`; 0: no endpoint, new connections are
    /// dropped (`service_no_backend`), as kube-proxy rejects them.
    pub backends: u32,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// Reserved for per-frontend options: 0.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 16);

/// Key of the backend slots map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendKey {
    /// [`ServiceEntry::id`].
    pub service: u32,
    /// 1..=[`ServiceEntry::backends`].
    pub slot: u32,
}

const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// A backend: where a frontend's connection goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// The endpoint's address, network byte order.
    pub address: u32,
    /// The endpoint's port (the resolved targetPort), network byte order.
    pub port: u16,
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// Key of the session-affinity LRU (`sessionAffinity: ClientIP`): a
/// client of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    /// [`ServiceEntry::id`].
    pub service: u32,
    /// The client's address, network byte order.
    pub client: u32,
}

const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// The backend a client of an affine frontend sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Affinity {
    /// The datapath's clock at the client's last new connection (as
    /// kube-proxy's `recent` match: the timeout runs from there).
    pub last_used_ns: u64,
    /// The slot the backend had: the affinity holds only while that slot
    /// still holds this backend (an endpoint change may end it early,
    /// never send a client to a backend that left).
    pub slot: u32,
    pub backend_address: u32,
    pub backend_port: u16,
    pub pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<Affinity>() == 24);

/// The source ports a NodePort connection to another node's backend gets
/// (host byte order): above Linux's default ephemeral range
/// (`ip_local_port_range` 32768-60999), so the node's own connections to a
/// backend never have the reply tuple of a translated one. 4,536 ports per
/// backend address and port: that many concurrent NodePort connections
/// through one node to one backend.
pub const NODE_PORT_SNAT_PORTS: core::ops::RangeInclusive<u16> = 61_000..=65_535;

/// The source a hairpin connection carries to its backend (a pod whose
/// connection to a Service frontend picked the pod itself), as bytes on
/// the wire. The pod cannot receive a packet from its own address on
/// eth0 (the kernel drops a local source arriving from outside as a
/// martian, `fib_validate_source`), and its reply to itself would stay on
/// its loopback, untranslated; from this link-local address the packet
/// is accepted and the reply goes out to from_pod, which makes it come
/// from the frontend again. Cilium's default service-loopback address,
/// so an allow-list written for it carries over.
pub const HAIRPIN_SOURCE: [u8; 4] = [169, 254, 42, 1];

/// Words of the backend-ports bitmap: one bit per port.
pub const SERVICE_PORT_WORDS: u32 = 65_536 / 64;

/// The bitmap word and bit of `port` (host byte order).
#[must_use]
pub const fn service_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integer fields only, padding spelled out (the
    // size asserts above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above: four u32.
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: as above: two u32.
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above: u32 + two u16.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above: two u32.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above: integers, padding spelled out.
    unsafe impl aya::Pod for super::Affinity {}
}
