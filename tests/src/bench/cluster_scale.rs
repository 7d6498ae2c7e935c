//! The cluster scale run (`cluster-scale`): a 3-member etcd loaded with a
//! simulated cluster ([`crate::sim_cluster`]) and churned, a few real
//! agents in lab nodes beside it, and what they cost and how fast a change
//! reaches them:
//!
//! - **Load:** time to write the nodes, pods, Services and policies; etcd's
//!   database size and keys; time until every real agent's maps hold them
//!   all (identities, remote CIDRs, Service frontends).
//! - **Steady state and churn:** each real agent's RSS and CPU over a
//!   window without churn, then under churn ([`ChurnRates`]); etcd's
//!   request rate and watchers over the churn window (its `/metrics`).
//! - **Propagation under churn:** a node joining, a pod added on a
//!   simulated node, a Service added; from the start of the write to the
//!   entry in every real agent's map (polled every millisecond), p50/p99
//!   over every agent and probe.
//! - **Restart:** node1's agent killed, a pod added meanwhile, the agent
//!   started again: the time from its start until that pod is in its maps.
//! - **Traffic:** real pods ping each other across nodes for the whole
//!   churn; none may be lost.
//!
//! The simulated nodes do not watch: each real agent holds the one watch
//! per prefix an agent opens, and the figures give etcd's cost per watch;
//! a watch per simulated node would put 5,000 agents' event fan-out on the
//! same two cores as etcd and the agents measured (BENCHMARKS.md says what
//! that means for the 50,000-node plan).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;
use podnet::datapath::{MapFill, PinnedMapReader, ip_key};
use podnet_common::{
    RemoteNode,
    names::{MAP_IDENTITIES, MAP_REMOTE, MAP_SERVICES},
    service::{ServiceEntry, ServiceKey},
};

use super::{BenchOptions, Figure, figure, rounds::progress, stats::percentile, tools::rss_kib};
use crate::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions},
    sim_cluster::{
        ChurnCounts, ChurnRates, LoadTimes, SIM_AGENT_CLUSTER_CIDR, SIM_SERVICE_PORT, SimCluster,
        SimSpec,
    },
};

/// What one scale run measured.
#[derive(Debug)]
pub struct ScaleReport {
    pub spec: SimSpec,
    pub load: LoadTimes,
    /// From the end of the load until every real agent held it all.
    pub converge_s: f64,
    pub etcd_db_bytes: f64,
    pub etcd_keys: f64,
    /// Per real agent: (RSS MiB, CPU % of one core), steady and churn.
    pub steady: Vec<(f64, f64)>,
    pub churning: Vec<(f64, f64)>,
    /// Milliseconds from write to every agent's map, per kind of change.
    pub propagation: BTreeMap<&'static str, Vec<f64>>,
    pub churn: ChurnCounts,
    pub churn_s: f64,
    /// etcd over the churn window: requests per second (all members) and
    /// the watchers open at its end.
    pub etcd_requests_per_s: f64,
    pub etcd_watchers: f64,
    /// From the restarted agent's start until a pod added while it was
    /// down is in its maps.
    pub restart_converge_s: f64,
    /// The fewest entries its identity map held from the kill until then.
    pub restart_fewest_identities: u32,
    /// node1's maps at the end.
    pub fills: Vec<MapFill>,
    pub pings: (usize, usize),
    /// The slowest agent's last policy and Services sync (compile and map
    /// writes) at the end of the churn, ms: what each change waits behind.
    pub policy_sync_ms: f64,
    pub services_sync_ms: f64,
}

/// The slowest agent's last (policy, Services) sync, ms.
fn last_syncs(layout: &LabLayout) -> (f64, f64) {
    let mut slowest = (0.0_f64, 0.0_f64);
    for node in &layout.nodes {
        let Ok(status) = podnet::api::Client::new(&node.agent_socket)
            .call::<podnet::api::AgentStatus>(&podnet::api::Request::Status)
        else {
            continue;
        };
        #[allow(clippy::cast_precision_loss, reason = "milliseconds")]
        let ms = |v: u64| v as f64;
        if let Some(policy) = status.cluster_objects.and_then(|c| c.policy) {
            slowest.0 = slowest.0.max(ms(policy.last_sync_ms));
        }
        if let Some(services) = status.services {
            slowest.1 = slowest.1.max(ms(services.last_sync_ms));
        }
    }
    slowest
}

/// Real nodes and their pods in the run.
pub const REAL_NODES: usize = 3;
const REAL_PODS_PER_NODE: usize = 2;

/// A real agent's maps, opened from their pins.
struct AgentMaps {
    remote: LpmTrie<MapData, u32, RemoteNode>,
    identities: BpfHashMap<MapData, u32, u32>,
    services: BpfHashMap<MapData, ServiceKey, ServiceEntry>,
}

impl AgentMaps {
    fn open(bpffs: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<aya::maps::Map> {
            let pin = bpffs.join(name);
            Ok(aya::maps::Map::from_map_data(
                MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?,
            )?)
        };
        Ok(Self {
            remote: LpmTrie::try_from(open(MAP_REMOTE)?)?,
            identities: BpfHashMap::try_from(open(MAP_IDENTITIES)?)?,
            services: BpfHashMap::try_from(open(MAP_SERVICES)?)?,
        })
    }

    fn holds(&self, change: &Change) -> bool {
        match change {
            Change::Node(cidr) => self
                .remote
                .get(
                    &Key::new(u32::from(cidr.prefix_len()), ip_key(cidr.network())),
                    0,
                )
                .is_ok(),
            Change::Pod(ip) => self.identities.get(&ip_key(*ip), 0).is_ok(),
            Change::Service(ip) => self
                .services
                .get(
                    &ServiceKey {
                        address: ip_key(*ip),
                        port: SIM_SERVICE_PORT.to_be(),
                        protocol: 6,
                        pad: 0,
                    },
                    0,
                )
                .is_ok(),
        }
    }
}

/// A change whose arrival in the agents' maps is timed.
enum Change {
    Node(Ipv4Net),
    Pod(Ipv4Addr),
    Service(Ipv4Addr),
}

impl Change {
    const fn kind(&self) -> &'static str {
        match self {
            Self::Node(_) => "node join",
            Self::Pod(_) => "pod add",
            Self::Service(_) => "service add",
        }
    }
}

/// Polls every agent until each holds `change`; per agent, the time from
/// `since`. `None` for an agent that did not within `limit`.
async fn arrival(
    agents: &[AgentMaps],
    change: &Change,
    since: Instant,
    limit: Duration,
) -> Vec<Option<f64>> {
    let mut seen: Vec<Option<f64>> = vec![None; agents.len()];
    while since.elapsed() < limit {
        for (agent, seen) in agents.iter().zip(seen.iter_mut()) {
            if seen.is_none() && agent.holds(change) {
                *seen = Some(since.elapsed().as_secs_f64() * 1e3);
            }
        }
        if seen.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    seen
}

/// CPU seconds (user + system) of process `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis: utime is the 12th,
    // stime the 13th (proc(5): fields 14 and 15), in clock ticks (100/s).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Each agent's RSS (MiB) at the end of `window` and CPU (% of a core)
/// over it, while `during` runs.
async fn usage(pids: &[u32], window: Duration) -> Vec<(f64, f64)> {
    let before: Vec<Option<f64>> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    tokio::time::sleep(window).await;
    pids.iter()
        .zip(before)
        .map(|(&p, b)| {
            let rss = rss_kib(p).unwrap_or(0.0) / 1024.0;
            let cpu = cpu_seconds(p)
                .zip(b)
                .map_or(0.0, |(a, b)| (a - b) / window.as_secs_f64() * 100.0);
            (rss, cpu)
        })
        .collect()
}

/// Every member's `/metrics`, summed: (gRPC requests handled, watchers,
/// database bytes of the largest member, keys).
fn etcd_metrics(layout: &LabLayout) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (mut requests, mut watchers, mut db, mut keys) = (0.0, 0.0, 0.0_f64, 0.0_f64);
    for member in &layout.etcd {
        let url = member
            .client_url
            .strip_prefix("http://")
            .context("plain etcd only")?;
        let addr: SocketAddr = url.parse().with_context(|| format!("etcd address {url}"))?;
        let answer = crate::scrape::get(&layout.fabric_netns, addr, "/metrics")?;
        for s in crate::scrape::samples(&answer.body) {
            match s.name.as_str() {
                "grpc_server_handled_total" => requests += s.value,
                "etcd_debugging_mvcc_watcher_total" => watchers += s.value,
                "etcd_mvcc_db_total_size_in_bytes" => db = db.max(s.value),
                "etcd_debugging_mvcc_keys_total" => keys = keys.max(s.value),
                _ => {}
            }
        }
    }
    Ok((requests, watchers, db, keys))
}

/// Continuous pings between the real pods of different nodes; (sent, lost).
fn ping_while(layout: &LabLayout, stop: &AtomicBool) -> (usize, usize) {
    let pods = &layout.pods;
    let pairs: Vec<(String, Ipv4Addr)> = pods
        .iter()
        .flat_map(|a| {
            pods.iter()
                .filter(move |b| b.node != a.node)
                .map(move |b| (a.netns.clone(), b.ip))
        })
        .collect();
    let (sent, lost) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && !pairs.is_empty() {
        let (netns, ip) = &pairs[i % pairs.len()];
        i += 1;
        let ok = crate::lab::in_netns(netns, "ping")
            .and_then(|mut c| {
                Ok(c.args(["-c", "1", "-W", "1", &ip.to_string()])
                    .output()?
                    .status
                    .success())
            })
            .unwrap_or(false);
        sent.fetch_add(1, Ordering::Relaxed);
        if !ok {
            lost.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (sent.into_inner(), lost.into_inner())
}

/// Runs the scale run on a new lab: `spec` simulated, churned for
/// `churn_window`, `probes` changes of each kind timed.
pub fn run(spec: SimSpec, churn_window: Duration, probes: usize) -> anyhow::Result<ScaleReport> {
    let options = LabOptions {
        etcd_members: 3,
        agent_args: vec![
            "--cluster-cidr".into(),
            SIM_AGENT_CLUSTER_CIDR.into(),
            "--services".into(),
            "bpf".into(),
        ],
        ..LabOptions::default()
    };
    let lab = LabGuard::up_with(
        "cs",
        REAL_NODES,
        REAL_PODS_PER_NODE,
        "vxlan",
        LabDatastore::Etcd,
        options,
    )?;
    let layout = lab.layout.clone();
    // Everything on one runtime in the fabric namespace (where etcd
    // listens), so that the simulated leases are kept alive throughout.
    lab.layout
        .on_fabric_runtime(session(layout, spec, churn_window, probes))?
}

/// Polls until every agent's maps hold the whole simulated cluster; the
/// seconds it took.
async fn converged(
    bpffs: &[std::path::PathBuf],
    spec: SimSpec,
    since: Instant,
) -> anyhow::Result<f64> {
    let want = [
        (MAP_IDENTITIES, spec.pods()),
        (MAP_REMOTE, spec.nodes),
        (MAP_SERVICES, spec.services),
    ];
    loop {
        let mut all = true;
        for dir in bpffs {
            let fill = PinnedMapReader::open(dir)?.fill()?;
            for (name, n) in want {
                let entries = fill
                    .iter()
                    .find(|f| f.name == name)
                    .map_or(0, |f| f.entries);
                all &= usize::try_from(entries).unwrap_or(0) >= n;
            }
        }
        if all {
            return Ok(since.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_mins(10),
            "the agents did not hold the simulated cluster within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn session(
    mut layout: LabLayout,
    spec: SimSpec,
    churn_window: Duration,
    probes: usize,
) -> anyhow::Result<ScaleReport> {
    let bpffs: Vec<std::path::PathBuf> = layout.nodes.iter().map(|n| n.bpffs_dir.clone()).collect();
    let sim = Arc::new(SimCluster::connect(&layout.etcd_endpoints(), spec).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let (keeper, keeper_stop) = (Arc::clone(&sim), Arc::clone(&stop));
    let keeping = tokio::spawn(async move { keeper.keep_alive(&keeper_stop).await });
    let outcome = measured(&mut layout, &sim, &bpffs, churn_window, probes).await;
    stop.store(true, Ordering::Relaxed);
    let _ = keeping.await;
    outcome
}

/// node1's agent killed, a pod added meanwhile, the agent started again:
/// seconds from its start until the pod is in its maps (`node1`: its
/// maps), and the fewest identities its map held meanwhile (sampled every
/// 100 ms): a restarted agent must not drop the cluster's pods while it
/// catches up.
async fn restart(
    layout: &mut LabLayout,
    sim: &SimCluster,
    node1: &AgentMaps,
) -> anyhow::Result<(f64, u32)> {
    let name = layout.nodes[0].name.clone();
    let bpffs = layout.nodes[0].bpffs_dir.clone();
    let identities = || -> anyhow::Result<u32> {
        let fill = PinnedMapReader::open(&bpffs)?.fill()?;
        Ok(fill
            .iter()
            .find(|f| f.name == MAP_IDENTITIES)
            .map_or(0, |f| f.entries))
    };
    layout.kill_agent(&name)?;
    let added = sim.add_pod(0, sim.spec.pods_per_node + 100).await?;
    let mut fewest = identities()?;
    let started = Instant::now();
    layout.start_agent(&name)?;
    let mut sampled = Instant::now();
    loop {
        if sampled.elapsed() >= Duration::from_millis(100) {
            fewest = fewest.min(identities()?);
            sampled = Instant::now();
        }
        if node1.holds(&Change::Pod(added)) {
            return Ok((started.elapsed().as_secs_f64(), fewest.min(identities()?)));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_mins(2),
            "the restarted agent never caught up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn measured(
    layout: &mut LabLayout,
    sim: &Arc<SimCluster>,
    bpffs: &[std::path::PathBuf],
    churn_window: Duration,
    probes: usize,
) -> anyhow::Result<ScaleReport> {
    let spec = sim.spec;
    let load = sim
        .load(&|m: &str| progress(&format!("cluster-scale: {m}")))
        .await?;
    let converge_s = converged(bpffs, spec, Instant::now()).await?;
    progress(&format!(
        "cluster-scale: every agent holds the cluster {converge_s:.1} s after the load"
    ));
    let (_, _, etcd_db_bytes, etcd_keys) = etcd_metrics(layout)?;
    let agents: Vec<AgentMaps> = bpffs
        .iter()
        .map(|d| AgentMaps::open(d))
        .collect::<anyhow::Result<_>>()?;
    let agent_pids: Vec<u32> = layout.nodes.iter().map(|n| n.pid).collect();
    let steady = usage(&agent_pids, Duration::from_secs(10)).await;

    // Churn, with pings between the real pods and the probes timed.
    let requests_before = etcd_metrics(layout)?.0;
    let pods_stop = Arc::new(AtomicBool::new(false));
    let (ping_layout, ping_stop) = (layout.clone(), Arc::clone(&pods_stop));
    let pinger = std::thread::spawn(move || ping_while(&ping_layout, &ping_stop));
    let churn_started = Instant::now();
    let churn_stop = Arc::new(AtomicBool::new(false));
    let (churn_flag, churn_sim) = (Arc::clone(&churn_stop), Arc::clone(sim));
    let churning =
        tokio::spawn(async move { churn_sim.churn(ChurnRates::realistic(), &churn_flag).await });
    let usage_pids = agent_pids.clone();
    let usage_task = tokio::spawn(async move { usage(&usage_pids, churn_window).await });
    let mut propagation: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let probe_outcome = async {
        for i in 0..probes {
            for kind in 0..3 {
                let since = Instant::now();
                let change = match kind {
                    0 => Change::Node(sim.join_node(spec.nodes + 1 + i).await?),
                    1 => Change::Pod(
                        sim.add_pod(i % spec.nodes, spec.pods_per_node + i / spec.nodes)
                            .await?,
                    ),
                    _ => Change::Service(sim.add_service(spec.services + i).await?),
                };
                let times = arrival(&agents, &change, since, Duration::from_secs(30)).await;
                let entry = propagation.entry(change.kind()).or_default();
                for t in times {
                    entry.push(
                        t.with_context(|| format!("a {} never reached an agent", change.kind()))?,
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let churning_usage = usage_task.await?;
    let rest = churn_window.saturating_sub(churn_started.elapsed());
    if probe_outcome.is_ok() {
        tokio::time::sleep(rest).await;
    }
    churn_stop.store(true, Ordering::Relaxed);
    pods_stop.store(true, Ordering::Relaxed);
    let churn = churning.await?;
    let churn_s = churn_started.elapsed().as_secs_f64();
    let pings = pinger.join().unwrap_or((0, 0));
    probe_outcome?;
    let (policy_sync_ms, services_sync_ms) = last_syncs(layout);
    let (requests_after, etcd_watchers, _, _) = etcd_metrics(layout)?;
    let etcd_requests_per_s = (requests_after - requests_before) / churn_s;

    let (restart_converge_s, restart_fewest_identities) = restart(layout, sim, &agents[0]).await?;
    let fills = PinnedMapReader::open(&bpffs[0])?.fill()?;
    Ok(ScaleReport {
        spec,
        load,
        converge_s,
        etcd_db_bytes,
        etcd_keys,
        steady,
        churning: churning_usage,
        propagation,
        churn,
        churn_s,
        etcd_requests_per_s,
        etcd_watchers,
        restart_converge_s,
        restart_fewest_identities,
        fills,
        pings,
        policy_sync_ms,
        services_sync_ms,
    })
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn count(n: usize) -> f64 {
    n as f64
}

/// The bench part: the cluster, its figures.
pub fn measure(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let spec = if opts.quick {
        SimSpec::short()
    } else {
        SimSpec::full()
    };
    let report = run(
        spec,
        Duration::from_secs(if opts.quick { 20 } else { 60 }),
        if opts.quick { 3 } else { 10 },
    )?;
    figures.extend(report_figures(&report));
    Ok(())
}

/// A report as bench figures.
#[must_use]
pub fn report_figures(r: &ScaleReport) -> Vec<Figure> {
    let scenario = format!(
        "{} nodes x {} pods, {} Services",
        r.spec.nodes, r.spec.pods_per_node, r.spec.services
    );
    let one = |metric: &str, unit: &str, value: f64| {
        figure("cluster-scale", &scenario, metric, unit, vec![value])
    };
    let mut out = vec![
        one("load_nodes_s", "s", r.load.nodes_s),
        one("load_pods_s", "s", r.load.pods_s),
        one("load_services_s", "s", r.load.services_s),
        one("agents_converged_after_load_s", "s", r.converge_s),
        one("etcd_db_mib", "MiB", r.etcd_db_bytes / 1_048_576.0),
        one("etcd_keys", "keys", r.etcd_keys),
        one("etcd_requests_per_s_churn", "req/s", r.etcd_requests_per_s),
        one("etcd_watchers", "watchers", r.etcd_watchers),
        one("restart_converge_s", "s", r.restart_converge_s),
        one(
            "restart_fewest_identities",
            "entries",
            f64::from(r.restart_fewest_identities),
        ),
        one("policy_sync_ms", "ms", r.policy_sync_ms),
        one("services_sync_ms", "ms", r.services_sync_ms),
        one("pings_sent", "pings", count(r.pings.0)),
        one("pings_lost", "pings", count(r.pings.1)),
    ];
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_s = |n: u64| n as f64 / r.churn_s;
    out.push(one("churn_pods_per_s", "/s", per_s(r.churn.pods_replaced)));
    out.push(one(
        "churn_nodes_per_s",
        "/s",
        per_s(r.churn.nodes_restarted),
    ));
    out.push(one(
        "churn_slices_per_s",
        "/s",
        per_s(r.churn.slices_changed),
    ));
    out.push(one(
        "churn_errors",
        "errors",
        per_s(r.churn.errors) * r.churn_s,
    ));
    let max = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).fold(0.0, f64::max);
    out.push(one("agent_rss_mib_steady", "MiB", max(&r.steady, |u| u.0)));
    out.push(one("agent_cpu_pct_steady", "%", max(&r.steady, |u| u.1)));
    out.push(one("agent_rss_mib_churn", "MiB", max(&r.churning, |u| u.0)));
    out.push(one("agent_cpu_pct_churn", "%", max(&r.churning, |u| u.1)));
    for (kind, times) in &r.propagation {
        let name = kind.replace(' ', "_");
        out.push(one(&format!("{name}_p50_ms"), "ms", percentile(times, 0.5)));
        out.push(one(
            &format!("{name}_p99_ms"),
            "ms",
            percentile(times, 0.99),
        ));
        out.push(figure(
            "cluster-scale",
            &scenario,
            &format!("{name}_each_ms"),
            "ms",
            times.clone(),
        ));
    }
    for f in &r.fills {
        out.push(one(
            &format!("map_{}_entries", f.name),
            "entries",
            f64::from(f.entries),
        ));
        out.push(one(
            &format!("map_{}_max", f.name),
            "entries",
            f64::from(f.max_entries),
        ));
    }
    out
}
