//! The cluster as the agent holds it: every object (a [`ClusterModel`])
//! and every node's endpoint records, kept from a [`Watcher`] of the
//! datastore (a list, then the changes from its revision; a list again
//! after a compaction, a lost watch or a reconnection).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    api::ClusterObjectsStatus,
    datastore::objects::{
        EndpointKey, ObjectEvent, ObjectPath, ObjectStore, ObjectStoreError, StoredEndpoint,
        StoredObject, Update, Watcher,
    },
    model::cluster::{
        ALL_KINDS, ClusterModel, ClusterObject, ModelEvent, ObjectKey, PodEndpointRecord,
    },
};

/// Every object and endpoint record, at one revision.
#[derive(Debug, Default)]
pub struct AgentView {
    model: ClusterModel,
    pods: BTreeMap<EndpointKey, PodEndpointRecord>,
    /// Pod IP -> the records naming it (two nodes may name one IP for a
    /// moment: a pod deleted on one, its address reused on the other).
    by_ip: BTreeMap<Ipv4Addr, BTreeSet<EndpointKey>>,
    /// The datastore revision applied (0: nothing yet).
    revision: i64,
    /// Lists after the first one.
    resyncs: u64,
    lists: u64,
    /// Keys whose value could not be read (left out).
    unreadable: BTreeSet<String>,
    connected: bool,
    last_error: Option<String>,
}

/// The model's key of a store path (`None`: not a kind the model knows).
fn object_key(path: &ObjectPath) -> Option<ObjectKey> {
    let kind = ALL_KINDS
        .into_iter()
        .find(|k| k.plural() == path.resource())?;
    match (kind.namespaced(), path.namespace()) {
        (true, Some(ns)) => Some(ObjectKey::namespaced(kind, ns, path.name())),
        (false, None) => Some(ObjectKey::cluster(kind, path.name())),
        _ => None,
    }
}

/// The object stored at `stored.path`, if it is one (its own key is its path).
fn decode_object(stored: &StoredObject) -> Result<(ObjectKey, ClusterObject), String> {
    let key = object_key(&stored.path).ok_or("not a path of a known kind")?;
    let object = ClusterObject::from_stored_json(&stored.value, stored.revision)
        .map_err(|e| e.to_string())?;
    if object.key() != key {
        return Err(format!("holds {}", object.key()));
    }
    Ok((key, object))
}

/// The record stored at `stored.key`, if it is one (naming its own key).
fn decode_record(stored: &StoredEndpoint) -> Result<PodEndpointRecord, String> {
    let record: PodEndpointRecord =
        serde_json::from_slice(&stored.value).map_err(|e| e.to_string())?;
    let key = &stored.key;
    if (
        record.node.as_str(),
        record.namespace.as_str(),
        record.name.as_str(),
    ) != (key.node(), key.namespace(), key.name())
    {
        return Err(format!(
            "names {}/{}/{}",
            record.node, record.namespace, record.name
        ));
    }
    Ok(record)
}

impl AgentView {
    /// Applies one update of a [`Watcher`]; returns how many objects and
    /// records changed.
    pub fn apply(&mut self, update: Update) -> usize {
        self.connected = true;
        match update {
            Update::Resync(snapshot) => {
                self.lists += 1;
                if self.lists > 1 {
                    self.resyncs += 1;
                }
                self.unreadable = snapshot.invalid.into_iter().collect();
                let mut objects = Vec::new();
                for stored in &snapshot.objects {
                    match decode_object(stored) {
                        Ok((_, object)) => objects.push(object),
                        Err(e) => self.unreadable(stored.path.to_key(), &e),
                    }
                }
                let changed = self
                    .model
                    .replace_all(objects, snapshot.revision)
                    .map_or(0, |c| c.len());
                self.pods.clear();
                self.by_ip.clear();
                for stored in snapshot.endpoints {
                    self.put_record(&stored);
                }
                self.revision = self.revision.max(snapshot.revision);
                changed + self.pods.len()
            }
            Update::Events { events, revision } => {
                let mut applied = 0;
                for event in events {
                    applied += usize::from(self.apply_event(event));
                }
                self.revision = self.revision.max(revision);
                applied
            }
        }
    }

    fn unreadable(&mut self, key: String, why: &str) {
        warn!(%key, error = why, "a cluster object or endpoint record cannot be read: left out");
        self.unreadable.insert(key);
    }

    fn apply_event(&mut self, event: ObjectEvent) -> bool {
        let revision = event.revision();
        match event {
            ObjectEvent::Put(stored) => {
                let path_key = stored.path.to_key();
                match decode_object(&stored) {
                    Ok((key, object)) => {
                        self.unreadable.remove(&path_key);
                        let event = ModelEvent::Put {
                            key,
                            object,
                            revision,
                        };
                        self.model.apply(event) == crate::model::cluster::Applied::Changed
                    }
                    Err(e) => {
                        self.unreadable(path_key, &e);
                        // What was there is gone: the store holds this now.
                        object_key(&stored.path).is_some_and(|key| {
                            self.model.apply(ModelEvent::Delete { key, revision })
                                == crate::model::cluster::Applied::Changed
                        })
                    }
                }
            }
            ObjectEvent::Delete { path, revision } => {
                self.unreadable.remove(&path.to_key());
                object_key(&path).is_some_and(|key| {
                    self.model.apply(ModelEvent::Delete { key, revision })
                        == crate::model::cluster::Applied::Changed
                })
            }
            ObjectEvent::EndpointPut(stored) => {
                self.remove_record(&stored.key);
                self.put_record(&stored)
            }
            ObjectEvent::EndpointDelete { key, .. } => {
                self.unreadable.remove(&key.to_key());
                self.remove_record(&key)
            }
        }
    }

    fn put_record(&mut self, stored: &StoredEndpoint) -> bool {
        match decode_record(stored) {
            Ok(record) => {
                self.unreadable.remove(&stored.key.to_key());
                self.by_ip
                    .entry(record.ip)
                    .or_default()
                    .insert(stored.key.clone());
                self.pods.insert(stored.key.clone(), record);
                true
            }
            Err(e) => {
                self.unreadable(stored.key.to_key(), &e);
                false
            }
        }
    }

    fn remove_record(&mut self, key: &EndpointKey) -> bool {
        let Some(old) = self.pods.remove(key) else {
            return false;
        };
        if let Some(keys) = self.by_ip.get_mut(&old.ip) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_ip.remove(&old.ip);
            }
        }
        true
    }

    /// The objects.
    #[must_use]
    pub fn model(&self) -> &ClusterModel {
        &self.model
    }

    /// The datastore revision applied.
    #[must_use]
    pub const fn revision(&self) -> i64 {
        self.revision
    }

    /// Every node's endpoint records.
    pub fn pod_records(&self) -> impl Iterator<Item = &PodEndpointRecord> {
        self.pods.values()
    }

    /// The records naming `ip` (more than one only for a moment, see
    /// `by_ip`), of the nodes `routed` accepts: a consumer passes the
    /// membership plan's routed nodes, so a gone node's leftovers count
    /// for nothing.
    pub fn pods_at<'a>(
        &'a self,
        ip: Ipv4Addr,
        routed: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = &'a PodEndpointRecord> + 'a {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|key| self.pods.get(key))
            .filter(move |r| routed(&r.node))
    }

    /// A pod's labels: the `Pod` object's of that namespace and name; `None`
    /// when there is no such object (an endpoint without one has none).
    #[must_use]
    pub fn pod_labels(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, String>> {
        self.model.pod_labels(namespace, name)
    }

    /// Changes when the view does: the datastore revision applied and the
    /// lists done.
    #[must_use]
    pub fn generation(&self) -> (i64, u64) {
        (self.revision, self.lists)
    }

    /// Whether the view has listed the datastore at least once (before
    /// that it knows nothing of the cluster, which is not "no cluster").
    #[must_use]
    pub fn synced(&self) -> bool {
        self.lists > 0
    }

    /// The view for `podnetctl status` (without the publisher's part).
    #[must_use]
    pub fn status(&self) -> ClusterObjectsStatus {
        ClusterObjectsStatus {
            connected: self.connected,
            revision: self.revision,
            counts: self
                .model
                .counts()
                .into_iter()
                .map(|(kind, n)| (kind.plural().to_owned(), n))
                .collect(),
            pod_records: self.pods.len(),
            resyncs: self.resyncs,
            unreadable: self.unreadable.len(),
            last_error: self.last_error.clone(),
            ..ClusterObjectsStatus::default()
        }
    }

    fn failed(&mut self, error: &ObjectStoreError) {
        self.connected = false;
        self.last_error = Some(error.to_string());
    }
}

fn lock(view: &Mutex<AgentView>) -> std::sync::MutexGuard<'_, AgentView> {
    view.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Follows the store into `view` forever: connects, lists, watches; after
/// an error it waits (`retry`, doubled after each failure in a row up to
/// 16 times `retry`), connects again and lists again (the view replaces
/// what it held: nothing applied twice, nothing missed).
pub async fn follow<S, C, F>(mut connect: C, view: Arc<Mutex<AgentView>>, retry: Duration)
where
    S: ObjectStore,
    C: FnMut() -> F + Send,
    F: Future<Output = Result<S, ObjectStoreError>> + Send,
{
    let mut pause = retry;
    loop {
        let error = match connect().await {
            Err(e) => e,
            Ok(store) => {
                let mut watcher = Watcher::new(store);
                loop {
                    match watcher.next().await {
                        Ok(update) => {
                            pause = retry;
                            let resync = matches!(update, Update::Resync(_));
                            let mut v = lock(&view);
                            v.apply(update);
                            if resync {
                                info!(
                                    revision = v.revision,
                                    objects = v.model.len(),
                                    pod_records = v.pods.len(),
                                    resyncs = v.resyncs,
                                    reason = watcher.last_loss().unwrap_or("start"),
                                    "cluster objects listed"
                                );
                            }
                        }
                        Err(e) => break e,
                    }
                }
            }
        };
        warn!(error = %error, retry_in = ?pause,
              "following the cluster objects failed; the agent keeps what it holds and lists again");
        lock(&view).failed(&error);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(retry * 16);
    }
}
