//! NetworkPolicy in user space: the Kubernetes semantics straight from the
//! objects ([`evaluate`], the reference), their compilation into the
//! datapath's maps for this node's endpoints ([`compile`] into a
//! [`PolicyPlan`], whose [`PolicyPlan::lookup`] does what the datapath
//! does), the pod identities the maps use ([`IdentityAllocator`]) and what
//! `podnetctl policy POD` shows ([`pod_policies`]). No I/O: the agent feeds
//! the cluster model in and writes the plan's entries to the maps.
//!
//! Semantic choices beyond the Kubernetes text:
//! - An `ipBlock` matches pod IPs too (as the upstream e2e suite expects).
//! - Every namespace carries `kubernetes.io/metadata.name: <name>` for
//!   namespace selectors, as the API server sets it, even when the stored
//!   Namespace lacks it or there is no Namespace object.
//! - A local endpoint without a Pod object has no labels: the policies of
//!   its namespace whose pod selector selects an empty label set select it
//!   (a default-deny still applies), and its named ports resolve to nothing.
//! - A peer address with no Pod object (or one of this node's addresses) is
//!   not a pod: only rules without peers and `ipBlock`s match it.
//! - Egress named ports resolve per peer identity (the union of the
//!   numbers the identity's pods give the name): when pods of one identity
//!   map one name to different numbers, each of them is allowed every one
//!   of those numbers (as Cilium does). With an `ipBlock` peer the name
//!   resolves per pod address in the block, exactly.
//! - A peer with neither selector nor `ipBlock` (which validation refuses)
//!   and an IPv6 `ipBlock` match nothing; a NetworkPolicy without `spec`
//!   is the empty spec (every pod of its namespace, ingress denied).
//! - Rule numbers go over every rule of every policy in key order (ingress
//!   rules, then egress ones), whether or not it selects a local pod; when
//!   two rules give the same trie key the lowest number stays.
//! - CIDR-set identities are numbered per compile, from
//!   `IDENTITY_FIRST_CIDR_SET`, per (endpoint, direction, distinct set),
//!   in endpoint address order: the same input gives the same numbers.

mod cidr;
mod compile;
mod explain;
mod identity;
mod ports;
mod reference;
mod spec;

#[cfg(test)]
mod tests;

use std::{fmt, net::Ipv4Addr};

use podnet_common::policy::{DIRECTION_EGRESS, DIRECTION_INGRESS};
use serde::{Deserialize, Serialize};

use crate::model::cluster::{ClusterModel, PodEndpointRecord};

pub use compile::{PolicyPlan, compile};
pub use explain::{DirectionPolicies, PodPolicies, RuleSummary, SelectingPolicy, pod_policies};
pub use identity::{IdentityAllocator, IdentityLabels};
pub use ports::{SCTP, TCP, UDP, port_range_prefixes, protocol_name};
pub use reference::{Evaluation, evaluate};

/// The `ENDPOINT_F_POLICY_*` bits of pod `namespace/name`: the directions
/// some policy selects it for (no labels when the Pod is unknown). What a
/// new endpoint starts with before its rules are compiled: isolated, so a
/// pod a policy selects is never open, not even for its first packets.
#[must_use]
pub fn selection_flags(model: &ClusterModel, namespace: &str, name: &str) -> u32 {
    let no_labels = std::collections::BTreeMap::new();
    let labels = model.pod_labels(namespace, name).unwrap_or(&no_labels);
    spec::policies(model, Some(namespace))
        .filter(|p| p.selects(namespace, labels))
        .fold(0, |flags, p| {
            let mut flags = flags;
            if p.applies(Direction::Ingress) {
                flags |= podnet_common::endpoint::ENDPOINT_F_POLICY_INGRESS;
            }
            if p.applies(Direction::Egress) {
                flags |= podnet_common::endpoint::ENDPOINT_F_POLICY_EGRESS;
            }
            flags
        })
}

/// A pod this node runs: policies are compiled for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub ip: Ipv4Addr,
    pub namespace: String,
    pub name: String,
}

/// What policies are compiled from.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    /// The cluster objects (Namespaces, Pods, NetworkPolicies).
    pub model: &'a ClusterModel,
    /// Every pod IP of the cluster, as the nodes publish them. When two
    /// records give one IP, the first with a Pod object counts.
    pub pods: Vec<&'a PodEndpointRecord>,
    /// This node's pods.
    pub local: &'a [LocalEndpoint],
    /// This node's own addresses.
    pub host_addresses: &'a [Ipv4Addr],
}

/// A connection's direction, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Self; 2] = [Self::Ingress, Self::Egress];

    /// The datapath's `DIRECTION_*`.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Ingress => DIRECTION_INGRESS,
            Self::Egress => DIRECTION_EGRESS,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// One rule of one policy: `spec.ingress[index]` or `spec.egress[index]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace, self.policy, self.direction, self.index
        )
    }
}
