//! An in-memory [`ObjectStore`] for the tests of its consumers: etcd's
//! semantics (one revision counter, per-key mod revisions, an event history
//! watches read from) with the faults a consumer must survive made on
//! demand: a compaction of the history ([`MemoryObjectStore::compact`]) and
//! lost watches ([`MemoryObjectStore::break_watches`]).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

use super::{
    ApplyOutcome, Decision, EndpointKey, Expect, Listing, ObjectEvent, ObjectPath, ObjectStore,
    ObjectStoreError, ObjectWatch, ReplaceOutcome, Snapshot, StoredEndpoint, StoredObject,
    decide_apply, decide_delete, diff_endpoints, written,
};

#[derive(Debug, Default)]
struct State {
    revision: i64,
    /// History up to this revision is gone.
    compacted: i64,
    objects: BTreeMap<ObjectPath, (Vec<u8>, i64)>,
    endpoints: BTreeMap<EndpointKey, (Vec<u8>, i64)>,
    history: Vec<ObjectEvent>,
    /// Bumped by [`MemoryObjectStore::break_watches`]: a watch opened in an
    /// earlier generation is lost.
    generation: u64,
}

impl State {
    /// Records `events` (made at the next revision) and returns it.
    fn commit(&mut self, events: Vec<ObjectEvent>) -> i64 {
        self.history.extend(events);
        self.revision
    }

    fn objects(&self) -> Vec<StoredObject> {
        self.objects
            .iter()
            .map(|(path, (value, revision))| StoredObject {
                path: path.clone(),
                value: value.clone(),
                revision: *revision,
            })
            .collect()
    }

    fn endpoints(&self, node: Option<&str>) -> Vec<StoredEndpoint> {
        self.endpoints
            .iter()
            .filter(|(key, _)| node.is_none_or(|n| key.node() == n))
            .map(|(key, (value, revision))| StoredEndpoint {
                key: key.clone(),
                value: value.clone(),
                revision: *revision,
            })
            .collect()
    }
}

/// Objects and endpoint records in memory; clones share the store.
#[derive(Debug, Clone, Default)]
pub struct MemoryObjectStore {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl MemoryObjectStore {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock left a consistent
        // state (every change is made before anything is recorded).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's revision.
    #[must_use]
    pub fn revision(&self) -> i64 {
        self.state().revision
    }

    /// Forgets the history up to `revision` (as etcd's compaction): a watch
    /// from at or below it fails with [`ObjectStoreError::Compacted`].
    pub fn compact(&self, revision: i64) {
        let mut state = self.state();
        state.compacted = state.compacted.max(revision.min(state.revision));
        let compacted = state.compacted;
        state.history.retain(|e| e.revision() > compacted);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Ends every open watch with [`ObjectStoreError::WatchLost`] (a member
    /// went away).
    pub fn break_watches(&self) {
        self.state().generation += 1;
        self.changed.notify_waiters();
    }
}

/// A watch on a [`MemoryObjectStore`].
#[derive(Debug)]
pub struct MemoryWatch {
    store: MemoryObjectStore,
    /// The last revision handed out.
    position: i64,
    generation: u64,
}

impl ObjectWatch for MemoryWatch {
    async fn next(&mut self) -> Result<Vec<ObjectEvent>, ObjectStoreError> {
        loop {
            // Registered before the state is looked at, so a change made in
            // between still wakes this watch.
            let changed = self.store.changed.clone();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.store.state();
                if state.generation != self.generation {
                    return Err(ObjectStoreError::WatchLost {
                        reason: "the memory store broke its watches".into(),
                    });
                }
                if self.position < state.compacted {
                    return Err(ObjectStoreError::Compacted {
                        compact_revision: state.compacted,
                    });
                }
                let events: Vec<ObjectEvent> = state
                    .history
                    .iter()
                    .filter(|e| e.revision() > self.position)
                    .cloned()
                    .collect();
                if let Some(last) = events.last() {
                    self.position = last.revision();
                    return Ok(events);
                }
            }
            notified.await;
        }
    }
}

impl ObjectStore for MemoryObjectStore {
    type Watch = MemoryWatch;

    fn endpoint(&self) -> String {
        "memory".into()
    }

    async fn get(&mut self, path: &ObjectPath) -> Result<Option<StoredObject>, ObjectStoreError> {
        Ok(self
            .state()
            .objects
            .get(path)
            .map(|(value, revision)| StoredObject {
                path: path.clone(),
                value: value.clone(),
                revision: *revision,
            }))
    }

    async fn list(
        &mut self,
        resource: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Listing, ObjectStoreError> {
        let state = self.state();
        Ok(Listing {
            objects: state
                .objects()
                .into_iter()
                .filter(|o| o.path.matches(resource, namespace))
                .collect(),
            revision: state.revision,
        })
    }

    async fn apply(
        &mut self,
        path: &ObjectPath,
        value: &[u8],
        expected: Expect,
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let mut state = self.state();
        let current = state.objects.get(path).map(|(v, r)| (v.as_slice(), *r));
        let base = match decide_apply(&path.to_key(), current, value, expected)? {
            Decision::Unchanged(revision) => return Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => base,
        };
        state.revision += 1;
        let revision = state.revision;
        state
            .objects
            .insert(path.clone(), (value.to_vec(), revision));
        state.commit(vec![ObjectEvent::Put(StoredObject {
            path: path.clone(),
            value: value.to_vec(),
            revision,
        })]);
        drop(state);
        self.changed.notify_waiters();
        Ok(written(base, revision))
    }

    async fn delete(
        &mut self,
        path: &ObjectPath,
        expected: Expect,
    ) -> Result<bool, ObjectStoreError> {
        let mut state = self.state();
        let current = state.objects.get(path).map(|(_, r)| *r);
        if decide_delete(&path.to_key(), current, expected)?.is_none() {
            return Ok(false);
        }
        state.revision += 1;
        let revision = state.revision;
        state.objects.remove(path);
        state.commit(vec![ObjectEvent::Delete {
            path: path.clone(),
            revision,
        }]);
        drop(state);
        self.changed.notify_waiters();
        Ok(true)
    }

    async fn put_endpoint(
        &mut self,
        key: &EndpointKey,
        value: &[u8],
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let mut state = self.state();
        let current = state.endpoints.get(key).map(|(v, r)| (v.as_slice(), *r));
        let base = match decide_apply(&key.to_key(), current, value, Expect::Any)? {
            Decision::Unchanged(revision) => return Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => base,
        };
        state.revision += 1;
        let revision = state.revision;
        state
            .endpoints
            .insert(key.clone(), (value.to_vec(), revision));
        state.commit(vec![ObjectEvent::EndpointPut(StoredEndpoint {
            key: key.clone(),
            value: value.to_vec(),
            revision,
        })]);
        drop(state);
        self.changed.notify_waiters();
        Ok(written(base, revision))
    }

    async fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<bool, ObjectStoreError> {
        let mut state = self.state();
        if !state.endpoints.contains_key(key) {
            return Ok(false);
        }
        state.revision += 1;
        let revision = state.revision;
        state.endpoints.remove(key);
        state.commit(vec![ObjectEvent::EndpointDelete {
            key: key.clone(),
            revision,
        }]);
        drop(state);
        self.changed.notify_waiters();
        Ok(true)
    }

    async fn replace_endpoints(
        &mut self,
        node: &str,
        records: &[(EndpointKey, Vec<u8>)],
    ) -> Result<ReplaceOutcome, ObjectStoreError> {
        let mut state = self.state();
        let diff = diff_endpoints(node, &state.endpoints(Some(node)), records)?;
        let mut outcome = ReplaceOutcome {
            written: diff.puts.len(),
            removed: diff.deletes.len(),
            unchanged: diff.unchanged,
            transactions: 0,
            revision: state.revision,
        };
        if diff.puts.is_empty() && diff.deletes.is_empty() {
            return Ok(outcome);
        }
        // One revision for the whole set, as one etcd transaction.
        state.revision += 1;
        let revision = state.revision;
        let mut events = Vec::new();
        for key in diff.deletes {
            state.endpoints.remove(&key);
            events.push(ObjectEvent::EndpointDelete { key, revision });
        }
        for (key, value) in diff.puts {
            state
                .endpoints
                .insert(key.clone(), (value.clone(), revision));
            events.push(ObjectEvent::EndpointPut(StoredEndpoint {
                key,
                value,
                revision,
            }));
        }
        outcome.revision = state.commit(events);
        outcome.transactions = 1;
        drop(state);
        self.changed.notify_waiters();
        Ok(outcome)
    }

    async fn list_endpoints(
        &mut self,
        node: Option<&str>,
    ) -> Result<(Vec<StoredEndpoint>, i64), ObjectStoreError> {
        let state = self.state();
        Ok((state.endpoints(node), state.revision))
    }

    async fn snapshot(&mut self) -> Result<Snapshot, ObjectStoreError> {
        let state = self.state();
        Ok(Snapshot {
            objects: state.objects(),
            endpoints: state.endpoints(None),
            revision: state.revision,
            invalid: Vec::new(),
        })
    }

    async fn watch(&mut self, from_revision: i64) -> Result<MemoryWatch, ObjectStoreError> {
        let state = self.state();
        // As etcd: a start at or below the compaction point is refused.
        if from_revision <= state.compacted {
            return Err(ObjectStoreError::Compacted {
                compact_revision: state.compacted,
            });
        }
        Ok(MemoryWatch {
            store: self.clone(),
            position: from_revision - 1,
            generation: state.generation,
        })
    }
}
