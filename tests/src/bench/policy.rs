//! The NetworkPolicy part: what enforcement costs a pod, whether the cost
//! grows with the rules, how fast a policy written to the datastore is
//! enforced, and what the policy state of a large cluster takes in memory.
//!
//! One two-node lab (direct mode, file datastore, two pods a node): the
//! server pod and a client on node2, another client on node1.
//!
//! - **Apply to enforced** (`policy-apply`), agents running: a
//!   NetworkPolicy denying the server's ingress is written to the
//!   datastore (`podnetctl apply`) and a client on node1 opens a new TCP
//!   connection every millisecond until one is refused; the time from the
//!   write's return to the first refused attempt. Then the policy is
//!   deleted, and the time until a connection goes through again.
//! - **Enforcement cost** (`policy-same-node`, `policy-cross-node`), both
//!   agents stopped (their datapaths stay, as on an agent restart) and the
//!   maps written by the agent's own code (`compile` + `apply_plan`) from a
//!   cluster model: no policy, an allow policy selecting the server for
//!   ingress, and that plus one selecting the clients for egress (both
//!   sides judged); conditions in a drawn order every round, each
//!   measured over both pairs.
//! - **Rules** (`policy-rules`): the server selected by policies whose
//!   ingress rules add up to 10, 1,000 and 10,000 (each rule one peer
//!   identity and one TCP port, so one trie entry each), one of them
//!   allowing the clients, with 1,000 synthetic pod identities in the
//!   identity map; same-node latency and connection rate, sizes in a drawn
//!   order every round.
//! - **Memory** (`policy-rss`): the bench process's RSS before and after
//!   building the 10,000-rule model and compiling it (model, pod records,
//!   identities and the plan held): the policy state an agent holds for
//!   it. Compile and write times of that plan are reported beside it.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use podnet::{
    agent::policy::{Applied, apply_plan},
    datapath::{Datapath, PinnedMapReader},
    model::cluster::{ClusterModel, PodEndpointRecord, decode},
    policy::{IdentityAllocator, LocalEndpoint, PolicyInput, PolicyPlan, compile},
};
use podnet_common::counters::Verdict;
use serde_json::{Value, json};

use super::{
    BenchOptions, Figure,
    bpf_cost::BpfStatsSwitch,
    figure,
    rounds::progress,
    stats::percentile,
    tools::{PairRuns, Roles, connection_rate, latency, measure_pair, pair_figures, rss_kib},
};
use crate::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions, LabPod},
    netns::run_in,
};

/// The enforcement conditions (dataplane names).
pub const NO_POLICY: &str = "podnet no policy";
pub const ALLOW_INGRESS: &str = "podnet allow ingress";
pub const ALLOW_BOTH: &str = "podnet allow both sides";
/// The rule counts of the rules scenario, and their dataplane names.
pub const RULE_COUNTS: [usize; 3] = [10, 1_000, 10_000];
pub const RULES_10: &str = "podnet 10 rules";
pub const RULES_1K: &str = "podnet 1000 rules";
pub const RULES_10K: &str = "podnet 10000 rules";
/// Synthetic pod identities in every model of the part.
pub const IDENTITIES: usize = 1_000;

/// The model's namespace.
const NAMESPACE: &str = "bench";
/// Ingress rules per synthetic policy.
const RULES_PER_POLICY: usize = 100;
/// Port of the apply-to-enforced probe.
const PROBE_PORT: u16 = 19_200;

fn rules_name(rules: usize) -> &'static str {
    match rules {
        10 => RULES_10,
        1_000 => RULES_1K,
        _ => RULES_10K,
    }
}

/// A pod of the model: name, labels, address and node.
struct ModelPod {
    name: String,
    labels: Value,
    ip: Ipv4Addr,
    node: String,
}

/// The real pods of the part as the model names them: the server and the
/// same-node client on node2, the cross-node client on node1.
pub struct RealPods {
    pub server: (Ipv4Addr, String),
    pub client_same: (Ipv4Addr, String),
    pub client_cross: (Ipv4Addr, String),
}

/// Which policies a model holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policies {
    None,
    /// The server selected for ingress, allowing the clients.
    AllowIngress,
    /// That, and the clients selected for egress, allowing the server.
    AllowBoth,
    /// The server selected by policies with this many ingress rules in
    /// all, one of them allowing the clients, the rest one synthetic
    /// identity and one TCP port each.
    Rules(usize),
}

/// The address of synthetic pod `i`: 100.64.0.0/10 (no lab address).
#[must_use]
pub fn synthetic_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX - 1);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i)
}

fn pod_json(pod: &ModelPod) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": NAMESPACE, "name": pod.name, "labels": pod.labels},
        "spec": {"containers": [{"name": "c", "image": "bench"}]},
    })
}

fn policy_json(name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": NAMESPACE, "name": name},
        "spec": spec,
    })
}

/// The NetworkPolicies of `policies`.
#[must_use]
pub fn policy_objects(policies: Policies) -> Vec<Value> {
    let allow_clients = json!({"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]});
    let server = json!({"matchLabels": {"role": "server"}});
    match policies {
        Policies::None => Vec::new(),
        Policies::AllowIngress | Policies::AllowBoth => {
            let mut out = vec![policy_json(
                "allow-clients",
                &json!({"podSelector": server, "policyTypes": ["Ingress"], "ingress": [allow_clients]}),
            )];
            if policies == Policies::AllowBoth {
                out.push(policy_json(
                    "clients-to-server",
                    &json!({
                        "podSelector": {"matchLabels": {"role": "client"}},
                        "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": server}]}],
                    }),
                ));
            }
            out
        }
        Policies::Rules(total) => {
            let rules: Vec<Value> = (0..total)
                .map(|j| {
                    if j == 0 {
                        return allow_clients.clone();
                    }
                    let port = 1_024 + j / IDENTITIES;
                    json!({
                        "from": [{"podSelector": {"matchLabels": {"id": (j % IDENTITIES).to_string()}}}],
                        "ports": [{"protocol": "TCP", "port": port}],
                    })
                })
                .collect();
            rules
                .chunks(RULES_PER_POLICY)
                .enumerate()
                .map(|(k, chunk)| {
                    policy_json(
                        &format!("rules-{k}"),
                        &json!({"podSelector": server, "policyTypes": ["Ingress"], "ingress": chunk}),
                    )
                })
                .collect()
        }
    }
}

/// A cluster model: the real pods, [`IDENTITIES`] synthetic pods (each its
/// own label set, on no node of the lab) and `policies`; with every pod's
/// record.
pub fn model(
    real: &RealPods,
    policies: Policies,
) -> anyhow::Result<(ClusterModel, Vec<PodEndpointRecord>)> {
    let mut pods = vec![
        ModelPod {
            name: "server".into(),
            labels: json!({"role": "server"}),
            ip: real.server.0,
            node: real.server.1.clone(),
        },
        ModelPod {
            name: "client-same".into(),
            labels: json!({"role": "client", "pod": "client-same"}),
            ip: real.client_same.0,
            node: real.client_same.1.clone(),
        },
        ModelPod {
            name: "client-cross".into(),
            labels: json!({"role": "client", "pod": "client-cross"}),
            ip: real.client_cross.0,
            node: real.client_cross.1.clone(),
        },
    ];
    pods.extend((0..IDENTITIES).map(|i| ModelPod {
        name: format!("synthetic-{i}"),
        labels: json!({"id": i.to_string()}),
        ip: synthetic_ip(i),
        node: "elsewhere".into(),
    }));
    let mut items = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}},
    })];
    items.extend(pods.iter().map(pod_json));
    items.extend(policy_objects(policies));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let objects = decode(&list.to_string()).context("decoding the bench's cluster model")?;
    let mut model = ClusterModel::new();
    model.replace_all(objects, 1);
    let records = pods
        .into_iter()
        .map(|p| PodEndpointRecord {
            node: p.node,
            namespace: NAMESPACE.into(),
            name: p.name,
            ip: p.ip,
        })
        .collect();
    Ok((model, records))
}

/// The plan of one node: `local` its pods (by model name), `host` its
/// address.
fn plan_for(
    model: &ClusterModel,
    records: &[PodEndpointRecord],
    local: &[&str],
    host: Ipv4Addr,
) -> PolicyPlan {
    let local: Vec<LocalEndpoint> = records
        .iter()
        .filter(|r| local.contains(&r.name.as_str()))
        .map(|r| LocalEndpoint {
            ip: r.ip,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        })
        .collect();
    let hosts = [host];
    let input = PolicyInput {
        model,
        pods: records.iter().collect(),
        local: &local,
        host_addresses: &hosts,
    };
    compile(&input, &mut IdentityAllocator::default())
}

/// A node's datapath as the part writes it (agent stopped).
struct NodeMaps {
    datapath: Datapath,
    applied: Applied,
    bpffs: std::path::PathBuf,
}

impl NodeMaps {
    fn open(bpffs: &std::path::Path) -> anyhow::Result<Self> {
        let mut datapath = Datapath::load(bpffs).context("a node's datapath")?;
        let applied = Applied::read(&mut datapath).context("reading the policy maps")?;
        Ok(Self {
            datapath,
            applied,
            bpffs: bpffs.to_path_buf(),
        })
    }

    /// Writes `plan` as the agent does; fails on any refused entry.
    fn apply(&mut self, plan: &PolicyPlan) -> anyhow::Result<()> {
        let (now, report) = apply_plan(&mut self.datapath, std::mem::take(&mut self.applied), plan);
        self.applied = now;
        anyhow::ensure!(
            report.errors.is_empty() && report.refused == 0,
            "writing a plan: {} refused, {:?}",
            report.refused,
            report.errors
        );
        Ok(())
    }

    fn allowed(&self) -> anyhow::Result<u64> {
        Ok(PinnedMapReader::open(&self.bpffs)?
            .counters()?
            .verdict(Verdict::PolicyAllowed))
    }
}

/// Both nodes' plans of one condition.
struct Condition {
    name: &'static str,
    node1: PolicyPlan,
    node2: PolicyPlan,
}

fn condition(
    name: &'static str,
    real: &RealPods,
    hosts: (Ipv4Addr, Ipv4Addr),
    policies: Policies,
) -> anyhow::Result<Condition> {
    let (model, records) = model(real, policies)?;
    Ok(Condition {
        name,
        node1: plan_for(&model, &records, &["client-cross"], hosts.0),
        node2: plan_for(&model, &records, &["server", "client-same"], hosts.1),
    })
}

/// The roles' pods as the policy scenarios name them.
fn real_pods(roles: &Roles<'_>) -> RealPods {
    let at = |p: &LabPod| (p.ip, p.node.clone());
    RealPods {
        server: at(roles.server),
        client_same: at(roles.client_same),
        client_cross: at(roles.client_cross),
    }
}

/// Runs the NetworkPolicy part.
pub fn measure(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress("policy: building a direct-mode lab, two pods a node");
    let mut lab = LabGuard::up_with(
        "bpo",
        2,
        2,
        "direct",
        LabDatastore::File,
        LabOptions::default(),
    )?;
    measure_apply(&lab.layout, opts, figures)?;
    let (node1, node2) = (lab.layout.nodes[0].clone(), lab.layout.nodes[1].clone());
    for node in [&node1, &node2] {
        lab.layout
            .stop_agent(&node.name)
            .with_context(|| format!("stopping {}'s agent", node.name))?;
    }
    let mut maps = [
        NodeMaps::open(&node1.bpffs_dir)?,
        NodeMaps::open(&node2.bpffs_dir)?,
    ];
    let roles = Roles::of(&lab.layout)?;
    let real = real_pods(&roles);
    let hosts = (node1.node_ip, node2.node_ip);
    let _stats_off = BpfStatsSwitch::set(false)?;
    measure_enforcement(&roles, &real, hosts, &mut maps, opts, figures)?;
    measure_rules(&roles, &real, hosts, &mut maps, opts, figures)?;
    drop(maps);
    drop(lab);
    Ok(())
}

/// Seconds per throughput run of the part (iperf3 adds a second of
/// warm-up), and per latency and connection-rate run: short, there are
/// many (tens of thousands of round trips and connections each).
fn run_seconds(opts: &BenchOptions) -> (u64, u64) {
    (opts.seconds.min(2), 1)
}

/// The resident memory of `pid` once the allocator has handed what is
/// free back to the kernel (so that what was built and dropped does not
/// count as held).
fn settled_rss_kib(pid: u32) -> Option<f64> {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
    rss_kib(pid)
}

/// No policy, an allow policy on the server, and on both sides: paired
/// rounds over the same-node and the cross-node pair.
fn measure_enforcement(
    roles: &Roles<'_>,
    real: &RealPods,
    hosts: (Ipv4Addr, Ipv4Addr),
    maps: &mut [NodeMaps; 2],
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let conditions = [
        condition(NO_POLICY, real, hosts, Policies::None)?,
        condition(ALLOW_INGRESS, real, hosts, Policies::AllowIngress)?,
        condition(ALLOW_BOTH, real, hosts, Policies::AllowBoth)?,
    ];
    let pairs = [
        ("policy-same-node", roles.pair(roles.client_same, None)),
        ("policy-cross-node", roles.pair(roles.client_cross, None)),
    ];
    let (tput_seconds, seconds) = run_seconds(opts);
    let mut runs = PairRuns::new();
    let mut allowed: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rng = opts.rng("policy");
    for round in 1..=opts.rounds {
        let mut order: Vec<usize> = (0..conditions.len()).collect();
        rng.shuffle(&mut order);
        for c in order.into_iter().map(|i| &conditions[i]) {
            maps[0].apply(&c.node1)?;
            maps[1].apply(&c.node2)?;
            let before = maps[0].allowed()? + maps[1].allowed()?;
            let mut pair_order = [0, 1];
            rng.shuffle(&mut pair_order);
            for (scenario, pair) in pair_order.into_iter().map(|i| &pairs[i]) {
                progress(&format!(
                    "policy: round {round}/{}: {scenario}: {}",
                    opts.rounds, c.name
                ));
                measure_pair(pair, (tput_seconds, seconds), (scenario, c.name), &mut runs)?;
            }
            *allowed.entry(c.name).or_default() += maps[0].allowed()? + maps[1].allowed()? - before;
        }
    }
    pair_figures(runs, figures);
    // The evidence that the policy conditions were judged (connections
    // allowed by a rule) and the unselected one was not.
    for c in &conditions {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let n = allowed.get(c.name).copied().unwrap_or(0) as f64;
        figures.push(figure("policy", c.name, "policy_allowed", "count", vec![n]));
    }
    anyhow::ensure!(
        allowed.get(NO_POLICY).copied().unwrap_or(0) == 0
            && allowed.get(ALLOW_INGRESS).copied().unwrap_or(0) > 0
            && allowed.get(ALLOW_BOTH).copied().unwrap_or(0) > 0,
        "policy verdicts do not match the conditions: {allowed:?}"
    );
    Ok(())
}

/// 10, 1,000 and 10,000 rules: same-node latency and connection rate in
/// paired rounds; the memory and times of the largest plan.
fn measure_rules(
    roles: &Roles<'_>,
    real: &RealPods,
    hosts: (Ipv4Addr, Ipv4Addr),
    maps: &mut [NodeMaps; 2],
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let pid = std::process::id();
    let mut plans = Vec::new();
    for rules in RULE_COUNTS {
        progress(&format!(
            "policy: rules: compiling {rules} rules, {IDENTITIES} identities"
        ));
        let rss_before = settled_rss_kib(pid);
        let started = Instant::now();
        let (model, records) = model(real, Policies::Rules(rules))?;
        let model_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let plan = plan_for(&model, &records, &["server", "client-same"], hosts.1);
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let rss_after = settled_rss_kib(pid);
        let name = rules_name(rules);
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let counts = [
            ("trie_entries", plan.rules.len() as f64),
            ("identities", plan.identity_labels.len() as f64),
        ];
        for (metric, n) in counts {
            figures.push(figure("policy-rules", name, metric, "count", vec![n]));
        }
        for (metric, ms) in [("model_ms", model_ms), ("compile_ms", compile_ms)] {
            figures.push(figure("policy-rules", name, metric, "ms", vec![ms]));
        }
        if rules == RULE_COUNTS[RULE_COUNTS.len() - 1] {
            let started = Instant::now();
            maps[1].apply(&plan)?;
            let write_ms = started.elapsed().as_secs_f64() * 1e3;
            figures.push(figure(
                "policy-rules",
                name,
                "write_ms",
                "ms",
                vec![write_ms],
            ));
            if let (Some(a), Some(b)) = (rss_before, rss_after) {
                figures.push(figure(
                    "policy-rss",
                    name,
                    "policy_state_rss",
                    "KiB",
                    vec![b - a],
                ));
            }
        }
        // Held (model included) until the part ends: the memory stays.
        plans.push((name, plan, model, records));
    }
    // node1 unselected throughout (as with no policy).
    let none = condition(NO_POLICY, real, hosts, Policies::None)?;
    maps[0].apply(&none.node1)?;
    let pair = roles.pair(roles.client_same, None);
    let (_, seconds) = run_seconds(opts);
    let mut runs: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut rng = opts.rng("policy-rules");
    for round in 1..=opts.rounds {
        let mut order: Vec<usize> = (0..plans.len()).collect();
        rng.shuffle(&mut order);
        for (name, plan, _, _) in order.into_iter().map(|i| &plans[i]) {
            progress(&format!(
                "policy: rules: round {round}/{}: {name}",
                opts.rounds
            ));
            maps[1].apply(plan)?;
            let before = maps[1].allowed()?;
            let (p50, _) = latency(&pair, seconds).with_context(|| format!("{name} latency"))?;
            let rate = connection_rate(&pair, seconds)
                .with_context(|| format!("{name} connection rate"))?;
            anyhow::ensure!(
                maps[1].allowed()? > before,
                "{name}: no connection was allowed by a rule"
            );
            runs.entry((name, "latency_p50")).or_default().push(p50);
            runs.entry((name, "conn_rate")).or_default().push(rate);
        }
    }
    for ((name, metric), values) in runs {
        let unit = if metric == "conn_rate" {
            "conn/s"
        } else {
            "us"
        };
        figures.push(figure("policy-rules", name, metric, unit, values));
    }
    Ok(())
}

/// A TCP listener in `netns` that accepts and drops connections until
/// the returned flag is set (non-blocking, so it ends also when no
/// connection can reach it any more).
pub(super) fn probe_server(
    netns: &str,
    addr: SocketAddrV4,
) -> anyhow::Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    let listener = run_in(netns, move || TcpListener::bind(addr))?.context("probe server bind")?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    Ok((stop, handle))
}

/// From `netns`, new connections to `addr` one after another (a refused
/// one gives up after 20 ms) until one's outcome is `want` (connected or
/// not): the time from `since` to that attempt's start.
pub(super) fn probe_until(
    netns: &str,
    addr: SocketAddrV4,
    want: bool,
    since: Instant,
) -> anyhow::Result<Duration> {
    run_in(netns, move || -> anyhow::Result<Duration> {
        // Generous: with 10,000 Services in the cluster an agent's sync
        // takes seconds (the services-scale part).
        let limit = Duration::from_mins(1);
        loop {
            let attempt = Instant::now();
            let connected =
                TcpStream::connect_timeout(&addr.into(), Duration::from_millis(20)).is_ok();
            if connected == want {
                return Ok(attempt.saturating_duration_since(since));
            }
            anyhow::ensure!(
                since.elapsed() < limit,
                "no connection {} within {limit:?}",
                if want { "succeeded" } else { "was refused" }
            );
            if connected {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })?
}

/// `podnetctl apply|delete -f -` of `object` against the lab's datastore.
fn podnetctl(layout: &LabLayout, verb: &str, object: &Value) -> anyhow::Result<()> {
    let mut child = layout
        .podnetctl_objects(&[verb.to_owned(), "-f".to_owned(), "-".to_owned()])?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("podnetctl {verb}"))?;
    child
        .stdin
        .take()
        .context("podnetctl's stdin")?
        .write_all(object.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "podnetctl {verb}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Apply to enforced on the server's node, agents running: p50/p99 over
/// the applies, and of the delete to allowed again.
fn measure_apply(
    layout: &LabLayout,
    opts: &BenchOptions,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let roles = Roles::of(layout)?;
    layout.describe_pods().context("the lab's Pod objects")?;
    let deny = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": roles.server.k8s_namespace(), "name": "bench-deny"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": roles.server.k8s_name()}},
            "policyTypes": ["Ingress"],
        },
    });
    let addr = SocketAddrV4::new(roles.server.ip, PROBE_PORT);
    let (stop, server) = probe_server(&roles.server.netns, addr)?;
    let client = roles.client_cross.netns.clone();
    let applies = if opts.quick { 3 } else { 20 };
    let measured = (|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        // Reachable before the first apply (the agents have synced).
        probe_until(&client, addr, true, Instant::now()).context("before any policy")?;
        let (mut denied, mut allowed) = (Vec::new(), Vec::new());
        for i in 1..=applies {
            progress(&format!("policy: apply to enforced {i}/{applies}"));
            podnetctl(layout, "apply", &deny)?;
            let written = Instant::now();
            denied.push(probe_until(&client, addr, false, written)?.as_secs_f64() * 1e3);
            podnetctl(layout, "delete", &deny)?;
            let deleted = Instant::now();
            allowed.push(probe_until(&client, addr, true, deleted)?.as_secs_f64() * 1e3);
        }
        Ok((denied, allowed))
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    let (denied, allowed) = measured?;
    for (name, values) in [
        ("podnet apply to denied", denied),
        ("podnet delete to allowed", allowed),
    ] {
        for (metric, p) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
            figures.push(figure(
                "policy-apply",
                name,
                metric,
                "ms",
                vec![percentile(&values, p)],
            ));
        }
        figures.push(figure("policy-apply", name, "each_ms", "ms", values));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> RealPods {
        RealPods {
            server: (Ipv4Addr::new(10, 244, 1, 2), "node2".into()),
            client_same: (Ipv4Addr::new(10, 244, 1, 3), "node2".into()),
            client_cross: (Ipv4Addr::new(10, 244, 0, 2), "node1".into()),
        }
    }

    fn plan(policies: Policies) -> PolicyPlan {
        let (model, records) = model(&real(), policies).expect("model");
        plan_for(
            &model,
            &records,
            &["server", "client-same"],
            Ipv4Addr::new(192, 168, 0, 2),
        )
    }

    #[test]
    fn the_rule_counts_are_the_trie_entries_and_the_identities_a_thousand() {
        for rules in [10, 1_000] {
            let plan = plan(Policies::Rules(rules));
            // The clients' rule has no ports: one entry per client identity.
            assert_eq!(plan.rules.len(), rules - 1 + 2, "{rules} rules");
            assert!(plan.identity_labels.len() >= IDENTITIES, "identities");
            assert_eq!(plan.ingress_selected(), 1, "the server");
            assert_eq!(plan.egress_selected(), 0);
        }
    }

    #[test]
    fn the_conditions_select_what_they_say() {
        let none = plan(Policies::None);
        assert_eq!((none.ingress_selected(), none.egress_selected()), (0, 0));
        let ingress = plan(Policies::AllowIngress);
        assert_eq!(
            (ingress.ingress_selected(), ingress.egress_selected()),
            (1, 0)
        );
        let both = plan(Policies::AllowBoth);
        assert_eq!((both.ingress_selected(), both.egress_selected()), (1, 1));
        assert_eq!(policy_objects(Policies::Rules(10_000)).len(), 100);
        assert_ne!(synthetic_ip(0), synthetic_ip(999));
    }
}
