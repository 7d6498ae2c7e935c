//! An in-memory datastore with etcd's semantics (claims, records under
//! leases, durable member records, tombstones, releases that re-check what
//! they were decided on), for tests of the join and follow loops that need
//! no etcd and no root. Clones share one cluster, as agents share one etcd.
//!
//! What etcd does on its own is done by the test: [`MemoryDatastore::expire`]
//! stands for a lease running out, [`MemoryDatastore::set_reachable`] for a
//! store that cannot be reached, [`MemoryDatastore::put_live`] and
//! [`MemoryDatastore::put_member`] for records written past the agents
//! (by hand, or by a broken agent).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
};

use ipnet::Ipv4Net;
use tokio::sync::watch;

use super::{
    DatastoreError, JoinRequest, NodeRecord, candidate_cidr,
    membership::{Policy, Release, Snapshot, Tombstone, decide_claims},
    store::{Datastore, LeaseId, Observation, claim_and_publish},
};

#[derive(Debug, Default)]
struct State {
    revision: i64,
    /// Shared claim keys written by agents from before claim-order keys,
    /// or by hand: CIDR -> (node, creation revision).
    legacy: BTreeMap<Ipv4Net, (String, i64)>,
    /// Liveness records and the lease they are under.
    live: BTreeMap<String, (NodeRecord, LeaseId)>,
    members: BTreeMap<String, NodeRecord>,
    /// Each node's claims: when it first claimed each CIDR (etcd's
    /// `held/` keys).
    held: BTreeMap<(String, Ipv4Net), i64>,
    /// Durable records' modification revisions.
    published: BTreeMap<String, i64>,
    /// node -> observer -> tombstone.
    tombstones: BTreeMap<String, BTreeMap<String, Tombstone>>,
    leases: BTreeSet<LeaseId>,
    next_lease: LeaseId,
    invalid: Vec<String>,
    unreachable: bool,
    /// Joins that were attempted (also while unreachable).
    join_attempts: u32,
}

impl State {
    /// The revision the running write commits at.
    const fn next_revision(&self) -> i64 {
        self.revision + 1
    }

    fn insert_member(&mut self, record: NodeRecord) {
        self.published
            .insert(record.name.clone(), self.next_revision());
        self.members.insert(record.name.clone(), record);
    }

    /// Who holds each CIDR, as every agent decides it.
    fn claims(&self) -> BTreeMap<Ipv4Net, String> {
        let live = self
            .live
            .iter()
            .map(|(name, (record, _))| (name.clone(), record.clone()))
            .collect();
        decide_claims(&self.held, &self.legacy, &live, &self.members)
    }

    /// What a node's publish writes: its claim-order key for the CIDR.
    fn insert_held(&mut self, record: &NodeRecord) {
        let at = self.next_revision();
        self.held
            .entry((record.name.clone(), record.pod_cidr))
            .or_insert(at);
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The revision, for watchers and lease keepers.
    changed: watch::Sender<i64>,
}

/// A cluster in memory; see the module doc.
#[derive(Debug, Clone)]
pub struct MemoryDatastore {
    shared: Arc<Shared>,
}

impl Default for MemoryDatastore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDatastore {
    /// An empty cluster, reachable. Remote like etcd: a node may start
    /// with its cached CIDR while it is unreachable.
    #[must_use]
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    next_lease: 1,
                    ..State::default()
                }),
                changed,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding it has failed already; the
        // state is still what it wrote.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the state as one transaction and wakes the watchers.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, revision) = {
            let mut state = self.state();
            let out = f(&mut state);
            state.revision += 1;
            (out, state.revision)
        };
        self.shared.changed.send_replace(revision);
        out
    }

    fn reachable(&self, action: &str) -> Result<(), DatastoreError> {
        if self.state().unreachable {
            return Err(DatastoreError::Io {
                what: "memory datastore".into(),
                action: action.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "unreachable (set by the test)",
                ),
            });
        }
        Ok(())
    }

    /// Makes every request fail (`false`) or succeed again.
    pub fn set_reachable(&self, reachable: bool) {
        self.state().unreachable = !reachable;
    }

    /// How many joins were attempted.
    #[must_use]
    pub fn join_attempts(&self) -> u32 {
        self.state().join_attempts
    }

    /// `name`'s lease runs out: its liveness record goes, as etcd deletes
    /// the keys of an expired lease.
    pub fn expire(&self, name: &str) {
        self.write(|s| {
            if let Some((_, lease)) = s.live.remove(name) {
                s.leases.remove(&lease);
            }
        });
    }

    /// Writes a liveness record (and a member record, and its claim order
    /// as a publish does) as is, under a lease of its own, unchecked: a
    /// record written past the claims.
    pub fn put_live(&self, record: NodeRecord) {
        self.write(|s| {
            let lease = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(lease);
            s.insert_member(record.clone());
            s.insert_held(&record);
            s.live.insert(record.name.clone(), (record, lease));
        });
    }

    /// Writes only a liveness record, as is, without a lease, a durable
    /// record or a claim: what one `etcdctl put /podnet/nodes/<name>` does.
    pub fn put_live_only(&self, record: NodeRecord) {
        self.write(|s| {
            s.live.insert(record.name.clone(), (record, 0));
        });
    }

    /// Writes a durable member record as is (no lease, no claim).
    pub fn put_member(&self, record: NodeRecord) {
        self.write(|s| s.insert_member(record));
    }

    /// Writes a shared claim key (`cidrs/`, as agents from before
    /// claim-order keys did, or by hand) naming `name`, as is: a put keeps
    /// the key's creation revision.
    pub fn put_claim(&self, cidr: Ipv4Net, name: &str) {
        self.write(|s| {
            let at = s
                .legacy
                .get(&cidr)
                .map_or_else(|| s.next_revision(), |(_, at)| *at);
            s.legacy.insert(cidr, (name.to_owned(), at));
        });
    }

    /// `cidr` released (every claim on it removed) and claimed by `name`:
    /// what a release while its holder was away and a new node's join do.
    pub fn reassign(&self, cidr: Ipv4Net, name: &str) {
        self.write(|s| {
            s.held.retain(|(_, c), _| *c != cidr);
            s.legacy.remove(&cidr);
            let at = s.next_revision();
            s.held.insert((name.to_owned(), cidr), at);
        });
    }

    /// A key that cannot be read.
    pub fn put_invalid(&self, key: &str) {
        self.write(|s| s.invalid.push(key.to_owned()));
    }

    /// Everything, as one read.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let s = self.state();
        let mut snapshot = Snapshot {
            revision: s.revision,
            live: s
                .live
                .iter()
                .map(|(name, (record, _))| (name.clone(), record.clone()))
                .collect(),
            members: s.members.clone(),
            tombstones: s.tombstones.clone(),
            published: s.published.clone(),
            claims: s.claims(),
            order: BTreeMap::new(),
            invalid: s.invalid.clone(),
        };
        snapshot.order = super::etcd::claim_order(&snapshot, &s.held);
        snapshot
    }

    /// The CIDR claimed by `name`, if any.
    #[must_use]
    pub fn claim_of(&self, name: &str) -> Option<Ipv4Net> {
        self.state()
            .claims()
            .iter()
            .find(|(_, holder)| *holder == name)
            .map(|(cidr, _)| *cidr)
    }

    /// Claims `cidr` for `name` unless someone else holds it; whether it
    /// is `name`'s now.
    fn claim(&self, cidr: Ipv4Net, name: &str) -> bool {
        self.write(|s| {
            let key = (name.to_owned(), cidr);
            let created = !s.held.contains_key(&key);
            let at = s.next_revision();
            s.held.entry(key.clone()).or_insert(at);
            if s.claims().get(&cidr).map(String::as_str) == Some(name) {
                return true;
            }
            if created {
                s.held.remove(&key);
            }
            false
        })
    }
}

impl Datastore for MemoryDatastore {
    fn endpoint(&self) -> String {
        "memory".into()
    }

    const STARTS_WITH_CACHED_CIDR: bool = true;

    async fn join(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        self.state().join_attempts += 1;
        claim_and_publish(self, request).await.map(|(cidr, _)| cidr)
    }

    async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        self.reachable("claiming a pod CIDR")?;
        if let Some(cidr) = request.pod_cidr {
            if self.claim(cidr, &request.name) {
                return Ok(cidr);
            }
            let holder = self
                .state()
                .claims()
                .get(&cidr)
                .cloned()
                .unwrap_or_else(|| "?".to_owned());
            return Err(DatastoreError::Conflict { cidr, holder });
        }
        loop {
            if let Some(cidr) = self.claim_of(&request.name) {
                return Ok(cidr);
            }
            let taken: Vec<Ipv4Net> = self.state().claims().keys().copied().collect();
            let candidate = candidate_cidr(request, &taken)?;
            if self.claim(candidate, &request.name) {
                return Ok(candidate);
            }
        }
    }

    async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<LeaseId, DatastoreError> {
        self.reachable("publishing")?;
        let name = request.name.clone();
        self.write(|s| match s.claims().get(&cidr) {
            Some(holder) if *holder == name => {
                let lease = s.next_lease;
                s.next_lease += 1;
                s.leases.insert(lease);
                let record = NodeRecord {
                    name: name.clone(),
                    node_ip: request.node_ip,
                    pod_cidr: cidr,
                };
                s.insert_held(&record);
                s.live.insert(name.clone(), (record.clone(), lease));
                s.insert_member(record);
                Ok(lease)
            }
            Some(holder) => Err(DatastoreError::Conflict {
                cidr,
                holder: holder.clone(),
            }),
            None => Err(DatastoreError::ClaimLost { cidr, node: name }),
        })
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<(), DatastoreError> {
        let mut changed = self.shared.changed.subscribe();
        let expired = changed
            .wait_for(|_| !self.state().leases.contains(&lease))
            .await;
        Err(match expired {
            Ok(_) => DatastoreError::Invalid {
                what: "memory datastore".into(),
                msg: format!("lease {lease:x} expired"),
            },
            Err(_) => DatastoreError::Invalid {
                what: "memory datastore".into(),
                msg: "closed".into(),
            },
        })
    }

    async fn observe(
        &mut self,
        policy: Policy,
        me: &str,
        now: u64,
    ) -> Result<Observation, DatastoreError> {
        self.reachable("reading the cluster")?;
        Ok(Observation::of_snapshot(&self.snapshot(), policy, me, now))
    }

    async fn mark_gone(
        &mut self,
        observer: &str,
        name: &str,
        since: u64,
    ) -> Result<bool, DatastoreError> {
        self.reachable("writing a tombstone")?;
        Ok(self.write(|s| {
            if s.live.contains_key(name) {
                return false;
            }
            let mod_revision = s.next_revision();
            s.tombstones.entry(name.to_owned()).or_default().insert(
                observer.to_owned(),
                Tombstone {
                    since,
                    mod_revision,
                },
            );
            true
        }))
    }

    async fn clear_tombstone(
        &mut self,
        observer: &str,
        name: &str,
        revision: i64,
    ) -> Result<bool, DatastoreError> {
        self.reachable("removing a tombstone")?;
        Ok(self.write(|s| {
            let Some(theirs) = s.tombstones.get_mut(name) else {
                return false;
            };
            let current = theirs.get(observer).map(|t| t.mod_revision);
            if !s.live.contains_key(name) || current != Some(revision) {
                return false;
            }
            theirs.remove(observer);
            if theirs.is_empty() {
                s.tombstones.remove(name);
            }
            true
        }))
    }

    async fn release(&mut self, release: &Release) -> Result<bool, DatastoreError> {
        self.reachable("releasing claims")?;
        let name = release.name.as_str();
        Ok(self.write(|s| {
            let claims = s.claims();
            let holds = release
                .cidrs
                .iter()
                .all(|c| claims.get(c).map(String::as_str) == Some(name));
            let unchanged = release.tombstones.iter().all(|(observer, revision)| {
                s.tombstones
                    .get(name)
                    .and_then(|t| t.get(observer))
                    .map(|t| t.mod_revision)
                    == Some(*revision)
            });
            if s.live.contains_key(name) || !unchanged || !holds {
                return false;
            }
            s.members.remove(name);
            s.published.remove(name);
            s.held.retain(|(holder, _), _| holder != name);
            s.tombstones.remove(name);
            s.legacy.retain(|_, (holder, _)| holder != name);
            true
        }))
    }

    async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        self.reachable("watching the cluster")?;
        let mut changed = self.shared.changed.subscribe();
        changed
            .wait_for(|r| *r > revision)
            .await
            .map(|_| ())
            .map_err(|_| DatastoreError::Invalid {
                what: "memory datastore".into(),
                msg: "closed".into(),
            })
    }
}
