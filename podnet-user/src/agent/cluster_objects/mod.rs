//! The agent's share of the cluster objects: it publishes one endpoint
//! record per pod it holds (`publish.rs`), and it holds every object and
//! every node's endpoint records in memory from a watch of the datastore
//! (`view.rs`). Both run as tasks of their own beside the agent's lock:
//! a CNI ADD never waits for the datastore.
//!
//! What is published: for each endpoint the plugin named a pod for
//! (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`), a [`PodEndpointRecord`] under
//! `<node>/<namespace>/<name>`. The agent hands the publisher the whole
//! set it should hold whenever its endpoints change; the publisher makes
//! the node's records exactly that set (`replace_endpoints`: new ones
//! written, stale ones removed, unchanged ones left alone), at start, on
//! every change, after every failure (with backoff) and every
//! [`Timing::republish`], so a restarted agent republishes exactly what it
//! holds and a record changed behind its back is put right.
//!
//! Where they run: on etcd over the agent's own connection (each datastore
//! session offers its client, [`SharedConnection`]; a task whose store
//! failed waits briefly for the next session's), with the node's
//! credential, which reads `/podnet/` and writes only the node's own
//! records; on the nodes-file datastore over the store beside the file.
//!
//! The records of a node that is gone are not removed by the others (a
//! node's credential writes its own records only): consumers ignore the
//! records of nodes the membership plan does not route.

mod publish;
mod view;

pub use publish::{Timing, publish};
pub use view::{AgentView, follow};

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    api::{ClusterObjectsStatus, Endpoint, PublishStatus},
    datastore::objects::{EndpointKey, ObjectStoreError, etcd::EtcdObjectStore},
    endpoint::Owner,
    model::cluster::PodEndpointRecord,
};

/// The records a node should hold, by key (JSON of [`PodEndpointRecord`]).
pub type Wanted = BTreeMap<EndpointKey, Vec<u8>>;

/// The records for `endpoints` of `node`, and why some endpoint with a
/// pod has none (an invalid key, a second interface of the same pod).
#[must_use]
pub fn records_for<'a>(
    node: &str,
    endpoints: impl IntoIterator<Item = (&'a Owner, &'a Endpoint)>,
) -> (Wanted, Vec<String>) {
    let mut wanted = Wanted::new();
    let mut problems = Vec::new();
    // In owner order: of two interfaces of one pod (or a pod sandbox and
    // its leftover), the first owner's address is published.
    for (owner, ep) in endpoints {
        let Some(pod) = &ep.pod else { continue };
        let key = match EndpointKey::new(node, &pod.namespace, &pod.name) {
            Ok(key) => key,
            Err(e) => {
                problems.push(format!(
                    "endpoint {}:{} (pod {}/{}): {e}",
                    owner.container_id, owner.ifname, pod.namespace, pod.name
                ));
                continue;
            }
        };
        if wanted.contains_key(&key) {
            problems.push(format!(
                "endpoint {}:{} ({}): pod {}/{} has an earlier interface; only that one's address is published",
                owner.container_id, owner.ifname, ep.ip, pod.namespace, pod.name
            ));
            continue;
        }
        let record = PodEndpointRecord {
            node: node.to_owned(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ip: ep.ip,
        };
        match serde_json::to_vec(&record) {
            Ok(bytes) => {
                wanted.insert(key, bytes);
            }
            Err(e) => problems.push(format!("pod {}/{}: encoding: {e}", pod.namespace, pod.name)),
        }
    }
    (wanted, problems)
}

/// The publisher's state, as its task and the agent share it.
#[derive(Debug, Default)]
pub struct PublishState {
    /// Records the node should hold.
    pub(crate) records: usize,
    /// Endpoints with a pod that have no record, and why.
    pub(crate) problems: Vec<String>,
    pub(crate) in_sync: bool,
    pub(crate) revision: i64,
    pub(crate) failures: u64,
    pub(crate) last_error: Option<String>,
}

impl PublishState {
    fn status(&self) -> PublishStatus {
        let mut pending = self.problems.clone();
        if !self.in_sync {
            pending.insert(
                0,
                format!(
                    "{} endpoint record(s) to publish{}",
                    self.records,
                    self.last_error
                        .as_deref()
                        .map(|e| format!(" (retrying: {e})"))
                        .unwrap_or_default()
                ),
            );
        }
        PublishStatus {
            records: self.records,
            in_sync: self.in_sync,
            revision: self.revision,
            failures: self.failures,
            pending,
            last_error: self.last_error.clone(),
        }
    }
}

/// The agent's handle on both tasks: hands the publisher its endpoints,
/// reads the view and the publication state for status and metrics.
#[derive(Clone)]
pub struct ClusterObjects {
    node: String,
    backend: String,
    wanted: Arc<watch::Sender<Wanted>>,
    pub(crate) publish: Arc<Mutex<PublishState>>,
    view: Arc<Mutex<AgentView>>,
    policy: Arc<Mutex<super::policy::PolicyState>>,
    services: Arc<Mutex<super::services::ServicesState>>,
}

/// What the tasks read: [`publish`] the wanted records and writes its
/// state, [`follow`] writes the view.
pub struct Tasks {
    pub wanted: watch::Receiver<Wanted>,
    pub publish: Arc<Mutex<PublishState>>,
    pub view: Arc<Mutex<AgentView>>,
    /// The policy sync's state ([`super::policy::run`] writes it).
    pub policy: Arc<Mutex<super::policy::PolicyState>>,
    /// The Services sync's state ([`super::services::run`] writes it).
    pub services: Arc<Mutex<super::services::ServicesState>>,
}

impl ClusterObjects {
    /// A handle for `node` over a datastore `backend` (`file`, `etcd`), and
    /// what its tasks need.
    #[must_use]
    pub fn new(node: &str, backend: &str) -> (Self, Tasks) {
        let (tx, rx) = watch::channel(Wanted::new());
        let publish = Arc::new(Mutex::new(PublishState::default()));
        let view = Arc::new(Mutex::new(AgentView::default()));
        let policy = Arc::new(Mutex::new(super::policy::PolicyState::default()));
        let services = Arc::new(Mutex::new(super::services::ServicesState::default()));
        (
            Self {
                node: node.to_owned(),
                backend: backend.to_owned(),
                wanted: Arc::new(tx),
                publish: Arc::clone(&publish),
                view: Arc::clone(&view),
                policy: Arc::clone(&policy),
                services: Arc::clone(&services),
            },
            Tasks {
                wanted: rx,
                publish,
                view,
                policy,
                services,
            },
        )
    }

    /// The agent's endpoints now: the publisher makes the node's records
    /// match (soon, without blocking the caller).
    pub fn set_endpoints<'a>(
        &self,
        endpoints: impl IntoIterator<Item = (&'a Owner, &'a Endpoint)>,
    ) {
        let (wanted, problems) = records_for(&self.node, endpoints);
        {
            let mut state = self.publish.lock().unwrap_or_else(PoisonError::into_inner);
            state.records = wanted.len();
            state.problems = problems;
        }
        self.wanted.send_if_modified(|held| {
            if *held == wanted {
                false
            } else {
                *held = wanted;
                true
            }
        });
    }

    /// What the agent holds and has published.
    #[must_use]
    pub fn status(&self) -> ClusterObjectsStatus {
        let publish = self
            .publish
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status();
        let mut status = self
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status();
        status.backend.clone_from(&self.backend);
        status.publish = publish;
        status.policy = Some(
            self.policy
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .status
                .clone(),
        );
        status
    }

    /// The policy sync's state (the plan in force, its status).
    #[must_use]
    pub fn policy(&self) -> Arc<Mutex<super::policy::PolicyState>> {
        Arc::clone(&self.policy)
    }

    /// The Services sync's state (the plan in force, its status).
    #[must_use]
    pub fn services(&self) -> Arc<Mutex<super::services::ServicesState>> {
        Arc::clone(&self.services)
    }

    /// The view (for the features that read the cluster).
    #[must_use]
    pub fn view(&self) -> Arc<Mutex<AgentView>> {
        Arc::clone(&self.view)
    }
}

/// A connection, numbered by the session that offered it.
type Offered = (u64, Option<EtcdObjectStore>);

/// What a connect function of [`SharedConnection::connector`] returns.
pub type Connecting =
    Pin<Box<dyn Future<Output = Result<EtcdObjectStore, ObjectStoreError>> + Send>>;

/// The agent's etcd connection, shared with the cluster objects' tasks: each
/// datastore session (a connection to one member, moved to the next when it
/// fails) offers its client, and the tasks use the newest one, so an agent
/// holds one connection to etcd, not three.
#[derive(Clone)]
pub struct SharedConnection {
    offered: Arc<watch::Sender<Offered>>,
}

impl fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConnection")
            .field("session", &self.offered.borrow().0)
            .finish()
    }
}

impl Default for SharedConnection {
    fn default() -> Self {
        Self {
            offered: Arc::new(watch::channel((0, None)).0),
        }
    }
}

impl SharedConnection {
    /// A new session's connection (`endpoint` names it in errors).
    pub fn offer(&self, client: etcd_client::Client, endpoint: &str) {
        let store = EtcdObjectStore::new(client, endpoint);
        self.offered.send_modify(|(session, offered)| {
            *session += 1;
            *offered = Some(store);
        });
    }

    /// A connect function for [`publish`] and [`follow`]: the first call
    /// waits for a connection; a later one (the caller's store failed)
    /// waits up to `newer` for the next session's, then takes the current
    /// one again (the failure was not the connection's: a compaction, a
    /// refused write).
    pub fn connector(&self, newer: Duration) -> impl FnMut() -> Connecting + Send + 'static {
        let rx = self.offered.subscribe();
        let used = Arc::new(AtomicU64::new(0));
        move || {
            let (mut rx, used) = (rx.clone(), Arc::clone(&used));
            Box::pin(async move {
                let seen = used.load(Ordering::Acquire);
                let fresh = |(session, store): &Offered| store.is_some() && *session > seen;
                // Owned before anything else is awaited (a borrow of the
                // channel must not be held across an await).
                let newest = tokio::time::timeout(newer, async {
                    rx.wait_for(fresh).await.map(|o| Offered::clone(&o))
                })
                .await;
                let (session, store) = match newest {
                    Ok(Ok(offered)) => offered,
                    Ok(Err(_)) => return Err(ObjectStoreError::NoEndpoints),
                    Err(_) => rx
                        .wait_for(|(_, store)| store.is_some())
                        .await
                        .map(|o| Offered::clone(&o))
                        .map_err(|_| ObjectStoreError::NoEndpoints)?,
                };
                used.store(session, Ordering::Release);
                store.ok_or(ObjectStoreError::NoEndpoints)
            })
        }
    }
}

#[cfg(test)]
mod tests;
