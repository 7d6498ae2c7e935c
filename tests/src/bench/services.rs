//! The Services part: what a Service costs a pod's connection when podnet
//! translates it in the datapath (`--services bpf`), against the pod's own
//! address and against a kube-proxy-style DNAT in the node's stack, in one
//! lab and paired rounds.
//!
//! One two-node lab (direct mode, file datastore, two pods a node, agents
//! with `--services bpf`): the server pod and a client on node2, another
//! client on node1. Conditions, in a drawn order every round, each
//! measured over both pairs (throughput, p50 latency, connection rate):
//!
//! - `podnet pod IP`: the client dials the server's own address.
//! - `podnet ClusterIP (bpf)`: it dials ClusterIP 10.96.0.20, a Service
//!   object (ports 5202, 11112, 19001 onto the same ports of the server)
//!   that the agents put in their Service maps and from_pod translates.
//! - `kube-proxy nft DNAT`: it dials 10.96.0.21, which podnet has no
//!   frontend for (ports 5203, 11113, 19002): the packet goes up the
//!   stack, where an nftables DNAT
//!   (kube-proxy's nftables mode does the same in its own table) sends it
//!   to the server, and podnet's stack-flows bookkeeping brings the
//!   replies back through conntrack.
//!
//! Each condition has server ports of its own (see `tools::Dial`).
//!
//! The evidence that the conditions were what they say: the agents'
//! `service_translated` counter moves in the bpf condition only.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use podnet_common::counters::Verdict;
use serde_json::json;

use super::{
    BenchOptions, Figure, figure,
    rounds::progress,
    tools::{Dial, Pair, PairRuns, measure_pair, pair_figures},
};
use crate::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions, LabPod, in_netns},
    netns::run_in,
    services::feed,
};

/// The conditions (dataplane names).
pub const POD_IP: &str = "podnet pod IP";
pub const CLUSTER_IP_BPF: &str = "podnet ClusterIP (bpf)";
pub const CLUSTER_IP_NFT: &str = "kube-proxy nft DNAT";

/// The bench Service's ClusterIP (translated by podnet) and the address
/// only the nftables DNAT knows.
const BPF_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NFT_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// The tools' ports (iperf3, sockperf, the connection-rate server).
pub(super) const PORTS: [u16; 3] = [5201, 11_111, 19_000];
/// Each condition's ports are the tools' shifted by its own amount (see
/// [`Dial`]): the pod IP's by 0.
const BPF_DIAL: Dial = Dial {
    address: BPF_CLUSTER_IP,
    port_shift: 1,
};
const NFT_DIAL: Dial = Dial {
    address: NFT_CLUSTER_IP,
    port_shift: 2,
};

/// The Service and its EndpointSlice: `PORTS` (shifted as `BPF_DIAL`
/// says) onto the same ports of `server`.
fn service_objects(server: &LabPod) -> Vec<serde_json::Value> {
    let shifted = PORTS.map(|p| p + BPF_DIAL.port_shift);
    let ports: Vec<serde_json::Value> = shifted
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "protocol": "TCP", "port": p, "targetPort": p}))
        .collect();
    let slice_ports: Vec<serde_json::Value> = shifted
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "protocol": "TCP", "port": p}))
        .collect();
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": BPF_CLUSTER_IP.to_string(),
                "clusterIPs": [BPF_CLUSTER_IP.to_string()],
                "ports": ports,
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "bench-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "bench"},
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": [server.ip.to_string()],
                "conditions": {"ready": true},
                "nodeName": server.node,
            }],
            "ports": slice_ports,
        }),
    ]
}

/// The nftables DNAT of `NFT_CLUSTER_IP` to `server` on `PORTS` (shifted
/// as `NFT_DIAL` says), where pods' packets meet it: forwarded by the node
/// (prerouting).
fn nft_dnat(server: Ipv4Addr) -> String {
    let ports: Vec<String> = PORTS
        .iter()
        .map(|p| (p + NFT_DIAL.port_shift).to_string())
        .collect();
    format!(
        "table ip benchsvc {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n    ip daddr {NFT_CLUSTER_IP} tcp dport {{ {} }} dnat to {server}\n  }}\n}}\n",
        ports.join(", "),
    )
}

/// Waits until a connection from `client` by `dial` reaches a listener
/// in `server` on the connection-rate port (the Service has reached the
/// maps, or the rules are in).
pub(super) fn wait_until_reachable(
    client: &LabPod,
    server: &LabPod,
    dial: Dial,
) -> anyhow::Result<()> {
    let port = 19_000 + dial.port_shift;
    let bind = SocketAddrV4::new(server.ip, port);
    let listener =
        run_in(&server.netns, move || TcpListener::bind(bind))?.context("probe listener")?;
    let target = SocketAddrV4::new(dial.address, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = run_in(&client.netns, move || {
            TcpStream::connect_timeout(&target.into(), Duration::from_millis(300)).is_ok()
        })?;
        if ok {
            drop(listener);
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}:{port} never reached {} from {}",
            dial.address,
            server.name,
            client.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn translated(layout: &LabLayout) -> u64 {
    layout
        .nodes
        .iter()
        .map(|n| crate::counters::read(&n.agent_socket, Verdict::ServiceTranslated))
        .sum()
}

/// Runs the Services part.
pub fn measure(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress("services: building a direct-mode lab, two pods a node, --services bpf");
    let lab = LabGuard::up_with(
        "bsv",
        2,
        2,
        "direct",
        LabDatastore::File,
        LabOptions {
            agent_args: vec!["--services".into(), "bpf".into()],
            ..LabOptions::default()
        },
    )?;
    let layout = &lab.layout;
    anyhow::ensure!(layout.nodes.len() >= 2, "the part needs two nodes");
    let (node1, node2) = (&layout.nodes[0].name, &layout.nodes[1].name);
    let mut on_two = layout.pods.iter().filter(|p| &p.node == node2);
    let server = on_two.next().context("node2's first pod")?;
    let client_same = on_two.next().context("node2's second pod")?;
    let client_cross = layout
        .pods
        .iter()
        .find(|p| &p.node == node1)
        .context("node1's pod")?;
    layout
        .apply_objects(&service_objects(server))
        .context("applying the bench Service")?;
    for node in &layout.nodes {
        let mut nft = in_netns(&node.netns, "nft")?;
        nft.args(["-f", "-"]);
        feed(nft, &nft_dnat(server.ip))
            .with_context(|| format!("the nftables DNAT on {}", node.name))?;
    }
    for client in [client_same, client_cross] {
        wait_until_reachable(client, server, BPF_DIAL)?;
        wait_until_reachable(client, server, NFT_DIAL)?;
    }
    let conditions = [
        (POD_IP, None),
        (CLUSTER_IP_BPF, Some(BPF_DIAL)),
        (CLUSTER_IP_NFT, Some(NFT_DIAL)),
    ];
    let pair = |client: &LabPod, dial: Option<Dial>| Pair {
        client_ns: client.netns.clone(),
        server_ns: server.netns.clone(),
        server_ip: server.ip,
        dial,
    };
    let seconds = (opts.seconds.min(2), 1);
    let mut runs = PairRuns::new();
    let mut translations: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rng = opts.rng("services");
    for round in 1..=opts.rounds {
        let mut order: Vec<usize> = (0..conditions.len()).collect();
        rng.shuffle(&mut order);
        for (name, dial) in order.into_iter().map(|i| conditions[i]) {
            let before = translated(layout);
            let mut pairs = [
                ("services-same-node", pair(client_same, dial)),
                ("services-cross-node", pair(client_cross, dial)),
            ];
            rng.shuffle(&mut pairs);
            for (scenario, pair) in &pairs {
                progress(&format!(
                    "services: round {round}/{}: {scenario}: {name}",
                    opts.rounds
                ));
                measure_pair(pair, seconds, (scenario, name), &mut runs)?;
            }
            *translations.entry(name).or_default() += translated(layout) - before;
        }
    }
    report(runs, &translations, figures)?;
    drop(lab);
    Ok(())
}

/// The figures of the rounds, and the check that the datapath translated
/// in the bpf condition only.
fn report(
    runs: PairRuns<'_>,
    translations: &BTreeMap<&str, u64>,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    pair_figures(runs, figures);
    for name in [POD_IP, CLUSTER_IP_BPF, CLUSTER_IP_NFT] {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let n = translations.get(name).copied().unwrap_or(0) as f64;
        figures.push(figure(
            "services",
            name,
            "service_translated",
            "count",
            vec![n],
        ));
    }
    anyhow::ensure!(
        translations.get(POD_IP).copied().unwrap_or(0) == 0
            && translations.get(CLUSTER_IP_NFT).copied().unwrap_or(0) == 0
            && translations.get(CLUSTER_IP_BPF).copied().unwrap_or(0) > 0,
        "the datapath's translations do not match the conditions: {translations:?}"
    );
    Ok(())
}
