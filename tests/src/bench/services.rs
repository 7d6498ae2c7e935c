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
//! - `podnet ClusterIP (socket LB)`: it dials ClusterIP 10.96.0.22, a
//!   second Service (ports 5204, 11114, 19003) on the same server, from
//!   inside its node's cgroup (this process moves into it for the
//!   condition, so the tools it runs are the cgroup's too), which the
//!   node's agent attached the socket LB to (`--socket-lb-cgroup`): the
//!   `connect` goes to the backend, and from_pod forwards pod-to-pod
//!   packets.
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
//! `service_translated` counter moves in the bpf condition only, the
//! socket LB's `connect_translated` in the socket LB condition only.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use podnet_common::{SocketLbCounter, counters::Verdict};
use serde_json::json;

use super::{
    BenchOptions, Figure, figure,
    rounds::progress,
    tools::{Dial, PairRuns, Roles, measure_pair, pair_figures},
};
use crate::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions, LabPod, in_netns},
    netns::run_in,
    services::feed,
    socket_lb::{self, NodeCgroup},
};

/// The conditions (dataplane names).
pub const POD_IP: &str = "podnet pod IP";
pub const CLUSTER_IP_BPF: &str = "podnet ClusterIP (bpf)";
pub const CLUSTER_IP_NFT: &str = "kube-proxy nft DNAT";
pub const CLUSTER_IP_SOCKET: &str = "podnet ClusterIP (socket LB)";

/// The bench Service's ClusterIP (translated by podnet) and the address
/// only the nftables DNAT knows.
const BPF_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NFT_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// The Service the socket LB condition dials.
const SOCKET_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
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
const SOCKET_DIAL: Dial = Dial {
    address: SOCKET_CLUSTER_IP,
    port_shift: 3,
};

/// The Service `name` at `dial`'s address and its EndpointSlice: `PORTS`
/// (shifted as `dial` says) onto the same ports of `server`.
fn service_objects(name: &str, dial: Dial, server: &LabPod) -> Vec<serde_json::Value> {
    let shifted = PORTS.map(|p| p + dial.port_shift);
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
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": dial.address.to_string(),
                "clusterIPs": [dial.address.to_string()],
                "ports": ports,
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"),
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": name},
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

/// The socket LB's `connect_translated`, summed over the nodes.
fn socket_translated(layout: &LabLayout) -> anyhow::Result<u64> {
    layout
        .nodes
        .iter()
        .map(|n| {
            socket_lb::counters(n).map(|c| {
                c.get(SocketLbCounter::ConnectTranslated.name())
                    .copied()
                    .unwrap_or(0)
            })
        })
        .sum()
}

/// Every node's pods' cgroup (the lab's pods are namespaces: the clients
/// join it by this process moving in), with the socket LB attached to it
/// by the node's agent.
fn socket_lb_cgroups(layout: &mut LabLayout) -> anyhow::Result<Vec<(String, NodeCgroup)>> {
    let prefix = layout.prefix.clone();
    let cgroups = layout
        .nodes
        .iter()
        .map(|n| Ok((n.name.clone(), NodeCgroup::new(&prefix, &n.name)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let paths: Vec<(&str, &std::path::Path)> = cgroups
        .iter()
        .map(|(n, c)| (n.as_str(), c.path()))
        .collect();
    progress("services: restarting the agents with --socket-lb-cgroup");
    socket_lb::attach_agents(layout, &paths)?;
    Ok(cgroups)
}

/// Runs the Services part.
pub fn measure(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress("services: building a direct-mode lab, two pods a node, --services bpf");
    let mut lab = LabGuard::up_with(
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
    let cgroups = socket_lb_cgroups(&mut lab.layout)?;
    let cgroup_of = |node: &str| {
        cgroups
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, c)| c)
            .with_context(|| format!("{node}'s cgroup"))
    };
    let layout = &lab.layout;
    let roles = Roles::of(layout)?;
    let (server, client_same, client_cross) = (roles.server, roles.client_same, roles.client_cross);
    layout
        .apply_objects(&service_objects("bench", BPF_DIAL, server))
        .context("applying the bench Service")?;
    layout
        .apply_objects(&service_objects("bench-socket", SOCKET_DIAL, server))
        .context("applying the socket LB's bench Service")?;
    for node in &layout.nodes {
        let mut nft = in_netns(&node.netns, "nft")?;
        nft.args(["-f", "-"]);
        feed(nft, &nft_dnat(server.ip))
            .with_context(|| format!("the nftables DNAT on {}", node.name))?;
    }
    for client in [client_same, client_cross] {
        wait_until_reachable(client, server, BPF_DIAL)?;
        wait_until_reachable(client, server, NFT_DIAL)?;
        let _inside = cgroup_of(&client.node)?.enter()?;
        wait_until_reachable(client, server, SOCKET_DIAL)?;
    }
    let conditions = [
        (POD_IP, None),
        (CLUSTER_IP_BPF, Some(BPF_DIAL)),
        (CLUSTER_IP_NFT, Some(NFT_DIAL)),
        (CLUSTER_IP_SOCKET, Some(SOCKET_DIAL)),
    ];
    let seconds = (opts.seconds.min(2), 1);
    let mut runs = PairRuns::new();
    let mut translations: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut rng = opts.rng("services");
    for round in 1..=opts.rounds {
        let mut order: Vec<usize> = (0..conditions.len()).collect();
        rng.shuffle(&mut order);
        for (name, dial) in order.into_iter().map(|i| conditions[i]) {
            let before = (translated(layout), socket_translated(layout)?);
            let mut pairs = [
                ("services-same-node", client_same),
                ("services-cross-node", client_cross),
            ];
            rng.shuffle(&mut pairs);
            for (scenario, client) in pairs {
                progress(&format!(
                    "services: round {round}/{}: {scenario}: {name}",
                    opts.rounds
                ));
                // The socket LB translates the sockets of its cgroup's
                // processes only: the client (and the tools it runs) is
                // one for the condition.
                let _inside = if name == CLUSTER_IP_SOCKET {
                    Some(cgroup_of(&client.node)?.enter()?)
                } else {
                    None
                };
                measure_pair(
                    &roles.pair(client, dial),
                    seconds,
                    (scenario, name),
                    &mut runs,
                )?;
            }
            let entry = translations.entry(name).or_default();
            entry.0 += translated(layout) - before.0;
            entry.1 += socket_translated(layout)? - before.1;
        }
    }
    report(runs, &translations, figures)?;
    drop(lab);
    for (_, cgroup) in cgroups {
        cgroup.remove()?;
    }
    Ok(())
}

/// The figures of the rounds, and the check that each path translated in
/// its own condition only: (per packet, at the socket) per condition.
fn report(
    runs: PairRuns<'_>,
    translations: &BTreeMap<&str, (u64, u64)>,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    pair_figures(runs, figures);
    let count = |name: &str| translations.get(name).copied().unwrap_or((0, 0));
    for name in [POD_IP, CLUSTER_IP_BPF, CLUSTER_IP_NFT, CLUSTER_IP_SOCKET] {
        let (per_packet, socket) = count(name);
        for (metric, n) in [
            ("service_translated", per_packet),
            ("socket_translated", socket),
        ] {
            #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            figures.push(figure("services", name, metric, "count", vec![n as f64]));
        }
    }
    let per_packet_only_bpf = [POD_IP, CLUSTER_IP_NFT, CLUSTER_IP_SOCKET]
        .iter()
        .all(|n| count(n).0 == 0)
        && count(CLUSTER_IP_BPF).0 > 0;
    let socket_only_socket = [POD_IP, CLUSTER_IP_NFT, CLUSTER_IP_BPF]
        .iter()
        .all(|n| count(n).1 == 0)
        && count(CLUSTER_IP_SOCKET).1 > 0;
    anyhow::ensure!(
        per_packet_only_bpf && socket_only_socket,
        "the datapath's translations do not match the conditions (per packet, socket): \
         {translations:?}"
    );
    Ok(())
}
