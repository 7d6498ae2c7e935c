//! Following the datastore: the agent's loops that keep the datapath in
//! line with the cluster (the nodes file, or etcd), and what they report.
//!
//! Whatever happens to the datastore, the datapath keeps the last state it
//! was given: a datastore that cannot be read (etcd down, a broken nodes
//! file) changes nothing, and a node is only removed when the datastore
//! says so (file) or after its grace period (etcd, see
//! [`crate::datastore::membership`]).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{debug, info, warn};

use super::{Agent, cluster::NodeNetwork};
use crate::{
    api::DatastoreStatus,
    datastore::{
        Datastore, DatastoreError, JoinRequest, NodeRecord,
        etcd::{EtcdAccess, EtcdDatastore},
        file::{FOLLOW_RESYNC, FileDatastore, Follower},
        membership::{self, NodeState, NodeStatus, Policy},
    },
};

/// Read everything again this often even without a change (a lost update,
/// or a datapath someone changed by hand, heals).
const RESYNC: Duration = Duration::from_mins(1);
/// First pause after etcd could not be reached through any member; doubled
/// up to [`RECONNECT_MAX`]. Short: an agent is back within that long of
/// etcd's return.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How often a node whose CIDR was taken while it was away tries again.
const CONFLICT_RETRY: Duration = Duration::from_secs(30);

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX)
}

/// What the follow loops drive: the datapath and host routes to make
/// match the nodes to route, and the datastore status to report. The agent's
/// is [`AgentSink`]; tests record what they are given.
pub trait ClusterSink: Send + Sync {
    /// Makes the node's routing match `nodes` (all nodes to route, this
    /// one included); returns whether that worked.
    fn apply(&self, nodes: Vec<NodeRecord>) -> impl Future<Output = bool> + Send;

    /// Changes the reported datastore status.
    fn update_status(&self, f: impl FnOnce(&mut DatastoreStatus));
}

/// The agent: its registry and the node's place on the underlay.
#[derive(Clone)]
pub struct AgentSink {
    pub registry: Arc<Mutex<Agent>>,
    pub network: NodeNetwork,
}

impl ClusterSink for AgentSink {
    /// Off the async runtime: netlink and map updates block.
    async fn apply(&self, nodes: Vec<NodeRecord>) -> bool {
        let (registry, network) = (Arc::clone(&self.registry), self.network.clone());
        let applied = tokio::task::spawn_blocking(move || {
            registry
                .lock()
                .map_err(|_| anyhow::anyhow!("agent state poisoned"))
                .and_then(|mut reg| reg.apply_nodes(&network, &nodes))
        })
        .await;
        match applied {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "applying the cluster state");
                false
            }
            Err(e) => {
                warn!(error = %e, "applying the cluster state panicked");
                false
            }
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut DatastoreStatus)) {
        if let Ok(mut reg) = self.registry.lock() {
            let mut status = reg.datastore_status();
            f(&mut status);
            reg.set_datastore_status(status);
        }
    }
}

impl AgentSink {
    fn node_name(&self) -> String {
        self.registry
            .lock()
            .map(|r| r.config().node_name.clone())
            .unwrap_or_default()
    }
}

/// One agent following the cluster through any [`Datastore`]: who it is,
/// the policy it applies, where the result goes, and what it remembers
/// between reads (each node's last state, for logging transitions).
pub struct ClusterFollow<K> {
    /// This node's name.
    pub me: String,
    pub policy: Policy,
    pub sink: K,
    /// A read without this node's own record ends the session (a leased
    /// store: the lease is gone, publish again); not for the nodes file,
    /// where the node added itself once at start.
    pub require_published: bool,
    states: BTreeMap<String, NodeState>,
    invalid_logged: Vec<String>,
}

/// What one round of following did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// The revision read: wait for changes after it.
    pub revision: i64,
    /// How long to wait at most before the next round (states change with
    /// time alone, and a lost update heals).
    pub wait: Duration,
    /// Whether the nodes were applied.
    pub applied: bool,
}

impl<K: ClusterSink> ClusterFollow<K> {
    #[must_use]
    pub fn new(me: String, policy: Policy, sink: K, require_published: bool) -> Self {
        Self {
            me,
            policy,
            sink,
            require_published,
            states: BTreeMap::new(),
            invalid_logged: Vec::new(),
        }
    }

    /// Reads the cluster once at `now` (Unix seconds) and acts on it:
    /// decides who is live, unreachable or gone ([`membership::plan`]),
    /// writes tombstones, clears stale ones, releases claims that are due,
    /// applies the nodes to route and reports. An error leaves the applied
    /// state as it was.
    pub async fn round<S: Datastore>(
        &mut self,
        store: &mut S,
        now: u64,
    ) -> Result<Round, DatastoreError> {
        let me = self.me.as_str();
        let policy = self.policy;
        let seen = store.observe(policy, me, now).await?;
        let endpoint = store.endpoint();
        if self.require_published && !seen.published {
            return Err(DatastoreError::EtcdProtocol {
                endpoint,
                action: "following the cluster".into(),
                msg: "this node's liveness key is gone; publishing again".into(),
            });
        }
        for key in &seen.invalid {
            if !self.invalid_logged.contains(key) {
                warn!(%key, "ignoring an unreadable key in the datastore");
                self.invalid_logged.push(key.clone());
            }
        }
        let (plan, claim_problems) = (seen.plan, seen.claim_problems);
        for name in &plan.mark_gone {
            if store.mark_gone(me, name, now).await?
                && plan.nodes.iter().any(|n| &n.record.name == name)
            {
                info!(node = %name, "wrote this node's tombstone of a node without a lease");
            }
        }
        for (name, observer, revision) in &plan.clear_tombstones {
            match store.clear_tombstone(observer, name, *revision).await {
                Ok(_) => {}
                // A tombstone from before observers kept their own is the
                // operator's to remove once the roles are on; it does not
                // count either way.
                Err(e) if e.is_permission_denied() => {
                    debug!(node = %name, "an old shared tombstone is left for the operator");
                }
                Err(e) => return Err(e),
            }
        }
        for release in &plan.releases {
            match store.release(release).await {
                Ok(true) => {
                    warn!(node = %release.name, cidrs = ?release.cidrs, after = %membership::format_duration(policy.cidr_release_after),
                          "released the pod CIDR of a node gone for longer than the release delay");
                }
                Ok(false) => {}
                // With etcd roles a node may not delete another node's
                // record: the release is the operator's (its credential
                // may); the node routes on.
                Err(e) if e.is_permission_denied() => {
                    warn!(node = %release.name, cidrs = ?release.cidrs,
                          "a gone node's pod CIDR is due for release, but this node's etcd role may not release it: \
                           release it with the operator's credential (podnetctl release NODE)");
                }
                Err(e) => return Err(e),
            }
        }
        log_transitions(&mut self.states, &plan.nodes, policy);
        let applied = self.sink.apply(plan.routed.clone()).await;
        self.sink.update_status(|s| {
            s.connected = true;
            s.endpoint = Some(endpoint);
            if applied {
                s.last_sync_ms = Some(unix_ms());
                s.last_error = None;
            }
            s.nodes = plan
                .nodes
                .iter()
                .filter(|n| n.record.name != me)
                .cloned()
                .collect();
            s.claim_problems = claim_problems;
        });
        // One second past the next change by time alone: states change
        // on whole seconds.
        let wait = plan
            .next_check
            .map_or(RESYNC, |d| (d + Duration::from_secs(1)).min(RESYNC));
        Ok(Round {
            revision: seen.revision,
            wait,
            applied,
        })
    }
}

/// Follows the nodes file (run it on the agent's runtime). A file that
/// cannot be read as a nodes file (empty, cut short, missing, not JSON)
/// keeps the last good state in the datapath and is logged once per
/// breakage.
pub async fn follow_file(
    path: std::path::PathBuf,
    registry: Arc<Mutex<Agent>>,
    network: NodeNetwork,
) {
    let sink = AgentSink { registry, network };
    sink.update_status(|s| {
        *s = DatastoreStatus {
            backend: "file".into(),
            endpoint: Some(path.display().to_string()),
            ..DatastoreStatus::default()
        };
    });
    let me = sink.node_name();
    let mut store = Follower::new(FileDatastore::new(&path), FOLLOW_RESYNC);
    let mut follow = ClusterFollow::new(me, Policy::default(), sink, false);
    let mut broken: Option<String> = None;
    loop {
        let mut was_broken = false;
        follow
            .sink
            .update_status(|s| was_broken = !s.connected && s.last_sync_ms.is_some());
        match follow.round(&mut store, unix_now().as_secs()).await {
            Ok(round) if !round.applied => store.forget(),
            Ok(_) => {
                broken = None;
                if was_broken {
                    info!("the nodes file is readable again");
                }
            }
            Err(error) => {
                let text = error.to_string();
                if broken.as_deref() != Some(text.as_str()) {
                    warn!(error = %error, "the nodes file is not a complete nodes file; keeping the last known state");
                }
                follow.sink.update_status(|s| {
                    s.connected = false;
                    s.last_error = Some(text.clone());
                });
                broken = Some(text);
            }
        }
        // Polls; never fails.
        let _ = store.wait_change(0).await;
    }
}

/// What the etcd follower needs.
#[derive(Debug, Clone)]
pub struct EtcdFollow {
    pub endpoints: Vec<String>,
    /// TLS, client certificate, user.
    pub access: EtcdAccess,
    pub lease_ttl: Duration,
    pub policy: Policy,
    /// This node, with the pod CIDR it runs with as `pod_cidr`.
    pub request: JoinRequest,
    /// Where each session's connection is offered to the cluster objects'
    /// tasks.
    pub connection: super::cluster_objects::SharedConnection,
}

/// Which member an agent asks first: spread over the members by node name,
/// so that one member going away moves only its share of the agents.
fn first_member(name: &str, members: usize) -> usize {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash % u64::try_from(members.max(1)).unwrap_or(1)).unwrap_or(0)
}

/// Follows etcd: publishes this node under a lease and keeps it alive,
/// watches `/podnet/`, and runs [`ClusterFollow::round`] on every change.
/// When its member fails the agent moves to the next; while no member
/// answers it retries every [`RECONNECT_MAX`] at most, and the datapath
/// keeps the last state.
pub async fn follow_etcd(follow: EtcdFollow, registry: Arc<Mutex<Agent>>, network: NodeNetwork) {
    let sink = AgentSink { registry, network };
    sink.update_status(|s| {
        *s = DatastoreStatus {
            backend: "etcd".into(),
            node_grace_period_s: Some(follow.policy.node_grace_period.as_secs()),
            cidr_release_after_s: Some(follow.policy.cidr_release_after.as_secs()),
            ..DatastoreStatus::default()
        };
    });
    let mut next = first_member(&follow.request.name, follow.endpoints.len());
    let mut pause = RECONNECT_FIRST;
    let mut cluster = ClusterFollow::new(follow.request.name.clone(), follow.policy, sink, true);
    loop {
        let error = match EtcdDatastore::connect_from(
            &follow.endpoints,
            next,
            follow.lease_ttl,
            &follow.access,
        )
        .await
        {
            Err(e) => e,
            Ok((store, used)) => {
                // Whatever ends the session, the next one starts at another
                // member: this one may be the one that failed.
                next = (used + 1) % follow.endpoints.len();
                follow.connection.offer(store.client(), store.endpoint());
                let mut synced = false;
                // Boxed: the session's state machine is large (etcd-client's futures).
                let e = Box::pin(session(store, &follow.request, &mut cluster, &mut synced)).await;
                if synced {
                    pause = RECONNECT_FIRST;
                    warn!(error = %e, "etcd session ended; forwarding with the last known state while reconnecting");
                    cluster.sink.update_status(|s| {
                        s.connected = false;
                        s.last_error = Some(e.to_string());
                    });
                    continue;
                }
                e
            }
        };
        // Another node holds this node's CIDR: that does not change in two
        // seconds (it was logged loudly by the session).
        let wait = if matches!(error, DatastoreError::Conflict { .. }) {
            CONFLICT_RETRY
        } else {
            warn!(error = %error, retry_in = ?pause, "etcd unreachable; forwarding with the last known state");
            pause
        };
        cluster.sink.update_status(|s| {
            s.connected = false;
            s.endpoint = None;
            s.last_error = Some(error.to_string());
        });
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

/// One session with a leased store, until it fails: publishes this node
/// (`request`, with the CIDR it runs with) under a fresh lease, keeps the
/// lease alive, and follows the cluster. Sets `synced` once the cluster
/// state was applied.
pub async fn session<S: Datastore, K: ClusterSink>(
    mut store: S,
    request: &JoinRequest,
    follow: &mut ClusterFollow<K>,
    synced: &mut bool,
) -> DatastoreError {
    let publish = async {
        let cidr = store.claim_cidr(request).await?;
        let lease = store.publish(request, cidr).await?;
        Ok::<_, DatastoreError>((cidr, lease))
    };
    let lease = match publish.await {
        Ok((cidr, lease)) => {
            info!(%cidr, lease = format!("{lease:x}"), member = store.endpoint(), "published in the datastore");
            lease
        }
        Err(e) => {
            if matches!(e, DatastoreError::Conflict { .. }) {
                warn!(error = %e, "this node's pod CIDR was released while it was away and another node took it: \
                       its pods are not routed by other nodes; drain the node and restart the agent with a new CIDR");
            }
            return e;
        }
    };
    let mut keeper = store.clone();
    follow.invalid_logged.clear();
    let watch = async {
        loop {
            let round = follow.round(&mut store, unix_now().as_secs()).await?;
            *synced = true;
            if let Ok(changed) =
                tokio::time::timeout(round.wait, store.wait_change(round.revision)).await
            {
                changed?;
            }
        }
    };
    let ended: Result<(), DatastoreError> = tokio::select! {
        r = keeper.keep_alive(lease) => r,
        r = watch => r,
    };
    ended.err().unwrap_or_else(|| DatastoreError::EtcdProtocol {
        endpoint: store.endpoint(),
        action: "following the cluster".into(),
        msg: "session ended".into(),
    })
}

/// Logs what changed for each node since the last plan.
fn log_transitions(states: &mut BTreeMap<String, NodeState>, nodes: &[NodeStatus], policy: Policy) {
    let grace = membership::format_duration(policy.node_grace_period);
    for node in nodes {
        let name = &node.record.name;
        let before = states.insert(name.clone(), node.state);
        if before == Some(node.state) {
            continue;
        }
        match (before, node.state) {
            (None, NodeState::Live) => {}
            (_, NodeState::Live) => info!(node = %name, "node is back; nothing to change"),
            (_, NodeState::Unreachable) => warn!(node = %name, %grace,
                "node unreachable (its lease expired): its routes stay for the grace period"),
            (_, NodeState::Gone) => warn!(node = %name, %grace,
                "node gone for longer than the grace period: its routes are removed"),
        }
    }
    states.retain(|name, _| nodes.iter().any(|n| &n.record.name == name));
}

#[cfg(test)]
mod tests;
