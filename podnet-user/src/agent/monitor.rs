//! Drop events, from the datapath's ring buffer to every `podnetctl
//! monitor` client.
//!
//! One task reads the ring buffer (`AsyncFd` on its fd: woken when the
//! datapath submits), names the pod of each event and publishes it on a
//! broadcast channel; every client connection holds a receiver. The channel
//! is bounded and never waits: a client that reads too slowly loses the
//! oldest messages and is told how many ([`MonitorMessage::Lost`]), while
//! the reader and the other clients go on. Once a second the task also
//! publishes how many events the datapath suppressed, by reason.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use podnet_common::{DropEvent, DropReason, Program, event::DEFAULT_DROP_EVENTS_PER_SEC, names};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::broadcast,
};
use tracing::warn;

use super::Agent;
use crate::{
    api::{DropEventRecord, IdentityRef, MonitorHello, MonitorMessage, PodRef, proto_name},
    datapath::monotonic_ns,
};

/// Messages a client may be behind before it loses the oldest.
pub const CLIENT_BACKLOG: usize = 4096;
/// How often suppressed counts are published.
const TICK: Duration = Duration::from_secs(1);

/// Where monitor clients subscribe. Cheap to clone.
#[derive(Clone)]
pub struct MonitorHub {
    tx: broadcast::Sender<Arc<MonitorMessage>>,
}

impl Default for MonitorHub {
    fn default() -> Self {
        Self::new()
    }
}

impl MonitorHub {
    #[must_use]
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(CLIENT_BACKLOG).0,
        }
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<MonitorMessage>> {
        self.tx.subscribe()
    }

    #[must_use]
    pub fn hello(&self) -> MonitorHello {
        MonitorHello {
            drop_events_per_sec_per_cpu: DEFAULT_DROP_EVENTS_PER_SEC,
        }
    }

    pub(crate) fn publish(&self, message: MonitorMessage) {
        // No receiver: nobody is watching, the message goes nowhere.
        let _ = self.tx.send(Arc::new(message));
    }
}

/// The local endpoints as drop events need them, read again whenever the
/// registry's endpoints changed.
struct Pods {
    by_ifindex: HashMap<u32, PodRef>,
    by_ip: HashMap<Ipv4Addr, PodRef>,
    /// The registry's endpoint generation these are of.
    generation: u64,
    /// The policy sync's state (the plan in force names the identities of
    /// policy drops); `None` without a datastore.
    policy: Option<Arc<Mutex<super::policy::PolicyState>>>,
    /// Other nodes' addresses (their identity is `remote-node`).
    nodes: std::collections::HashSet<Ipv4Addr>,
    /// The Services sync's state (its plan names the Service of a
    /// `service_no_backend` drop); `None` without a datastore.
    services: Option<Arc<Mutex<super::services::ServicesState>>>,
}

impl Default for Pods {
    fn default() -> Self {
        Self {
            by_ifindex: HashMap::new(),
            by_ip: HashMap::new(),
            policy: None,
            nodes: std::collections::HashSet::new(),
            services: None,
            // Never a registry's: the first event reads them.
            generation: u64::MAX,
        }
    }
}

impl Pods {
    /// Reads the endpoints again if they changed since the last time.
    fn refresh(&mut self, registry: &Mutex<Agent>, generation: &AtomicU64) {
        if generation.load(Ordering::Acquire) == self.generation {
            return;
        }
        // The registry's lock may be held by a slow request.
        tokio::task::block_in_place(|| {
            let Ok(registry) = registry.lock() else {
                return;
            };
            self.generation = generation.load(Ordering::Acquire);
            self.policy = registry
                .cluster_objects()
                .map(super::cluster_objects::ClusterObjects::policy);
            self.services = registry
                .cluster_objects()
                .map(super::cluster_objects::ClusterObjects::services);
            self.nodes = registry
                .remote_nodes()
                .into_iter()
                .map(|n| n.node_ip)
                .collect();
            self.by_ifindex.clear();
            self.by_ip.clear();
            for ep in registry.endpoints.values() {
                let pod = PodRef {
                    container_id: ep.owner.container_id.clone(),
                    ifname: ep.owner.ifname.clone(),
                    ip: ep.ip,
                    host_ifname: ep.host_ifname.clone(),
                    matched: String::new(),
                };
                self.by_ifindex.insert(ep.host_ifindex, pod.clone());
                self.by_ip.insert(ep.ip, pod);
            }
        });
    }

    fn find(&self, ifindex: u32, src: Ipv4Addr, dst: Ipv4Addr) -> Option<PodRef> {
        let matched = |pod: &PodRef, how: &str| PodRef {
            matched: how.to_owned(),
            ..pod.clone()
        };
        if let Some(pod) = self.by_ifindex.get(&ifindex) {
            return Some(matched(pod, "veth"));
        }
        if let Some(pod) = self.by_ip.get(&src) {
            return Some(matched(pod, "source"));
        }
        self.by_ip.get(&dst).map(|pod| matched(pod, "destination"))
    }

    /// The Service of frontend `dst:dst_port/proto` in the plan in force.
    fn service(&self, dst: Ipv4Addr, dst_port: u16, proto: u8) -> Option<String> {
        let state = self.services.as_ref()?.lock().ok()?;
        let frontend = crate::services::Frontend {
            address: dst,
            port: dst_port,
            protocol: proto,
        };
        state
            .plan
            .as_ref()?
            .frontends
            .get(&frontend)
            .map(|f| f.service.to_string())
    }

    /// The identities of `src` and `dst` in the plan in force.
    fn identities(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<Vec<IdentityRef>> {
        use podnet_common::policy::{IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD};
        let state = self.policy.as_ref()?.lock().ok()?;
        let plan = state.plan.as_ref()?;
        let named = |ip: Ipv4Addr| {
            let id = plan.peer_identity(ip, |ip| self.nodes.contains(&ip));
            let name = match id {
                IDENTITY_HOST => "host".to_owned(),
                IDENTITY_WORLD => "world".to_owned(),
                IDENTITY_REMOTE_NODE => "remote-node".to_owned(),
                _ => plan.identity_labels.get(&id).map_or_else(
                    || "?".to_owned(),
                    |l| {
                        let labels: Vec<String> =
                            l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        format!("{}: {}", l.namespace, labels.join(","))
                    },
                ),
            };
            IdentityRef { id, name }
        };
        Some(vec![named(src), named(dst)])
    }
}

/// The Unix time of monotonic timestamp `ts_ns`.
fn unix_ns(ts_ns: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    now.saturating_sub(monotonic_ns().saturating_sub(ts_ns))
}

/// What the agent tells a client about `event`.
fn record(event: &DropEvent, pods: &Pods) -> DropEventRecord {
    let (src, dst) = (
        Ipv4Addr::from(event.src.to_ne_bytes()),
        Ipv4Addr::from(event.dst.to_ne_bytes()),
    );
    DropEventRecord {
        time_unix_ns: unix_ns(event.timestamp_ns),
        reason: event.drop_reason().map_or_else(
            || format!("reason_{}", event.reason),
            |r| r.name().to_owned(),
        ),
        program: Program::from_u8(event.program).map_or_else(
            || format!("program_{}", event.program),
            |p| p.name().to_owned(),
        ),
        ifindex: event.ifindex,
        cpu: event.cpu,
        len: event.len,
        proto: proto_name(event.proto),
        src,
        dst,
        src_port: u16::from_be(event.src_port),
        dst_port: u16::from_be(event.dst_port),
        pod: pods.find(event.ifindex, src, dst),
        identities: matches!(
            event.drop_reason(),
            Some(DropReason::PolicyDeniedIngress | DropReason::PolicyDeniedEgress)
        )
        .then(|| pods.identities(src, dst))
        .flatten()
        .unwrap_or_default(),
        service: (event.drop_reason() == Some(DropReason::ServiceNoBackend))
            .then(|| pods.service(dst, u16::from_be(event.dst_port), event.proto))
            .flatten(),
    }
}

fn open_pinned(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading the type of {}", path.display()))
}

/// Suppressed events by reason, summed over the CPUs.
fn suppressed_totals(map: &PerCpuArray<MapData, u64>) -> Vec<u64> {
    DropReason::ALL
        .iter()
        .map(|&reason| {
            map.get(&(reason as u32), 0)
                .map_or(0, |values| values.iter().sum())
        })
        .collect()
}

/// Reads drop events from the pinned ring buffer in `pin_dir` and publishes
/// them on `hub` until the task is dropped.
pub async fn run(
    hub: MonitorHub,
    pin_dir: &Path,
    registry: Arc<Mutex<Agent>>,
) -> anyhow::Result<()> {
    let ring = RingBuf::try_from(open_pinned(pin_dir, names::MAP_EVENTS)?)
        .context("opening the drop events as a ring buffer")?;
    // SAFETY: the ring buffer owns its map's fd (`MapData` holds it) and
    // returns that same fd from `as_raw_fd` until it is dropped, which is
    // when the `AsyncFd` is.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the drop events ring buffer")?;
    let suppressed: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_pinned(pin_dir, names::MAP_EVENTS_SUPPRESSED)?)
            .context("opening the suppressed-events counters")?;
    let mut last_suppressed = suppressed_totals(&suppressed);
    let generation = registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
        .endpoints_generation();
    let mut pods = Pods::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for drop events")?;
                let mut events = Vec::new();
                while let Some(item) = guard.get_inner_mut().next() {
                    if item.len() >= size_of::<DropEvent>() {
                        events.push(bytemuck::pod_read_unaligned::<DropEvent>(
                            &item[..size_of::<DropEvent>()],
                        ));
                    }
                }
                guard.clear_ready();
                if !events.is_empty() {
                    pods.refresh(&registry, &generation);
                }
                for event in &events {
                    hub.publish(MonitorMessage::Drop(Box::new(record(event, &pods))));
                }
            }
            _ = tick.tick() => {
                let now = suppressed_totals(&suppressed);
                for (i, (&now, &before)) in now.iter().zip(&last_suppressed).enumerate() {
                    if now > before {
                        hub.publish(MonitorMessage::Suppressed {
                            time_unix_ns: unix_ns(monotonic_ns()),
                            reason: DropReason::ALL[i].name().to_owned(),
                            count: now - before,
                        });
                    }
                }
                last_suppressed = now;
            }
        }
    }
}

/// Runs [`run`], logging why it stopped (the agent goes on without drop
/// events: forwarding does not depend on them).
pub async fn run_logged(hub: MonitorHub, pin_dir: std::path::PathBuf, registry: Arc<Mutex<Agent>>) {
    if let Err(e) = run(hub, &pin_dir, registry).await {
        warn!(error = %format!("{e:#}"), "drop events are not reported");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use podnet_common::{DropEvent, DropReason, Program};

    use super::{Pods, record};
    use crate::api::PodRef;

    fn pod(ip: Ipv4Addr) -> PodRef {
        PodRef {
            container_id: format!("c-{ip}"),
            ifname: "eth0".into(),
            ip,
            host_ifname: "pnveth".into(),
            matched: String::new(),
        }
    }

    #[test]
    fn an_event_names_its_pod_by_veth_then_source_then_destination() {
        let (a, b) = (Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3));
        let mut pods = Pods::default();
        pods.by_ifindex.insert(12, pod(a));
        pods.by_ip.insert(a, pod(a));
        pods.by_ip.insert(b, pod(b));
        let outside = Ipv4Addr::new(192, 0, 2, 1);
        let found = |ifindex, src, dst| {
            pods.find(ifindex, src, dst)
                .map(|p| (p.container_id, p.matched))
        };
        assert_eq!(found(12, b, b), Some((format!("c-{a}"), "veth".into())));
        assert_eq!(found(7, b, a), Some((format!("c-{b}"), "source".into())));
        assert_eq!(
            found(7, outside, a),
            Some((format!("c-{a}"), "destination".into()))
        );
        assert_eq!(found(7, outside, outside), None);
    }

    #[test]
    fn a_record_spells_out_the_event() {
        let event = DropEvent {
            timestamp_ns: 1,
            reason: DropReason::SpoofedSourceIp as u32,
            ifindex: 12,
            src: u32::from_ne_bytes([10, 244, 0, 99]),
            dst: u32::from_ne_bytes([10, 244, 0, 3]),
            src_port: 40_000u16.to_be(),
            dst_port: 7011u16.to_be(),
            proto: 17,
            program: Program::FromPod as u8,
            reserved: 0,
            len: 60,
            cpu: 1,
        };
        let r = record(&event, &Pods::default());
        assert_eq!(r.reason, "spoofed_source_ip");
        assert_eq!(r.program, "from_pod");
        assert_eq!(r.proto, "udp");
        assert_eq!(
            (r.src, r.src_port, r.dst, r.dst_port),
            (
                Ipv4Addr::new(10, 244, 0, 99),
                40_000,
                Ipv4Addr::new(10, 244, 0, 3),
                7011
            )
        );
        assert_eq!((r.ifindex, r.len, r.cpu, r.pod), (12, 60, 1, None));
        // A newer datapath's reason or program is shown by number.
        let unknown = record(
            &DropEvent {
                reason: 999,
                program: 99,
                ..event
            },
            &Pods::default(),
        );
        assert_eq!(
            (unknown.reason.as_str(), unknown.program.as_str()),
            ("reason_999", "program_99")
        );
        assert_eq!(r.service, None);
    }

    #[test]
    fn a_drop_for_want_of_backends_names_its_service() {
        use std::sync::{Arc, Mutex};

        use crate::services::{Frontend, FrontendPlan, ServiceName, ServicePlan};
        let frontend = Frontend {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: 6,
        };
        let plan = ServicePlan {
            frontends: [(
                frontend,
                FrontendPlan {
                    service: ServiceName {
                        namespace: "x".into(),
                        name: "web".into(),
                    },
                    port_name: String::new(),
                    backends: Vec::new(),
                    affinity_timeout_s: 0,
                    node_port: false,
                },
            )]
            .into(),
            conflicts: Vec::new(),
        };
        let pods = Pods {
            services: Some(Arc::new(Mutex::new(
                super::super::services::ServicesState {
                    plan: Some(Arc::new(plan)),
                    ..Default::default()
                },
            ))),
            ..Pods::default()
        };
        let event = DropEvent {
            timestamp_ns: 1,
            reason: DropReason::ServiceNoBackend as u32,
            ifindex: 12,
            src: u32::from_ne_bytes([10, 244, 0, 2]),
            dst: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port: 40_000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: 6,
            program: Program::FromPod as u8,
            reserved: 0,
            len: 60,
            cpu: 0,
        };
        let r = record(&event, &pods);
        assert_eq!(r.reason, "service_no_backend");
        assert_eq!(r.service.as_deref(), Some("x/web"));
        // Another reason to the same address names no Service.
        let other = record(
            &DropEvent {
                reason: DropReason::SpoofedSourceIp as u32,
                ..event
            },
            &pods,
        );
        assert_eq!(other.service, None);
    }
}
