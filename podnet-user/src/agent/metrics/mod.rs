//! What the agent tells Prometheus and its log: every CNI operation it
//! handles (a log line, a counter by result and a latency histogram), and a
//! collector that reads the datapath's pinned maps and the agent's state when
//! Prometheus scrapes, never per packet.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Registry, Unit},
};
use tracing::{info, warn};

use super::{Agent, cluster_objects::ClusterObjects};
use crate::{
    api::{
        ClusterObjectsStatus, DatastoreStatus, Endpoint, Request,
        services::{ServicesMode, ServicesStatus},
    },
    datapath::{Counters, MapFill, PinnedMapReader},
    datastore::membership::NodeState,
    ipam::Owner,
};

/// Every metric's prefix.
pub const PREFIX: &str = "podnet";

/// A CNI operation as the agent sees it: the request the plugin sends for
/// each verb (VERSION and STATUS never reach the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CniOp {
    /// ADD: `AddEndpoint`.
    Add,
    /// DEL: `RemoveEndpoint`.
    Del,
    /// CHECK: `GetEndpoint`.
    Check,
    /// GC: `Gc`.
    Gc,
}

impl CniOp {
    pub const ALL: [Self; 4] = [Self::Add, Self::Del, Self::Check, Self::Gc];

    /// The operation `request` is part of; `None` for podnetctl's requests.
    #[must_use]
    pub fn of(request: &Request) -> Option<Self> {
        match request {
            Request::AddEndpoint { .. } => Some(Self::Add),
            Request::RemoveEndpoint { .. } => Some(Self::Del),
            Request::GetEndpoint { .. } => Some(Self::Check),
            Request::Gc { .. } => Some(Self::Gc),
            _ => None,
        }
    }

    /// The `verb` label value (the CNI verb, lower case).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Del => "del",
            Self::Check => "check",
            Self::Gc => "gc",
        }
    }
}

/// Who a CNI operation was for, for its log line.
#[derive(Debug, Clone, Default)]
pub struct OpSubject {
    pub owner: Option<Owner>,
    pub network: Option<String>,
}

impl OpSubject {
    /// The attachment (and network) `request` is about.
    #[must_use]
    pub fn of(request: &Request) -> Self {
        match request {
            Request::AddEndpoint { endpoint } => Self {
                owner: Some(endpoint.owner.clone()),
                network: Some(endpoint.network.clone()),
            },
            Request::RemoveEndpoint { owner } | Request::GetEndpoint { owner } => Self {
                owner: Some(owner.clone()),
                network: None,
            },
            Request::Gc { network, .. } => Self {
                owner: None,
                network: network.clone(),
            },
            _ => Self::default(),
        }
    }
}

type OpLabels = [(&'static str, &'static str); 2];
type VerbLabel = [(&'static str, &'static str); 1];
type HistogramFamily = Family<VerbLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. 4 s: an ADD takes a few ms, one stuck behind netlink or a
    // big GC much longer.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// The agent's CNI operations: counted by op and result, timed, and logged
/// one line each. Cheap to clone (shared counters).
#[derive(Debug, Clone)]
pub struct CniOps {
    total: Family<OpLabels, Counter>,
    duration: HistogramFamily,
}

impl Default for CniOps {
    fn default() -> Self {
        let ops = Self {
            total: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        // Every op and result from the start: a rate over a series that
        // appears with its first increment misses that increment.
        for op in CniOp::ALL {
            for result in ["ok", "error"] {
                let _ = ops
                    .total
                    .get_or_create(&[("verb", op.name()), ("result", result)]);
            }
            let _ = ops.duration.get_or_create(&[("verb", op.name())]);
        }
        ops
    }
}

impl CniOps {
    /// Counts, times and logs one operation; `error` is the agent's answer
    /// when it refused or failed.
    pub fn record(&self, op: CniOp, subject: &OpSubject, error: Option<&str>, took: Duration) {
        let result = if error.is_some() { "error" } else { "ok" };
        self.total
            .get_or_create(&[("verb", op.name()), ("result", result)])
            .inc();
        self.duration
            .get_or_create(&[("verb", op.name())])
            .observe(took.as_secs_f64());
        let container_id = subject.owner.as_ref().map(|o| o.container_id.as_str());
        let ifname = subject.owner.as_ref().map(|o| o.ifname.as_str());
        let network = subject.network.as_deref();
        // Milliseconds with microsecond precision.
        let duration_ms = (took.as_secs_f64() * 1_000_000.0).round() / 1000.0;
        match error {
            None => info!(
                verb = op.name(),
                container_id, ifname, network, result, duration_ms, "CNI operation"
            ),
            Some(error) => warn!(
                verb = op.name(),
                container_id, ifname, network, result, duration_ms, error, "CNI operation"
            ),
        }
    }
}

/// What the agent info metric says.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub version: String,
    pub mode: String,
    pub node: String,
    /// `none`, `file` or `etcd`.
    pub datastore: String,
}

/// The running agent, once it has loaded the datapath.
struct Attached {
    registry: Arc<Mutex<Agent>>,
    maps: PinnedMapReader,
}

/// The agent's metrics registry and health, shared by the HTTP server and
/// the agent. Until [`Self::attach`] (the agent is joining the cluster or
/// loading the datapath) it serves the CNI and info metrics and is not
/// ready.
pub struct AgentMetrics {
    registry: Registry,
    attached: Arc<OnceLock<Attached>>,
}

/// The agent's state the metrics need, copied under its lock.
struct Snapshot {
    endpoints: Vec<Endpoint>,
    pending: Vec<String>,
    datastore: DatastoreStatus,
    cluster_objects: Option<ClusterObjectsStatus>,
    services: ServicesStatus,
}

impl Snapshot {
    fn take(registry: &Mutex<Agent>) -> Option<Self> {
        let reg = registry.lock().ok()?;
        Some(Self {
            endpoints: reg.endpoints.values().cloned().collect(),
            pending: reg.pending(),
            datastore: reg.datastore_status(),
            cluster_objects: reg.cluster_objects().map(ClusterObjects::status),
            services: reg.services_status(),
        })
    }

    /// `Err(reason)` while the agent is not ready: something of the node's
    /// network or an endpoint still pending, or the datastore never applied.
    fn readiness(&self) -> Result<(), String> {
        if !self.pending.is_empty() {
            return Err(format!("pending: {}", self.pending.join("; ")));
        }
        if self.datastore.backend != "none" && self.datastore.last_sync_ms.is_none() {
            return Err(format!(
                "the datastore ({}) has not been synced yet{}",
                self.datastore.backend,
                self.datastore
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }
}

impl AgentMetrics {
    #[must_use]
    pub fn new(info: &AgentInfo, cni: &CniOps) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "agent",
            "The podnet agent: its version, forwarding mode, node and datastore (always 1).",
            Info::new([
                ("version", info.version.clone()),
                ("mode", info.mode.clone()),
                ("node", info.node.clone()),
                ("datastore", info.datastore.clone()),
            ]),
        );
        registry.register(
            "cni_operations",
            "CNI operations the agent handled (verb: add, del, check, gc; result: ok or error).",
            cni.total.clone(),
        );
        registry.register_with_unit(
            "cni_operation_duration",
            "How long the agent took to handle a CNI operation, its lock wait included.",
            Unit::Seconds,
            cni.duration.clone(),
        );
        let attached = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(AgentCollector {
            attached: Arc::clone(&attached),
        }));
        Self { registry, attached }
    }

    /// Hands over the running agent: from now on the datapath and agent
    /// metrics are served and readiness is the agent's. Later calls are
    /// ignored.
    pub fn attach(&self, registry: Arc<Mutex<Agent>>, maps: PinnedMapReader) {
        let _ = self.attached.set(Attached { registry, maps });
    }

    /// The exposition (OpenMetrics text). Blocks: reads the kernel's maps and
    /// takes the agent's lock briefly.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// `Ok` once the agent is ready (maps loaded, node network set up,
    /// nothing pending, the datastore synced), else why not. Blocks briefly
    /// on the agent's lock.
    pub fn readiness(&self) -> Result<(), String> {
        let attached = self
            .attached
            .get()
            .ok_or_else(|| "starting: joining the cluster and loading the datapath".to_owned())?;
        Snapshot::take(&attached.registry)
            .ok_or_else(|| "agent state poisoned by an earlier panic".to_owned())?
            .readiness()
    }
}

/// Reads the datapath and the agent at scrape time.
struct AgentCollector {
    attached: Arc<OnceLock<Attached>>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector")
            .field("attached", &self.attached.get().is_some())
            .finish()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(attached) = self.attached.get() else {
            return Ok(());
        };
        // Copied under the lock; the maps are read after it is released.
        let snapshot = Snapshot::take(&attached.registry);
        match attached.maps.counters() {
            Ok(counters) => encode_counters(&mut encoder, &counters)?,
            Err(e) => warn!(error = %e, "metrics: reading the datapath counters"),
        }
        match attached.maps.socket_lb_counters() {
            Ok(counters) => encode_socket_lb(&mut encoder, &counters)?,
            Err(e) => warn!(error = %e, "metrics: reading the socket LB's counters"),
        }
        if let Some(snapshot) = &snapshot {
            match attached.maps.endpoint_stats() {
                Ok(stats) => encode_endpoints(&mut encoder, &snapshot.endpoints, &stats)?,
                Err(e) => warn!(error = %e, "metrics: reading the endpoint counters"),
            }
            encode_datastore(&mut encoder, &snapshot.datastore, unix_now())?;
            if let Some(objects) = &snapshot.cluster_objects {
                encode_cluster_objects(&mut encoder, objects)?;
            }
            encode_services(&mut encoder, &snapshot.services)?;
            encode_ready(&mut encoder, snapshot)?;
        }
        match attached.maps.fill() {
            Ok(fill) => encode_fill(&mut encoder, &fill)?,
            Err(e) => warn!(error = %e, "metrics: reading the map fill levels"),
        }
        Ok(())
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// One family: a descriptor, then one sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<&Unit>),
    metric_type: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One family of constant counters.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(encoder, (name, help, unit), MetricType::Counter, rows)
}

/// One family of constant gauges.
fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, N)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(encoder, (name, help, unit), MetricType::Gauge, rows)
}

fn encode_counters(encoder: &mut DescriptorEncoder, c: &Counters) -> fmt::Result {
    counters(
        encoder,
        "datapath_verdicts",
        "Packets podnet's eBPF programs handled, by what they did with them (summed over CPUs).",
        None,
        c.verdicts.iter().map(|(&v, &n)| ([("verdict", v)], n)),
    )?;
    counters(
        encoder,
        "datapath_drops",
        "Packets podnet's eBPF programs dropped, by reason (summed over CPUs).",
        None,
        c.drops.iter().map(|(&r, &n)| ([("reason", r)], n)),
    )
}

/// The socket LB's counters (`podnetd --socket-lb-cgroup`), by name.
fn encode_socket_lb(
    encoder: &mut DescriptorEncoder,
    counted: &std::collections::BTreeMap<&'static str, u64>,
) -> fmt::Result {
    if counted.is_empty() {
        return Ok(());
    }
    counters(
        encoder,
        "socket_lb",
        "What the socket LB's cgroup programs did (connect_translated, sendmsg_translated: a ClusterIP turned into a backend; no_backend: a call refused; recvmsg_reversed, peername_reversed: the ClusterIP shown again; reverse_not_recorded: the reverse map refused an entry), summed over CPUs.",
        None,
        counted.iter().map(|(&name, &n)| ([("counter", name)], n)),
    )
}

/// Labels of one endpoint's series.
fn endpoint_labels(ep: &Endpoint) -> [(&'static str, String); 5] {
    [
        ("pod_ip", ep.ip.to_string()),
        ("container_id", ep.owner.container_id.clone()),
        ("ifname", ep.owner.ifname.clone()),
        ("network", ep.network.clone()),
        ("host_ifname", ep.host_ifname.clone()),
    ]
}

fn encode_endpoints(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Endpoint],
    stats: &HashMap<u32, podnet_common::EndpointStats>,
) -> fmt::Result {
    let rows = |field: fn(&podnet_common::EndpointStats) -> u64| {
        endpoints.iter().map(move |ep| {
            let value = stats.get(&ep.host_ifindex).map_or(0, field);
            (endpoint_labels(ep), value)
        })
    };
    counters(
        encoder,
        "endpoint_sent_packets",
        "Packets a pod sent, as from_pod counted them on its host veth (dropped ones included).",
        None,
        rows(|s| s.packets),
    )?;
    counters(
        encoder,
        "endpoint_sent",
        "Bytes a pod sent (L2 frames), as from_pod counted them on its host veth.",
        Some(&Unit::Bytes),
        rows(|s| s.bytes),
    )?;
    gauges(
        encoder,
        "endpoints",
        "Pod interfaces (CNI attachments) the agent serves.",
        None,
        [(NO_LABELS, count(endpoints.len()))],
    )
}

type NoLabels = [(&'static str, &'static str); 0];
const NO_LABELS: NoLabels = [];

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn encode_datastore(
    encoder: &mut DescriptorEncoder,
    status: &DatastoreStatus,
    now: Duration,
) -> fmt::Result {
    gauges(
        encoder,
        "datastore_connected",
        "1 while the agent follows the datastore (etcd: published and watching; nodes file: last read complete), else 0.",
        None,
        [(
            [("backend", status.backend.as_str())],
            u64::from(status.connected),
        )],
    )?;
    let state = |s: NodeState| match s {
        NodeState::Live => "live",
        NodeState::Unreachable => "unreachable",
        NodeState::Gone => "gone",
    };
    gauges(
        encoder,
        "datastore_nodes",
        "Other nodes the datastore lists, by state (live; unreachable: lease expired, still routed; gone: no longer routed).",
        None,
        [NodeState::Live, NodeState::Unreachable, NodeState::Gone].map(|s| {
            let n = status.nodes.iter().filter(|node| node.state == s).count();
            ([("state", state(s))], count(n))
        }),
    )?;
    if let Some(ms) = status.last_sync_ms {
        #[allow(clippy::cast_precision_loss)] // milliseconds since 1970 fit in f64 exactly
        let age = (now.as_secs_f64() - ms as f64 / 1000.0).max(0.0);
        gauges(
            encoder,
            "datastore_last_sync_age",
            "Seconds since the agent last applied the datastore's state (absent until it has).",
            Some(&Unit::Seconds),
            [(NO_LABELS, age)],
        )?;
    }
    Ok(())
}

fn encode_cluster_objects(
    encoder: &mut DescriptorEncoder,
    status: &ClusterObjectsStatus,
) -> fmt::Result {
    gauges(
        encoder,
        "cluster_objects",
        "Cluster objects the agent holds from its watch of the datastore, by kind (the API's plural name); kind=\"podendpoints\": every node's pod endpoint records.",
        None,
        status
            .counts
            .iter()
            .map(|(kind, &n)| ([("kind", kind.as_str())], count(n)))
            .chain([([("kind", "podendpoints")], count(status.pod_records))]),
    )?;
    gauges(
        encoder,
        "cluster_objects_revision",
        "The datastore revision the agent's view of the cluster objects has applied (a node behind the others has a lower one).",
        None,
        [(NO_LABELS, status.revision)],
    )?;
    counters(
        encoder,
        "cluster_objects_resyncs",
        "Times the agent listed every cluster object again after its first list (a compaction, a lost watch, a reconnection).",
        None,
        [(NO_LABELS, status.resyncs)],
    )?;
    gauges(
        encoder,
        "cluster_objects_watching",
        "1 while the agent watches the cluster objects, else 0.",
        None,
        [(NO_LABELS, u64::from(status.connected))],
    )?;
    gauges(
        encoder,
        "pod_records_published",
        "1 when the datastore holds exactly this node's pod endpoint records, else 0 (retrying).",
        None,
        [(NO_LABELS, u64::from(status.publish.in_sync))],
    )?;
    if let Some(policy) = &status.policy {
        encode_policy(encoder, policy)?;
    }
    Ok(())
}

fn encode_policy(
    encoder: &mut DescriptorEncoder,
    policy: &crate::api::policy::PolicyStatus,
) -> fmt::Result {
    gauges(
        encoder,
        "policy_selected_pods",
        "Local pods a NetworkPolicy isolates, by direction.",
        None,
        [
            ([("direction", "ingress")], count(policy.ingress_selected)),
            ([("direction", "egress")], count(policy.egress_selected)),
        ],
    )?;
    gauges(
        encoder,
        "policy_identities",
        "Pod identities (namespace and labels) the node knows.",
        None,
        [(NO_LABELS, count(policy.identities))],
    )?;
    gauges(
        encoder,
        "policy_synced",
        "1 once the agent has written the policy maps from a full view of the cluster, else 0 (the pinned maps hold the previous agent's policy).",
        None,
        [(NO_LABELS, u64::from(policy.synced))],
    )?;
    gauges(
        encoder,
        "policy_refused_entries",
        "Policy map entries refused in the last sync (a full map): the pods they were for deny more than their policies say, never less.",
        None,
        [(NO_LABELS, policy.refused)],
    )?;
    counters(
        encoder,
        "policy_syncs",
        "Times the agent compiled the policies and brought the maps in step.",
        None,
        [(NO_LABELS, policy.syncs)],
    )
}

/// The Services sync (bpf mode; zeros with kube-proxy, whose Services
/// the datapath does not see).
fn encode_services(encoder: &mut DescriptorEncoder, services: &ServicesStatus) -> fmt::Result {
    gauges(
        encoder,
        "services_bpf",
        "1 when the datapath translates Services (podnetd --services bpf), 0 when the node's kube-proxy does.",
        None,
        [(NO_LABELS, u64::from(services.mode == ServicesMode::Bpf))],
    )?;
    gauges(
        encoder,
        "services_frontends",
        "Service frontends (ClusterIP, port, protocol) the datapath translates.",
        None,
        [(NO_LABELS, count(services.frontends))],
    )?;
    gauges(
        encoder,
        "services_backends",
        "Backend slots over all Service frontends in the datapath's maps.",
        None,
        [(NO_LABELS, count(services.backends))],
    )?;
    gauges(
        encoder,
        "services_refused_entries",
        "Service map entries refused in the last sync (a full map): frontends translate to fewer backends than they have, or are not translated.",
        None,
        [(NO_LABELS, services.refused)],
    )?;
    gauges(
        encoder,
        "services_synced",
        "1 once the agent has written the Service maps from a full view of the cluster (bpf mode), else 0.",
        None,
        [(NO_LABELS, u64::from(services.synced))],
    )?;
    counters(
        encoder,
        "services_syncs",
        "Times the agent compiled the Services and brought the maps in step.",
        None,
        [(NO_LABELS, services.syncs)],
    )
}

fn encode_ready(encoder: &mut DescriptorEncoder, snapshot: &Snapshot) -> fmt::Result {
    gauges(
        encoder,
        "agent_ready",
        "1 when /readyz answers 200: node network set up, nothing pending, datastore synced.",
        None,
        [(NO_LABELS, u64::from(snapshot.readiness().is_ok()))],
    )?;
    gauges(
        encoder,
        "agent_pending",
        "Things the agent could not set up yet and retries (node network, endpoint filters, host routes).",
        None,
        [(NO_LABELS, count(snapshot.pending.len()))],
    )
}

fn encode_fill(encoder: &mut DescriptorEncoder, fill: &[MapFill]) -> fmt::Result {
    gauges(
        encoder,
        "map_entries",
        "Entries in a pinned BPF map (endpoints, veths, remote CIDRs, stack flows, identities, policy rules and CIDR sets, tracked connections, Service frontends and backend slots).",
        None,
        fill.iter().map(|f| ([("map", f.name)], f.entries)),
    )?;
    gauges(
        encoder,
        "map_max_entries",
        "Capacity of a pinned BPF map.",
        None,
        fill.iter().map(|f| ([("map", f.name)], f.max_entries)),
    )
}

#[cfg(test)]
mod tests;
