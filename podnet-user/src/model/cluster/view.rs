//! The cluster objects an agent holds in memory, fed by whatever watches
//! them (the datastore's watch today, a Kubernetes API watcher later): a
//! re-list replaces everything, then events apply in revision order, and
//! an event the view already reflects is ignored, so that a watch resumed
//! from an older revision applies nothing twice.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    hash::Hash,
    net::Ipv4Addr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    kind::{ALL_KINDS, Kind, ObjectKey},
    object::ClusterObject,
    types::{EndpointSlice, Pod, Service},
};

/// A datastore revision: etcd's (the store-wide counter every write
/// raises, which is also `resourceVersion`) or the nodes-file store's.
pub type Revision = i64;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One change, as a watch reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    Put {
        key: ObjectKey,
        object: ClusterObject,
        revision: Revision,
    },
    Delete {
        key: ObjectKey,
        revision: Revision,
    },
}

impl ModelEvent {
    pub fn revision(&self) -> Revision {
        match self {
            Self::Put { revision, .. } | Self::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &ObjectKey {
        match self {
            Self::Put { key, .. } | Self::Delete { key, .. } => key,
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The view changed.
    Changed,
    /// The view already reflects this event or a later one: ignored.
    Stale,
    /// A delete of an object the view does not hold.
    Absent,
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    object: Held,
    /// The revision of the event (or list) that put it.
    revision: Revision,
}

/// An object as the view holds it.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    Object(ClusterObject),
    /// A Pod, reduced to what podnet reads of it.
    Pod(PodFacts),
}

/// What podnet reads of a Pod, all the view keeps of one. A Pod as its API
/// type is about 5 KB in memory (`Pod` is 2.4 KB and each `Container` 2.3
/// KB inline, before any string), 750 MB for the 150,000 pods of a
/// 5,000-node cluster (BENCHMARKS.md, "Cluster scale"). Label sets, port
/// lists and node names are shared between the pods that have equal ones
/// (a Deployment's replicas, a node's pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub labels: Arc<BTreeMap<String, String>>,
    /// `spec.nodeName`: the node the pod is bound to.
    pub node_name: Option<Arc<str>>,
    /// The named container ports, in container order.
    pub ports: Arc<[NamedPort]>,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: String,
    /// `TCP` when the port gives none.
    pub protocol: String,
    pub port: u16,
}

/// One shared copy of each value (see [`PodFacts`]). Values no pod holds
/// any more are dropped when the set has doubled since the last sweep.
#[derive(Debug)]
struct Shared<T: ?Sized + Eq + Hash> {
    values: HashSet<Arc<T>>,
    swept_at: usize,
}

// By hand: the derives would ask `T: Default` / `T: Clone` of `str`.
impl<T: ?Sized + Eq + Hash> Default for Shared<T> {
    fn default() -> Self {
        Self {
            values: HashSet::new(),
            swept_at: 0,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self {
            values: self.values.clone(),
            swept_at: self.swept_at,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Shared<T> {
    fn get(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(held) = self.values.get(value) {
            return Arc::clone(held);
        }
        if self.values.len() >= 2 * self.swept_at + 64 {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.swept_at = self.values.len();
        }
        let held = make();
        self.values.insert(Arc::clone(&held));
        held
    }
}

/// The shared values of every [`PodFacts`] of a view.
#[derive(Debug, Clone, Default)]
struct PodShares {
    labels: Shared<BTreeMap<String, String>>,
    ports: Shared<[NamedPort]>,
    nodes: Shared<str>,
}

impl PodShares {
    fn facts(&mut self, pod: &Pod) -> PodFacts {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let ports: Vec<NamedPort> = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
                })
            })
            .collect();
        let node_name = spec
            .and_then(|s| s.node_name.as_deref())
            .map(|n| self.nodes.get(n, || Arc::from(n)));
        PodFacts {
            labels: self.labels.get(&labels, || Arc::new(labels.clone())),
            ports: self.ports.get(&ports, || Arc::from(ports.as_slice())),
            node_name,
        }
    }

    fn hold(&mut self, object: ClusterObject) -> Held {
        match object {
            ClusterObject::Pod(pod) => Held::Pod(self.facts(&pod)),
            other => Held::Object(other),
        }
    }
}

/// The objects by key, and how far the view has got.
#[derive(Debug, Clone, Default)]
pub struct ClusterModel {
    objects: BTreeMap<ObjectKey, Entry>,
    shares: PodShares,
    /// The highest revision applied (of a list or an event).
    revision: Revision,
    /// The revision of the last re-list: every event at or below it is in it.
    listed: Revision,
}

impl ClusterModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest revision applied: how far behind the datastore this view is.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Everything, as a list at `revision` says it is. A list older than
    /// what the view holds is ignored (`None`); otherwise the keys whose
    /// object appeared, changed or went away.
    pub fn replace_all(
        &mut self,
        objects: impl IntoIterator<Item = ClusterObject>,
        revision: Revision,
    ) -> Option<BTreeSet<ObjectKey>> {
        if revision < self.revision {
            return None;
        }
        let fresh: BTreeMap<ObjectKey, Entry> = objects
            .into_iter()
            .map(|object| {
                let key = object.key();
                let object = self.shares.hold(object);
                (key, Entry { object, revision })
            })
            .collect();
        let mut changed: BTreeSet<ObjectKey> = self
            .objects
            .iter()
            .filter(|(key, old)| fresh.get(*key).is_none_or(|new| new.object != old.object))
            .map(|(key, _)| key.clone())
            .collect();
        changed.extend(
            fresh
                .keys()
                .filter(|key| !self.objects.contains_key(*key))
                .cloned(),
        );
        self.objects = fresh;
        self.revision = revision;
        self.listed = revision;
        Some(changed)
    }

    /// One watch event. Events of one revision (one transaction) may touch
    /// several keys, so a revision equal to the view's still applies to a
    /// key it has not put at that revision; anything older is stale.
    pub fn apply(&mut self, event: ModelEvent) -> Applied {
        let revision = event.revision();
        let held = self.objects.get(event.key()).map(|e| e.revision);
        if revision < self.revision
            || revision <= self.listed
            || held.is_some_and(|r| revision <= r)
        {
            return Applied::Stale;
        }
        self.revision = revision;
        match event {
            ModelEvent::Put {
                key,
                object,
                revision,
            } => {
                let object = self.shares.hold(object);
                self.objects.insert(key, Entry { object, revision });
                Applied::Changed
            }
            ModelEvent::Delete { key, .. } => {
                if self.objects.remove(&key).is_some() {
                    Applied::Changed
                } else {
                    Applied::Absent
                }
            }
        }
    }

    /// The object at `key`. Pods are held as [`PodFacts`] only: see
    /// [`Self::pod`].
    pub fn get(&self, key: &ObjectKey) -> Option<&ClusterObject> {
        match &self.objects.get(key)?.object {
            Held::Object(object) => Some(object),
            Held::Pod(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// How many objects of each kind (every kind, zero included).
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut counts: BTreeMap<Kind, usize> = ALL_KINDS.into_iter().map(|k| (k, 0)).collect();
        for key in self.objects.keys() {
            *counts.entry(key.kind).or_default() += 1;
        }
        counts
    }

    /// The objects of `kind`, in one namespace or all, in key order (none
    /// for Pods: see [`Self::pod`]).
    pub fn objects<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a ClusterObject> + 'a {
        let start = ObjectKey {
            kind,
            namespace: namespace.filter(|_| kind.namespaced()).map(str::to_owned),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(key, _)| {
                key.kind == kind
                    && (namespace.is_none()
                        || !kind.namespaced()
                        || key.namespace.as_deref() == namespace)
            })
            .filter_map(|(_, e)| match &e.object {
                Held::Object(object) => Some(object),
                Held::Pod(_) => None,
            })
    }

    /// A Namespace's labels; `None` when there is no such Namespace.
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.get(&ObjectKey::cluster(Kind::Namespace, name))
            .map(ClusterObject::labels)
    }

    /// Every key held, in key order.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.objects.keys()
    }

    /// Every Pod as the view holds it, in key order.
    pub fn pods(&self) -> impl Iterator<Item = (&ObjectKey, &PodFacts)> {
        self.objects.iter().filter_map(|(key, e)| match &e.object {
            Held::Pod(facts) => Some((key, facts)),
            Held::Object(_) => None,
        })
    }

    /// What the view holds of a Pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        match &self
            .objects
            .get(&ObjectKey::namespaced(Kind::Pod, namespace, name))?
            .object
        {
            Held::Pod(facts) => Some(facts),
            Held::Object(_) => None,
        }
    }

    /// A pod's labels, from its Pod object; `None` without one (an endpoint
    /// whose pod has no object has no labels).
    pub fn pod_labels(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, String>> {
        self.pod(namespace, name).map(|p| p.labels.as_ref())
    }

    /// The number of a pod's named container port for `protocol` (`TCP`
    /// when a port gives none), as a NetworkPolicy or a Service's
    /// targetPort names it. The first container that has it wins.
    pub fn named_port(
        &self,
        namespace: &str,
        pod: &str,
        port_name: &str,
        protocol: &str,
    ) -> Option<u16> {
        self.pod(namespace, pod)?
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
            .map(|p| p.port)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.get(&ObjectKey::namespaced(Kind::Service, namespace, name)) {
            Some(ClusterObject::Service(service)) => Some(service),
            _ => None,
        }
    }

    /// The Services of one namespace or all.
    pub fn services<'a>(
        &'a self,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        self.objects(Kind::Service, namespace)
            .filter_map(|o| match o {
                ClusterObject::Service(s) => Some(s.as_ref()),
                _ => None,
            })
    }

    /// The EndpointSlices of a Service: those in its namespace labelled
    /// `kubernetes.io/service-name: <service>`.
    pub fn endpoint_slices<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.objects(Kind::EndpointSlice, Some(namespace))
            .filter_map(move |o| match o {
                ClusterObject::EndpointSlice(s)
                    if o.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service) =>
                {
                    Some(s.as_ref())
                }
                _ => None,
            })
    }
}

impl ClusterModel {
    /// Every Service's EndpointSlices (as [`Self::endpoint_slices`] gives
    /// them), keyed by (namespace, Service name), in one pass: what a
    /// compiler of every Service needs (one lookup per Service, where
    /// [`Self::endpoint_slices`] scans the namespace's slices each time,
    /// quadratic at 10,000 Services).
    #[must_use]
    pub fn endpoint_slices_by_service(&self) -> BTreeMap<(&str, &str), Vec<&EndpointSlice>> {
        let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        let slices = self
            .objects
            .iter()
            .filter(|(key, _)| key.kind == Kind::EndpointSlice);
        for (key, entry) in slices {
            let Held::Object(object @ ClusterObject::EndpointSlice(slice)) = &entry.object else {
                continue;
            };
            let Some(service) = object.labels().get(SERVICE_NAME_LABEL) else {
                continue;
            };
            // The key's namespace, as `endpoint_slices` selects by.
            let namespace = key.namespace.as_deref().unwrap_or_default();
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice.as_ref());
        }
        by_service
    }
}

/// What an agent publishes for each pod it holds, so that every node can
/// map the pod's IP to its namespace and name (and, through the Pod
/// object, its labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEndpointRecord {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::decode;

    const OBJECTS: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers:
  - name: web
    image: i
    ports:
    - {name: dns, containerPort: 5353, protocol: UDP}
    - {name: http, containerPort: 8080}
  - name: side
    image: i
    ports:
    - {name: dns, containerPort: 53}
    - {name: metrics, containerPort: 9090}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, namespace: x, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-3, namespace: y, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
";

    fn listed(revision: Revision) -> ClusterModel {
        let mut model = ClusterModel::new();
        let changed = model.replace_all(decode(OBJECTS).expect("decodes"), revision);
        assert_eq!(changed.map(|c| c.len()), Some(9));
        model
    }

    fn pod(namespace: &str, name: &str, label: &str) -> ClusterObject {
        decode(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{v: '{label}'}}}}\n"
        ))
        .expect("decodes")
        .remove(0)
    }

    fn put(object: ClusterObject, revision: Revision) -> ModelEvent {
        ModelEvent::Put {
            key: object.key(),
            object,
            revision,
        }
    }

    #[test]
    fn counts_and_queries() {
        let model = listed(10);
        assert_eq!(model.revision(), 10);
        assert_eq!(model.len(), 9);
        let counts: Vec<usize> = model.counts().into_values().collect();
        assert_eq!(counts, [2, 2, 0, 1, 4]);
        assert_eq!(
            model
                .namespace_labels("x")
                .and_then(|l| l.get("ns"))
                .map(String::as_str),
            Some("x")
        );
        assert_eq!(model.namespace_labels("y").map(BTreeMap::len), Some(0));
        assert_eq!(model.namespace_labels("z"), None);
        assert_eq!(
            model
                .pod_labels("x", "a")
                .and_then(|l| l.get("pod"))
                .map(String::as_str),
            Some("a")
        );
        assert_eq!(model.pod_labels("x", "b"), None);
        assert_eq!(model.pod_labels("z", "a"), None);
        let names: Vec<&str> = model.pods().map(|(key, _)| key.name.as_str()).collect();
        assert_eq!(names, ["a", "a"]);
        assert_eq!(
            model.objects(Kind::Pod, None).count(),
            0,
            "Pods are held as facts"
        );
        assert_eq!(
            model.objects(Kind::Namespace, Some("x")).count(),
            2,
            "cluster-scoped: all"
        );
        assert_eq!(model.services(Some("x")).count(), 1);
        assert_eq!(model.services(Some("y")).count(), 0);
        assert!(model.service("x", "web").is_some());
        assert!(model.service("y", "web").is_none());
        let slices: Vec<&str> = model
            .endpoint_slices("x", "web")
            .map(|s| s.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(slices, ["web-1", "web-2"]);
        assert_eq!(model.endpoint_slices("y", "web").count(), 1);
        assert_eq!(model.endpoint_slices("y", "other").count(), 0);
    }

    #[test]
    fn pods_are_held_as_facts_sharing_equal_labels_ports_and_nodes() {
        let replica = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: web}}}}\n\
                 spec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: i\n    ports:\n    \
                 - {{name: http, containerPort: 8080}}\n    - {{containerPort: 9000}}\n---\n"
            )
        };
        let text: String = ["r1", "r2", "r3"].iter().map(|n| replica(n)).collect();
        let mut model = ClusterModel::new();
        model.replace_all(decode(&text).expect("decodes"), 1);
        let (a, b) = (
            model.pod("x", "r1").expect("r1"),
            model.pod("x", "r3").expect("r3"),
        );
        assert!(Arc::ptr_eq(&a.labels, &b.labels), "one label set");
        assert!(Arc::ptr_eq(&a.ports, &b.ports), "one port list");
        assert_eq!(a.node_name.as_deref(), Some("n1"));
        assert_eq!(
            a.ports.as_ref(),
            [NamedPort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8080
            }],
            "named ports only"
        );
        assert_eq!(model.named_port("x", "r2", "http", "TCP"), Some(8080));
        // One pod relabelled 1,000 times: the label sets no pod holds any
        // more are swept, not kept.
        for i in 0..1_000 {
            model.apply(put(pod("x", "churn", &format!("v{i}")), 2 + i));
        }
        assert!(
            model.shares.labels.values.len() < 200,
            "{} label sets held",
            model.shares.labels.values.len()
        );
        assert_eq!(
            model
                .pod_labels("x", "churn")
                .and_then(|l| l.get("v"))
                .map(String::as_str),
            Some("v999")
        );
    }

    #[test]
    fn named_ports_resolve_by_name_and_protocol() {
        let model = listed(1);
        assert_eq!(model.named_port("x", "a", "http", "TCP"), Some(8080));
        assert_eq!(model.named_port("x", "a", "http", "UDP"), None);
        // The same name in two containers, for two protocols.
        assert_eq!(model.named_port("x", "a", "dns", "UDP"), Some(5353));
        assert_eq!(model.named_port("x", "a", "dns", "TCP"), Some(53));
        assert_eq!(model.named_port("x", "a", "metrics", "TCP"), Some(9090));
        assert_eq!(model.named_port("x", "a", "nope", "TCP"), None);
        assert_eq!(model.named_port("y", "a", "http", "TCP"), None);
        assert_eq!(model.named_port("x", "b", "http", "TCP"), None);
    }

    #[test]
    fn events_apply_once_in_revision_order() {
        let mut model = listed(10);
        // At or below the list's revision: already in the list.
        assert_eq!(model.apply(put(pod("x", "b", "1"), 10)), Applied::Stale);
        assert_eq!(model.pod_labels("x", "b"), None);
        assert_eq!(model.apply(put(pod("x", "b", "1"), 11)), Applied::Changed);
        assert_eq!(
            model
                .pod_labels("x", "b")
                .and_then(|l| l.get("v"))
                .map(String::as_str),
            Some("1")
        );
        // The same event again (a resumed watch): nothing applied twice.
        assert_eq!(model.apply(put(pod("x", "b", "2"), 11)), Applied::Stale);
        assert_eq!(
            model
                .pod_labels("x", "b")
                .and_then(|l| l.get("v"))
                .map(String::as_str),
            Some("1")
        );
        // One transaction touching two keys: both at the same revision.
        assert_eq!(model.apply(put(pod("x", "c", "1"), 12)), Applied::Changed);
        assert_eq!(model.apply(put(pod("x", "d", "1"), 12)), Applied::Changed);
        // Older than the view: refused even for a key it does not hold.
        assert_eq!(model.apply(put(pod("x", "e", "1"), 11)), Applied::Stale);
        let delete = |revision| ModelEvent::Delete {
            key: ObjectKey::namespaced(Kind::Pod, "x", "b"),
            revision,
        };
        // A delete in the same transaction as those puts still applies; a
        // replay of it finds nothing, and a replay after a later event is stale.
        assert_eq!(model.apply(delete(12)), Applied::Changed);
        assert_eq!(model.apply(delete(12)), Applied::Absent);
        assert_eq!(model.apply(put(pod("x", "b", "3"), 14)), Applied::Changed);
        assert_eq!(model.apply(delete(12)), Applied::Stale);
        assert_eq!(
            model.apply(delete(14)),
            Applied::Stale,
            "put at the same revision"
        );
        assert_eq!(
            model
                .pod_labels("x", "b")
                .and_then(|l| l.get("v"))
                .map(String::as_str),
            Some("3")
        );
        assert_eq!(model.apply(delete(15)), Applied::Changed);
        assert_eq!(model.pod_labels("x", "b"), None);
        assert_eq!(model.revision(), 15);
        assert_eq!(model.counts()[&Kind::Pod], 4);
    }

    #[test]
    fn a_relist_replaces_everything_and_reports_what_changed() {
        let mut model = listed(10);
        assert_eq!(model.apply(put(pod("x", "b", "1"), 11)), Applied::Changed);
        // An older list (a slow re-list racing a newer one) is ignored.
        assert_eq!(model.replace_all(Vec::new(), 9), None);
        assert_eq!(model.len(), 10);
        let mut objects = decode(OBJECTS).expect("decodes");
        objects.retain(|o| o.key() != ObjectKey::namespaced(Kind::Service, "x", "web"));
        objects.push(pod("x", "b", "2"));
        let changed = model.replace_all(objects, 20).expect("newer");
        let changed: Vec<String> = changed.iter().map(ToString::to_string).collect();
        assert_eq!(changed, ["pods/x/b", "services/x/web"]);
        assert_eq!(model.revision(), 20);
        assert_eq!(model.apply(put(pod("x", "b", "3"), 20)), Applied::Stale);
        assert_eq!(model.apply(put(pod("x", "b", "3"), 21)), Applied::Changed);
    }

    #[test]
    fn endpoint_records_are_camel_case_json() {
        let record = PodEndpointRecord {
            node: "node-1".into(),
            namespace: "x".into(),
            name: "a".into(),
            ip: Ipv4Addr::new(10, 244, 1, 5),
        };
        let json = serde_json::to_string(&record).expect("encodes");
        assert_eq!(
            json,
            r#"{"node":"node-1","namespace":"x","name":"a","ip":"10.244.1.5"}"#
        );
        assert_eq!(
            serde_json::from_str::<PodEndpointRecord>(&json).expect("decodes"),
            record
        );
        assert!(
            serde_json::from_str::<PodEndpointRecord>(
                r#"{"node":"n","namespace":"x","name":"a","ip":"fd00::1"}"#
            )
            .is_err()
        );
    }
}
