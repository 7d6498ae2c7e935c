//! The agent's NetworkPolicy: compiles the cluster view (Namespaces, Pods
//! with their labels and IPs, NetworkPolicies; see [`crate::policy`]) into
//! the datapath's policy maps, and keeps them in step as the cluster and
//! the node's endpoints change.
//!
//! The maps are pinned and the datapath enforces from them alone, so
//! enforcement holds while the agent is down. Nothing is written before the
//! agent's view of the cluster has listed the datastore once: a restarted
//! agent keeps what its predecessor wrote until it knows better, and its
//! identities keep their numbers (seeded from the pinned map). Every change
//! is applied make-before-break: rules and identities first, then the
//! endpoints' policy bits, removals last; so no moment of a change allows
//! what neither the old nor the new policy allows. A map that refuses an
//! entry (full) is an error in the status and the metrics, and the
//! endpoint stays selected (denying what the missing entry would allow),
//! never a silent allow.

mod sync;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::{Duration, Instant},
};

pub use sync::{Applied, PolicyMaps, SyncReport, apply_plan};

use super::{Agent, cluster_objects::AgentView};
pub use crate::api::policy::PolicyStatus;
use crate::policy::{IdentityAllocator, LocalEndpoint, PolicyInput, PolicyPlan, compile};

/// How often the task looks for a change of the view or the endpoints: a
/// change reaches the maps within this (plus the compile and the writes).
pub const POLL: Duration = Duration::from_millis(100);

/// The policy sync's state, shared by its task and the agent's status.
#[derive(Debug, Default)]
pub struct PolicyState {
    pub status: PolicyStatus,
    /// The plan in force (for `podnetctl explain` and the monitor).
    pub plan: Option<Arc<PolicyPlan>>,
}

/// The local endpoints that name their pod, as the compiler takes them.
#[must_use]
pub fn local_endpoints(agent: &Agent) -> Vec<LocalEndpoint> {
    agent
        .endpoints
        .values()
        .filter_map(|endpoint| {
            endpoint.pod.as_ref().map(|pod| LocalEndpoint {
                ip: endpoint.ip,
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })
        })
        .collect()
}

/// This node's own IPv4 addresses (every interface of its network
/// namespace): what it sends to its pods is always allowed.
#[must_use]
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut found: Vec<Ipv4Addr> = addresses
        .filter_map(|a| a.address)
        .filter_map(|a| a.as_sockaddr_in().map(nix::sys::socket::SockaddrIn::ip))
        .filter(|ip| !ip.is_loopback())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// What a sync was of: the view's generation, the endpoints' and the
/// nodes' pod CIDRs.
type SyncedFrom = ((i64, u64), u64, BTreeMap<String, ipnet::Ipv4Net>);

/// Every routed node's pod CIDR (this node's included), by name.
fn node_cidrs(agent: &Agent) -> BTreeMap<String, ipnet::Ipv4Net> {
    agent
        .remote_nodes()
        .into_iter()
        .map(|n| (n.name, n.pod_cidr))
        .chain([(agent.config.node_name.clone(), agent.config.pod_cidr)])
        .collect()
}

/// Whether a pod record names an address of its own node's pod CIDR: a
/// node speaks for its own pods only. Without this, one node's credential
/// could give another node's pod (or any address) the identity of a
/// privileged pod, and with it what the policies allow that pod.
fn published_by_owner(
    cidrs: &BTreeMap<String, ipnet::Ipv4Net>,
    record: &crate::model::cluster::PodEndpointRecord,
) -> bool {
    cidrs
        .get(&record.node)
        .is_some_and(|cidr| cidr.contains(&record.ip))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps the policy maps in step with the view and the endpoints, forever
/// (see the module doc). Runs on a blocking thread of its own: compiling
/// a large cluster takes milliseconds the async tasks should not wait.
pub fn run(
    registry: &Arc<Mutex<Agent>>,
    view: &Arc<Mutex<AgentView>>,
    state: &Arc<Mutex<PolicyState>>,
) {
    let mut allocator = IdentityAllocator::default();
    let mut applied: Option<Applied> = None;
    // What the last sync was of: the view, the endpoints and the nodes'
    // pod CIDRs (a node's record may arrive after its pods').
    let mut last_seen: Option<SyncedFrom> = None;
    loop {
        std::thread::sleep(POLL);
        let (local, endpoints_generation, cidrs) = {
            let agent = lock(registry);
            (
                local_endpoints(&agent),
                agent.generation.load(Ordering::Relaxed),
                node_cidrs(&agent),
            )
        };
        let (view_generation, synced) = {
            let v = lock(view);
            (v.generation(), v.synced())
        };
        // Nothing before the first full list: the pinned maps hold the last
        // agent's policy, which is better than an empty view's.
        if !synced {
            continue;
        }
        let seen = (view_generation, endpoints_generation, cidrs.clone());
        if last_seen.as_ref() == Some(&seen) {
            continue;
        }
        let started = Instant::now();
        let hosts = host_addresses();
        if applied.is_none() {
            // A restart: the identities keep the numbers the pinned map
            // gives them.
            let agent_identities = lock(registry).datapath.identities();
            if let Ok(pinned) = agent_identities {
                let v = lock(view);
                allocator.seed(pinned.iter().filter_map(|(ip, &identity)| {
                    v.pods_at(*ip, |_| true).next().and_then(|record| {
                        v.pod_labels(&record.namespace, &record.name).map(|labels| {
                            (
                                crate::policy::IdentityLabels {
                                    namespace: record.namespace.clone(),
                                    labels: labels.clone(),
                                },
                                identity,
                            )
                        })
                    })
                }));
            }
        }
        let plan = {
            let v = lock(view);
            let input = PolicyInput {
                model: v.model(),
                pods: v
                    .pod_records()
                    .filter(|r| published_by_owner(&cidrs, r))
                    .collect(),
                local: &local,
                host_addresses: &hosts,
            };
            compile(&input, &mut allocator)
        };
        let report = {
            let mut agent = lock(registry);
            let maps = &mut agent.datapath;
            let current = match applied.take() {
                Some(current) => Ok(current),
                None => Applied::read(maps),
            };
            match current {
                Ok(current) => {
                    let (now, report) = apply_plan(maps, current, &plan);
                    applied = Some(now);
                    Ok(report)
                }
                Err(e) => Err(format!("reading the pinned policy maps: {e}")),
            }
        };
        let mut shared = lock(state);
        let status = &mut shared.status;
        status.syncs += 1;
        status.last_sync_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match report {
            Ok(report) => {
                last_seen = if report.errors.is_empty() {
                    Some(seen)
                } else {
                    None
                };
                status.synced = report.errors.is_empty() || status.synced;
                status.refused = report.refused;
                status.last_error = report.errors.first().cloned();
                status.ingress_selected = plan.ingress_selected();
                status.egress_selected = plan.egress_selected();
                status.identities = plan.identity_labels.len();
                status.addresses = plan.identities.len();
                status.rules = plan.rules.len();
                status.cidrs = plan.cidrs.len();
                shared.plan = Some(Arc::new(plan));
            }
            Err(e) => status.last_error = Some(e),
        }
    }
}

impl PolicyPlan {
    /// Local endpoints the plan selects for ingress.
    #[must_use]
    pub fn ingress_selected(&self) -> usize {
        self.endpoints
            .values()
            .filter(|&&flags| flags & podnet_common::endpoint::ENDPOINT_F_POLICY_INGRESS != 0)
            .count()
    }

    /// Local endpoints the plan selects for egress.
    #[must_use]
    pub fn egress_selected(&self) -> usize {
        self.endpoints
            .values()
            .filter(|&&flags| flags & podnet_common::endpoint::ENDPOINT_F_POLICY_EGRESS != 0)
            .count()
    }
}
