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
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::{EndpointRegistry, cluster::NodeNetwork};
use crate::{
    api::DatastoreStatus,
    datastore::{
        DatastoreError, JoinRequest, NodeRecord,
        etcd::EtcdDatastore,
        file::{FileDatastore, FileUpdate, Follower},
        membership::{self, NodeState, NodeStatus, Policy},
    },
};

/// How often the nodes file is looked at.
const FILE_POLL: Duration = Duration::from_millis(300);
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

fn update_status(registry: &Mutex<EndpointRegistry>, f: impl FnOnce(&mut DatastoreStatus)) {
    if let Ok(mut reg) = registry.lock() {
        let mut status = reg.datastore_status();
        f(&mut status);
        reg.set_datastore_status(status);
    }
}

/// Applies the nodes to route to (off the async runtime: netlink and map
/// updates block). Returns whether they were applied.
async fn apply(
    registry: &Arc<Mutex<EndpointRegistry>>,
    network: &NodeNetwork,
    nodes: Vec<NodeRecord>,
) -> bool {
    let (registry, network) = (Arc::clone(registry), network.clone());
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

/// Follows the nodes file on a thread of its own. A file that cannot be
/// read as a nodes file (empty, cut short, missing, not JSON) keeps the
/// last good state in the datapath and is logged once per breakage.
pub fn follow_file(
    path: &std::path::Path,
    registry: Arc<Mutex<EndpointRegistry>>,
    network: NodeNetwork,
) {
    let store = FileDatastore::new(path);
    update_status(&registry, |s| {
        *s = DatastoreStatus {
            backend: "file".into(),
            endpoint: Some(path.display().to_string()),
            ..DatastoreStatus::default()
        };
    });
    std::thread::spawn(move || {
        let me = registry
            .lock()
            .map(|r| r.config().node_name.clone())
            .unwrap_or_default();
        let mut follower = Follower::new(store, Duration::from_secs(10));
        loop {
            match follower.poll() {
                FileUpdate::Unchanged => {}
                FileUpdate::Nodes(nodes) => {
                    let applied = registry
                        .lock()
                        .map_err(|_| anyhow::anyhow!("agent state poisoned"))
                        .and_then(|mut reg| reg.apply_nodes(&network, &nodes));
                    match applied {
                        Ok(()) => update_status(&registry, |s| {
                            if !s.connected && s.last_sync_ms.is_some() {
                                info!("the nodes file is readable again");
                            }
                            s.connected = true;
                            s.last_sync_ms = Some(unix_ms());
                            s.last_error = None;
                            s.nodes = nodes
                                .iter()
                                .filter(|n| n.name != me)
                                .map(|n| NodeStatus {
                                    record: n.clone(),
                                    state: NodeState::Live,
                                    since: None,
                                    routed: true,
                                })
                                .collect();
                        }),
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "applying the cluster state");
                            // Read it again next time.
                            follower.forget();
                        }
                    }
                }
                FileUpdate::Broken { error, first } => {
                    if first {
                        warn!(error = %error, "the nodes file is not a complete nodes file; keeping the last known state");
                    }
                    update_status(&registry, |s| {
                        s.connected = false;
                        s.last_error = Some(error.to_string());
                    });
                }
            }
            std::thread::sleep(FILE_POLL);
        }
    });
}

/// What the etcd follower needs.
#[derive(Debug, Clone)]
pub struct EtcdFollow {
    pub endpoints: Vec<String>,
    pub lease_ttl: Duration,
    pub policy: Policy,
    /// This node, with the pod CIDR it runs with as `pod_cidr`.
    pub request: JoinRequest,
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
/// watches `/podnet/`, decides who is live, unreachable or gone
/// ([`membership::plan`]), writes tombstones, releases claims that are due,
/// and applies the nodes to route to. When its member fails the agent moves
/// to the next; while no member answers it retries every
/// [`RECONNECT_MAX`] at most, and the datapath keeps the last state.
pub async fn follow_etcd(
    follow: EtcdFollow,
    registry: Arc<Mutex<EndpointRegistry>>,
    network: NodeNetwork,
) {
    update_status(&registry, |s| {
        *s = DatastoreStatus {
            backend: "etcd".into(),
            node_grace_period_s: Some(follow.policy.node_grace_period.as_secs()),
            cidr_release_after_s: Some(follow.policy.cidr_release_after.as_secs()),
            ..DatastoreStatus::default()
        };
    });
    let mut next = first_member(&follow.request.name, follow.endpoints.len());
    let mut pause = RECONNECT_FIRST;
    let mut states: BTreeMap<String, NodeState> = BTreeMap::new();
    loop {
        let error = match EtcdDatastore::connect_from(&follow.endpoints, next, follow.lease_ttl)
            .await
        {
            Err(e) => e,
            Ok((store, used)) => {
                // Whatever ends the session, the next one starts at another
                // member: this one may be the one that failed.
                next = (used + 1) % follow.endpoints.len();
                let mut synced = false;
                // Boxed: the session's state machine is large (etcd-client's futures).
                let e = Box::pin(session(
                    store,
                    &follow,
                    &registry,
                    &network,
                    &mut states,
                    &mut synced,
                ))
                .await;
                if synced {
                    pause = RECONNECT_FIRST;
                    warn!(error = %e, "etcd session ended; forwarding with the last known state while reconnecting");
                    update_status(&registry, |s| {
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
        update_status(&registry, |s| {
            s.connected = false;
            s.endpoint = None;
            s.last_error = Some(error.to_string());
        });
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

/// One connection to one member, until it fails. Sets `synced` once the
/// cluster state was applied.
async fn session(
    mut store: EtcdDatastore,
    follow: &EtcdFollow,
    registry: &Arc<Mutex<EndpointRegistry>>,
    network: &NodeNetwork,
    states: &mut BTreeMap<String, NodeState>,
    synced: &mut bool,
) -> DatastoreError {
    let request = &follow.request;
    let me = request.name.as_str();
    let publish = async {
        let cidr = store.claim_cidr(request).await?;
        let lease = store.publish(request, cidr).await?;
        Ok::<_, DatastoreError>((cidr, lease))
    };
    let lease = match publish.await {
        Ok((cidr, lease)) => {
            info!(%cidr, lease = format!("{lease:x}"), member = store.endpoint(), "published in etcd");
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
    let endpoint = store.endpoint().to_owned();
    let mut invalid_logged: Vec<String> = Vec::new();
    let watch = async {
        loop {
            let snapshot = store.snapshot().await?;
            if !snapshot.live.contains_key(me) {
                return Err(DatastoreError::EtcdProtocol {
                    endpoint: endpoint.clone(),
                    action: "following the cluster".into(),
                    msg: "this node's liveness key is gone; publishing again".into(),
                });
            }
            for key in &snapshot.invalid {
                if !invalid_logged.contains(key) {
                    warn!(%key, "ignoring an unreadable key in etcd");
                    invalid_logged.push(key.clone());
                }
            }
            let now = unix_now().as_secs();
            let plan = membership::plan(&snapshot, follow.policy, Some(me), now);
            for name in &plan.mark_gone {
                if store.mark_gone(name, now).await? && snapshot.members.contains_key(name) {
                    info!(node = %name, "wrote the tombstone of a node without a lease");
                }
            }
            for (name, revision) in &plan.clear_tombstones {
                store.clear_tombstone(name, *revision).await?;
            }
            for release in &plan.releases {
                if store.release(release).await? {
                    warn!(node = %release.name, cidrs = ?release.cidrs, after = %membership::format_duration(follow.policy.cidr_release_after),
                          "released the pod CIDR of a node gone for longer than the release delay");
                }
            }
            log_transitions(states, &plan.nodes, follow.policy);
            let applied = apply(registry, network, plan.routed.clone()).await;
            update_status(registry, |s| {
                s.connected = true;
                s.endpoint = Some(endpoint.clone());
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
            });
            *synced = true;
            // One second past the next change by time alone: states change
            // on whole seconds.
            let wait = plan
                .next_check
                .map_or(RESYNC, |d| (d + Duration::from_secs(1)).min(RESYNC));
            if let Ok(changed) =
                tokio::time::timeout(wait, store.wait_change(snapshot.revision)).await
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
        endpoint: store.endpoint().to_owned(),
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
mod tests {
    use super::*;

    #[test]
    fn agents_spread_over_the_members() {
        let firsts: std::collections::BTreeSet<usize> = (1..=12)
            .map(|i| first_member(&format!("node{i}"), 3))
            .collect();
        assert_eq!(firsts.len(), 3, "some agent starts at each member");
        assert_eq!(first_member("node1", 1), 0);
        assert_eq!(first_member("node1", 0), 0);
    }
}
