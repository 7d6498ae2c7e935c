//! What a lab is: its description (`LabSpec`) and the layout it writes to
//! `<run dir>/lab.json` (`LabLayout`: nodes, pods, etcd members, servers),
//! which scripts, tests and later `podnet-lab` commands read back.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::services::ServiceSpec;

/// Default run directory of `cargo xtask lab`.
pub const DEFAULT_RUN_DIR: &str = "/run/podnet-lab";
/// The fabric bridge's address: the "outside" host.
pub const FABRIC_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabDatastore {
    File,
    Etcd,
}

/// How the lab's demo Service is written into the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceKind {
    /// iptables rules as kube-proxy's iptables mode writes them
    /// ([`services::kube_proxy_iptables`]), NodePort included.
    KubeProxyIptables,
    /// A plain nftables DNAT table ([`services::nft_dnat`]), ClusterIP only.
    Nftables,
    /// No rules in the nodes: the Service and its EndpointSlice as cluster
    /// objects in the datastore, translated by podnet's datapath (the
    /// agents run with `--services bpf`). ClusterIP only.
    Datapath,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// `vxlan` or `direct`.
    pub mode: String,
    pub datastore: LabDatastore,
    /// Prefix of every namespace name (distinct labs can coexist).
    pub prefix: String,
    pub run_dir: PathBuf,
    /// Print progress lines.
    pub verbose: bool,
    /// Install the demo Service (backends in the first pod of node1 and of
    /// node2) on every node.
    pub service: Option<ServiceKind>,
    /// Members of the etcd cluster (etcd datastore): 1, or 3 for a real
    /// quorum.
    pub etcd_members: usize,
    /// Extra arguments for every agent (e.g. `--node-grace-period 3s`).
    pub agent_args: Vec<String>,
    /// etcd over TLS with `--client-cert-auth`: a CA, etcd's certificate
    /// and a client certificate per node in `<run dir>/etcd-pki`.
    pub etcd_tls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub agent_socket: PathBuf,
    pub cni_conf: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabPod {
    /// The lab's name for it (unique in the lab).
    pub name: String,
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
    /// Its Kubernetes namespace and name, as the plugin was told
    /// (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`); a layout written before
    /// they were recorded: `default` and the lab name.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
}

impl LabPod {
    /// Its Kubernetes namespace.
    #[must_use]
    pub fn k8s_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(super::LAB_NAMESPACE)
    }

    /// Its Kubernetes name.
    #[must_use]
    pub fn k8s_name(&self) -> &str {
        self.pod_name.as_deref().unwrap_or(&self.name)
    }
}

/// A member of the lab's etcd cluster, in the fabric namespace: member 1
/// on the fabric host's address, the others on addresses of their own on
/// the fabric bridge (192.168.100.2, .3, ...), each with client port 2379
/// and peer port 2380.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabEtcdMember {
    /// `etcd1`, `etcd2`, ...
    pub name: String,
    pub address: Ipv4Addr,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    /// 0 while stopped.
    pub pid: u32,
}

/// A backend server of the demo Service (`podnet-lab serve` in a pod).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabServer {
    pub pod: String,
    pub pid: u32,
}

/// `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabLayout {
    pub prefix: String,
    pub mode: String,
    pub datastore: LabDatastore,
    pub fabric_netns: String,
    pub fabric_host: Ipv4Addr,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub run_dir: PathBuf,
    /// The etcd cluster in the fabric namespace (etcd datastore).
    #[serde(default)]
    pub etcd: Vec<LabEtcdMember>,
    /// The single etcd server of a lab.json written before `etcd` (only
    /// read, so that `down` stops it).
    #[serde(default, skip_serializing)]
    pub etcd_pid: u32,
    /// Extra arguments every agent runs with.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// etcd over TLS (see [`LabSpec::etcd_tls`]).
    #[serde(default)]
    pub etcd_tls: bool,
    /// TTL of the agents' etcd leases, seconds.
    #[serde(default = "default_lease_ttl")]
    pub etcd_lease_ttl: u64,
    /// The demo Service's backend servers.
    #[serde(default)]
    pub servers: Vec<LabServer>,
    /// The demo Service, installed on every node.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    /// How the demo Service is installed.
    #[serde(default)]
    pub service_kind: Option<ServiceKind>,
    /// Where the agents (`podnetd`) and the CNI plugin (`podnet`) come
    /// from; `None`: this build's (`bins::binary`). Kept in the layout so
    /// restarts and joining nodes run the same binaries as the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin_dir: Option<PathBuf>,
}

pub(super) fn default_lease_ttl() -> u64 {
    10
}

/// Member `i` (from 1) of the lab's etcd cluster: the fabric host, then
/// addresses of their own below the nodes' (.11 and up).
pub(super) fn etcd_address(i: usize) -> Ipv4Addr {
    if i <= 1 {
        FABRIC_HOST
    } else {
        Ipv4Addr::new(192, 168, 100, u8::try_from(i).unwrap_or(9))
    }
}

pub(super) fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, u8::try_from(10 + i).unwrap_or(250))
}

impl LabLayout {
    pub fn load(run_dir: &Path) -> anyhow::Result<Self> {
        let path = run_dir.join("lab.json");
        serde_json::from_slice(
            &fs::read(&path)
                .with_context(|| format!("reading {} (is a lab up?)", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        fs::write(
            self.run_dir.join("lab.json"),
            serde_json::to_vec_pretty(self)?,
        )
        .context("writing lab.json")
    }

    #[must_use]
    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, name: &str) -> Option<&LabPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub(super) fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut LabNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .context("no such node")
    }

    /// Every etcd member's client URL (what agents get).
    #[must_use]
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The etcd member called `name`.
    #[must_use]
    pub fn etcd_member(&self, name: &str) -> Option<&LabEtcdMember> {
        self.etcd.iter().find(|m| m.name == name)
    }

    pub(super) fn etcd_member_index(&self, name: &str) -> anyhow::Result<usize> {
        self.etcd
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no etcd member {name}"))
    }
}
