//! Reading NetworkPolicy objects: which policies there are, their types,
//! whom they select, their rules; the pods peers can be.

use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr, sync::LazyLock};

use crate::model::cluster::{
    ClusterModel, ClusterObject, Kind, selector_matches,
    types::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
};

use super::{Direction, PolicyInput};

/// The label the API server puts on every Namespace.
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One NetworkPolicy and the directions it applies to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a NetworkPolicySpec,
    pub ingress: bool,
    pub egress: bool,
}

impl<'a> Policy<'a> {
    pub fn applies(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }

    /// Whether it selects a pod of `namespace` with `labels`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && self
                .spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, labels))
    }

    /// The rules of a direction (none when the policy does not apply to
    /// it): peers and ports, `None` for every peer / every port.
    pub fn rules(&self, direction: Direction) -> Vec<Rule<'a>> {
        if !self.applies(direction) {
            return Vec::new();
        }
        match direction {
            Direction::Ingress => self
                .spec
                .ingress
                .iter()
                .flatten()
                .map(|r| Rule {
                    peers: nonempty(r.from.as_ref()),
                    ports: nonempty(r.ports.as_ref()),
                })
                .collect(),
            Direction::Egress => self
                .spec
                .egress
                .iter()
                .flatten()
                .map(|r| Rule {
                    peers: nonempty(r.to.as_ref()),
                    ports: nonempty(r.ports.as_ref()),
                })
                .collect(),
        }
    }
}

/// A list that is there and not empty.
fn nonempty<T>(list: Option<&Vec<T>>) -> Option<&[T]> {
    list.filter(|l| !l.is_empty()).map(Vec::as_slice)
}

/// A rule: `None` peers is every peer, `None` ports every port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rule<'a> {
    pub peers: Option<&'a [NetworkPolicyPeer]>,
    pub ports: Option<&'a [NetworkPolicyPort]>,
}

/// The directions a policy applies to: its `policyTypes`, or (absent or
/// empty, as the API server defaults them) Ingress, plus Egress when it
/// has egress rules.
pub(crate) fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

static EMPTY_SPEC: LazyLock<NetworkPolicySpec> = LazyLock::new(NetworkPolicySpec::default);

fn policy_of(object: &ClusterObject) -> Option<Policy<'_>> {
    let ClusterObject::NetworkPolicy(policy) = object else {
        return None;
    };
    let NetworkPolicy { metadata, spec, .. } = policy.as_ref();
    // The API server defaults an absent spec to `{}`: every pod of the
    // namespace, isolated for ingress.
    let spec = spec.as_ref().unwrap_or(&EMPTY_SPEC);
    let (ingress, egress) = policy_types(spec);
    Some(Policy {
        namespace: metadata.namespace.as_deref().unwrap_or_default(),
        name: metadata.name.as_deref().unwrap_or_default(),
        spec,
        ingress,
        egress,
    })
}

/// The NetworkPolicies of one namespace or all, in key order.
pub(crate) fn policies<'a>(
    model: &'a ClusterModel,
    namespace: Option<&'a str>,
) -> impl Iterator<Item = Policy<'a>> + 'a {
    model
        .objects(Kind::NetworkPolicy, namespace)
        .filter_map(policy_of)
}

/// A namespace's labels for namespace selectors: its object's, plus the
/// name label the API server sets.
pub(crate) fn namespace_labels<'a>(
    model: &'a ClusterModel,
    namespace: &str,
) -> Cow<'a, BTreeMap<String, String>> {
    match model.namespace_labels(namespace) {
        Some(labels) if labels.get(NAMESPACE_NAME_LABEL).map(String::as_str) == Some(namespace) => {
            Cow::Borrowed(labels)
        }
        labels => {
            let mut labels = labels.cloned().unwrap_or_default();
            labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
            Cow::Owned(labels)
        }
    }
}

/// A pod a peer address can be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// The pods by IP: the first record of an IP whose Pod object is known;
/// this node's own addresses are never pods.
pub(crate) fn pods_by_ip<'a>(input: &PolicyInput<'a>) -> BTreeMap<Ipv4Addr, PeerPod<'a>> {
    let mut pods = BTreeMap::new();
    for record in &input.pods {
        if pods.contains_key(&record.ip) || input.host_addresses.contains(&record.ip) {
            continue;
        }
        // A Pod bound to a node (`spec.nodeName`, as the scheduler sets
        // it) is only that node's to publish: another node's record naming
        // it gives the address nothing of the pod's identity.
        let bound_elsewhere = input
            .model
            .pod(&record.namespace, &record.name)
            .and_then(|pod| pod.spec.as_ref())
            .and_then(|spec| spec.node_name.as_deref())
            .is_some_and(|node| node != record.node);
        if bound_elsewhere {
            continue;
        }
        if let Some(labels) = input.model.pod_labels(&record.namespace, &record.name) {
            pods.insert(
                record.ip,
                PeerPod {
                    namespace: &record.namespace,
                    name: &record.name,
                    labels,
                },
            );
        }
    }
    pods
}
