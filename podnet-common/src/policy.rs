//! NetworkPolicy in the datapath: numeric identities, the per-endpoint
//! allow rules and podnet's own connection tracking.
//!
//! - Every IP the node may see as a peer maps to a numeric identity
//!   ([`crate::names::MAP_IDENTITIES`]): each pod of the cluster to the
//!   identity of its namespace and labels (pods with the same namespace and
//!   labels share one), this node's own addresses to [`IDENTITY_HOST`].
//!   What is not in the map is another node ([`IDENTITY_REMOTE_NODE`], from
//!   the remote trie) or the world ([`IDENTITY_WORLD`]).
//! - A local endpoint selected by a policy for a direction carries
//!   `ENDPOINT_F_POLICY_INGRESS` / `ENDPOINT_F_POLICY_EGRESS`
//!   ([`crate::endpoint`]); one flag test is all an unselected pod pays.
//! - A new connection of a selected endpoint is allowed when the rules map
//!   ([`crate::names::MAP_POLICY`], an LPM trie of [`PolicyKey`]) holds a
//!   prefix of (endpoint, peer identity, direction, protocol, port) for the
//!   peer's identity, for [`IDENTITY_ANY_POD`] (a pod peer), for
//!   [`IDENTITY_ANY`], or for the CIDR set the peer's address falls in
//!   ([`crate::names::MAP_POLICY_CIDRS`], an LPM trie of
//!   [`PolicyCidrKey`]). Four lookups at most, whatever the number of rules:
//!   the agent compiles every selecting policy into these entries.
//! - An allowed connection is tracked ([`crate::names::MAP_CONNTRACK`]):
//!   both directions' tuples, so each later packet, replies and ICMP errors
//!   included, costs one lookup.

/// No identity known (never in a rule).
pub const IDENTITY_UNKNOWN: u32 = 0;
/// This node's own addresses (its underlay address, its pods' gateway):
/// what it sends to its pods is always allowed (the Kubernetes rule, which
/// kubelet's probes need).
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside the cluster.
pub const IDENTITY_WORLD: u32 = 2;
/// Another node's own address.
pub const IDENTITY_REMOTE_NODE: u32 = 6;
/// The first identity of a pod label set; below it, the reserved ones.
pub const IDENTITY_FIRST_POD: u32 = 256;
/// The first identity of a CIDR set (the set of a policy's `ipBlock`s an
/// address falls in, one per distinct set); pod identities stay below it.
pub const IDENTITY_FIRST_CIDR_SET: u32 = 1 << 24;
/// In a rule: every pod of the cluster (a peer `namespaceSelector: {}`).
pub const IDENTITY_ANY_POD: u32 = u32::MAX - 1;
/// In a rule: every peer (a rule without `from` / `to`).
pub const IDENTITY_ANY: u32 = u32::MAX;

/// [`PolicyKey::direction`]: traffic to the endpoint.
pub const DIRECTION_INGRESS: u8 = 0;
/// [`PolicyKey::direction`]: traffic from the endpoint.
pub const DIRECTION_EGRESS: u8 = 1;

/// Key data of the rules LPM trie. The kernel compares key data byte by
/// byte from the first, so the fields go from always-exact to wildcardable:
/// a rule for every protocol and port is a prefix of
/// [`POLICY_PREFIX_ANY_PROTOCOL`] bits, for one protocol and every port
/// [`POLICY_PREFIX_ANY_PORT`], a port range a few prefixes of the port
/// (network byte order, so its high bits come first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyKey {
    /// The local endpoint's pod IP (network byte order).
    pub endpoint: u32,
    /// The peer's identity (or [`IDENTITY_ANY_POD`], [`IDENTITY_ANY`], a
    /// CIDR set), native byte order: always matched whole.
    pub identity: u32,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// IP protocol number (TCP, UDP, SCTP; 0 with a shorter prefix).
    pub protocol: u8,
    /// The endpoint's port for ingress, the peer's for egress (network
    /// byte order). 0 for protocols without ports.
    pub port: u16,
}

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// Bits of a whole [`PolicyKey`] (one protocol, one port).
pub const POLICY_KEY_BITS: u32 = 96;
/// Prefix of a rule for every protocol and port: endpoint, identity,
/// direction.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 72;
/// Prefix of a rule for one protocol and every port.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;

/// Value of the rules trie: which rule allowed (for counters and
/// `podnetctl explain`; the agent keeps the table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyRule {
    /// The agent's number of the rule (policy and rule index).
    pub rule: u32,
    /// Explicit padding, always zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<PolicyRule>() == 8);

/// Key data of the CIDR-sets LPM trie: (endpoint, direction) exact, then the
/// peer address as a prefix (`POLICY_CIDR_PREFIX_BASE` + the CIDR's length).
/// The value is the CIDR set's identity (a `u32`): the set of the selecting
/// policies' `ipBlock`s that hold the longest matching prefix, so an
/// `except` is a longer prefix whose set leaves its block out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyCidrKey {
    /// The local endpoint's pod IP (network byte order).
    pub endpoint: u32,
    /// `DIRECTION_*` (in the low byte; the rest zero).
    pub direction: u32,
    /// The peer address (network byte order).
    pub address: u32,
}

const _: () = assert!(core::mem::size_of::<PolicyCidrKey>() == 12);

/// Prefix bits of a [`PolicyCidrKey`] before the address.
pub const POLICY_CIDR_PREFIX_BASE: u32 = 64;

/// Value of the connection-tracking LRU map, keyed by a packet's
/// [`crate::FlowKey`] in either direction (both are inserted when a
/// connection is allowed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TrackedConnection {
    /// `bpf_ktime_get_coarse_ns()` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// `CONN_F_*` bits.
    pub flags: u32,
    /// The rule that allowed the connection (0: the endpoint's own
    /// connection, allowed for its replies).
    pub rule: u32,
    // Appended for Service translation (a migrated entry holds zeroes: no
    // translation).
    /// The address this direction's packets are translated to (network
    /// byte order): the backend for `CONN_NAT_DST`, the frontend for
    /// `CONN_NAT_SRC`.
    pub nat_address: u32,
    /// The port they are translated to (network byte order).
    pub nat_port: u16,
    /// `CONN_NAT_*`.
    pub nat: u8,
    pub pad: u8,
    /// The Service frontend's id (`crate::ServiceEntry::id`), 0 for none.
    pub service: u32,
    /// The other port of a NodePort connection with SNAT
    /// ([`CONN_NAT_DST_SNAT`], [`CONN_NAT_SRC_SNAT`]); 0 otherwise.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<TrackedConnection>() == 32);

/// `TrackedConnection::nat`: no translation.
pub const CONN_NAT_NONE: u8 = 0;
/// The client's tuple to a Service frontend: the destination becomes the
/// backend.
pub const CONN_NAT_DST: u8 = 1;
/// A backend's reply to a translated connection: the source becomes the
/// frontend again.
pub const CONN_NAT_SRC: u8 = 2;
/// A client's tuple to a NodePort whose backend is on another node: the
/// destination becomes the backend (`nat_address`, `nat_port`) and the
/// source this node's address at the port in `reserved` (network byte
/// order, low 16 bits), so that the backend's replies come back here.
pub const CONN_NAT_DST_SNAT: u8 = 3;
/// The reply tuple of a [`CONN_NAT_DST_SNAT`] connection (the backend's
/// to this node's address and SNAT port): the destination becomes the
/// client again (`nat_address`, `nat_port`) and the source this node's
/// address at the NodePort in `reserved`.
pub const CONN_NAT_SRC_SNAT: u8 = 4;

/// This key is the connection's reply direction.
pub const CONN_F_REPLY: u32 = 1;
/// An RST was seen in this direction.
pub const CONN_F_RST: u32 = 1 << 1;
/// A FIN was seen in this direction.
pub const CONN_F_FIN: u32 = 1 << 2;

/// Idle lifetime of a tracked TCP connection (Cilium's default for an
/// established one: 6 h).
pub const CONN_TIMEOUT_TCP_S: u64 = 21_600;
/// Idle lifetime after an RST or a FIN (the last ACKs).
pub const CONN_TIMEOUT_CLOSING_S: u64 = 10;
/// Idle lifetime of everything else (UDP, ICMP echo, SCTP): conntrack's UDP
/// stream timeout.
pub const CONN_TIMEOUT_OTHER_S: u64 = 120;

impl TrackedConnection {
    /// How long the entry lives after its last packet, for IP protocol
    /// `protocol`.
    #[must_use]
    pub const fn timeout_s(&self, protocol: u8) -> u64 {
        /// `IPPROTO_TCP`.
        const TCP: u8 = 6;
        if self.flags & (CONN_F_RST | CONN_F_FIN) != 0 {
            CONN_TIMEOUT_CLOSING_S
        } else if protocol == TCP {
            CONN_TIMEOUT_TCP_S
        } else {
            CONN_TIMEOUT_OTHER_S
        }
    }

    /// No longer tracked at monotonic time `now_ns` (the datapath's clock,
    /// `CLOCK_MONOTONIC_COARSE`).
    #[must_use]
    pub const fn expired(&self, protocol: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_s(protocol) * 1_000_000_000
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integer fields only, no implicit padding (the
    // size asserts above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above: two u32.
    unsafe impl aya::Pod for super::PolicyRule {}
    // SAFETY: as above: three u32.
    unsafe impl aya::Pod for super::PolicyCidrKey {}
    // SAFETY: as above: integers, padding spelled out.
    unsafe impl aya::Pod for super::TrackedConnection {}
}
