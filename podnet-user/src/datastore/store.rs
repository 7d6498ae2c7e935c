//! The datastore as the agent's join and follow loops see it: one trait
//! over the nodes file ([`super::file::Follower`]), etcd
//! ([`super::etcd::EtcdDatastore`]) and the in-memory store the tests use
//! ([`super::memory::MemoryDatastore`]), as the IPAM allocator runs over
//! `IpamStore`. Everything the loops decide (which CIDR to take, who is
//! live, unreachable or gone, what to release) is written once against it
//! (`agent::join`, `agent::follow`) and tested without root.
//!
//! A store without leases (the nodes file) treats every record as live:
//! it has no tombstones, no releases and nothing to keep alive.

use std::future::Future;

use ipnet::Ipv4Net;

use super::{
    DatastoreError, JoinRequest,
    membership::{self, Plan, Policy, Release, Snapshot},
};

/// A lease handle: what [`Datastore::publish`] hands to
/// [`Datastore::keep_alive`] (0 for a store without leases).
pub type LeaseId = i64;

/// One read of the datastore, decided: what to route and what to tidy up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The revision read ([`Datastore::wait_change`] waits past it).
    pub revision: i64,
    /// Whether this node's own record is published (its lease alive). A
    /// session whose node vanished from the store publishes again.
    pub published: bool,
    /// What the read means under the policy (see [`membership::plan`]).
    pub plan: Plan,
    /// Keys that could not be read (logged once, otherwise ignored).
    pub invalid: Vec<String>,
    /// What is wrong with the claims, if anything (see
    /// [`membership::claim_problems`]): e.g. a node holding a second CIDR
    /// with a claim key of its own, which only the operator can remove.
    pub claim_problems: Vec<String>,
}

impl Observation {
    /// The decision for a leased store's snapshot: membership's plan.
    #[must_use]
    pub fn of_snapshot(snapshot: &Snapshot, policy: Policy, me: &str, now: u64) -> Self {
        Self {
            revision: snapshot.revision,
            published: snapshot.live.contains_key(me),
            plan: membership::plan(snapshot, policy, Some(me), now),
            invalid: snapshot.invalid.clone(),
            claim_problems: membership::claim_problems(snapshot),
        }
    }
}

/// Where the cluster lives, as the agent's join and follow loops use it.
///
/// Futures are `Send`: the follow loops run as tasks on the agent's
/// multi-threaded runtime. `Clone`: a session keeps a lease alive on one
/// handle while it reads and writes on another (etcd: two streams over
/// one connection).
pub trait Datastore: Clone + Send + Sync + 'static {
    /// What the store is (a path, an etcd member), for logs and status.
    fn endpoint(&self) -> String;

    /// Whether a node that ran before may start with its last pod CIDR
    /// (cached in its state dir) while this store cannot be reached: a
    /// remote store (etcd) may be down while the datapath has to forward;
    /// a local nodes file that cannot be read is waited for. A constant:
    /// it is asked while no connection could be made.
    const STARTS_WITH_CACHED_CIDR: bool;

    /// Takes (or gets back) this node's pod CIDR and publishes its record
    /// at once (a claim without a record would look like a node that went
    /// away to the other agents). The lease of the record is not kept
    /// alive: the follow loop publishes again under its own.
    fn join(
        &mut self,
        request: &JoinRequest,
    ) -> impl Future<Output = Result<Ipv4Net, DatastoreError>> + Send;

    /// Takes (or confirms) this node's pod CIDR without publishing.
    fn claim_cidr(
        &mut self,
        request: &JoinRequest,
    ) -> impl Future<Output = Result<Ipv4Net, DatastoreError>> + Send;

    /// Publishes this node's record for `cidr` under a fresh lease, if its
    /// claim on `cidr` still names it (`Conflict`/`ClaimLost` otherwise).
    fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> impl Future<Output = Result<LeaseId, DatastoreError>> + Send;

    /// Keeps `lease` alive; returns only when that fails (the store is
    /// gone or the lease expired). A store without leases never returns.
    fn keep_alive(
        &mut self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<(), DatastoreError>> + Send;

    /// Reads the cluster and decides, at `now` (Unix seconds), what it
    /// means for node `me` under `policy`.
    fn observe(
        &mut self,
        policy: Policy,
        me: &str,
        now: u64,
    ) -> impl Future<Output = Result<Observation, DatastoreError>> + Send;

    /// Writes `observer`'s tombstone of `name` with `since` unless `name`
    /// has a lease; `Ok(true)` when written.
    fn mark_gone(
        &mut self,
        observer: &str,
        name: &str,
        since: u64,
    ) -> impl Future<Output = Result<bool, DatastoreError>> + Send;

    /// Removes `observer`'s tombstone of a node that is live again if it
    /// is still the one at `revision`; `Ok(true)` when removed.
    fn clear_tombstone(
        &mut self,
        observer: &str,
        name: &str,
        revision: i64,
    ) -> impl Future<Output = Result<bool, DatastoreError>> + Send;

    /// Releases a gone node's claims and forgets it if what the decision
    /// was made on still holds; `Ok(true)` when released.
    fn release(
        &mut self,
        release: &Release,
    ) -> impl Future<Output = Result<bool, DatastoreError>> + Send;

    /// Waits for a change after `revision`. A store that cannot watch
    /// returns on a change it polled, or when it is time to read again
    /// anyway (a lost update heals).
    fn wait_change(
        &mut self,
        revision: i64,
    ) -> impl Future<Output = Result<(), DatastoreError>> + Send;
}

/// Claims this node's CIDR and publishes its record under a fresh lease
/// (what [`Datastore::join`] does for a leased store). A claim released
/// between the two steps (the node had been away long enough), and maybe
/// taken by another node at once, is claimed again, up to three times;
/// unless this node must have that CIDR.
pub async fn claim_and_publish<S: Datastore>(
    store: &mut S,
    request: &JoinRequest,
) -> Result<(Ipv4Net, LeaseId), DatastoreError> {
    let mut attempt = 0;
    loop {
        let cidr = store.claim_cidr(request).await?;
        match store.publish(request, cidr).await {
            Err(DatastoreError::ClaimLost { .. }) if attempt < 3 => attempt += 1,
            Err(DatastoreError::Conflict { .. }) if attempt < 3 && request.pod_cidr.is_none() => {
                attempt += 1;
            }
            Ok(lease) => return Ok((cidr, lease)),
            Err(e) => return Err(e),
        }
    }
}
