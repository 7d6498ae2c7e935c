//! The Services-at-scale part (issue 24): what a Service connection costs
//! with 1, 1,000 and 10,000 Services in the cluster when podnet
//! translates it in the datapath (`--services bpf`), against kube-proxy's
//! iptables mode and its nftables mode on the same podnet nodes; what the
//! agent and its Service maps hold at the largest size; and how long a
//! Service written with `podnetctl apply` takes to forward.
//!
//! One two-node lab (direct mode, file datastore, two pods a node, agents
//! with `--services bpf`): the server pod and a client on node2, another
//! client on node1. Every size is one state of the lab, grown from the
//! previous one:
//!
//! - podnet: N Service and N EndpointSlice objects applied with
//!   `podnetctl apply` in multi-document Lists of [`APPLY_CHUNK`] Services
//!   (the agents put them in their maps through their own sync, as
//!   anything an operator applies): the measured Service (ClusterIP
//!   10.96.0.20, one endpoint, the server) and N - 1 others (2 endpoints
//!   each, at addresses no pod has, in 100.64.0.0/10).
//! - kube-proxy iptables mode, on both nodes: the same N Services as
//!   kube-proxy writes them (one `iptables-restore`), the measured one at
//!   10.96.0.22, placed in the middle of KUBE-SERVICES: kube-proxy writes
//!   that chain in the order of its (Go map) iteration, so a typical
//!   Service sits halfway down the chain a packet is matched along.
//! - kube-proxy nftables mode, on both nodes: the same N Services as table
//!   `ip kube-proxy` (one `nft -f`), the measured one at 10.96.0.21 (a
//!   verdict map: the position does not matter).
//!
//! Both kube-proxy rule sets stay loaded; only the condition being
//! measured has its entry points in (iptables: the jumps from the
//! built-in chains; nftables: the hooked base chains), so a packet meets
//! one mode's rules only, as on a node that runs one kube-proxy. podnet
//! has no frontend for 10.96.0.21 and .22: from_pod hands those packets to
//! the stack, where the rules DNAT them, and podnet's stack-flows
//! bookkeeping brings the replies back through conntrack. Each condition
//! has server ports of its own (see `tools::Dial`).
//!
//! At each size the three conditions are measured in a drawn order every
//! round, each over both pairs (throughput, p50 latency, connection
//! rate; `--quick`: the cross-node pair only), as the `services` part
//! does; the scenario names carry the size
//! (`services-scale-same-node-10000`). Comparisons between sizes pair
//! round i of one size with round i of another, measured minutes apart:
//! weaker than the within-size ones, and said so in BENCHMARKS.md.
//!
//! Also at each size: both agents' RSS (VmRSS), the Service maps' entries
//! and memory (`bpftool`'s `bytes_memlock`: the maps are not
//! preallocated, so it follows their entries), how long the objects took
//! to apply and then to reach both nodes' maps, how long each kube-proxy
//! rule set took to load. At the largest size: apply to forwarding, a new
//! Service applied [`applies`] times and a client on node1 dialling its
//! ClusterIP every millisecond until a connection goes through.
//!
//! The evidence that the conditions were what they say: the agents'
//! `service_translated` counter moves in the bpf condition only.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use podnet::datapath::PinnedMapReader;
use podnet_common::names::{MAP_SERVICE_BACKENDS, MAP_SERVICES, MAX_STACK_FLOWS};

use super::{
    BenchOptions, Figure, figure,
    policy::{probe_server, probe_until},
    rounds::progress,
    services::{PORTS, translated, wait_until_reachable},
    stats::{Rng, percentile},
    tools::{Dial, PairRuns, Roles, measure_pair, pair_figures, rss_kib},
};
use crate::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions},
    services::scale::{
        ClusterIpService, TcpPort, iptables_restore, kube_proxy_iptables_jumps,
        kube_proxy_iptables_rules, kube_proxy_nft_hooks, kube_proxy_nft_rules, nft_script,
    },
};

/// The conditions (dataplane names).
pub const CLUSTER_IP_BPF: &str = "podnet ClusterIP (bpf)";
pub const KUBE_PROXY_IPTABLES: &str = "kube-proxy iptables";
pub const KUBE_PROXY_NFT: &str = "kube-proxy nftables";

/// Services in the cluster at each size (the full run; `--quick` has
/// [`QUICK_SIZES`]).
pub const SIZES: [usize; 3] = [1, 1_000, 10_000];
pub const QUICK_SIZES: [usize; 2] = [1, 50];

/// The scenarios the targets compare (see [`scenario`]).
pub const SAME_NODE_1: &str = "services-scale-same-node-1";
pub const SAME_NODE_10K: &str = "services-scale-same-node-10000";
pub const CROSS_NODE_1: &str = "services-scale-cross-node-1";
pub const CROSS_NODE_10K: &str = "services-scale-cross-node-10000";

/// Services per `podnetctl apply` (twice as many objects).
pub const APPLY_CHUNK: usize = 1_000;

/// Where each condition dials: the measured Service's ClusterIP in it,
/// and its ports' shift.
const BPF_DIAL: Dial = Dial {
    address: Ipv4Addr::new(10, 96, 0, 20),
    port_shift: 1,
};
const NFT_DIAL: Dial = Dial {
    address: Ipv4Addr::new(10, 96, 0, 21),
    port_shift: 2,
};
const IPTABLES_DIAL: Dial = Dial {
    address: Ipv4Addr::new(10, 96, 0, 22),
    port_shift: 3,
};
/// The port of the apply-to-forwarding probe Services (on the server).
const PROBE_PORT: u16 = 19_300;
/// The Services' namespace.
const NAMESPACE: &str = "default";

/// The scenario of `pair` (`same-node`, `cross-node`) at `size` Services.
#[must_use]
pub fn scenario(pair: &str, size: usize) -> String {
    format!("services-scale-{pair}-{size}")
}

/// Times a new Service is applied to measure apply to forwarding.
#[must_use]
pub fn applies(opts: &BenchOptions) -> usize {
    if opts.quick { 2 } else { 5 }
}

/// The `i`th of the Services that are not measured: ClusterIP
/// 10.100.0.0 + i + 1 (in the service CIDR, 10.96.0.0/12), port 80 onto
/// 8080 of two endpoints no pod has.
#[must_use]
pub fn filler(i: usize) -> ClusterIpService {
    let i = u32::try_from(i).unwrap_or(u32::MAX / 4);
    let at = |base: Ipv4Addr, offset: u32| Ipv4Addr::from(u32::from(base) + offset);
    ClusterIpService {
        namespace: NAMESPACE.into(),
        name: format!("scale-{i}"),
        cluster_ip: at(Ipv4Addr::new(10, 100, 0, 0), i + 1),
        ports: vec![TcpPort {
            name: "http".into(),
            port: 80,
            target: 8080,
        }],
        backends: vec![
            at(Ipv4Addr::new(100, 64, 0, 0), 2 * i + 1),
            at(Ipv4Addr::new(100, 64, 0, 0), 2 * i + 2),
        ],
    }
}

/// The measured Service as `dial` reaches it: the tools' ports (shifted)
/// onto the same ports of `server`.
fn measured(name: &str, dial: Dial, server: Ipv4Addr) -> ClusterIpService {
    ClusterIpService {
        namespace: NAMESPACE.into(),
        name: name.into(),
        cluster_ip: dial.address,
        ports: PORTS
            .iter()
            .map(|p| p + dial.port_shift)
            .map(|p| TcpPort {
                name: format!("p{p}"),
                port: p,
                target: p,
            })
            .collect(),
        backends: vec![server],
    }
}

/// `size` Services for kube-proxy's rules: the fillers with `measured` in
/// the middle (index (size - 1) / 2).
fn rule_services(size: usize, measured: &ClusterIpService) -> Vec<ClusterIpService> {
    let mut services: Vec<ClusterIpService> = (0..size.saturating_sub(1)).map(filler).collect();
    services.insert((size.saturating_sub(1)) / 2, measured.clone());
    services
}

/// The conditions: name, where its client dials, which kube-proxy
/// mode's entry points must be in.
const CONDITIONS: [(&str, Dial, Option<Entry>); 3] = [
    (CLUSTER_IP_BPF, BPF_DIAL, None),
    (KUBE_PROXY_IPTABLES, IPTABLES_DIAL, Some(Entry::Iptables)),
    (KUBE_PROXY_NFT, NFT_DIAL, Some(Entry::Nft)),
];

/// Which mode's entry points are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Iptables,
    Nft,
}

/// Puts `entry`'s entry points in (`on`) or out on every node.
fn switch(layout: &LabLayout, entry: Entry, on: bool) -> anyhow::Result<()> {
    for node in &layout.nodes {
        match entry {
            Entry::Iptables => iptables_restore(&node.netns, &kube_proxy_iptables_jumps(on)),
            Entry::Nft => nft_script(&node.netns, &kube_proxy_nft_hooks(on)),
        }
        .with_context(|| format!("switching {entry:?} {on} on {}", node.name))?;
    }
    Ok(())
}

/// Frontends and backend slots in one node's Service maps.
fn service_entries(bpffs: &std::path::Path) -> anyhow::Result<(u32, u32)> {
    let fill = PinnedMapReader::open(bpffs)?.fill()?;
    let entries = |name: &str| {
        fill.iter()
            .find(|f| f.name == name)
            .map_or(0, |f| f.entries)
    };
    Ok((entries(MAP_SERVICES), entries(MAP_SERVICE_BACKENDS)))
}

/// The kernel's memory of a pinned map (`bpftool`'s `bytes_memlock`).
fn map_bytes(pin: &std::path::Path) -> anyhow::Result<f64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool map show {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    info["bytes_memlock"]
        .as_f64()
        .with_context(|| format!("no bytes_memlock for {}", pin.display()))
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn count(n: usize) -> f64 {
    n as f64
}

/// Runs `load` for every node at once; the slowest one's seconds.
fn on_every_node(
    layout: &LabLayout,
    load: impl Fn(&crate::lab::LabNode) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<f64> {
    let times: Vec<anyhow::Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = layout
            .nodes
            .iter()
            .map(|node| {
                let load = &load;
                scope.spawn(move || {
                    let started = Instant::now();
                    load(node).map(|()| started.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a loading thread panicked")))
            })
            .collect()
    });
    let mut slowest: f64 = 0.0;
    for t in times {
        slowest = slowest.max(t?);
    }
    Ok(slowest)
}

/// What growing the lab to one size measured.
struct Growth {
    apply_s: f64,
    objects: usize,
    sync_s: f64,
    iptables_load_s: f64,
    iptables_rules: usize,
    nft_load_s: f64,
    nft_lines: usize,
}

/// Grows the lab from `from` to `size` Services in every mode: podnet's
/// objects applied and waited for in both nodes' maps, both kube-proxy
/// rule sets reloaded (entry points out).
fn grow(layout: &LabLayout, roles: &Roles<'_>, from: usize, size: usize) -> anyhow::Result<Growth> {
    // podnet: the measured Service is applied with the first size; the
    // fillers 0 .. size - 1 in Lists of APPLY_CHUNK.
    let mut objects: Vec<serde_json::Value> = Vec::new();
    if from == 0 {
        objects.extend(measured("measured", BPF_DIAL, roles.server.ip).objects());
    }
    objects
        .extend((from.saturating_sub(1)..size.saturating_sub(1)).flat_map(|i| filler(i).objects()));
    let started = Instant::now();
    for chunk in objects.chunks(2 * APPLY_CHUNK) {
        layout
            .apply_objects(chunk)
            .context("applying the Services")?;
    }
    let apply_s = started.elapsed().as_secs_f64();
    // The measured Service has a frontend per port with one slot each;
    // every other, one frontend with two.
    let want = (
        u32::try_from(PORTS.len() + size - 1)?,
        u32::try_from(PORTS.len() + 2 * (size - 1))?,
    );
    let applied = Instant::now();
    let deadline = applied + Duration::from_mins(10);
    for node in &layout.nodes {
        loop {
            let have = service_entries(&node.bpffs_dir)?;
            if have == want {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}'s Service maps hold {have:?} (frontends, slots), want {want:?}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let sync_s = applied.elapsed().as_secs_f64();

    let cluster_cidr = layout.cluster_cidr();
    let iptables = kube_proxy_iptables_rules(
        &rule_services(
            size,
            &measured("measured-ipt", IPTABLES_DIAL, roles.server.ip),
        ),
        &cluster_cidr,
    );
    // Every node loads at once, as every node's kube-proxy would: the
    // time is the slowest node's.
    let iptables_load_s = on_every_node(layout, |node| {
        iptables_restore(&node.netns, &iptables)
            .with_context(|| format!("kube-proxy's iptables rules on {}", node.name))
    })?;
    let nft_services = rule_services(size, &measured("measured-nft", NFT_DIAL, roles.server.ip));
    let nft_lines = kube_proxy_nft_rules(
        &nft_services,
        &cluster_cidr,
        "10.96.0.0/12",
        Ipv4Addr::UNSPECIFIED,
    )
    .lines()
    .count();
    let nft_load_s = on_every_node(layout, |node| {
        let script =
            kube_proxy_nft_rules(&nft_services, &cluster_cidr, "10.96.0.0/12", node.node_ip);
        nft_script(&node.netns, &script)
            .with_context(|| format!("kube-proxy's nftables rules on {}", node.name))
    })?;
    Ok(Growth {
        apply_s,
        objects: objects.len(),
        sync_s,
        iptables_load_s,
        iptables_rules: iptables.lines().filter(|l| l.starts_with("-A ")).count(),
        nft_load_s,
        nft_lines,
    })
}

/// The figures of one size's state: growth times, agents' memory, maps.
fn state_figures(
    layout: &LabLayout,
    size: usize,
    growth: &Growth,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let podnet = format!("podnet, {size} Services");
    let mut add = |dataplane: &str, metric: &str, unit: &str, v: f64| {
        figures.push(figure("services-scale", dataplane, metric, unit, vec![v]));
    };
    add(&podnet, "apply_s", "s", growth.apply_s);
    add(&podnet, "objects_applied", "count", count(growth.objects));
    add(&podnet, "sync_s", "s", growth.sync_s);
    for node in &layout.nodes {
        let rss = rss_kib(node.pid).with_context(|| format!("{}'s agent RSS", node.name))?;
        add(&podnet, &format!("agent_rss_{}", node.name), "KiB", rss);
    }
    let node = layout.nodes.last().context("a node")?;
    let (frontends, slots) = service_entries(&node.bpffs_dir)?;
    add(&podnet, "svc_entries", "count", f64::from(frontends));
    add(&podnet, "svcbe_entries", "count", f64::from(slots));
    for map in [MAP_SERVICES, MAP_SERVICE_BACKENDS] {
        let bytes = map_bytes(&node.bpffs_dir.join(map))?;
        add(&podnet, &format!("{map}_bytes"), "B", bytes);
    }
    let iptables = format!("kube-proxy iptables, {size} Services");
    add(&iptables, "load_s", "s", growth.iptables_load_s);
    add(&iptables, "rules", "count", count(growth.iptables_rules));
    let nft = format!("kube-proxy nftables, {size} Services");
    add(&nft, "load_s", "s", growth.nft_load_s);
    add(&nft, "script_lines", "count", count(growth.nft_lines));
    Ok(())
}

/// The pids the layout has for the agents are podnetd's (whose RSS the
/// part reports), not a wrapper's.
fn agents_are_podnetd(layout: &LabLayout) -> anyhow::Result<()> {
    for node in &layout.nodes {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", node.pid)).unwrap_or_default();
        anyhow::ensure!(
            comm.trim() == "podnetd",
            "{}'s pid {} is {comm:?}, not podnetd",
            node.name,
            node.pid
        );
    }
    Ok(())
}

/// Runs the Services-at-scale part.
pub fn measure(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress("services-scale: building a direct-mode lab, two pods a node, --services bpf");
    let lab = LabGuard::up_with(
        "bsc",
        2,
        2,
        "direct",
        LabDatastore::File,
        LabOptions {
            agent_args: vec![
                "--services".into(),
                "bpf".into(),
                // The client pods' stack connections (kube-proxy's
                // conditions) reach 15,000 a second, and a closed one's
                // entry stays 10 to 15 s: the default share (16,384)
                // would refuse the second condition's flows, whose
                // replies then miss conntrack. One busy pod per node:
                // the whole table, the LRU evicting the closed flows.
                "--stack-flows-per-endpoint".into(),
                MAX_STACK_FLOWS.to_string(),
            ],
            ..LabOptions::default()
        },
    )?;
    let layout = &lab.layout;
    agents_are_podnetd(layout)?;
    let roles = Roles::of(layout)?;
    let sizes: &[usize] = if opts.quick { &QUICK_SIZES } else { &SIZES };
    let scenarios: Vec<(usize, [String; 2])> = sizes
        .iter()
        .map(|&n| (n, [scenario("same-node", n), scenario("cross-node", n)]))
        .collect();
    let mut runs = PairRuns::new();
    let mut translations: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rng = opts.rng("services-scale");
    let mut from = 0;
    for (size, names) in &scenarios {
        progress(&format!("services-scale: growing to {size} Services"));
        let growth = grow(layout, &roles, from, *size)?;
        from = *size;
        progress(&format!(
            "services-scale: {size} Services: {} objects applied in {:.1} s, in both nodes' maps {:.1} s later; iptables rules loaded in {:.1} s, nftables in {:.1} s",
            growth.objects,
            growth.apply_s,
            growth.sync_s,
            growth.iptables_load_s,
            growth.nft_load_s
        ));
        state_figures(layout, *size, &growth, figures)?;
        for (_, dial, entry) in CONDITIONS {
            if let Some(e) = entry {
                switch(layout, e, true)?;
            }
            for client in [roles.client_same, roles.client_cross] {
                wait_until_reachable(client, roles.server, dial)?;
            }
            if let Some(e) = entry {
                switch(layout, e, false)?;
            }
        }
        measure_size(
            layout,
            &roles,
            names,
            opts,
            &mut rng,
            &mut runs,
            &mut translations,
        )?;
    }
    pair_figures(runs, figures);
    let largest = sizes.last().copied().unwrap_or(1);
    if let Err(e) = measure_apply(layout, &roles, largest, applies(opts), figures) {
        // CI (`--quick`) fails on it; a full run keeps the half hour of
        // figures it has, says so, and records the failure as a figure.
        anyhow::ensure!(!opts.quick, "apply to forwarding: {e:#}");
        progress(&format!(
            "services-scale: apply to forwarding FAILED: {e:#}"
        ));
        figures.push(figure(
            "services-scale-apply",
            &format!("podnet, {largest} Services"),
            "failed",
            "count",
            vec![1.0],
        ));
    }
    for name in [CLUSTER_IP_BPF, KUBE_PROXY_IPTABLES, KUBE_PROXY_NFT] {
        let n = translations.get(name).copied().unwrap_or(0);
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        figures.push(figure(
            "services-scale",
            name,
            "service_translated",
            "count",
            vec![n as f64],
        ));
    }
    anyhow::ensure!(
        translations.get(KUBE_PROXY_IPTABLES).copied().unwrap_or(0) == 0
            && translations.get(KUBE_PROXY_NFT).copied().unwrap_or(0) == 0
            && translations.get(CLUSTER_IP_BPF).copied().unwrap_or(0) > 0,
        "the datapath's translations do not match the conditions: {translations:?}"
    );
    drop(lab);
    Ok(())
}

/// One size's paired rounds: the conditions in a drawn order every round,
/// each over the pairs in a drawn order, `scenarios` (same node, cross
/// node) naming them.
fn measure_size<'a>(
    layout: &LabLayout,
    roles: &Roles<'_>,
    scenarios: &'a [String; 2],
    opts: &BenchOptions,
    rng: &mut Rng,
    runs: &mut PairRuns<'a>,
    translations: &mut BTreeMap<&'static str, u64>,
) -> anyhow::Result<()> {
    let seconds = (opts.seconds.min(2), 1);
    for round in 1..=opts.rounds {
        let mut order: Vec<usize> = (0..CONDITIONS.len()).collect();
        rng.shuffle(&mut order);
        for (name, dial, entry) in order.into_iter().map(|i| CONDITIONS[i]) {
            if let Some(e) = entry {
                switch(layout, e, true)?;
            }
            let before = translated(layout);
            let mut pairs = vec![
                (
                    scenarios[0].as_str(),
                    roles.pair(roles.client_same, Some(dial)),
                ),
                (
                    scenarios[1].as_str(),
                    roles.pair(roles.client_cross, Some(dial)),
                ),
            ];
            // `--quick` (CI) checks that every condition works at
            // every size; the cross-node pair alone keeps it short.
            if opts.quick {
                pairs.remove(0);
            }
            rng.shuffle(&mut pairs);
            for (scenario, pair) in &pairs {
                progress(&format!(
                    "services-scale: round {round}/{}: {scenario}: {name}",
                    opts.rounds
                ));
                measure_pair(pair, seconds, (scenario, name), runs)?;
            }
            *translations.entry(name).or_default() += translated(layout) - before;
            if let Some(e) = entry {
                switch(layout, e, false)?;
            }
        }
    }
    Ok(())
}

/// Apply to forwarding at `size` Services: `applies` times a new Service
/// (its own ClusterIP, one port onto [`PROBE_PORT`] of the server) is
/// applied, and the cross-node client opens a connection to it every
/// millisecond (each attempt given 20 ms) until one goes through; the time
/// from the start of `podnetctl apply` to that attempt. The probe
/// Services stay (a handful more than `size`): deleting each would put a
/// second sync of the whole set between two applies.
fn measure_apply(
    layout: &LabLayout,
    roles: &Roles<'_>,
    size: usize,
    applies: usize,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let listen = SocketAddrV4::new(roles.server.ip, PROBE_PORT);
    let (stop, server) = probe_server(&roles.server.netns, listen)?;
    let measured = (|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let (mut forwarding, mut commands) = (Vec::new(), Vec::new());
        for i in 0..applies {
            progress(&format!(
                "services-scale: apply to forwarding {}/{applies} at {size} Services",
                i + 1
            ));
            let svc = ClusterIpService {
                namespace: NAMESPACE.into(),
                name: format!("probe-{i}"),
                cluster_ip: Ipv4Addr::new(10, 96, 1, u8::try_from(i + 1)?),
                ports: vec![TcpPort {
                    name: "probe".into(),
                    port: PROBE_PORT,
                    target: PROBE_PORT,
                }],
                backends: vec![roles.server.ip],
            };
            let objects = svc.objects();
            let started = Instant::now();
            layout.apply_objects(&objects)?;
            commands.push(started.elapsed().as_secs_f64() * 1e3);
            let target = SocketAddrV4::new(svc.cluster_ip, PROBE_PORT);
            let took = probe_until(&roles.client_cross.netns, target, true, started)
                .with_context(|| format!("{} never forwarded", svc.cluster_ip))?;
            forwarding.push(took.as_secs_f64() * 1e3);
        }
        Ok((forwarding, commands))
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    let (forwarding, commands) = measured?;
    let name = format!("podnet, {size} Services");
    for (metric, p) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
        figures.push(figure(
            "services-scale-apply",
            &name,
            metric,
            "ms",
            vec![percentile(&forwarding, p)],
        ));
    }
    figures.push(figure(
        "services-scale-apply",
        &name,
        "apply_command_p50_ms",
        "ms",
        vec![percentile(&commands, 0.5)],
    ));
    figures.push(figure(
        "services-scale-apply",
        &name,
        "each_ms",
        "ms",
        forwarding,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_scenarios_are_the_sizes_scenarios() {
        assert_eq!(scenario("same-node", SIZES[0]), SAME_NODE_1);
        assert_eq!(scenario("same-node", SIZES[2]), SAME_NODE_10K);
        assert_eq!(scenario("cross-node", SIZES[0]), CROSS_NODE_1);
        assert_eq!(scenario("cross-node", SIZES[2]), CROSS_NODE_10K);
    }

    #[test]
    fn fillers_are_distinct_and_stay_in_their_ranges() {
        let last = filler(SIZES[2] - 2);
        assert_eq!(filler(0).cluster_ip, Ipv4Addr::new(10, 100, 0, 1));
        assert!(
            last.cluster_ip < Ipv4Addr::new(10, 112, 0, 0),
            "service CIDR"
        );
        assert_eq!(filler(0).backends.len(), 2);
        assert_ne!(filler(0).backends[1], filler(1).backends[0]);
        assert!(
            last.backends[1] < Ipv4Addr::new(100, 128, 0, 0),
            "100.64.0.0/10"
        );
    }

    #[test]
    fn the_measured_service_sits_in_the_middle_of_the_rules() {
        let m = measured("m", IPTABLES_DIAL, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(rule_services(1, &m), vec![m.clone()]);
        let services = rule_services(1_000, &m);
        assert_eq!(services.len(), 1_000);
        assert_eq!(services.iter().position(|s| s == &m), Some(499));
        assert_eq!(
            m.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            [5204, 11_114, 19_003]
        );
    }
}
