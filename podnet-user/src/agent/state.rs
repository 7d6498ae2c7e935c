//! The agent: its state behind one lock (operations are short), and what
//! it does across its parts. Each responsibility adds its operations on
//! [`Agent`] in a module of its own, so a change to one has one home:
//!
//! | module | owns |
//! | --- | --- |
//! | `endpoints/` | the node's endpoints: records on disk, datapath entries, filters on their veths, shapers; the start-up reconcile |
//! | `cluster.rs`, `cluster/reconcile.rs` | the node's network: overlay/underlay programs, node config, remote pod CIDRs and host routes, masquerade |
//! | `follow.rs`, `join.rs` | following the cluster in the datastore (they call into `cluster.rs` through the agent, never the datapath) |
//! | `check.rs` | comparing what the agent believes with what the kernel holds |
//! | `explain.rs` | copying what a packet's path reads for `podnetctl explain` |
//! | `socket_lb.rs` | the socket LB's links on the pods' cgroup (`--socket-lb-cgroup`) |
//! | `cluster_objects/` | publishing the node's endpoint records, holding the cluster objects from a watch |
//! | `server.rs`, `metrics/`, `monitor.rs`, `http.rs`, `accept.rs` | the socket, Prometheus metrics, drop events, health, accept loops that survive running out of descriptors |
//!
//! Here: opening the agent (loading the records and reconciling), the
//! retries of what could not be set up yet, and status.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
};

use anyhow::Context as _;
use tracing::{info, warn};

use super::{AgentConfig, endpoints::attach_mode};
use crate::{
    api::{AgentStatus, CounterTotals, Endpoint, NodeInfo},
    datapath::Datapath,
    ipam::{Owner, PodRange},
};

/// The agent's state; one lock around it (operations are short).
pub struct Agent {
    pub(super) config: AgentConfig,
    pub(super) datapath: Datapath,
    pub(super) endpoints: BTreeMap<Owner, Endpoint>,
    /// Bumped whenever `endpoints` changes (who caches them, the drop
    /// event monitor, knows when to read them again).
    pub(super) generation: Arc<AtomicU64>,
    /// Endpoints whose filters failed to attach at start: retried.
    pub(super) unattached: BTreeSet<Owner>,
    /// Whether the node's devices are set up (overlay/underlay programs
    /// attached, node config written).
    pub(super) node_network_ready: bool,
    pub(super) cluster: super::cluster::ClusterState,
    /// Endpoint records that could not be read, kept aside (see
    /// [`record`]); reported until an operator removes them.
    pub(super) unreadable_records: Vec<PathBuf>,
    /// The cluster objects' tasks (publisher, view); `None` without a
    /// datastore.
    pub(super) cluster_objects: Option<super::cluster_objects::ClusterObjects>,
}

impl Agent {
    /// Loads the endpoint records and reconciles them with the live
    /// interfaces, the datapath and the attached programs (see [`Self::reconcile`]).
    pub fn open(
        config: AgentConfig,
        datapath: Datapath,
        network: &super::cluster::NodeNetwork,
    ) -> anyhow::Result<Self> {
        for dir in [
            config.endpoints_dir(),
            config.links_dir(),
            config.ipam_dir(),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut registry = Self {
            config,
            datapath,
            endpoints: BTreeMap::new(),
            generation: Arc::default(),
            unattached: BTreeSet::new(),
            node_network_ready: false,
            cluster: super::cluster::ClusterState::default(),
            unreadable_records: Vec::new(),
            cluster_objects: None,
        };
        // Before reconcile re-points the pods' programs at this build's.
        registry.write_node_checks(network)?;
        registry.load_records()?;
        registry.reconcile()?;
        registry.apply_socket_lb()?;
        Ok(registry)
    }

    /// Retries what is not in place yet: the node's network and endpoints
    /// whose filters failed to attach at start. Once everything is, the old
    /// build's programs are gone and a migration of pinned maps is
    /// finished. Returns whether everything is in place.
    pub fn retry_pending(&mut self, net: &super::cluster::NodeNetwork) -> bool {
        self.cluster.network = Some(net.clone());
        if !self.node_network_ready {
            match self.setup_node_network(net) {
                Ok(()) => {
                    self.node_network_ready = true;
                    // The services flag is clear from now on: what a bpf
                    // agent left in the Service maps can go.
                    if self.config.services == crate::api::services::ServicesMode::KubeProxy {
                        super::services::clear_maps(self);
                    }
                }
                Err(e) => warn!(error = %format!("{e:#}"),
                                "setting up the node's network failed; what runs is left as it is, retrying"),
            }
        }
        for owner in self.unattached.clone() {
            let Some(ep) = self.endpoints.get(&owner).cloned() else {
                self.unattached.remove(&owner);
                continue;
            };
            match self.install(&ep, true) {
                Ok(()) => {
                    info!(container = %owner.container_id, host = %ep.host_ifname, "endpoint re-installed");
                    self.unattached.remove(&owner);
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), host = %ep.host_ifname, "re-installing an endpoint");
                }
            }
        }
        let routes_done = self.retry_failed_routes(net);
        let done = self.node_network_ready && self.unattached.is_empty() && routes_done;
        if done && let Err(e) = self.datapath.finish_migration() {
            warn!(error = %format!("{e:#}"), "finishing the migration of pinned maps");
        }
        done
    }

    /// What [`Self::retry_pending`] still has to do, for `podnetctl status`.
    #[must_use]
    pub fn pending(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self.node_network_ready {
            pending.push("node network (overlay/underlay programs, node config)".to_owned());
        }
        pending.extend(self.unattached.iter().map(|o| {
            format!(
                "endpoint {}:{} (filters not attached)",
                o.container_id, o.ifname
            )
        }));
        pending.extend(self.failed_routes());
        pending
    }

    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_name: self.config.node_name.clone(),
            pod_cidr: self.config.pod_cidr,
            cluster_cidr: self.config.cluster_cidr,
            gateway: PodRange::new(self.config.pod_cidr)
                .map_or(self.config.pod_cidr.network(), |r| r.gateway()),
            mtu: self.config.mtu,
            ipam_dir: self.config.ipam_dir(),
        }
    }

    pub fn status(&self) -> anyhow::Result<AgentStatus> {
        Ok(AgentStatus {
            node: self.node_info(),
            endpoints: self.endpoints.len(),
            attach_mode: attach_mode().to_owned(),
            bpffs_dir: self.config.bpffs_dir.clone(),
            programs: self
                .datapath
                .programs()?
                .into_iter()
                .map(|p| p.name.to_owned())
                .collect(),
            pending: self.pending(),
            unreadable_records: self.unreadable_records.clone(),
            cluster_objects: self
                .cluster_objects
                .as_ref()
                .map(super::cluster_objects::ClusterObjects::status),
            services: Some(self.services_status()),
            // Counted off the lock: see `report::table_fill`.
            tables: Vec::new(),
            tables_error: None,
        })
    }

    /// Who translates Services, and the sync's state in bpf mode (which
    /// needs the cluster objects: without a datastore there are no
    /// Services, and the maps stay empty).
    #[must_use]
    pub fn services_status(&self) -> crate::api::services::ServicesStatus {
        use crate::api::services::{ServicesMode, ServicesStatus};
        let mode = self.config.services;
        let mut status = match (&self.cluster_objects, mode) {
            (Some(objects), ServicesMode::Bpf) => objects
                .services()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .status
                .clone(),
            (None, ServicesMode::Bpf) => ServicesStatus {
                last_error: Some(
                    "no datastore: no Services to translate (the maps stay as they are)".to_owned(),
                ),
                ..ServicesStatus::default()
            },
            (_, ServicesMode::KubeProxy) => ServicesStatus::default(),
        };
        status.mode = mode;
        status
    }

    /// [`crate::api::Request::Services`]'s answer.
    #[must_use]
    pub fn services_answer(&self) -> crate::api::services::ServicesAnswer {
        use crate::api::services::{ServicesAnswer, ServicesMode};
        match (&self.cluster_objects, self.config.services) {
            (Some(objects), ServicesMode::Bpf) => {
                // Status and listing from one look at the sync's state.
                let mut answer = objects
                    .services()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .answer();
                answer.status.mode = ServicesMode::Bpf;
                answer
            }
            _ => ServicesAnswer {
                status: self.services_status(),
                services: Vec::new(),
            },
        }
    }

    /// Hands the agent the cluster objects' tasks; its endpoints are
    /// published from now on (all of them now: a restart republishes).
    pub fn set_cluster_objects(&mut self, objects: super::cluster_objects::ClusterObjects) {
        objects.set_endpoints(&self.endpoints);
        self.cluster_objects = Some(objects);
    }

    /// The cluster objects' tasks, if the agent has a datastore.
    #[must_use]
    pub fn cluster_objects(&self) -> Option<&super::cluster_objects::ClusterObjects> {
        self.cluster_objects.as_ref()
    }

    /// Tells the publisher the endpoints changed.
    pub(super) fn endpoints_changed(&self) {
        if let Some(objects) = &self.cluster_objects {
            objects.set_endpoints(&self.endpoints);
        }
    }

    pub fn counters(&self) -> anyhow::Result<CounterTotals> {
        Ok(super::report::counter_totals(self.datapath.counters()?))
    }

    pub(crate) fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    #[must_use]
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    #[must_use]
    pub fn bpffs_dir(&self) -> &Path {
        &self.config.bpffs_dir
    }
}
