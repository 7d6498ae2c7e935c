//! Cluster-level datapath state: this node's config and the other nodes'
//! pod CIDRs.

/// Forwarding mode between nodes (`NodeConfig::mode`).
pub const MODE_LOCAL_ONLY: u32 = 0;
/// Encapsulate in VXLAN to the remote node (collect-metadata device).
pub const MODE_VXLAN: u32 = 1;
/// Route natively on the underlay (`bpf_redirect_neigh` to the remote node).
pub const MODE_DIRECT: u32 = 2;

/// The IANA VXLAN UDP port (RFC 7348), the default of `--vxlan-port`.
pub const VXLAN_PORT: u16 = 4789;

/// Outer Ethernet header of a VXLAN packet.
const VXLAN_OUTER_ETH: u32 = 14;
/// Outer IPv4 header (no options).
const VXLAN_OUTER_IPV4: u32 = 20;
/// Outer UDP header.
const VXLAN_UDP: u32 = 8;
/// The VXLAN header.
const VXLAN_HEADER: u32 = 8;

/// What VXLAN adds to a pod's IP packet on the underlay: outer Ethernet 14 +
/// IPv4 20 + UDP 8 + VXLAN 8 (equally: outer IPv4 + UDP + VXLAN + the inner
/// Ethernet header, the room the BPF encapsulation makes in front of the
/// pod's frame). The pod MTU leaves room for it ([`pod_mtu`]).
pub const VXLAN_OVERHEAD: u32 = VXLAN_OUTER_ETH + VXLAN_OUTER_IPV4 + VXLAN_UDP + VXLAN_HEADER;

const _: () = assert!(VXLAN_OVERHEAD == 50);

/// The largest pod MTU that does not fragment on an underlay of
/// `underlay_mtu` in `mode` (`MODE_*`): vxlan leaves room for
/// [`VXLAN_OVERHEAD`]; direct and local-only use the underlay's.
#[must_use]
pub const fn pod_mtu(underlay_mtu: u32, mode: u32) -> u32 {
    if mode == MODE_VXLAN {
        underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    } else {
        underlay_mtu
    }
}

/// The pod MTU in force: an explicit one (podnetd's `--mtu`, a CNI
/// network conf's `mtu`) wins over `computed` (the agent's [`pod_mtu`]).
#[must_use]
pub const fn effective_pod_mtu(explicit: Option<u32>, computed: u32) -> u32 {
    match explicit {
        Some(mtu) => mtu,
        None => computed,
    }
}

/// The single entry of the config array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeConfig {
    /// This node's underlay address, network byte order.
    pub node_ip: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// Ifindex of the collect-metadata VXLAN device (vxlan mode).
    pub tunnel_ifindex: u32,
    /// Ifindex of the underlay device (direct mode).
    pub underlay_ifindex: u32,
    /// VXLAN network identifier.
    pub vni: u32,
    /// The node's VXLAN UDP port, network byte order (vxlan mode; 0
    /// otherwise). A pod's UDP to it is dropped: the node would decapsulate
    /// whatever inner packet the pod made up. Was padding (always 0) before.
    pub vxlan_port: u16,
    /// Explicit padding, always zero.
    pub reserved: u16,
    /// This node's pod CIDR: network address and mask, network byte order
    /// (appended in layout 2; a mask of 0, what a migrated entry of layout 1
    /// holds, means "not known"). from_underlay drops frames for a local
    /// pod whose source claims one of this node's pod addresses.
    pub pod_cidr_network: u32,
    pub pod_cidr_mask: u32,
    /// Drop events per second and CPU (appended in layout 3; 0, what a
    /// migrated entry holds, means [`crate::event::DEFAULT_DROP_EVENTS_PER_SEC`]).
    pub drop_events_per_sec: u32,
    /// `NODE_F_*` flags (appended in layout 4; 0, what a migrated entry
    /// holds, is the behaviour of earlier layouts).
    pub flags: u32,
    /// The cluster CIDR (every node's pods): network address and mask,
    /// network byte order (appended in layout 5; a mask of 0 means "not
    /// known", and the checks fall back to the pod CIDRs in the maps).
    /// from_underlay drops what arrives from the underlay with a source in
    /// it but not from the node that owns that source.
    pub cluster_cidr_network: u32,
    pub cluster_cidr_mask: u32,
    /// Stack-flows entries one local endpoint may hold (appended in layout
    /// 5; 0 means [`crate::flow::DEFAULT_STACK_FLOWS_PER_ENDPOINT`]).
    pub stack_flows_per_endpoint: u32,
    /// Explicit padding, always zero.
    pub reserved2: u32,
    /// The Services' ClusterIP range: network address and mask, network
    /// byte order (appended in layout 6; a mask of 0 means none known).
    /// A policy-selected pod's packet to it is judged after the stack's
    /// DNAT, against the backend (the Kubernetes rule), not at from_pod
    /// against the ClusterIP.
    pub service_cidr_network: u32,
    pub service_cidr_mask: u32,
}

const _: () = assert!(core::mem::size_of::<NodeConfig>() == 64);

/// `NodeConfig::flags`, vxlan mode: from_pod encapsulates VXLAN itself
/// (`bpf_skb_adjust_room` + `bpf_redirect_neigh` to the underlay) and
/// from_underlay decapsulates what other nodes sent to local pods, instead
/// of the node's VXLAN device doing both (`--vxlan-datapath bpf`).
pub const NODE_F_VXLAN_BPF: u32 = 1;
/// `NodeConfig::flags`: Services are translated in the datapath
/// (`--services bpf`, see `crate::service`) instead of by kube-proxy's
/// rules in the stack. A packet for the Service CIDR is then a pod's own
/// connection to a frontend, judged by policy after the translation.
pub const NODE_F_SERVICES_BPF: u32 = 1 << 1;

impl NodeConfig {
    /// Whether `ip` (network byte order) lies in this node's pod CIDR.
    #[must_use]
    pub const fn in_pod_cidr(&self, ip: u32) -> bool {
        self.pod_cidr_mask != 0 && ip & self.pod_cidr_mask == self.pod_cidr_network
    }

    /// The stack-flows entries one local endpoint may hold.
    #[must_use]
    pub const fn stack_flows_limit(&self) -> u32 {
        if self.stack_flows_per_endpoint == 0 {
            crate::flow::DEFAULT_STACK_FLOWS_PER_ENDPOINT
        } else {
            self.stack_flows_per_endpoint
        }
    }

    /// Whether `ip` (network byte order) lies in the Service CIDR (false
    /// while none is known).
    #[must_use]
    pub const fn in_service_cidr(&self, ip: u32) -> bool {
        self.service_cidr_mask != 0 && ip & self.service_cidr_mask == self.service_cidr_network
    }

    /// Whether `ip` (network byte order) lies in the cluster CIDR (false
    /// while it is not known).
    #[must_use]
    pub const fn in_cluster_cidr(&self, ip: u32) -> bool {
        self.cluster_cidr_mask != 0 && ip & self.cluster_cidr_mask == self.cluster_cidr_network
    }
}

/// Value of the remote pod CIDR LPM trie: where that CIDR lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RemoteNode {
    /// The remote node's underlay address, network byte order.
    pub node_ip: u32,
    /// `REMOTE_*` flags.
    pub flags: u32,
}

/// `RemoteNode::flags`: the entry is the node's own address (a /32), not
/// its pod CIDR. Pods reach other nodes' addresses through the tunnel like
/// their pods, and a node's address is a source the node may send from.
pub const REMOTE_NODE_ADDRESS: u32 = 1;

const _: () = assert!(core::mem::size_of::<RemoteNode>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_leaves_room_for_its_headers() {
        assert_eq!(pod_mtu(1500, MODE_VXLAN), 1450);
        assert_eq!(pod_mtu(9000, MODE_VXLAN), 8950);
        assert_eq!(pod_mtu(40, MODE_VXLAN), 0, "never wraps");
    }

    #[test]
    fn direct_and_local_use_the_underlay_mtu() {
        assert_eq!(pod_mtu(1500, MODE_DIRECT), 1500);
        assert_eq!(pod_mtu(9000, MODE_LOCAL_ONLY), 9000);
    }

    #[test]
    fn an_explicit_mtu_wins() {
        assert_eq!(
            effective_pod_mtu(Some(1400), pod_mtu(1500, MODE_VXLAN)),
            1400
        );
        assert_eq!(effective_pod_mtu(None, pod_mtu(1500, MODE_VXLAN)), 1450);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], u32 fields only, no implicit padding (size asserts).
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RemoteNode {}
}
