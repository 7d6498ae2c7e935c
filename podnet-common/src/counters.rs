//! Counter indices. The numeric values are part of the pinned maps' format:
//! append new variants, never renumber (a restarted agent reads counters that
//! an older datapath wrote).

/// What a program did with a packet; index into the verdicts map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Handed to a local pod with `bpf_redirect_peer`.
    RedirectPeer = 0,
    /// Left to the host stack (not IPv4, not for a local endpoint, ...).
    PassToStack = 1,
    /// Dropped; the reason is counted in the drops map.
    Drop = 2,
    /// An ARP request from a pod answered in place with the host veth's MAC.
    ArpReply = 3,
    /// Encapsulated in VXLAN towards a remote node.
    VxlanEncap = 4,
    /// Routed to a remote node on the underlay (`bpf_redirect_neigh`).
    RedirectNeigh = 5,
    /// Decapsulated and delivered to a local pod (from_overlay).
    OverlayDeliver = 6,
    /// Arrived routed on the underlay and delivered to a local pod.
    UnderlayDeliver = 7,
    /// Handed to the host stack instead of redirected: a packet of a flow
    /// whose other direction went through the stack (NAT, Services), so
    /// conntrack sees it (see [`crate::flow`]).
    StackFlow = 8,
    /// The stack sent a pod's flow through a pod veth or the overlay /
    /// underlay; its reply direction was recorded to follow it.
    StackFlowTracked = 9,
    /// A packet of a pod with an egress bandwidth limit, checked and handed
    /// to the pod's shaper (an ifb device whose tbf queues it); from there
    /// it goes up the host stack, which routes it.
    ToShaper = 10,
    /// Encapsulated in VXLAN by from_pod itself and sent out of the
    /// underlay device (`--vxlan-datapath bpf`), skipping the node's VXLAN
    /// device and IP output.
    VxlanEncapBpf = 11,
    /// A VXLAN packet from another node for a local pod, decapsulated by
    /// from_underlay itself and delivered (`--vxlan-datapath bpf`), skipping
    /// the node's UDP socket and VXLAN device.
    VxlanDecapBpf = 12,
    /// A new connection of a policy-selected pod allowed by a rule, and
    /// tracked (counted besides the packet's forwarding verdict).
    PolicyAllowed = 13,
    /// A packet of a policy-selected pod that belonged to a tracked
    /// connection (counted besides its forwarding verdict).
    PolicyTracked = 14,
    /// The first packet of a connection to a Service frontend, translated
    /// to the backend it picked (`--services bpf`; counted besides its
    /// forwarding verdict).
    ServiceTranslated = 15,
    /// A later packet of a translated connection, either way (the reply's
    /// source made the frontend again).
    ServiceTracked = 16,
    /// A new NodePort connection whose backend is on another node: its
    /// source made this node's address and a port of its own (SNAT), so
    /// the replies come back through this node (counted besides
    /// `service_translated`).
    NodePortSnat = 17,
    /// A NodePort connection's packet for a client outside the pod network
    /// (the reply, its source the NodePort again), sent out of the
    /// underlay by the kernel's route and neighbour (`bpf_redirect_neigh`):
    /// the stack would drop a packet with the node's own source arriving
    /// on a pod's veth or the overlay as a martian.
    ToNodePortClient = 18,
    /// A packet of a hairpin connection, either way: a pod's connection to
    /// a Service frontend that picked the pod itself, its source made
    /// [`crate::service::HAIRPIN_SOURCE`] on the way in and the pod's own
    /// address again on the way back (counted besides
    /// `service_translated` / `service_tracked`).
    ServiceHairpin = 19,
}

impl Verdict {
    pub const COUNT: u32 = 20;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Self::RedirectPeer,
        Self::PassToStack,
        Self::Drop,
        Self::ArpReply,
        Self::VxlanEncap,
        Self::RedirectNeigh,
        Self::OverlayDeliver,
        Self::UnderlayDeliver,
        Self::StackFlow,
        Self::StackFlowTracked,
        Self::ToShaper,
        Self::VxlanEncapBpf,
        Self::VxlanDecapBpf,
        Self::PolicyAllowed,
        Self::PolicyTracked,
        Self::ServiceTranslated,
        Self::ServiceTracked,
        Self::NodePortSnat,
        Self::ToNodePortClient,
        Self::ServiceHairpin,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::RedirectPeer => "redirect_peer",
            Self::PassToStack => "pass_to_stack",
            Self::Drop => "drop",
            Self::ArpReply => "arp_reply",
            Self::VxlanEncap => "vxlan_encap",
            Self::RedirectNeigh => "redirect_neigh",
            Self::OverlayDeliver => "overlay_deliver",
            Self::UnderlayDeliver => "underlay_deliver",
            Self::StackFlow => "stack_flow",
            Self::StackFlowTracked => "stack_flow_tracked",
            Self::ToShaper => "to_shaper",
            Self::VxlanEncapBpf => "vxlan_encap_bpf",
            Self::VxlanDecapBpf => "vxlan_decap_bpf",
            Self::PolicyAllowed => "policy_allowed",
            Self::PolicyTracked => "policy_tracked",
            Self::ServiceTranslated => "service_translated",
            Self::ServiceTracked => "service_tracked",
            Self::NodePortSnat => "node_port_snat",
            Self::ToNodePortClient => "to_node_port_client",
            Self::ServiceHairpin => "service_hairpin",
        }
    }
}

/// Why a packet was dropped; index into the drops map. Stable numbering.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// `EtherType` says IPv4 but the frame is too short for an IPv4 header, or
    /// the header's version/IHL is invalid.
    MalformedIpv4 = 0,
    /// Source IPv4 is not the sending endpoint's own address.
    SpoofedSourceIp = 1,
    /// Source MAC is not the sending endpoint's own address.
    SpoofedSourceMac = 2,
    /// Rewriting the headers (MACs, TTL) for delivery failed.
    HeaderRewriteFailed = 3,
    /// `bpf_skb_set_tunnel_key` refused the key.
    TunnelKeyFailed = 4,
    /// A remote CIDR matched but this node has no forwarding config yet.
    NoNodeConfig = 5,
    /// Sent on a veth that is no endpoint's (none, or no longer): kept apart
    /// from spoofing, which is an endpoint claiming another's identity.
    UnknownSender = 6,
    /// ARP from a pod whose sender IP or MAC, or frame source MAC, is not the
    /// pod's own, or that is not an Ethernet/IPv4 request or reply.
    ForgedArp = 7,
    /// IPv6 from a pod (podnet carries IPv4 only).
    Ipv6FromPod = 8,
    /// Any other ethertype from a pod: VLAN and QinQ tags included.
    UnsupportedEthertype = 9,
    /// UDP from a pod to the cluster's VXLAN port of anything but a pod: the
    /// node's VXLAN device would decapsulate and deliver whatever inner
    /// packet the pod made up, past the anti-spoofing check.
    VxlanFromPod = 10,
    /// Decapsulated by the VXLAN device, but the tunnel's remote address is
    /// no known node (or the packet carries no tunnel metadata at all).
    UnknownTunnelSource = 11,
    /// Decapsulated from a known node, but the inner IPv4 source is neither
    /// that node's pod CIDR nor its node IP (injection through the tunnel).
    TunnelSourceMismatch = 12,
    /// Arrived on the underlay for a local pod in a frame that was not
    /// unicast to this node (L2 broadcast or multicast).
    UnderlayNotUnicast = 13,
    /// Arrived on the underlay for a local pod from a pod-network source (a
    /// pod of this node, or another node's pod CIDR or node IP) in a frame
    /// that the owning node did not send (source MAC is not that node's
    /// neighbour entry).
    UnderlaySourceMismatch = 14,
    /// A new connection to a policy-selected pod that no rule of its
    /// ingress policies allows (nor a tracked connection).
    PolicyDeniedIngress = 15,
    /// A new connection from a policy-selected pod that no rule of its
    /// egress policies allows (nor a tracked connection).
    PolicyDeniedEgress = 16,
    /// A new connection to a Service frontend that has no endpoint to send
    /// it to (kube-proxy rejects these).
    ServiceNoBackend = 17,
    /// A TCP segment other than a SYN to a Service frontend, of no tracked
    /// connection: its entry expired or was evicted from a full connection
    /// table. Sent to another backend it would only earn an RST; dropped
    /// and counted instead, so a table too small shows.
    ServiceConnectionUnknown = 18,
    /// A new NodePort connection to a backend on another node for which
    /// no SNAT port was free (every one tried already holds a connection
    /// to that backend; see `NODE_PORT_SNAT_PORTS`).
    NodePortSnatExhausted = 19,
}

impl DropReason {
    pub const COUNT: u32 = 20;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::MalformedIpv4,
        Self::SpoofedSourceIp,
        Self::SpoofedSourceMac,
        Self::HeaderRewriteFailed,
        Self::TunnelKeyFailed,
        Self::NoNodeConfig,
        Self::UnknownSender,
        Self::ForgedArp,
        Self::Ipv6FromPod,
        Self::UnsupportedEthertype,
        Self::VxlanFromPod,
        Self::UnknownTunnelSource,
        Self::TunnelSourceMismatch,
        Self::UnderlayNotUnicast,
        Self::UnderlaySourceMismatch,
        Self::PolicyDeniedIngress,
        Self::PolicyDeniedEgress,
        Self::ServiceNoBackend,
        Self::ServiceConnectionUnknown,
        Self::NodePortSnatExhausted,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::MalformedIpv4 => "malformed_ipv4",
            Self::SpoofedSourceIp => "spoofed_source_ip",
            Self::SpoofedSourceMac => "spoofed_source_mac",
            Self::HeaderRewriteFailed => "header_rewrite_failed",
            Self::TunnelKeyFailed => "tunnel_key_failed",
            Self::NoNodeConfig => "no_node_config",
            Self::UnknownSender => "unknown_sender",
            Self::ForgedArp => "forged_arp",
            Self::Ipv6FromPod => "ipv6_from_pod",
            Self::UnsupportedEthertype => "unsupported_ethertype",
            Self::VxlanFromPod => "vxlan_from_pod",
            Self::UnknownTunnelSource => "unknown_tunnel_source",
            Self::TunnelSourceMismatch => "tunnel_source_mismatch",
            Self::UnderlayNotUnicast => "underlay_not_unicast",
            Self::UnderlaySourceMismatch => "underlay_source_mismatch",
            Self::PolicyDeniedIngress => "policy_denied_ingress",
            Self::PolicyDeniedEgress => "policy_denied_egress",
            Self::ServiceNoBackend => "service_no_backend",
            Self::ServiceConnectionUnknown => "service_connection_unknown",
            Self::NodePortSnatExhausted => "node_port_snat_exhausted",
        }
    }
}

// ALL lists the variants in index order (userspace reads counter i as
// ALL[i]); a misordered or renumbered list fails to compile here.
const _: () = {
    let mut i = 0;
    while i < Verdict::ALL.len() {
        assert!(Verdict::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as usize == i);
        i += 1;
    }
};
