//! Names of the BPF programs and maps, as the object file and the pin
//! directory spell them. The kernel keeps at most 15 bytes of an object name
//! (`BPF_OBJ_NAME_LEN` = 16 with the NUL), so every name stays within that and
//! the pinned file has the same name as the kernel object.

/// TC ingress program on each pod's host-side veth.
pub const PROG_FROM_POD: &str = "from_pod";
/// TC egress program on each pod's host-side veth (what the stack delivers).
pub const PROG_TO_POD: &str = "to_pod";

/// TC ingress program on the node's collect-metadata VXLAN device.
pub const PROG_FROM_OVERLAY: &str = "from_overlay";
/// TC ingress program on the underlay device (direct mode).
pub const PROG_FROM_UNDERLAY: &str = "from_underlay";
/// TC egress program on the VXLAN device (what the node sends through it).
pub const PROG_TO_OVERLAY: &str = "to_overlay";
/// TC egress program on the underlay device (direct mode).
pub const PROG_TO_UNDERLAY: &str = "to_underlay";

/// Local endpoints: pod IPv4 (network byte order) -> [`crate::EndpointInfo`].
pub const MAP_ENDPOINTS: &str = "podnet_endpts";
/// Per-CPU packet counters by [`crate::Verdict`].
pub const MAP_VERDICTS: &str = "podnet_verdicts";
/// Per-CPU drop counters by [`crate::DropReason`].
pub const MAP_DROPS: &str = "podnet_drops";
/// Per-CPU per-veth identity and counters: host veth ifindex ->
/// [`crate::VethEndpoint`].
pub const MAP_VETHS: &str = "podnet_veths";

/// Remote pod CIDRs (LPM trie, key data network order) -> [`crate::RemoteNode`].
pub const MAP_REMOTE: &str = "podnet_remote";
/// This node's [`crate::NodeConfig`] (array of one).
pub const MAP_CONFIG: &str = "podnet_config";

/// Reply directions of flows that crossed the host stack (LRU hash):
/// [`crate::FlowKey`] -> [`crate::StackFlow`].
pub const MAP_STACK_FLOWS: &str = "podnet_stackflw";

/// Stack-flows entries per local endpoint (hash): pod IP (network order)
/// -> [`crate::FlowOwner`].
pub const MAP_FLOW_OWNERS: &str = "podnet_flowown";

/// Drop events (ring buffer of [`crate::DropEvent`]), read by the agent.
pub const MAP_EVENTS: &str = "podnet_events";
/// Per-CPU token bucket of the drop-event rate limit
/// ([`crate::EventLimiter`], array of one).
pub const MAP_EVENT_LIMIT: &str = "podnet_evlimit";
/// Per-CPU counters, by [`crate::DropReason`], of drops whose event was
/// suppressed (over the rate limit, or no room in the ring buffer).
pub const MAP_EVENTS_SUPPRESSED: &str = "podnet_evsupp";

/// Pod IPs of the cluster and this node's addresses (hash): IPv4 (network
/// order) -> identity (`u32`, see [`crate::policy`]).
pub const MAP_IDENTITIES: &str = "podnet_ident";
/// Allow rules of the policy-selected local endpoints (LPM trie):
/// [`crate::PolicyKey`] -> [`crate::PolicyRule`].
pub const MAP_POLICY: &str = "podnet_policy";
/// `ipBlock` CIDR sets of the policy-selected local endpoints (LPM trie):
/// [`crate::PolicyCidrKey`] -> CIDR-set identity (`u32`).
pub const MAP_POLICY_CIDRS: &str = "podnet_polcidr";
/// Connections of policy-selected endpoints (LRU hash), both directions:
/// [`crate::FlowKey`] -> [`crate::TrackedConnection`].
pub const MAP_CONNTRACK: &str = "podnet_conntrk";
/// Service frontends (hash): [`crate::ServiceKey`] -> [`crate::ServiceEntry`].
pub const MAP_SERVICES: &str = "podnet_svc";
/// Service backend slots (hash): [`crate::BackendKey`] -> [`crate::Backend`].
pub const MAP_SERVICE_BACKENDS: &str = "podnet_svcbe";
/// Ports some Service backend serves on (array of u64 words, a bit per
/// port): which packets may be replies to translate.
pub const MAP_SERVICE_PORTS: &str = "podnet_svcport";
/// Session affinity (LRU hash): [`crate::service::AffinityKey`] ->
/// [`crate::service::Affinity`].
pub const MAP_SERVICE_AFFINITY: &str = "podnet_svcaff";

/// The socket LB's reverse LRU (see [`crate::socket_lb`]):
/// [`crate::SocketReverseKey`] -> [`crate::SocketFrontend`].
pub const MAP_SOCKET_LB_REVERSE: &str = "podnet_sockrev";
/// Per-CPU counters of the socket programs, by [`crate::SocketLbCounter`].
pub const MAP_SOCKET_LB_COUNTERS: &str = "podnet_socklb";

/// cgroup `connect4` (TCP, connected UDP): frontend -> backend.
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
/// cgroup `sendmsg4` (unconnected UDP): frontend -> backend.
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
/// cgroup `recvmsg4` (UDP): a backend's datagram reads as the frontend's.
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
/// cgroup `getpeername4`: a translated socket's peer reads as the frontend.
pub const PROG_SOCK_PEERNAME4: &str = "sock_peername4";

/// The socket LB's programs (cgroup `sock_addr`, attached only with
/// `podnetd --socket-lb-cgroup`; loaded, and so verified, always). Not in
/// [`ALL_PROGRAMS`], which are TC classifiers.
pub const SOCKET_LB_PROGRAMS: [&str; 4] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_PEERNAME4,
];

/// Every map the datapath pins, for tools that list or clean the pin directory.
pub const ALL_MAPS: [&str; 21] = [
    MAP_ENDPOINTS,
    MAP_VERDICTS,
    MAP_DROPS,
    MAP_VETHS,
    MAP_REMOTE,
    MAP_CONFIG,
    MAP_STACK_FLOWS,
    MAP_FLOW_OWNERS,
    MAP_EVENTS,
    MAP_EVENT_LIMIT,
    MAP_EVENTS_SUPPRESSED,
    MAP_IDENTITIES,
    MAP_POLICY,
    MAP_POLICY_CIDRS,
    MAP_CONNTRACK,
    MAP_SERVICES,
    MAP_SERVICE_BACKENDS,
    MAP_SERVICE_PORTS,
    MAP_SERVICE_AFFINITY,
    MAP_SOCKET_LB_REVERSE,
    MAP_SOCKET_LB_COUNTERS,
];
/// Every program in the object.
pub const ALL_PROGRAMS: [&str; 6] = [
    PROG_FROM_POD,
    PROG_TO_POD,
    PROG_FROM_OVERLAY,
    PROG_TO_OVERLAY,
    PROG_FROM_UNDERLAY,
    PROG_TO_UNDERLAY,
];

/// Capacity of the remote pod CIDR trie (nodes in the cluster).
pub const MAX_REMOTE_CIDRS: u32 = 65_536;

/// Capacity of the local-endpoints map (pods per node).
pub const MAX_ENDPOINTS: u32 = 16_384;

/// Capacity of the stack-flows LRU map: flows through the host stack
/// (Service connections) a node follows at once. Preallocated, ~100 bytes
/// an entry: 13 MiB.
pub const MAX_STACK_FLOWS: u32 = 131_072;

/// Capacity of the identities map: pod IPs of the whole cluster (and this
/// node's addresses). Not preallocated.
pub const MAX_IDENTITY_ADDRESSES: u32 = 262_144;

/// Capacity of the policy rules trie (entries of every selected local
/// endpoint; a port range takes up to 30). Tries are never preallocated.
pub const MAX_POLICY_RULES: u32 = 262_144;

/// Capacity of the policy CIDR-sets trie.
pub const MAX_POLICY_CIDRS: u32 = 65_536;

/// Capacity of the connection-tracking LRU map: two entries a connection
/// (one per direction), 131,072 connections of policy-selected pods.
pub const MAX_TRACKED_CONNECTIONS: u32 = 262_144;
/// Service frontends (ClusterIP x port): 10,000 Services of a few ports
/// each, with room.
pub const MAX_SERVICES: u32 = 65_536;
/// Backend slots over all frontends.
pub const MAX_SERVICE_BACKENDS: u32 = 262_144;
/// Translated sockets the socket LB remembers the frontend of (LRU:
/// preallocated, ~80 bytes an entry; an evicted socket's owner sees the
/// backend's address in `recvmsg` / `getpeername`).
pub const MAX_SOCKET_LB_REVERSE: u32 = 65_536;
/// Clients remembered by affine frontends (LRU: the least recently used
/// affinity makes room, which only costs that client its stickiness).
pub const MAX_SERVICE_AFFINITIES: u32 = 65_536;

/// Whether every name fits a BPF object name (15 bytes and the NUL).
const fn all_fit(names: &[&str]) -> bool {
    let mut i = 0;
    while i < names.len() {
        if names[i].len() > 15 {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(all_fit(&ALL_MAPS), "BPF object names are at most 15 bytes");
const _: () = assert!(
    all_fit(&SOCKET_LB_PROGRAMS),
    "BPF object names are at most 15 bytes"
);
