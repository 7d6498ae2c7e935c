//! A simulated cluster in the lab's etcd, for the scale run: thousands of
//! nodes with their pods, and the cluster's Namespaces, Pods,
//! NetworkPolicies, Services and EndpointSlices, written with the keys and
//! bytes the agents and `podnetctl apply` write (node records published
//! under one lease per node, kept alive; endpoint records under each
//! node's prefix; objects validated and encoded as `apply` stores them),
//! then churned at set rates. Cilium's etcd-only mock (cilium/scaffolding
//! `cmapisrv-mock`) stands in for a cluster the same way. A few real
//! agents run beside it in lab nodes and are measured.
//!
//! Simulated nodes take the pod CIDRs of [`SIM_CIDRS`] (one /24 each) and
//! underlay addresses in 172.16.0.0/12 that nobody answers: nothing is
//! sent to them, the real agents only hold them.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp};
use futures::{StreamExt as _, stream};
use ipnet::Ipv4Net;
use podnet::{
    datastore::{
        NodeRecord,
        etcd::publication,
        objects::{
            EndpointKey,
            etcd::{MAX_TXN_OPS, endpoint_key, object_key},
        },
    },
    model::cluster::{PodEndpointRecord, decode},
    objects_ctl::prepare_apply,
};

use crate::services::scale::{ClusterIpService, TcpPort};

/// Where simulated nodes' pod CIDRs are (a /24 each): inside the real
/// agents' cluster CIDR ([`SIM_AGENT_CLUSTER_CIDR`]) and past the /24s the
/// real agents claim from its start.
pub const SIM_CIDRS: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 192, 0, 0), 10);

/// The cluster CIDR the real agents run with (`--cluster-cidr`): room for
/// 32,768 nodes' /24s.
pub const SIM_AGENT_CLUSTER_CIDR: &str = "10.128.0.0/9";

/// The Service port every simulated Service has, onto its backends' 8080.
pub const SIM_SERVICE_PORT: u16 = 80;

/// The simulated cluster's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub namespaces: usize,
    /// Distinct `app` labels per namespace: the cluster has
    /// `namespaces * label_sets` identities.
    pub label_sets: usize,
    /// Services, 2 endpoints each.
    pub services: usize,
    /// NetworkPolicies per namespace.
    pub policies_per_namespace: usize,
    /// The simulated nodes' lease TTL (the agents' default: 30 s).
    pub lease_ttl: i64,
}

impl SimSpec {
    /// The cluster: 5,000 nodes x 30 pods, 1,000 identities,
    /// 10,000 Services.
    #[must_use]
    pub const fn full() -> Self {
        Self {
            nodes: 5_000,
            pods_per_node: 30,
            namespaces: 50,
            label_sets: 20,
            services: 10_000,
            policies_per_namespace: 4,
            lease_ttl: 30,
        }
    }

    /// The version `cargo xtask test` runs: a few hundred nodes.
    #[must_use]
    pub const fn short() -> Self {
        Self {
            nodes: 300,
            pods_per_node: 5,
            namespaces: 10,
            label_sets: 5,
            services: 300,
            policies_per_namespace: 2,
            lease_ttl: 30,
        }
    }

    #[must_use]
    pub const fn pods(&self) -> usize {
        self.nodes * self.pods_per_node
    }

    #[must_use]
    pub const fn identities(&self) -> usize {
        self.namespaces * self.label_sets
    }

    fn pod_index(&self, node: usize, slot: usize) -> usize {
        node * self.pods_per_node + slot
    }

    fn pod_namespace(&self, node: usize, slot: usize) -> String {
        format!("ns{}", self.pod_index(node, slot) % self.namespaces)
    }

    fn pod_app(&self, node: usize, slot: usize) -> String {
        format!(
            "a{}",
            (self.pod_index(node, slot) / self.namespaces) % self.label_sets
        )
    }
}

/// Simulated node `i`'s name.
#[must_use]
pub fn node_name(i: usize) -> String {
    format!("sim{i:05}")
}

/// Simulated node `i`'s pod CIDR (a /24 of [`SIM_CIDRS`]).
#[must_use]
pub fn node_cidr(i: usize) -> Ipv4Net {
    let index = u32::try_from(i % (1 << 14)).unwrap_or(0);
    let base = u32::from(SIM_CIDRS.network());
    Ipv4Net::new_assert(Ipv4Addr::from(base + (index << 8)), 24)
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + u32::try_from(i).unwrap_or(0))
}

/// The address of pod `slot` of simulated node `node`.
#[must_use]
pub fn pod_ip(node: usize, slot: usize) -> Ipv4Addr {
    let offset = u32::try_from(2 + slot).unwrap_or(2);
    Ipv4Addr::from(u32::from(node_cidr(node).network()) + offset)
}

/// Service `k`'s ClusterIP (10.100.0.0/16, in the default Service CIDR).
#[must_use]
pub fn service_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + u32::try_from(k).unwrap_or(0))
}

fn pod_name(node: usize, slot: usize, generation: u32) -> String {
    format!("p{node}-{slot}-{generation}")
}

fn pod_json(spec: &SimSpec, node: usize, slot: usize, generation: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": spec.pod_namespace(node, slot),
            "name": pod_name(node, slot, generation),
            "labels": {"app": spec.pod_app(node, slot)},
        },
        "spec": {
            "nodeName": node_name(node),
            "containers": [{"name": "c", "image": "sim",
                            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
        },
    })
}

fn namespace_json(n: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 5)}},
    })
}

/// Policy `k` of namespace `n`: pods of one app take TCP 8080 from the
/// next app of their namespace and from namespaces of one team.
fn policy_json(spec: &SimSpec, n: usize, k: usize) -> serde_json::Value {
    let app = k % spec.label_sets;
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": format!("ns{n}"), "name": format!("pol{k}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("a{app}")}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": format!("a{}", (app + 1) % spec.label_sets)}}},
                    {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 5)}}},
                ],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }],
        },
    })
}

/// Service `k` with the pods at slot 0 of nodes `k + shift` and
/// `k + shift + 1` as its endpoints.
fn service(spec: &SimSpec, k: usize, shift: usize) -> ClusterIpService {
    let (a, b) = ((k + shift) % spec.nodes, (k + shift + 1) % spec.nodes);
    ClusterIpService {
        namespace: format!("ns{}", k % spec.namespaces),
        name: format!("svc{k}"),
        cluster_ip: service_ip(k),
        ports: vec![TcpPort {
            name: "http".into(),
            port: SIM_SERVICE_PORT,
            target: 8080,
        }],
        backends: vec![pod_ip(a, 0), pod_ip(b, 0)],
    }
}

/// `values` checked and encoded as `podnetctl apply` stores them: (etcd
/// key, bytes).
fn prepared(values: &[serde_json::Value]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values});
    let objects = decode(&list.to_string()).context("decoding simulated objects")?;
    let prepared = prepare_apply(&objects).map_err(|refused| {
        anyhow::anyhow!(
            "simulated objects refused: {}",
            refused
                .iter()
                .map(|r| r.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    Ok(prepared
        .iter()
        .map(|p| (object_key(p.path()), p.bytes().to_vec()))
        .collect())
}

fn endpoint_record(
    spec: &SimSpec,
    node: usize,
    slot: usize,
    generation: u32,
) -> anyhow::Result<(String, Vec<u8>)> {
    let record = PodEndpointRecord {
        node: node_name(node),
        namespace: spec.pod_namespace(node, slot),
        name: pod_name(node, slot, generation),
        ip: pod_ip(node, slot),
    };
    let key = EndpointKey::new(&record.node, &record.namespace, &record.name)?;
    Ok((endpoint_key(&key), serde_json::to_vec(&record)?))
}

/// A pod's two keys and values: its Pod object and its node's endpoint
/// record.
fn pod_writes(
    spec: &SimSpec,
    node: usize,
    slot: usize,
    generation: u32,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut writes = prepared(&[pod_json(spec, node, slot, generation)])?;
    writes.push(endpoint_record(spec, node, slot, generation)?);
    Ok(writes)
}

/// Puts `writes` in transactions of at most [`MAX_TXN_OPS`].
async fn put_all(client: &mut Client, writes: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let ops: Vec<TxnOp> = writes
        .into_iter()
        .map(|(k, v)| TxnOp::put(k, v, None))
        .collect();
    for chunk in ops.chunks(MAX_TXN_OPS) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("writing simulated keys")?;
    }
    Ok(())
}

/// The first error of `results`, if any.
fn all_ok<T>(results: Vec<anyhow::Result<T>>) -> anyhow::Result<()> {
    results.into_iter().try_for_each(|r| r.map(|_| ()))
}

/// How long loading took, part by part.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimes {
    pub nodes_s: f64,
    pub pods_s: f64,
    pub services_s: f64,
    pub policies_s: f64,
}

/// What the churn did.
#[derive(Debug, Default)]
pub struct ChurnCounts {
    pub pods_replaced: u64,
    pub nodes_restarted: u64,
    pub slices_changed: u64,
    pub errors: u64,
}

/// Churn rates, per second, cluster-wide.
#[derive(Debug, Clone, Copy)]
pub struct ChurnRates {
    pub pods: f64,
    pub nodes: f64,
    pub slices: f64,
}

impl ChurnRates {
    /// The issue's: pods 100/s; a node restart every 2 s; 10 EndpointSlice
    /// changes per second.
    #[must_use]
    pub const fn realistic() -> Self {
        Self {
            pods: 100.0,
            nodes: 0.5,
            slices: 10.0,
        }
    }
}

/// The simulated cluster: a client of the lab's etcd and what it wrote.
pub struct SimCluster {
    client: Client,
    pub spec: SimSpec,
    /// Each simulated node's current lease.
    leases: Arc<Vec<AtomicI64>>,
    /// Each pod slot's generation (its name's suffix).
    generations: Mutex<Vec<u32>>,
}

/// splitmix64: a fixed-seed sequence for the churn's picks.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick(state: &mut u64, n: usize) -> usize {
    usize::try_from(splitmix(state) % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

impl SimCluster {
    /// Connects to the lab's etcd (from its fabric namespace).
    pub async fn connect(endpoints: &[String], spec: SimSpec) -> anyhow::Result<Self> {
        let client = Client::connect(endpoints, None)
            .await
            .context("connecting to etcd")?;
        Ok(Self {
            client,
            spec,
            leases: Arc::new((0..spec.nodes).map(|_| AtomicI64::new(0)).collect()),
            generations: Mutex::new(vec![0; spec.pods()]),
        })
    }

    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Publishes simulated node `i` under a fresh lease.
    async fn publish_node(&self, i: usize) -> anyhow::Result<i64> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(self.spec.lease_ttl, None)
            .await
            .context("granting a lease")?
            .id();
        let record = NodeRecord {
            name: node_name(i),
            node_ip: node_ip(i),
            pod_cidr: node_cidr(i),
        };
        client
            .txn(Txn::new().and_then(publication(&record, lease)?))
            .await
            .with_context(|| format!("publishing {}", record.name))?;
        if let Some(slot) = self.leases.get(i) {
            slot.store(lease, Ordering::Relaxed);
        }
        Ok(lease)
    }

    /// Publishes node `i` (past the simulated ones: a node joining) and
    /// returns its pod CIDR; its lease is not kept alive.
    pub async fn join_node(&self, i: usize) -> anyhow::Result<Ipv4Net> {
        self.publish_node(i).await?;
        Ok(node_cidr(i))
    }

    /// Writes the whole cluster, many requests in flight.
    pub async fn load(&self, progress: &(dyn Fn(&str) + Sync)) -> anyhow::Result<LoadTimes> {
        const IN_FLIGHT: usize = 32;
        let spec = self.spec;
        let mut times = LoadTimes::default();
        let started = Instant::now();
        let mut client = self.client.clone();
        let mut policy_objects: Vec<serde_json::Value> =
            (0..spec.namespaces).map(namespace_json).collect();
        for n in 0..spec.namespaces {
            policy_objects
                .extend((0..spec.policies_per_namespace).map(|k| policy_json(&spec, n, k)));
        }
        put_all(&mut client, prepared(&policy_objects)?).await?;
        times.policies_s = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let results: Vec<anyhow::Result<i64>> = stream::iter(0..spec.nodes)
            .map(|i| self.publish_node(i))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        all_ok(results)?;
        times.nodes_s = started.elapsed().as_secs_f64();
        progress(&format!("{} nodes published", spec.nodes));

        let started = Instant::now();
        let results: Vec<anyhow::Result<()>> = stream::iter(0..spec.nodes)
            .map(|node| {
                let mut client = self.client.clone();
                async move {
                    let mut writes = Vec::new();
                    for slot in 0..spec.pods_per_node {
                        writes.extend(pod_writes(&spec, node, slot, 0)?);
                    }
                    put_all(&mut client, writes).await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        all_ok(results)?;
        times.pods_s = started.elapsed().as_secs_f64();
        progress(&format!("{} pods written", spec.pods()));

        let started = Instant::now();
        let chunks: Vec<Vec<usize>> = (0..spec.services)
            .collect::<Vec<_>>()
            .chunks(50)
            .map(<[usize]>::to_vec)
            .collect();
        let results: Vec<anyhow::Result<()>> = stream::iter(chunks)
            .map(|chunk| {
                let mut client = self.client.clone();
                async move {
                    let objects: Vec<serde_json::Value> = chunk
                        .iter()
                        .flat_map(|&k| service(&spec, k, 0).objects())
                        .collect();
                    put_all(&mut client, prepared(&objects)?).await
                }
            })
            .buffer_unordered(IN_FLIGHT / 4)
            .collect()
            .await;
        all_ok(results)?;
        times.services_s = started.elapsed().as_secs_f64();
        progress(&format!("{} Services written", spec.services));
        Ok(times)
    }

    /// Keeps every simulated node's current lease alive until `stop`: a
    /// keep-alive per lease every TTL/3, as each agent sends its own.
    pub async fn keep_alive(&self, stop: &AtomicBool) {
        let period =
            Duration::from_secs(u64::try_from(self.spec.lease_ttl / 3).unwrap_or(10).max(1));
        let mut keepers: Vec<Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>> =
            (0..self.spec.nodes).map(|_| None).collect();
        while !stop.load(Ordering::Relaxed) {
            let round = Instant::now();
            let client = self.client.clone();
            let leases = Arc::clone(&self.leases);
            let renewed: Vec<_> = stream::iter(keepers.drain(..).enumerate())
                .map(|(i, keeper)| {
                    let mut client = client.clone();
                    let lease = leases[i].load(Ordering::Relaxed);
                    async move {
                        let mut keeper = match keeper {
                            Some(k) if k.0 == lease => k,
                            _ => {
                                let (k, s) = client.lease_keep_alive(lease).await.ok()?;
                                (lease, k, s)
                            }
                        };
                        keeper.1.keep_alive().await.ok()?;
                        keeper.2.message().await.ok()??;
                        Some(keeper)
                    }
                })
                .buffered(64)
                .collect()
                .await;
            keepers = renewed;
            let rest = period.saturating_sub(round.elapsed());
            let deadline = Instant::now() + rest;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Replaces the pod in `slot` of `node` (deleted, created again under
    /// the next name with the same address), in one transaction.
    async fn replace_pod(&self, node: usize, slot: usize) -> anyhow::Result<()> {
        let generation = {
            let mut generations = self
                .generations
                .lock()
                .map_err(|_| anyhow::anyhow!("generations poisoned"))?;
            let g = &mut generations[self.spec.pod_index(node, slot)];
            *g += 1;
            *g
        };
        let old = pod_writes(&self.spec, node, slot, generation - 1)?;
        let new = pod_writes(&self.spec, node, slot, generation)?;
        let mut ops: Vec<TxnOp> = old
            .into_iter()
            .map(|(k, _)| TxnOp::delete(k, None))
            .collect();
        ops.extend(new.into_iter().map(|(k, v)| TxnOp::put(k, v, None)));
        self.client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .context("replacing a pod")?;
        Ok(())
    }

    /// Adds a pod beyond the simulated ones (`slot` >= pods per node) on
    /// `node`; its address.
    pub async fn add_pod(&self, node: usize, slot: usize) -> anyhow::Result<Ipv4Addr> {
        put_all(
            &mut self.client.clone(),
            pod_writes(&self.spec, node, slot, 0)?,
        )
        .await?;
        Ok(pod_ip(node, slot))
    }

    /// Writes Service `k` (past the simulated ones: a new Service).
    pub async fn add_service(&self, k: usize) -> anyhow::Result<Ipv4Addr> {
        put_all(
            &mut self.client.clone(),
            prepared(&service(&self.spec, k, 0).objects())?,
        )
        .await?;
        Ok(service_ip(k))
    }

    /// Churns the cluster at `rates` until `stop`; what it did.
    pub async fn churn(self: &Arc<Self>, rates: ChurnRates, stop: &AtomicBool) -> ChurnCounts {
        // Changes in flight at most: past it the churn waits (and falls
        // short of its rates, which the counts show).
        const IN_FLIGHT: usize = 128;
        let mut counts = ChurnCounts::default();
        let mut seed = 0x5CA1_E000_u64;
        let tick = Duration::from_millis(10);
        let per_tick = |rate: f64| rate * tick.as_secs_f64();
        let (mut pods, mut nodes, mut slices) = (0.0_f64, 0.0_f64, 0.0_f64);
        let mut slice_shift = 1;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running: tokio::task::JoinSet<(Churn, anyhow::Result<()>)> =
            tokio::task::JoinSet::new();
        let count = |counts: &mut ChurnCounts, done: (Churn, anyhow::Result<()>)| match done {
            (_, Err(_)) => counts.errors += 1,
            (Churn::Pod(..), Ok(())) => counts.pods_replaced += 1,
            (Churn::Node(_), Ok(())) => counts.nodes_restarted += 1,
            (Churn::Slice(..), Ok(())) => counts.slices_changed += 1,
        };
        while !stop.load(Ordering::Relaxed) {
            interval.tick().await;
            pods += per_tick(rates.pods);
            nodes += per_tick(rates.nodes);
            slices += per_tick(rates.slices);
            let mut work = Vec::new();
            while pods >= 1.0 {
                pods -= 1.0;
                let (node, slot) = (
                    pick(&mut seed, self.spec.nodes),
                    pick(&mut seed, self.spec.pods_per_node),
                );
                work.push(Churn::Pod(node, slot));
            }
            while nodes >= 1.0 {
                nodes -= 1.0;
                work.push(Churn::Node(pick(&mut seed, self.spec.nodes)));
            }
            while slices >= 1.0 {
                slices -= 1.0;
                slice_shift += 1;
                work.push(Churn::Slice(
                    pick(&mut seed, self.spec.services),
                    slice_shift,
                ));
            }
            for w in work {
                while running.len() >= IN_FLIGHT {
                    if let Some(Ok(done)) = running.join_next().await {
                        count(&mut counts, done);
                    }
                }
                let me = Arc::clone(self);
                running.spawn(async move {
                    let r = match w {
                        Churn::Pod(node, slot) => me.replace_pod(node, slot).await,
                        Churn::Node(i) => me.restart_node(i).await,
                        Churn::Slice(k, shift) => me.change_slice(k, shift).await,
                    };
                    (w, r)
                });
            }
            while let Some(done) = running.try_join_next() {
                if let Ok(done) = done {
                    count(&mut counts, done);
                }
            }
        }
        while let Some(done) = running.join_next().await {
            if let Ok(done) = done {
                count(&mut counts, done);
            }
        }
        counts
    }

    /// A node leaving and coming back: its lease revoked (its liveness key
    /// goes), then published again under a new one.
    async fn restart_node(&self, i: usize) -> anyhow::Result<()> {
        let lease = self.leases[i].load(Ordering::Relaxed);
        let _ = self.client.clone().lease_revoke(lease).await;
        self.publish_node(i).await.map(|_| ())
    }

    /// Service `k`'s EndpointSlice pointed at another pair of pods.
    async fn change_slice(&self, k: usize, shift: usize) -> anyhow::Result<()> {
        let [_, slice] = service(&self.spec, k, shift).objects();
        put_all(&mut self.client.clone(), prepared(&[slice])?).await
    }
}

#[derive(Debug, Clone, Copy)]
enum Churn {
    Pod(usize, usize),
    Node(usize),
    Slice(usize, usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_simulated_object_is_one_the_api_server_would_take() {
        let spec = SimSpec::short();
        let mut objects: Vec<serde_json::Value> =
            (0..spec.namespaces).map(namespace_json).collect();
        objects.push(policy_json(&spec, 3, 1));
        objects.push(pod_json(&spec, 7, 2, 4));
        objects.extend(service(&spec, 9, 3).objects());
        let written = prepared(&objects).expect("valid");
        assert_eq!(written.len(), spec.namespaces + 4);
        assert!(
            written
                .iter()
                .any(|(k, _)| k == "/podnet/cluster/pods/ns7/p7-2-4"),
            "{written:?}"
        );
    }

    #[test]
    fn simulated_addresses_are_distinct_and_inside_the_agents_cluster_cidr() {
        let cluster: Ipv4Net = SIM_AGENT_CLUSTER_CIDR.parse().expect("cidr");
        let spec = SimSpec::full();
        let mut cidrs = std::collections::HashSet::new();
        for i in 0..spec.nodes * 3 {
            let cidr = node_cidr(i);
            assert!(
                cluster.contains(&cidr) && SIM_CIDRS.contains(&cidr),
                "{cidr}"
            );
            assert!(cidrs.insert(cidr), "{cidr} twice");
        }
        assert!(node_cidr(0).contains(&pod_ip(0, spec.pods_per_node + 10)));
        // The real agents claim the first /24s of the cluster CIDR.
        assert!(!SIM_CIDRS.contains(&cluster.network()));
        let services: Ipv4Net = "10.96.0.0/12".parse().expect("cidr");
        assert!(services.contains(&service_ip(spec.services * 2)));
    }

    #[test]
    fn the_identities_are_the_namespaces_times_the_label_sets() {
        let spec = SimSpec::full();
        assert_eq!(spec.identities(), 1_000);
        let seen: std::collections::HashSet<(String, String)> = (0..spec.nodes)
            .flat_map(|n| (0..spec.pods_per_node).map(move |s| (n, s)))
            .map(|(n, s)| (spec.pod_namespace(n, s), spec.pod_app(n, s)))
            .collect();
        assert_eq!(seen.len(), spec.identities());
    }
}
