//! Counter indices. The numeric values are part of the pinned maps' format:
//! append new variants, never renumber (a restarted agent reads counters that
//! an older datapath wrote).

/// A counter index enum: its variants with their stable numbers and
/// metric names, `COUNT`, `ALL` (the variants in index order: userspace
/// reads counter i as `ALL[i]`) and `name()`. A numbering that is not
/// 0, 1, 2, ... in order fails to compile.
macro_rules! counter_index {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident = $index:literal => $text:literal,
            )*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                $(#[$variant_meta])*
                $variant = $index,
            )*
        }

        impl $name {
            #[allow(clippy::cast_possible_truncation)] // a few dozen variants
            pub const COUNT: u32 = [$(stringify!($variant)),*].len() as u32;
            pub const ALL: [$name; Self::COUNT as usize] = [$(Self::$variant),*];

            /// The counter's name in metrics and `podnetctl`.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        const _: () = {
            let mut i = 0;
            while i < $name::ALL.len() {
                assert!($name::ALL[i] as usize == i, "counter indices are 0, 1, 2, ... in order");
                i += 1;
            }
        };
    };
}
pub(crate) use counter_index;

counter_index! {
    /// What a program did with a packet; index into the verdicts map.
    pub enum Verdict {
        /// Handed to a local pod with `bpf_redirect_peer`.
        RedirectPeer = 0 => "redirect_peer",
        /// Left to the host stack (not IPv4, not for a local endpoint, ...).
        PassToStack = 1 => "pass_to_stack",
        /// Dropped; the reason is counted in the drops map.
        Drop = 2 => "drop",
        /// An ARP request from a pod answered in place with the host veth's MAC.
        ArpReply = 3 => "arp_reply",
        /// Encapsulated in VXLAN towards a remote node.
        VxlanEncap = 4 => "vxlan_encap",
        /// Routed to a remote node on the underlay (`bpf_redirect_neigh`).
        RedirectNeigh = 5 => "redirect_neigh",
        /// Decapsulated and delivered to a local pod (from_overlay).
        OverlayDeliver = 6 => "overlay_deliver",
        /// Arrived routed on the underlay and delivered to a local pod.
        UnderlayDeliver = 7 => "underlay_deliver",
        /// Handed to the host stack instead of redirected: a packet of a flow
        /// whose other direction went through the stack (NAT, Services), so
        /// conntrack sees it (see [`crate::flow`]).
        StackFlow = 8 => "stack_flow",
        /// The stack sent a pod's flow through a pod veth or the overlay /
        /// underlay; its reply direction was recorded to follow it.
        StackFlowTracked = 9 => "stack_flow_tracked",
        /// A packet of a pod with an egress bandwidth limit, checked and handed
        /// to the pod's shaper (an ifb device whose tbf queues it); from there
        /// it goes up the host stack, which routes it.
        ToShaper = 10 => "to_shaper",
        /// Encapsulated in VXLAN by from_pod itself and sent out of the
        /// underlay device (`--vxlan-datapath bpf`), skipping the node's VXLAN
        /// device and IP output.
        VxlanEncapBpf = 11 => "vxlan_encap_bpf",
        /// A VXLAN packet from another node for a local pod, decapsulated by
        /// from_underlay itself and delivered (`--vxlan-datapath bpf`), skipping
        /// the node's UDP socket and VXLAN device.
        VxlanDecapBpf = 12 => "vxlan_decap_bpf",
        /// A new connection of a policy-selected pod allowed by a rule, and
        /// tracked (counted besides the packet's forwarding verdict).
        PolicyAllowed = 13 => "policy_allowed",
        /// A packet of a policy-selected pod that belonged to a tracked
        /// connection (counted besides its forwarding verdict).
        PolicyTracked = 14 => "policy_tracked",
        /// The first packet of a connection to a Service frontend, translated
        /// to the backend it picked (`--services bpf`; counted besides its
        /// forwarding verdict).
        ServiceTranslated = 15 => "service_translated",
        /// A later packet of a translated connection, either way (the reply's
        /// source made the frontend again).
        ServiceTracked = 16 => "service_tracked",
        /// A new NodePort connection whose backend is on another node: its
        /// source made this node's address and a port of its own (SNAT), so
        /// the replies come back through this node (counted besides
        /// `service_translated`).
        NodePortSnat = 17 => "node_port_snat",
        /// A NodePort connection's packet for a client outside the pod network
        /// (the reply, its source the NodePort again), sent out of the
        /// underlay by the kernel's route and neighbour (`bpf_redirect_neigh`):
        /// the stack would drop a packet with the node's own source arriving
        /// on a pod's veth or the overlay as a martian.
        ToNodePortClient = 18 => "to_node_port_client",
        /// A packet of a hairpin connection, either way: a pod's connection to
        /// a Service frontend that picked the pod itself, its source made
        /// [`crate::service::HAIRPIN_SOURCE`] on the way in and the pod's own
        /// address again on the way back (counted besides
        /// `service_translated` / `service_tracked`).
        ServiceHairpin = 19 => "service_hairpin",
    }
}

counter_index! {
    /// Why a packet was dropped; index into the drops map. Stable numbering.
    pub enum DropReason {
        /// `EtherType` says IPv4 but the frame is too short for an IPv4 header, or
        /// the header's version/IHL is invalid.
        MalformedIpv4 = 0 => "malformed_ipv4",
        /// Source IPv4 is not the sending endpoint's own address.
        SpoofedSourceIp = 1 => "spoofed_source_ip",
        /// Source MAC is not the sending endpoint's own address.
        SpoofedSourceMac = 2 => "spoofed_source_mac",
        /// Rewriting the headers (MACs, TTL) for delivery failed.
        HeaderRewriteFailed = 3 => "header_rewrite_failed",
        /// `bpf_skb_set_tunnel_key` refused the key.
        TunnelKeyFailed = 4 => "tunnel_key_failed",
        /// A remote CIDR matched but this node has no forwarding config yet.
        NoNodeConfig = 5 => "no_node_config",
        /// Sent on a veth that is no endpoint's (none, or no longer): kept apart
        /// from spoofing, which is an endpoint claiming another's identity.
        UnknownSender = 6 => "unknown_sender",
        /// ARP from a pod whose sender IP or MAC, or frame source MAC, is not the
        /// pod's own, or that is not an Ethernet/IPv4 request or reply.
        ForgedArp = 7 => "forged_arp",
        /// IPv6 from a pod (podnet carries IPv4 only).
        Ipv6FromPod = 8 => "ipv6_from_pod",
        /// Any other ethertype from a pod: VLAN and QinQ tags included.
        UnsupportedEthertype = 9 => "unsupported_ethertype",
        /// UDP from a pod to the cluster's VXLAN port of anything but a pod: the
        /// node's VXLAN device would decapsulate and deliver whatever inner
        /// packet the pod made up, past the anti-spoofing check.
        VxlanFromPod = 10 => "vxlan_from_pod",
        /// Decapsulated by the VXLAN device, but the tunnel's remote address is
        /// no known node (or the packet carries no tunnel metadata at all).
        UnknownTunnelSource = 11 => "unknown_tunnel_source",
        /// Decapsulated from a known node, but the inner IPv4 source is neither
        /// that node's pod CIDR nor its node IP (injection through the tunnel).
        TunnelSourceMismatch = 12 => "tunnel_source_mismatch",
        /// Arrived on the underlay for a local pod in a frame that was not
        /// unicast to this node (L2 broadcast or multicast).
        UnderlayNotUnicast = 13 => "underlay_not_unicast",
        /// Arrived on the underlay for a local pod from a pod-network source (a
        /// pod of this node, or another node's pod CIDR or node IP) in a frame
        /// that the owning node did not send (source MAC is not that node's
        /// neighbour entry).
        UnderlaySourceMismatch = 14 => "underlay_source_mismatch",
        /// A new connection to a policy-selected pod that no rule of its
        /// ingress policies allows (nor a tracked connection).
        PolicyDeniedIngress = 15 => "policy_denied_ingress",
        /// A new connection from a policy-selected pod that no rule of its
        /// egress policies allows (nor a tracked connection).
        PolicyDeniedEgress = 16 => "policy_denied_egress",
        /// A new connection to a Service frontend that has no endpoint to send
        /// it to (kube-proxy rejects these).
        ServiceNoBackend = 17 => "service_no_backend",
        /// A TCP segment other than a SYN to a Service frontend, of no tracked
        /// connection: its entry expired or was evicted from a full connection
        /// table. Sent to another backend it would only earn an RST; dropped
        /// and counted instead, so a table too small shows.
        ServiceConnectionUnknown = 18 => "service_connection_unknown",
        /// A new NodePort connection to a backend on another node for which
        /// no SNAT port was free (every one tried already holds a connection
        /// to that backend; see `NODE_PORT_SNAT_PORTS`).
        NodePortSnatExhausted = 19 => "node_port_snat_exhausted",
    }
}
