//! The Kubernetes semantics read straight from the objects, for one
//! connection: the reference the compiled maps are checked against, and
//! what `explain` says.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::model::cluster::{
    selector_matches,
    types::{IntOrString, NetworkPolicyPeer, NetworkPolicyPort},
};

use super::{
    Direction, LocalEndpoint, PolicyInput, RuleRef, cidr,
    ports::protocol_number,
    spec::{self, PeerPod, Policy},
};

/// Whether the policies let a connection through, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Evaluation {
    /// No policy selects the endpoint for this direction: allowed.
    NotSelected,
    /// Every rule that allows it. Ingress from this node's own addresses
    /// is always allowed, by a rule or not (then the list is empty).
    Allowed(Vec<RuleRef>),
    /// The endpoint is isolated and no rule allows it: the selecting
    /// policies (namespace, name).
    Denied { selecting: Vec<(String, String)> },
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSelected => {
                f.write_str("allowed: no policy isolates the pod for this direction")
            }
            Self::Allowed(rules) if rules.is_empty() => {
                f.write_str("allowed: traffic from the pod's own node is always allowed")
            }
            Self::Allowed(rules) => {
                let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
                write!(f, "allowed by {}", rules.join(", "))
            }
            Self::Denied { selecting } => {
                let policies: Vec<String> = selecting
                    .iter()
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .collect();
                write!(
                    f,
                    "denied: isolated by {} and no rule allows it",
                    policies.join(", ")
                )
            }
        }
    }
}

impl Evaluation {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Self::Denied { .. })
    }
}

/// The verdict on a connection of local `endpoint` in `direction` with
/// `peer` (`port`: the destination's port, 0 for a protocol without
/// ports), straight from the objects.
pub fn evaluate(
    input: &PolicyInput,
    endpoint: &LocalEndpoint,
    direction: Direction,
    peer: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Evaluation {
    let model = input.model;
    let no_labels = BTreeMap::new();
    let labels = model
        .pod_labels(&endpoint.namespace, &endpoint.name)
        .unwrap_or(&no_labels);
    let selecting: Vec<Policy> = spec::policies(model, Some(&endpoint.namespace))
        .filter(|p| p.applies(direction) && p.selects(&endpoint.namespace, labels))
        .collect();
    if selecting.is_empty() {
        return Evaluation::NotSelected;
    }
    let peer_pod = spec::pods_by_ip(input).get(&peer).copied();
    let connection = Connection {
        input,
        endpoint,
        direction,
        peer,
        peer_pod,
        protocol,
        port,
    };
    let mut allowing = Vec::new();
    for policy in &selecting {
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            let peers = rule
                .peers
                .is_none_or(|peers| peers.iter().any(|p| connection.peer_matches(policy, p)));
            let ports = rule
                .ports
                .is_none_or(|ports| ports.iter().any(|p| connection.port_matches(p)));
            if peers && ports {
                allowing.push(RuleRef {
                    namespace: policy.namespace.to_owned(),
                    policy: policy.name.to_owned(),
                    direction,
                    index,
                });
            }
        }
    }
    let from_node = direction == Direction::Ingress && input.host_addresses.contains(&peer);
    if allowing.is_empty() && !from_node {
        Evaluation::Denied {
            selecting: selecting
                .iter()
                .map(|p| (p.namespace.to_owned(), p.name.to_owned()))
                .collect(),
        }
    } else {
        Evaluation::Allowed(allowing)
    }
}

struct Connection<'a, 'i> {
    input: &'a PolicyInput<'i>,
    endpoint: &'a LocalEndpoint,
    direction: Direction,
    peer: Ipv4Addr,
    peer_pod: Option<PeerPod<'i>>,
    protocol: u8,
    port: u16,
}

impl Connection<'_, '_> {
    fn peer_matches(&self, policy: &Policy, peer: &NetworkPolicyPeer) -> bool {
        if let Some(block) = &peer.ip_block {
            return cidr::block_contains(
                &block.cidr,
                block.except.as_deref().unwrap_or_default(),
                self.peer,
            );
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            return false;
        }
        let Some(pod) = self.peer_pod else {
            return false;
        };
        let namespace = match &peer.namespace_selector {
            None => pod.namespace == policy.namespace,
            Some(selector) => selector_matches(
                selector,
                &spec::namespace_labels(self.input.model, pod.namespace),
            ),
        };
        namespace
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, pod.labels))
    }

    fn port_matches(&self, port: &NetworkPolicyPort) -> bool {
        if protocol_number(port.protocol.as_deref()) != Some(self.protocol) {
            return false;
        }
        match &port.port {
            None => true,
            Some(IntOrString::Int(first)) => {
                let last = port.end_port.unwrap_or(*first);
                (*first..=last).contains(&i32::from(self.port))
            }
            Some(IntOrString::String(name)) => {
                let protocol = port.protocol.as_deref().unwrap_or("TCP");
                let model = self.input.model;
                let number = match self.direction {
                    Direction::Ingress => model.named_port(
                        &self.endpoint.namespace,
                        &self.endpoint.name,
                        name,
                        protocol,
                    ),
                    Direction::Egress => self
                        .peer_pod
                        .and_then(|pod| model.named_port(pod.namespace, pod.name, name, protocol)),
                };
                number == Some(self.port)
            }
        }
    }
}
