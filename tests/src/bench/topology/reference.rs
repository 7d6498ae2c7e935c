//! Nodes whose pods the reference CNI plugins attach (bridge, ptp).

use std::{net::Ipv4Addr, time::Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{super::Pair, veth::set_ipv4_big_tcp};
use crate::{
    netns::{NetNs, run},
    node::{Node, TempDir},
};

/// A node whose pods are attached by a reference CNI plugin (`bridge` or
/// `ptp`) with `host-local`, run exactly as a runtime would.
pub struct ReferenceNode {
    pub node: NetNs,
    pub pods: Vec<NetNs>,
    pub ips: Vec<Ipv4Addr>,
    conf: Value,
    _dir: TempDir,
}

impl ReferenceNode {
    pub fn new(plugin: &str, subnet: &str, pods: usize) -> anyhow::Result<Self> {
        let node = NetNs::new(&format!("b{plugin}"))?;
        let dir = TempDir::new(plugin)?;
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("bench-{plugin}"),
            "type": plugin,
            "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": dir.path().join("ipam")}
        });
        if plugin == "bridge" {
            conf["bridge"] = json!("cni0");
            conf["isGateway"] = json!(true);
            conf["isDefaultGateway"] = json!(true);
        }
        let mut me = Self {
            node,
            pods: Vec::new(),
            ips: Vec::new(),
            conf,
            _dir: dir,
        };
        for _ in 0..pods {
            me.add_pod()?;
        }
        Ok(me)
    }

    fn cni(&self, command: &str, pod: &NetNs) -> anyhow::Result<Value> {
        let plugin = self.conf["type"].as_str().unwrap_or("bridge").to_owned();
        let path = pod.path().display().to_string();
        let out = crate::run_cni_plugin(
            self.node.command(format!("/usr/lib/cni/{plugin}"))?,
            "/usr/lib/cni",
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", pod.name()),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            self.conf.to_string().as_bytes(),
        )?;
        anyhow::ensure!(
            out.status.success(),
            "{plugin} {command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    pub fn add_pod(&mut self) -> anyhow::Result<Ipv4Addr> {
        let pod = NetNs::new("bpod")?;
        let result = self.cni("ADD", &pod)?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .context("no IP from the reference plugin")?;
        self.pods.push(pod);
        self.ips.push(ip);
        Ok(ip)
    }

    /// IPv4 BIG TCP on the node's links (bridge, host veths) and the pods'
    /// ([`set_ipv4_big_tcp`]).
    pub fn set_ipv4_big_tcp(&self) -> anyhow::Result<()> {
        set_ipv4_big_tcp(&self.node)?;
        for pod in &self.pods {
            set_ipv4_big_tcp(pod)?;
        }
        Ok(())
    }

    /// Sets `net.bridge.bridge-nf-call-iptables` in the node's netns (per
    /// netns on this kernel: checked, setting it in a new netns leaves the
    /// root namespace's at 1). With it at 1 (the default, br_netfilter is
    /// built in here) every bridged packet goes through the iptables hooks.
    pub fn set_bridge_nf_call_iptables(&self, on: bool) -> anyhow::Result<()> {
        run(self.node.command("sysctl")?.args([
            "-qw",
            if on {
                "net.bridge.bridge-nf-call-iptables=1"
            } else {
                "net.bridge.bridge-nf-call-iptables=0"
            },
        ]))
        .with_context(|| format!("bridge-nf-call-iptables in {}", self.node.name()))?;
        Ok(())
    }

    /// Times ADD of a fresh pod and its DEL (seconds each).
    pub fn time_add_del(&self) -> anyhow::Result<(f64, f64)> {
        let pod = NetNs::new("bcni")?;
        let t = Instant::now();
        self.cni("ADD", &pod)?;
        let add = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.cni("DEL", &pod)?;
        Ok((add, t.elapsed().as_secs_f64()))
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.pods[0].name().into(),
            server_ns: self.pods[1].name().into(),
            server_ip: self.ips[1],
            dial: None,
        }
    }
}

/// Times CNI ADD and DEL of a fresh pod with podnet (seconds each).
pub fn podnet_add_del(node: &Node, tag: usize) -> anyhow::Result<(f64, f64)> {
    let pod = NetNs::new("pcni")?;
    let path = pod.path().display().to_string();
    let cid = format!("bench-cni-{tag}");
    let conf = node.conf("1.1.0", &Value::Null).to_string();
    let env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid.as_str()),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let t = Instant::now();
    let out = node.cni(&env("ADD"), conf.as_bytes())?;
    anyhow::ensure!(out.success, "podnet ADD: {out:?}");
    let add = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = node.cni(&env("DEL"), conf.as_bytes())?;
    anyhow::ensure!(out.success, "podnet DEL: {out:?}");
    Ok((add, t.elapsed().as_secs_f64()))
}
