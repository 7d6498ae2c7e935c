//! The cluster objects an agent holds in memory, fed by whatever watches
//! them (the datastore's watch today, a Kubernetes API watcher later): a
//! re-list replaces everything, then events apply in revision order, and
//! an event the view already reflects is ignored, so that a watch resumed
//! from an older revision applies nothing twice.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
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
    object: ClusterObject,
    /// The revision of the event (or list) that put it.
    revision: Revision,
}

/// The objects by key, and how far the view has got.
#[derive(Debug, Clone, Default)]
pub struct ClusterModel {
    objects: BTreeMap<ObjectKey, Entry>,
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
            .map(|object| (object.key(), Entry { object, revision }))
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

    pub fn get(&self, key: &ObjectKey) -> Option<&ClusterObject> {
        self.objects.get(key).map(|e| &e.object)
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

    /// The objects of `kind`, in one namespace or all, in key order.
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
            .map(|(_, e)| &e.object)
    }

    /// A Namespace's labels; `None` when there is no such Namespace.
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.get(&ObjectKey::cluster(Kind::Namespace, name))
            .map(ClusterObject::labels)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.get(&ObjectKey::namespaced(Kind::Pod, namespace, name)) {
            Some(ClusterObject::Pod(pod)) => Some(pod),
            _ => None,
        }
    }

    /// A pod's labels, from its Pod object; `None` without one (an endpoint
    /// whose pod has no object has no labels).
    pub fn pod_labels(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, String>> {
        self.get(&ObjectKey::namespaced(Kind::Pod, namespace, name))
            .map(ClusterObject::labels)
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
        let spec = self.pod(namespace, pod)?.spec.as_ref()?;
        spec.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(port_name)
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0)
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
            let ClusterObject::EndpointSlice(slice) = &entry.object else {
                continue;
            };
            let Some(service) = entry.object.labels().get(SERVICE_NAME_LABEL) else {
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
        let names: Vec<&str> = model
            .objects(Kind::Pod, None)
            .map(ClusterObject::name)
            .collect();
        assert_eq!(names, ["a", "a"]);
        assert_eq!(model.objects(Kind::Pod, Some("y")).count(), 1);
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
