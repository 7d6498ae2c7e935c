//! The wire types of `podnetctl explain` (see [`crate::explain`] for how
//! the agent answers): the question, the sender as the agent knows it, and
//! the answer.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The L4 protocol of the explained packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Icmp => 1,
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// What to explain: a packet from a local pod to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// A local pod's IP or container ID.
    pub from: String,
    pub to: Ipv4Addr,
    /// Destination port (TCP, UDP).
    #[serde(default)]
    pub port: Option<u16>,
    pub proto: Proto,
    /// A source address other than the pod's own: what a forged packet
    /// would meet.
    #[serde(default)]
    pub forged_source: Option<Ipv4Addr>,
}

impl ExplainRequest {
    /// Parses `IP[:port][/tcp|udp|icmp]` (no port and no protocol: ICMP
    /// echo; a port without a protocol: TCP).
    pub fn parse_to(to: &str) -> Result<(Ipv4Addr, Option<u16>, Proto), String> {
        let (address, proto) = match to.split_once('/') {
            Some((address, proto)) => (
                address,
                Some(match proto {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    "icmp" => Proto::Icmp,
                    other => return Err(format!("unknown protocol {other:?} (tcp, udp, icmp)")),
                }),
            ),
            None => (to, None),
        };
        let (ip, port) = match address.split_once(':') {
            Some((ip, port)) => (
                ip,
                Some(
                    port.parse::<u16>()
                        .map_err(|_| format!("invalid port {port:?}"))?,
                ),
            ),
            None => (address, None),
        };
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("invalid IPv4 address {ip:?}"))?;
        let proto = proto.unwrap_or(if port.is_some() {
            Proto::Tcp
        } else {
            Proto::Icmp
        });
        if proto == Proto::Icmp && port.is_some() {
            return Err("ICMP has no ports".to_owned());
        }
        Ok((ip, port, proto))
    }
}

/// The sending pod, as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// Where the packet would go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// Into a pod of this node.
    LocalPod {
        ip: Ipv4Addr,
        container_id: Option<String>,
        host_veth: String,
        /// Through the host veth's egress and its tbf (an ingress limit),
        /// not straight into the pod.
        shaped: bool,
    },
    /// Encapsulated to another node (VXLAN, tunnel key = VNI, remote =
    /// the node's address).
    Tunnel {
        node_ip: Ipv4Addr,
        node_name: Option<String>,
        vni: u32,
        device: String,
    },
    /// Routed to another node on the underlay (`bpf_redirect_neigh`).
    Underlay {
        node_ip: Ipv4Addr,
        node_name: Option<String>,
        next_hop: Ipv4Addr,
        device: String,
    },
    /// Handed to the pod's shaper (egress limit), then up the host stack.
    Shaper { device: String },
    /// Up the node's stack, which routes (and masquerades) it.
    HostStack { why: String },
    /// Dropped.
    Dropped { reason: String },
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub request: ExplainRequest,
    pub sender: Sender,
    /// The program's verdict counter (`redirect_peer`, `drop`, ...).
    pub verdict: String,
    /// The drop counter, for a drop.
    pub drop_reason: Option<String>,
    /// The TC return code, by name (`TC_ACT_REDIRECT`, ...).
    pub action: String,
    pub destination: Destination,
    /// TTL as sent and as the program left it; destination MAC after.
    pub ttl_in: u8,
    pub ttl_out: Option<u8>,
    pub dst_mac_out: Option<String>,
    /// What NetworkPolicy says of the connection (absent without a
    /// datastore, i.e. without cluster objects). The scratch run above
    /// shows the forwarding with the policy maps left out; this is the
    /// policy verdict, from the objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyVerdicts>,
    /// The Service translation the datapath makes of the packet
    /// (`--services bpf`, a frontend's address and port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTranslation>,
}

/// A packet to a Service frontend, as the datapath translates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTranslation {
    /// `namespace/name` of the Service (from the plan in force).
    pub service: Option<String>,
    /// `address:port/protocol`.
    pub frontend: String,
    /// The backend the explanation follows (`address:port`), `None` for a
    /// frontend without one (the datapath drops: `service_no_backend`).
    pub backend: Option<String>,
    /// Every backend slot of the frontend in the datapath, in order: a new
    /// connection draws one at random (or its client's affine one).
    pub backends: Vec<String>,
}

/// NetworkPolicy's verdict on an explained connection: the sender's egress
/// and the receiver's ingress (when the receiver is a pod the cluster
/// knows). Allowed when both allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdicts {
    pub egress: PolicySide,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<PolicySide>,
}

/// One side of [`PolicyVerdicts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySide {
    /// The pod judged, `namespace/name` (`None`: the sender names no pod,
    /// so no policy can select it).
    pub pod: Option<String>,
    pub evaluation: crate::policy::Evaluation,
}

impl PolicySide {
    /// One line: the pod and the verdict with the policy and rule that
    /// decided.
    #[must_use]
    pub fn describe(&self) -> String {
        use crate::policy::Evaluation;
        let pod = self.pod.as_deref().unwrap_or("(a pod without a name)");
        match &self.evaluation {
            Evaluation::NotSelected => format!("{pod}: allowed, no policy selects the pod"),
            Evaluation::Allowed(rules) if rules.is_empty() => {
                format!("{pod}: allowed, from the pod's own node (always allowed)")
            }
            Evaluation::Allowed(rules) => format!(
                "{pod}: allowed by {}",
                rules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Evaluation::Denied { selecting } => format!(
                "{pod}: DENIED, selected by {} and no rule allows it",
                selecting
                    .iter()
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}
