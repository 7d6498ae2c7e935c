//! The agent's Service translation (`podnetd --services bpf`): compiles
//! the cluster view (Services, EndpointSlices; see [`crate::services`])
//! into the datapath's Service maps, and keeps them in step as the
//! cluster changes. With `--services kube-proxy` (the default) nothing
//! here runs and the maps stay empty: the node's kube-proxy translates in
//! the stack.
//!
//! The maps are pinned and the datapath translates from them alone, so
//! Services keep working while the agent is down. Nothing is written
//! before the agent's view of the cluster has listed the datastore once:
//! a restarted agent keeps what its predecessor wrote until it knows
//! better, and the frontends keep their ids (seeded from the pinned map),
//! so an unchanged Service costs no write. Every change is applied
//! make-before-break (see [`apply_plan`]): no moment of it has the
//! datapath pick a backend slot that is not written, or translate to a
//! backend whose replies it would not translate back. A removed backend
//! keeps its connections (the datapath does not cut them), so the bit of
//! its port stays for [`PORT_LINGER`] after the last backend on it went.
//! A map that refuses an entry (full) is an error in the status and the
//! metrics.

mod sync;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use sync::{Applied, PORT_LINGER, PortLinger, ServiceMaps, SyncReport, apply_plan};
use tracing::{info, warn};

use super::{Agent, cluster_objects::AgentView};
pub use crate::api::services::{
    FrontendInfo, ServiceInfo, ServicesAnswer, ServicesMode, ServicesStatus,
};
use crate::{
    datapath::DatapathError,
    services::{Frontend, FrontendIds, ServicePlan, compile},
};

/// How often the task looks for a change of the view: a change reaches
/// the maps within this (plus the compile and the writes).
pub const POLL: Duration = Duration::from_millis(100);

/// The Services sync's state, shared by its task and the agent's status.
#[derive(Debug, Default)]
pub struct ServicesState {
    pub status: ServicesStatus,
    /// The plan in force.
    pub plan: Option<Arc<ServicePlan>>,
    /// Every frontend's id, as of the last sync.
    pub ids: BTreeMap<Frontend, u32>,
    /// Frontends the last sync could not write completely.
    pub incomplete: BTreeSet<Frontend>,
}

impl ServicesState {
    /// The answer to `Request::Services` (the status's mode set by the
    /// caller, who knows the agent's configuration).
    #[must_use]
    pub fn answer(&self) -> ServicesAnswer {
        let mut services: BTreeMap<(String, String), Vec<FrontendInfo>> = BTreeMap::new();
        for (frontend, planned) in self.plan.iter().flat_map(|p| &p.frontends) {
            let id = self.ids.get(frontend).copied();
            services
                .entry((
                    planned.service.namespace.clone(),
                    planned.service.name.clone(),
                ))
                .or_default()
                .push(FrontendInfo {
                    address: frontend.address,
                    port: frontend.port,
                    protocol: crate::api::proto_name(frontend.protocol),
                    port_name: planned.port_name.clone(),
                    id,
                    affinity_timeout_s: planned.affinity_timeout_s,
                    backends: planned.backends.iter().map(ToString::to_string).collect(),
                    in_datapath: id.is_some() && !self.incomplete.contains(frontend),
                });
        }
        ServicesAnswer {
            status: self.status.clone(),
            services: services
                .into_iter()
                .map(|((namespace, name), frontends)| ServiceInfo {
                    namespace,
                    name,
                    frontends,
                })
                .collect(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps the Service maps in step with the view, forever (see the module
/// doc). Runs on a blocking thread of its own, like the policy sync.
pub fn run(
    registry: &Arc<Mutex<Agent>>,
    view: &Arc<Mutex<AgentView>>,
    state: &Arc<Mutex<ServicesState>>,
    node_ip: Option<std::net::Ipv4Addr>,
) {
    let node = lock(registry).config.node_name.clone();
    lock(state).status.mode = ServicesMode::Bpf;
    let mut ids = FrontendIds::default();
    let mut applied: Option<Applied> = None;
    let mut last_seen: Option<(i64, u64)> = None;
    let mut linger = PortLinger::default();
    loop {
        std::thread::sleep(POLL);
        let (generation, synced) = {
            let v = lock(view);
            (v.generation(), v.synced())
        };
        // Nothing before the first full list: the pinned maps hold the
        // last agent's Services, which is better than an empty view's.
        if !synced || (last_seen == Some(generation) && !linger.due(Instant::now(), PORT_LINGER)) {
            continue;
        }
        let started = Instant::now();
        let plan = compile(lock(view).model(), &node, node_ip);
        // The state is updated before the agent's lock is let go: the
        // agent's check compares the maps with it under that lock.
        let mut agent = lock(registry);
        let report = {
            let maps = &mut agent.datapath;
            let current = match applied.take() {
                Some(current) => Ok(current),
                None => Applied::read(maps).inspect(|current| {
                    // A restart: the frontends keep the ids the pins give.
                    ids.seed(current.frontends.iter().map(|(&f, e)| (f, e.id)));
                }),
            };
            current.map(|current| {
                for &frontend in plan.frontends.keys() {
                    // `None` (every id held) is reported by apply_plan.
                    let _ = ids.assign(frontend);
                }
                let keep = linger.update(
                    &current.ports,
                    &plan.watched_ports(),
                    Instant::now(),
                    PORT_LINGER,
                );
                let (now, report) = apply_plan(maps, current, &plan, ids.all(), &keep);
                ids.retain(|f| plan.frontends.contains_key(f) || now.frontends.contains_key(f));
                applied = Some(now);
                report
            })
        };
        let mut shared = lock(state);
        let status = &mut shared.status;
        status.syncs += 1;
        status.last_sync_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        status.last_sync_unix_ms = Some(unix_ms());
        match report {
            Ok(report) => {
                last_seen = report.errors.is_empty().then_some(generation);
                if report.forgotten > 0 {
                    info!(
                        connections = report.forgotten,
                        "Services: UDP connections of backends that left dropped (their next \
                         datagram picks a live backend)"
                    );
                }
                if !report.errors.is_empty() && status.last_error.as_ref() != report.errors.first()
                {
                    warn!(refused = report.refused, incomplete = report.incomplete.len(),
                          error = ?report.errors.first(), "Services: the maps are not complete");
                }
                status.synced = report.errors.is_empty() || status.synced;
                status.refused = report.refused;
                status.incomplete = report.incomplete.len();
                status.last_error = report.errors.first().cloned();
                status.frontends = plan.frontends.len();
                status.backends = applied.as_ref().map_or(0, Applied::slot_count);
                status.services = plan
                    .frontends
                    .values()
                    .map(|f| &f.service)
                    .collect::<BTreeSet<_>>()
                    .len();
                status.conflicts.clone_from(&plan.conflicts);
                shared.ids = ids.all().clone();
                shared.incomplete = report.incomplete;
                shared.plan = Some(Arc::new(plan));
            }
            Err(e) => {
                status.last_error = Some(format!("reading the pinned Service maps: {e}"));
            }
        }
        drop(shared);
        drop(agent);
    }
}

/// `--services kube-proxy`: empties the Service maps a `--services bpf`
/// agent left, once the node network is set up (which is what clears the
/// node config's flag: the datapath no longer reads them); before, the
/// maps stay as they are.
pub fn clear_maps(agent: &mut Agent) {
    if !agent.node_network_ready {
        return;
    }
    match empty_maps(&mut agent.datapath) {
        // Nothing held, or an eBPF object without Service maps: nothing
        // to empty.
        Ok(None) | Err(DatapathError::MissingMap { .. }) => {}
        Ok(Some(report)) if report.errors.is_empty() => info!(
            removed = report.removed,
            "Services are kube-proxy's: emptied the Service maps a bpf-mode agent left"
        ),
        Ok(Some(report)) => warn!(errors = ?report.errors, "emptying the Service maps"),
        Err(e) => warn!(error = %e, "reading the Service maps"),
    }
}

/// Removes everything the Service maps hold (entries before their slots,
/// port bits last); `None` when they hold nothing.
pub fn empty_maps(maps: &mut impl ServiceMaps) -> Result<Option<SyncReport>, DatapathError> {
    let current = Applied::read(maps)?;
    if current == Applied::default() {
        return Ok(None);
    }
    let (_, report) = apply_plan(
        maps,
        current,
        &ServicePlan::default(),
        &BTreeMap::new(),
        &BTreeSet::new(),
    );
    Ok(Some(report))
}
