//! Two nodes on kernel VXLAN, programmed as flannel's vxlan backend does.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use serde_json::Value;

use super::{super::Pair, reference::ReferenceNode};
use crate::netns::{NetNs, run};

/// Two nodes and a pod each on kernel VXLAN programmed the way flannel's
/// vxlan backend does it: `flannel.1` (VNI 1, learning off), pods on a
/// bridge via the `bridge` plugin, and per remote node a route
/// (`10.247.X.0/24 via 10.247.X.0 dev flannel.1 onlink`), a permanent
/// neighbour and an FDB entry to the remote node's underlay address.
pub struct FlannelCluster {
    pub fabric: NetNs,
    pub nodes: Vec<ReferenceNode>,
}

impl FlannelCluster {
    #[allow(
        clippy::too_many_lines,
        reason = "one linear recipe, as flannel's docs give it"
    )]
    pub fn new() -> anyhow::Result<Self> {
        let fabric = NetNs::new("bflfab")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let node = ReferenceNode::new("bridge", &format!("10.247.{i}.0/24"), 0)?;
            let (ns, fab) = (node.node.name().to_owned(), fabric.name().to_owned());
            let port = format!("n{i}");
            run(Command::new("ip").args([
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &fab,
            ]))?;
            fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
            node.node
                .ip(&["addr", "add", &format!("192.168.101.{i}/24"), "dev", "eth0"])?;
            node.node.ip(&["link", "set", "eth0", "up"])?;
            node.node.ip(&[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &format!("192.168.101.{i}"),
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ])?;
            node.node.ip(&[
                "addr",
                "add",
                &format!("10.247.{i}.0/32"),
                "dev",
                "flannel.1",
            ])?;
            node.node.ip(&["link", "set", "flannel.1", "up"])?;
            run(node
                .node
                .command("sysctl")?
                .args(["-qw", "net.ipv4.ip_forward=1"]))?;
            flannel_ip_masq(&node.node, &format!("10.247.{i}.0/24"), "10.247.0.0/16")?;
            nodes.push(node);
        }
        let macs: Vec<String> = nodes
            .iter()
            .map(|n| {
                let out = n.node.ip(&["-j", "link", "show", "flannel.1"])?;
                let v: Value = serde_json::from_slice(&out.stdout)?;
                v[0]["address"]
                    .as_str()
                    .map(str::to_owned)
                    .context("flannel.1 MAC")
            })
            .collect::<anyhow::Result<_>>()?;
        for (i, node) in nodes.iter().enumerate() {
            for (j, mac) in macs.iter().enumerate() {
                if i == j {
                    continue;
                }
                let remote = j + 1;
                let gw = format!("10.247.{remote}.0");
                node.node.ip(&[
                    "route",
                    "add",
                    &format!("10.247.{remote}.0/24"),
                    "via",
                    &gw,
                    "dev",
                    "flannel.1",
                    "onlink",
                ])?;
                node.node.ip(&[
                    "neigh",
                    "add",
                    &gw,
                    "lladdr",
                    mac,
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ])?;
                run(node.node.command("bridge")?.args([
                    "fdb",
                    "append",
                    mac,
                    "dev",
                    "flannel.1",
                    "dst",
                    &format!("192.168.101.{remote}"),
                ]))?;
            }
        }
        let mut me = Self { fabric, nodes };
        for node in &mut me.nodes {
            node.add_pod()?;
            // MTU: the overlay's, as flannel sets it.
            let pod = node.pods.last().context("pod")?;
            pod.ip(&["link", "set", "eth0", "mtu", "1450"])?;
        }
        Ok(me)
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.nodes[0].pods[0].name().into(),
            server_ns: self.nodes[1].pods[0].name().into(),
            server_ip: self.nodes[1].ips[0],
            dial: None,
        }
    }

    #[must_use]
    pub fn underlay_pair(&self) -> Pair {
        Pair {
            client_ns: self.nodes[0].node.name().into(),
            server_ns: self.nodes[1].node.name().into(),
            server_ip: Ipv4Addr::new(192, 168, 101, 2),
            dial: None,
        }
    }
}

/// What flanneld with `--ip-masq` (its default in the kube-flannel
/// manifest) installs on a node: the nat POSTROUTING chain that
/// masquerades pod traffic leaving the cluster, and the FORWARD accepts for
/// the cluster CIDR (flannel's `MasqRules` and `ForwardRules`, IPv4).
/// Conntrack then sees the pods' and the VXLAN traffic, as on podnet's
/// nodes with their nft masquerade.
fn flannel_ip_masq(node: &NetNs, pod_subnet: &str, cluster: &str) -> anyhow::Result<()> {
    let rules = format!(
        "*nat\n\
         :FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod_subnet} -d {cluster} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {cluster} -d {pod_subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {cluster} -d {pod_subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {cluster} ! -d 224.0.0.0/4 -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {cluster} -d {cluster} -j MASQUERADE --random-fully\n\
         COMMIT\n\
         *filter\n\
         :FLANNEL-FWD - [0:0]\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s {cluster} -j ACCEPT\n\
         -A FLANNEL-FWD -d {cluster} -j ACCEPT\n\
         COMMIT\n"
    );
    let mut child = node
        .command("iptables-restore")?
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(
        child.wait()?.success(),
        "flannel's masquerade rules in {}",
        node.name()
    );
    Ok(())
}
