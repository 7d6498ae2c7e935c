//! The datapath's maps. Names come from `podnet_common::names`; every map is
//! pinned by name so the agent can restart (or be replaced) without the
//! datapath losing its state.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use podnet_common::{
    Affinity, AffinityKey, Backend, BackendKey, DropReason, EndpointInfo, EventLimiter, FlowKey,
    FlowOwner, NodeConfig, PolicyCidrKey, PolicyKey, PolicyRule, RemoteNode, ServiceEntry,
    ServiceKey, SocketFrontend, SocketLbCounter, SocketReverseKey, StackFlow, TrackedConnection,
    Verdict, VethEndpoint,
    event::EVENTS_RING_BYTES,
    names::{
        MAX_ENDPOINTS, MAX_IDENTITY_ADDRESSES, MAX_POLICY_CIDRS, MAX_POLICY_RULES,
        MAX_REMOTE_CIDRS, MAX_SERVICE_AFFINITIES, MAX_SERVICE_BACKENDS, MAX_SERVICES,
        MAX_SOCKET_LB_REVERSE, MAX_STACK_FLOWS, MAX_TRACKED_CONNECTIONS,
    },
    service::SERVICE_PORT_WORDS,
};

/// Local endpoints: pod IPv4 (network order) -> where and how to deliver.
#[map(name = "podnet_endpts")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Packets by verdict.
#[map(name = "podnet_verdicts")]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(Verdict::COUNT, 0);

/// Drops by reason.
#[map(name = "podnet_drops")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT, 0);

/// Who may send on a host veth, and what it sent, keyed by the veth's
/// ifindex. The agent creates the entry when it adds the endpoint; the
/// datapath only updates the counters of existing entries, so no entry
/// outlives its endpoint.
#[map(name = "podnet_veths")]
pub static VETHS: PerCpuHashMap<u32, VethEndpoint> = PerCpuHashMap::pinned(MAX_ENDPOINTS, 0);

/// Other nodes' pod CIDRs -> the node. `BPF_F_NO_PREALLOC` is mandatory for
/// LPM tries.
#[map(name = "podnet_remote")]
pub static REMOTE: LpmTrie<u32, RemoteNode> = LpmTrie::pinned(MAX_REMOTE_CIDRS, 1);

/// This node's forwarding config, written by the agent.
#[map(name = "podnet_config")]
pub static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Reply directions of flows that crossed the host stack (see
/// `podnet_common::flow`). LRU: when full, the least recently used entry
/// makes room, so tracking never fails for lack of space (an evicted idle
/// flow's next reply would take the fast path).
#[map(name = "podnet_stackflw")]
pub static STACK_FLOWS: LruHashMap<FlowKey, StackFlow> = LruHashMap::pinned(MAX_STACK_FLOWS, 0);

/// Stack-flows entries charged to each local endpoint (see
/// `podnet_common::FlowOwner`): what bounds one pod's share of the LRU.
#[map(name = "podnet_flowown")]
pub static FLOW_OWNERS: HashMap<u32, FlowOwner> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// Drop events for the agent (see `events`): `DropEvent` records.
#[map(name = "podnet_events")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// This CPU's token bucket of the drop-event rate limit.
#[map(name = "podnet_evlimit")]
pub static EVENT_LIMIT: PerCpuArray<EventLimiter> = PerCpuArray::pinned(1, 0);

/// Drops whose event was not sent (rate limit, full ring), by reason.
#[map(name = "podnet_evsupp")]
pub static EVENTS_SUPPRESSED: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT, 0);

/// Pod IPs of the cluster and this node's addresses -> identity (see
/// `podnet_common::policy`). Not preallocated (`BPF_F_NO_PREALLOC`): sized
/// for the cluster, filled as it is.
#[map(name = "podnet_ident")]
pub static IDENTITIES: HashMap<u32, u32> = HashMap::pinned(MAX_IDENTITY_ADDRESSES, 1);

/// Allow rules of the policy-selected local endpoints.
#[map(name = "podnet_policy")]
pub static POLICY: LpmTrie<PolicyKey, PolicyRule> = LpmTrie::pinned(MAX_POLICY_RULES, 1);

/// `ipBlock` CIDR sets of the policy-selected local endpoints -> CIDR-set
/// identity.
#[map(name = "podnet_polcidr")]
pub static POLICY_CIDRS: LpmTrie<PolicyCidrKey, u32> = LpmTrie::pinned(MAX_POLICY_CIDRS, 1);

/// Connections of policy-selected endpoints, both directions, and
/// translated Service connections (see `service`). LRU: when full, the
/// least recently used entries make room (the agent reports the fill
/// level).
#[map(name = "podnet_conntrk")]
pub static CONNTRACK: LruHashMap<FlowKey, TrackedConnection> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

/// Service frontends (`--services bpf`, see `podnet_common::service`).
/// Not preallocated: sized for 10,000 Services, filled as they come.
#[map(name = "podnet_svc")]
pub static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(MAX_SERVICES, 1);

/// The frontends' backend slots.
#[map(name = "podnet_svcbe")]
pub static SERVICE_BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(MAX_SERVICE_BACKENDS, 1);

/// A bit per port some backend serves on: which packets may be replies of
/// translated connections.
#[map(name = "podnet_svcport")]
pub static SERVICE_PORTS: Array<u64> = Array::pinned(SERVICE_PORT_WORDS, 0);

/// Session affinity: which backend each client of an affine frontend
/// sticks to.
#[map(name = "podnet_svcaff")]
pub static SERVICE_AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::pinned(MAX_SERVICE_AFFINITIES, 0);

/// The socket LB's reverse LRU (see `podnet_common::socket_lb`): the
/// frontend each translated socket asked for, by the socket and its
/// backend. LRU: nothing removes an entry when its socket closes, the
/// least recently used make room.
#[map(name = "podnet_sockrev")]
pub static SOCKET_LB_REVERSE: LruHashMap<SocketReverseKey, SocketFrontend> =
    LruHashMap::pinned(MAX_SOCKET_LB_REVERSE, 0);

/// What the socket programs did, by `SocketLbCounter`.
#[map(name = "podnet_socklb")]
pub static SOCKET_LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(SocketLbCounter::COUNT, 0);
