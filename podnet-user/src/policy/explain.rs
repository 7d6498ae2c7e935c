//! `podnetctl policy POD`: the policies selecting a pod and what their
//! rules allow, as data and as text.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::model::cluster::{
    format_selector,
    types::{IntOrString, NetworkPolicyPeer, NetworkPolicyPort},
};

use super::{
    Direction, PolicyInput,
    spec::{self, Policy},
};

/// The policies of one pod, both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPolicies {
    pub namespace: String,
    pub name: String,
    /// Its IP, when a node published one.
    pub ip: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub ingress: DirectionPolicies,
    pub egress: DirectionPolicies,
}

/// One direction of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionPolicies {
    pub direction: Direction,
    /// Selected by some policy: only what a rule allows gets through.
    pub isolated: bool,
    pub policies: Vec<SelectingPolicy>,
}

/// A policy selecting the pod, with its rules for the direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectingPolicy {
    pub namespace: String,
    pub name: String,
    pub rules: Vec<RuleSummary>,
}

/// A rule as text: its peers (empty: every peer) and ports (empty: every
/// port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSummary {
    pub index: usize,
    pub peers: Vec<String>,
    pub ports: Vec<String>,
}

/// The policies selecting pod `namespace/name` and their rules; `None`
/// when there is no such Pod.
pub fn pod_policies(input: &PolicyInput, namespace: &str, name: &str) -> Option<PodPolicies> {
    let model = input.model;
    model.pod(namespace, name)?;
    let labels = model
        .pod_labels(namespace, name)
        .cloned()
        .unwrap_or_default();
    let ip = input
        .local
        .iter()
        .find(|e| e.namespace == namespace && e.name == name)
        .map(|e| e.ip)
        .or_else(|| {
            input
                .pods
                .iter()
                .find(|r| r.namespace == namespace && r.name == name)
                .map(|r| r.ip)
        });
    let direction = |direction: Direction| {
        let policies: Vec<SelectingPolicy> = spec::policies(model, Some(namespace))
            .filter(|p| p.applies(direction) && p.selects(namespace, &labels))
            .map(|p| SelectingPolicy {
                namespace: p.namespace.to_owned(),
                name: p.name.to_owned(),
                rules: p
                    .rules(direction)
                    .iter()
                    .enumerate()
                    .map(|(index, rule)| RuleSummary {
                        index,
                        peers: rule
                            .peers
                            .iter()
                            .flat_map(|peers| peers.iter())
                            .map(|peer| describe_peer(&p, peer))
                            .collect(),
                        ports: rule
                            .ports
                            .iter()
                            .flat_map(|ports| ports.iter())
                            .map(|port| describe_port(input, namespace, name, direction, port))
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        DirectionPolicies {
            direction,
            isolated: !policies.is_empty(),
            policies,
        }
    };
    let ingress = direction(Direction::Ingress);
    let egress = direction(Direction::Egress);
    Some(PodPolicies {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        ip,
        labels,
        ingress,
        egress,
    })
}

fn describe_peer(policy: &Policy, peer: &NetworkPolicyPeer) -> String {
    if let Some(block) = &peer.ip_block {
        let except = block.except.as_deref().unwrap_or_default();
        return if except.is_empty() {
            block.cidr.clone()
        } else {
            format!("{} except {}", block.cidr, except.join(", "))
        };
    }
    let pods = peer.pod_selector.as_ref().map_or_else(
        || "every pod".to_owned(),
        |s| format!("pods {}", format_selector(s)),
    );
    match (&peer.pod_selector, &peer.namespace_selector) {
        (None, None) => "nothing (a peer without selectors)".to_owned(),
        (_, None) => format!("{pods} in namespace {}", policy.namespace),
        (_, Some(namespaces)) => format!("{pods} in namespaces {}", format_selector(namespaces)),
    }
}

fn describe_port(
    input: &PolicyInput,
    namespace: &str,
    name: &str,
    direction: Direction,
    port: &NetworkPolicyPort,
) -> String {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match (&port.port, port.end_port) {
        (None, _) => format!("{protocol} (every port)"),
        (Some(IntOrString::Int(first)), Some(last)) => format!("{protocol}/{first}-{last}"),
        (Some(IntOrString::Int(port)), None) => format!("{protocol}/{port}"),
        (Some(IntOrString::String(port_name)), _) => match direction {
            Direction::Ingress => {
                match input.model.named_port(namespace, name, port_name, protocol) {
                    Some(number) => format!("{protocol}/{port_name} ({number})"),
                    None => {
                        format!("{protocol}/{port_name} (not a port of this pod: allows nothing)")
                    }
                }
            }
            Direction::Egress => format!("{protocol}/{port_name} (as each peer names it)"),
        },
    }
}

impl fmt::Display for PodPolicies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}/{}", self.namespace, self.name)?;
        if let Some(ip) = self.ip {
            write!(f, " ({ip})")?;
        }
        writeln!(f)?;
        write!(f, "{}", self.ingress)?;
        write!(f, "{}", self.egress)
    }
}

impl fmt::Display for DirectionPolicies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.isolated {
            let count = self.policies.len();
            write!(
                f,
                "{}: isolated by {count} {} (only what a rule allows)",
                self.direction,
                if count == 1 { "policy" } else { "policies" }
            )?;
        } else {
            write!(
                f,
                "{}: not isolated (no policy selects it: everything allowed)",
                self.direction
            )?;
        }
        if self.direction == Direction::Ingress {
            write!(f, "; traffic from the pod's own node is always allowed")?;
        }
        writeln!(f)?;
        let (peer_word, every_peer) = match self.direction {
            Direction::Ingress => ("from", "from every peer"),
            Direction::Egress => ("to", "to every peer"),
        };
        for policy in &self.policies {
            if policy.rules.is_empty() {
                writeln!(
                    f,
                    "  {}/{}: no rules (allows nothing)",
                    policy.namespace, policy.name
                )?;
                continue;
            }
            writeln!(f, "  {}/{}:", policy.namespace, policy.name)?;
            for rule in &policy.rules {
                let peers = if rule.peers.is_empty() {
                    every_peer.to_owned()
                } else {
                    format!("{peer_word} {}", rule.peers.join("; "))
                };
                let ports = if rule.ports.is_empty() {
                    "every port".to_owned()
                } else {
                    rule.ports.join(", ")
                };
                writeln!(f, "    rule {}: {peers} on {ports}", rule.index)?;
            }
        }
        Ok(())
    }
}
