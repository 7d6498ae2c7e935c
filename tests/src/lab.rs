//! The lab: a cluster on one machine. Nodes are network namespaces joined by
//! an underlay (a veth each to a bridge in a fabric namespace, which also
//! plays "a host outside the cluster"); each node runs its own podnetd with
//! its own bpffs, state and socket; pods are namespaces attached by the real
//! `podnet` binary, as a runtime does. Optionally a demo Service (see
//! [`crate::services`]) is installed on every node, as kube-proxy would,
//! with backend servers in two pods. The layout is written to
//! `<run dir>/lab.json` for scripts and tests.
//!
//! `up` leaves everything running (the lab outlives the command); `down`
//! removes it all and is safe to run twice or after a crash. Tests wrap it
//! in [`LabGuard`], which calls `down` on drop.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    bins,
    netns::{command_in, run, run_in, spawn_in},
    podnetd::{self, Lifetime, Podnetd},
    services::{self, ServiceSpec},
};

/// The lab's names for entering a node's or pod's namespace (tests call them
/// through `lab::`); the one way in is `crate::netns`.
pub use crate::netns::{command_in as in_netns, run_in as on_netns_thread};

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
    pub name: String,
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
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

fn default_lease_ttl() -> u64 {
    10
}

fn progress(spec: &LabSpec, msg: &str) {
    if spec.verbose {
        eprintln!("lab: {msg}");
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Member `i` (from 1) of the lab's etcd cluster: the fabric host, then
/// addresses of their own below the nodes' (.11 and up).
fn etcd_address(i: usize) -> Ipv4Addr {
    if i <= 1 {
        FABRIC_HOST
    } else {
        Ipv4Addr::new(192, 168, 100, u8::try_from(i).unwrap_or(9))
    }
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, u8::try_from(10 + i).unwrap_or(250))
}

impl LabLayout {
    /// Adds one more node to a running lab (a node joining the cluster);
    /// returns its name.
    pub fn join_node(&mut self) -> anyhow::Result<String> {
        let i = self.nodes.len() + 1;
        let spec = LabSpec {
            nodes: i,
            pods_per_node: 0,
            mode: self.mode.clone(),
            datastore: self.datastore,
            prefix: self.prefix.clone(),
            run_dir: self.run_dir.clone(),
            verbose: false,
            service: None,
            etcd_members: self.etcd.len(),
            agent_args: self.agent_args.clone(),
        };
        let fabric = self.fabric_netns.clone();
        let bin_dir = bins::binary_in(self.bin_dir.as_deref(), "podnet")
            .parent()
            .context("bin dir")?
            .to_path_buf();
        add_node(&spec, self, i, &fabric, &bin_dir)?;
        let name = format!("node{i}");
        // Like kube-proxy on a new node: the Service is there too.
        if let (Some(svc), Some(kind)) = (self.service.clone(), self.service_kind) {
            let netns = self.node(&name).context("the new node")?.netns.clone();
            apply_service(&netns, kind, &svc, &self.cluster_cidr())?;
        }
        Ok(name)
    }

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

    fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut LabNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .context("no such node")
    }

    /// Runs the plugin for `node` with `env` and the node's conf on stdin.
    pub fn cni(
        &self,
        node: &LabNode,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        self.cni_with(node, env, &serde_json::Value::Null)
    }

    /// [`Self::cni`] with the keys of `extra` (an object, e.g. a
    /// `runtimeConfig`) added to the conf, as libcni adds runtime config.
    pub fn cni_with(
        &self,
        node: &LabNode,
        env: &[(&str, &str)],
        extra: &serde_json::Value,
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        let conflist: serde_json::Value = serde_json::from_slice(&fs::read(&node.cni_conf)?)?;
        // What libcni does with a conflist of one plugin.
        let mut conf = conflist["plugins"][0].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        if let Some(extra) = extra.as_object() {
            for (key, value) in extra {
                conf[key] = value.clone();
            }
        }
        let out = crate::run_cni_plugin(
            command_in(&node.netns, node.cni_bin_dir.join("podnet"))?,
            &format!("{}:/usr/lib/cni", node.cni_bin_dir.display()),
            env,
            conf.to_string().as_bytes(),
        )?;
        let value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok((out.status.success(), value))
    }

    /// Creates a pod on `node` (a new netns + CNI ADD) and records it.
    pub fn add_pod(&mut self, node_name: &str, pod_name: &str) -> anyhow::Result<LabPod> {
        self.add_pod_with(node_name, pod_name, &serde_json::Value::Null)
    }

    /// [`Self::add_pod`] with `extra` added to the conf (see [`Self::cni_with`]).
    pub fn add_pod_with(
        &mut self,
        node_name: &str,
        pod_name: &str,
        extra: &serde_json::Value,
    ) -> anyhow::Result<LabPod> {
        let node = self.node(node_name).context("no such node")?.clone();
        let netns = format!("{}-{pod_name}", self.prefix);
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let path = format!("/var/run/netns/{netns}");
        let (ok, result) = self.cni_with(
            &node,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &netns),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            extra,
        )?;
        if !ok {
            let _ = ip(&["netns", "del", &netns]);
        }
        anyhow::ensure!(ok, "ADD of {pod_name} on {node_name} failed: {result}");
        let pod_ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .context("no IP in the ADD result")?;
        let pod = LabPod {
            name: pod_name.to_owned(),
            netns: netns.clone(),
            node: node_name.to_owned(),
            ip: pod_ip,
            container_id: netns,
            ifname: "eth0".into(),
        };
        self.pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// Starts (or restarts) the agent of `node`, detached, and waits for it.
    pub fn start_agent(&mut self, node_name: &str) -> anyhow::Result<()> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == node_name)
            .context("no such node")?;
        let datastore = match self.datastore {
            LabDatastore::File => format!("file:{}", self.run_dir.join("nodes.json").display()),
            LabDatastore::Etcd => format!("etcd:{}", self.etcd_endpoints().join(",")),
        };
        let node = &self.nodes[index];
        let log = fs::File::create(node.state_dir.with_file_name("podnetd.log"))?;
        let child = Podnetd {
            bin_dir: self.bin_dir.as_deref(),
            netns: &node.netns,
            node_name: &node.name,
            bpffs_dir: &node.bpffs_dir,
            state_dir: &node.state_dir,
            socket: &node.agent_socket,
        }
        .command(Lifetime::Detached, log)?
        .arg("--node-ip")
        .arg(node.node_ip.to_string())
        .arg("--mode")
        .arg(&self.mode)
        .arg("--datastore")
        .arg(&datastore)
        .arg("--etcd-lease-ttl")
        .arg(self.etcd_lease_ttl.to_string())
        .args(&self.agent_args)
        .spawn()
        .context("starting podnetd")?;
        let socket = node.agent_socket.clone();
        self.nodes[index].pid = child.id();
        // Not waited for: the agent outlives `lab up`; `down` kills it.
        std::mem::forget(child);
        let info = podnetd::wait_for_node_info(&socket, Duration::from_secs(20));
        if let Some(info) = &info {
            self.nodes[index].pod_cidr = info.pod_cidr.to_string();
        }
        anyhow::ensure!(
            info.is_some(),
            "podnetd on {node_name} did not come up:\n{}",
            fs::read_to_string(self.nodes[index].state_dir.with_file_name("podnetd.log"))
                .unwrap_or_default()
        );
        self.save()
    }

    /// The cluster CIDR as the agents know it (kube-proxy's
    /// `--cluster-cidr`); podnetd's default when no agent answers.
    fn cluster_cidr(&self) -> String {
        self.nodes
            .iter()
            .find_map(|n| {
                podnet::api::Client::new(&n.agent_socket)
                    .call::<podnet::api::NodeInfo>(&podnet::api::Request::Node)
                    .ok()
            })
            .map_or_else(
                || "10.244.0.0/16".to_owned(),
                |i| i.cluster_cidr.to_string(),
            )
    }

    /// Installs the demo Service on every node, with backend servers in the
    /// first pod of node1 and the first pod of node2 (only node1's with one
    /// node, none without pods). Replaces an installed one.
    pub fn install_service(&mut self, kind: ServiceKind) -> anyhow::Result<()> {
        self.remove_service()?;
        let backends: Vec<LabPod> = self
            .nodes
            .iter()
            .take(2)
            .filter_map(|n| self.pods.iter().find(|p| p.node == n.name))
            .cloned()
            .collect();
        let svc = services::demo_service(backends.iter().map(|p| p.ip).collect());
        // Recorded before anything is started: `remove_service` and `down`
        // then find whatever a failure halfway leaves.
        self.service = Some(svc.clone());
        self.service_kind = Some(kind);
        self.save()?;
        for pod in &backends {
            self.start_server(pod, &svc)?;
        }
        let cidr = self.cluster_cidr();
        for node in &self.nodes {
            apply_service(&node.netns, kind, &svc, &cidr)
                .with_context(|| format!("installing the demo Service on {}", node.name))?;
        }
        Ok(())
    }

    /// Removes the demo Service from every node and stops its servers. Does
    /// nothing when none is installed.
    pub fn remove_service(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if let (Some(svc), Some(kind)) = (&self.service, self.service_kind) {
            for node in &self.nodes {
                // A node whose namespace is gone took its rules with it.
                if !Path::new("/var/run/netns").join(&node.netns).exists() {
                    continue;
                }
                let removed = match kind {
                    ServiceKind::KubeProxyIptables => {
                        services::remove_kube_proxy_iptables(&node.netns, svc)
                    }
                    ServiceKind::Nftables => services::remove_nft(&node.netns),
                };
                if let Err(e) = removed {
                    errors.push(format!("{}: {e:#}", node.name));
                }
            }
        }
        for server in self.servers.drain(..) {
            kill_and_wait(server.pid);
        }
        self.service = None;
        self.service_kind = None;
        self.save()?;
        anyhow::ensure!(
            errors.is_empty(),
            "removing the demo Service: {}",
            errors.join("; ")
        );
        Ok(())
    }

    /// Starts a backend server of `svc` in `pod`, detached, and waits until
    /// it answers at the pod's own IP.
    pub fn start_server(&mut self, pod: &LabPod, svc: &ServiceSpec) -> anyhow::Result<()> {
        let log_path = self.run_dir.join(format!("serve-{}.log", pod.name));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = command_in(&pod.netns, bins::binary("podnet-lab"))?
            // `--lab` is only there for `down`'s fallback to find it.
            .args(["serve", "--lab", &self.prefix, "--name", &pod.name])
            .arg("--tcp")
            .arg(svc.target_tcp_port.to_string())
            .arg("--udp")
            .arg(svc.target_udp_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the server in {}", pod.name))?;
        self.servers.push(LabServer {
            pod: pod.name.clone(),
            pid: child.id(),
        });
        // Not waited for: the server outlives `lab up`; `down` kills it.
        std::mem::forget(child);
        self.save()?;
        let addr = SocketAddrV4::new(pod.ip, svc.target_tcp_port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match services::tcp_query(&pod.netns, addr, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "the server in {} did not come up:\n{}",
                        pod.name,
                        fs::read_to_string(&log_path).unwrap_or_default()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
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

    fn etcd_member_index(&self, name: &str) -> anyhow::Result<usize> {
        self.etcd
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no etcd member {name}"))
    }

    /// Spawns member `index` (detached; `down` kills it). Does not wait.
    fn spawn_etcd_member(&mut self, index: usize) -> anyhow::Result<()> {
        let initial_cluster: Vec<String> = self
            .etcd
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let member = self.etcd[index].clone();
        let log_path = self.run_dir.join(format!("{}.log", member.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // A restarted member finds its data dir and ignores the initial-*
        // flags: it rejoins as the member it was.
        let child = command_in(&self.fabric_netns, "etcd")?
            .args(["--name", &member.name, "--data-dir"])
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &member.client_url])
            .args(["--advertise-client-urls", &member.client_url])
            .args(["--listen-peer-urls", &member.peer_url])
            .args(["--initial-advertise-peer-urls", &member.peer_url])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-token", &self.prefix])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting etcd (etcd-server is installed by `cargo xtask setup`)")?;
        self.etcd[index].pid = child.id();
        // Not waited for: the member outlives `lab up`; `down` kills it.
        std::mem::forget(child);
        self.save()
    }

    /// Waits until every running member serves (has a leader and a quorum).
    pub fn wait_etcd_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for member in self.etcd.iter().filter(|m| m.pid != 0) {
            loop {
                let url = member.client_url.clone();
                let ready = self.on_fabric_runtime(async move {
                    podnet::datastore::etcd::EtcdDatastore::connect_one(
                        &url,
                        Duration::from_secs(10),
                    )
                    .await
                    .is_ok()
                })?;
                if ready {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "etcd member {} did not come up:\n{}",
                    member.name,
                    fs::read_to_string(self.run_dir.join(format!("{}.log", member.name)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Starts every etcd member that is not running and waits until the
    /// cluster serves.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        for i in 0..self.etcd.len() {
            if self.etcd[i].pid == 0 {
                self.spawn_etcd_member(i)?;
            }
        }
        self.wait_etcd_ready(Duration::from_secs(30))
    }

    /// Stops every etcd member (SIGTERM).
    pub fn stop_etcd(&mut self) -> anyhow::Result<()> {
        for member in &mut self.etcd {
            kill_and_wait(member.pid);
            member.pid = 0;
        }
        self.save()
    }

    /// Starts one etcd member again (it rejoins with its data) and waits
    /// until it serves.
    pub fn start_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        if self.etcd[i].pid == 0 {
            self.spawn_etcd_member(i)?;
        }
        self.wait_etcd_ready(Duration::from_secs(30))
    }

    /// Stops one etcd member (SIGTERM: it leaves its peers cleanly).
    pub fn stop_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        kill_and_wait(self.etcd[i].pid);
        self.etcd[i].pid = 0;
        self.save()
    }

    /// Kills one etcd member (SIGKILL: a crash, nothing is said to anyone).
    pub fn kill_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        if let Ok(raw) = i32::try_from(self.etcd[i].pid)
            && raw != 0
        {
            let pid = nix::unistd::Pid::from_raw(raw);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        self.etcd[i].pid = 0;
        self.save()
    }

    /// Runs `fut` on a small runtime on a thread in the fabric namespace
    /// (where etcd's addresses are).
    fn on_fabric_runtime<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> anyhow::Result<T> {
        run_in(&self.fabric_netns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
        })?
        .context("starting a runtime")
    }

    /// The name of the current etcd leader, as the running members see it
    /// (`None` while there is none).
    pub fn etcd_leader(&self) -> anyhow::Result<Option<String>> {
        let running: Vec<(String, String)> = self
            .etcd
            .iter()
            .filter(|m| m.pid != 0)
            .map(|m| (m.name.clone(), m.client_url.clone()))
            .collect();
        self.on_fabric_runtime(async move {
            use podnet::datastore::etcd::EtcdDatastore;
            // Member IDs are etcd's; map them to names by asking each
            // member who it is.
            let mut ids = Vec::new();
            let mut leader = 0;
            for (name, url) in running {
                if let Ok(mut store) =
                    EtcdDatastore::connect_one(&url, Duration::from_secs(10)).await
                    && let Ok(status) = store.member_status().await
                {
                    ids.push((status.member_id, name));
                    if status.leader != 0 {
                        leader = status.leader;
                    }
                }
            }
            ids.into_iter()
                .find(|(id, _)| *id == leader && leader != 0)
                .map(|(_, name)| name)
        })
    }

    /// Makes member `to` the etcd leader (etcd's move-leader, asked of the
    /// current leader) and waits until it is.
    pub fn etcd_move_leader(&self, to: &str) -> anyhow::Result<()> {
        let leader = self.etcd_leader()?.context("no etcd leader")?;
        if leader == to {
            return Ok(());
        }
        let leader_url = self
            .etcd_member(&leader)
            .context("the leader")?
            .client_url
            .clone();
        let to_url = self
            .etcd_member(to)
            .context("no such member")?
            .client_url
            .clone();
        self.on_fabric_runtime(async move {
            let mut target = etcd_client::Client::connect([to_url], None).await?;
            let id = target
                .status()
                .await?
                .header()
                .map_or(0, etcd_client::ResponseHeader::member_id);
            let mut leader = etcd_client::Client::connect([leader_url], None).await?;
            leader.move_leader(id).await?;
            Ok::<_, etcd_client::Error>(())
        })?
        .context("moving the etcd leader")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.etcd_leader()?.as_deref() != Some(to) {
            anyhow::ensure!(Instant::now() < deadline, "{to} did not become the leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Everything podnet keeps in etcd, read at one revision.
    pub fn etcd_snapshot(&self) -> anyhow::Result<podnet::datastore::membership::Snapshot> {
        let endpoints = self.etcd_endpoints();
        self.on_fabric_runtime(async move {
            let mut store = podnet::datastore::etcd::EtcdDatastore::connect(
                &endpoints,
                Duration::from_secs(10),
            )
            .await?;
            store.snapshot().await
        })?
        .context("reading etcd")
    }

    /// How node `name`'s agent follows the datastore.
    pub fn datastore_status(&self, name: &str) -> anyhow::Result<podnet::api::DatastoreStatus> {
        let node = self.node(name).context("no such node")?;
        Ok(podnet::api::Client::new(&node.agent_socket).call(&podnet::api::Request::Datastore)?)
    }

    /// Kills the agent of `node` without letting it clean up (a crashed or
    /// vanished node).
    pub fn kill_agent(&mut self, node_name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(node_name)?;
        if let Ok(raw) = i32::try_from(node.pid) {
            let pid = nix::unistd::Pid::from_raw(raw);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        node.pid = 0;
        self.save()
    }

    /// Stops the agent of `node` (SIGTERM), leaving its pins: traffic goes on.
    pub fn stop_agent(&mut self, node_name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(node_name)?;
        kill_and_wait(node.pid);
        node.pid = 0;
        self.save()
    }
}

/// Installs `svc` in a node's namespace the way `kind` says.
fn apply_service(
    netns: &str,
    kind: ServiceKind,
    svc: &ServiceSpec,
    cluster_cidr: &str,
) -> anyhow::Result<()> {
    match kind {
        ServiceKind::KubeProxyIptables => {
            services::apply_kube_proxy_iptables(netns, svc, cluster_cidr)
        }
        ServiceKind::Nftables => services::apply_nft(netns, svc),
    }
}

fn kill_and_wait(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if raw == 0 {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(raw);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        // Reap if it is our child; otherwise poll for its disappearance.
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// Builds a lab. On failure, everything built so far is removed.
pub fn up(spec: &LabSpec) -> anyhow::Result<LabLayout> {
    up_with_bins(spec, None)
}

/// [`up`] with the agents and the CNI plugin taken from `bin_dir` when
/// given (e.g. an older commit's release build, for a same-run comparison).
pub fn up_with_bins(spec: &LabSpec, bin_dir: Option<&Path>) -> anyhow::Result<LabLayout> {
    down(&spec.run_dir, &spec.prefix)?;
    let built = build(spec, bin_dir);
    if built.is_err() {
        let _ = down(&spec.run_dir, &spec.prefix);
    }
    built
}

fn build(spec: &LabSpec, bin_dir: Option<&Path>) -> anyhow::Result<LabLayout> {
    fs::create_dir_all(&spec.run_dir)?;
    let fabric = format!("{}-fabric", spec.prefix);
    progress(
        spec,
        &format!("fabric namespace {fabric} with bridge br0 ({FABRIC_HOST}/24)"),
    );
    ip(&["netns", "add", &fabric])?;
    ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
    ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &fabric,
        "addr",
        "add",
        &format!("{FABRIC_HOST}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
    let mut layout = LabLayout {
        prefix: spec.prefix.clone(),
        mode: spec.mode.clone(),
        datastore: spec.datastore,
        fabric_netns: fabric.clone(),
        fabric_host: FABRIC_HOST,
        nodes: Vec::new(),
        pods: Vec::new(),
        run_dir: spec.run_dir.clone(),
        etcd: Vec::new(),
        etcd_pid: 0,
        agent_args: spec.agent_args.clone(),
        etcd_lease_ttl: default_lease_ttl(),
        servers: Vec::new(),
        service: None,
        service_kind: None,
        bin_dir: bin_dir.map(Path::to_path_buf),
    };
    layout.save()?;
    if spec.datastore == LabDatastore::Etcd {
        add_etcd(spec, &mut layout)?;
    }
    let cni_bin_dir = bins::binary_in(bin_dir, "podnet")
        .parent()
        .context("bin dir")?
        .to_path_buf();
    for i in 1..=spec.nodes {
        add_node(spec, &mut layout, i, &fabric, &cni_bin_dir)?;
    }
    for i in 1..=spec.nodes {
        for j in 1..=spec.pods_per_node {
            let pod = layout.add_pod(&format!("node{i}"), &format!("node{i}-pod{j}"))?;
            progress(spec, &format!("pod {} on node{i}: {}", pod.name, pod.ip));
        }
    }
    // Every agent has seen every node (the nodes file is polled).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let all_known = layout.nodes.iter().all(|n| {
            podnet::api::Client::new(&n.agent_socket)
                .call::<Vec<podnet::datastore::NodeRecord>>(&podnet::api::Request::Nodes)
                .is_ok_and(|nodes| nodes.len() + 1 >= layout.nodes.len())
        });
        if all_known {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(kind) = spec.service {
        layout.install_service(kind)?;
        if let Some(svc) = &layout.service {
            progress(
                spec,
                &format!(
                    "service {} ({kind:?}): ClusterIP {}, backends {:?}",
                    svc.name, svc.cluster_ip, svc.backends
                ),
            );
        }
    }
    Ok(layout)
}

/// The lab's etcd cluster: addresses on the fabric bridge, members
/// started, and the cluster serving.
fn add_etcd(spec: &LabSpec, layout: &mut LabLayout) -> anyhow::Result<()> {
    let fabric = layout.fabric_netns.clone();
    anyhow::ensure!(
        (1..=9).contains(&spec.etcd_members),
        "--etcd-members must be 1 to 9"
    );
    for i in 1..=spec.etcd_members {
        let address = etcd_address(i);
        if address != FABRIC_HOST {
            ip(&[
                "-n",
                &fabric,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "br0",
            ])?;
        }
        layout.etcd.push(LabEtcdMember {
            name: format!("etcd{i}"),
            address,
            client_url: format!("http://{address}:2379"),
            peer_url: format!("http://{address}:2380"),
            data_dir: spec.run_dir.join(format!("etcd{i}")),
            pid: 0,
        });
    }
    progress(
        spec,
        &format!(
            "etcd in the fabric namespace: {}",
            layout
                .etcd
                .iter()
                .map(|m| format!("{} {}", m.name, m.client_url))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    layout.start_etcd()?;
    Ok(())
}

/// Node `i`: namespace, underlay veth to the fabric, bpffs, CNI conf, agent.
fn add_node(
    spec: &LabSpec,
    layout: &mut LabLayout,
    i: usize,
    fabric: &str,
    cni_bin_dir: &Path,
) -> anyhow::Result<()> {
    let name = format!("node{i}");
    let netns = format!("{}-{name}", layout.prefix);
    let dir = layout.run_dir.join(&name);
    progress(
        spec,
        &format!("node {name}: namespace {netns}, underlay {}/24", node_ip(i)),
    );
    ip(&["netns", "add", &netns])?;
    ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &name, "netns",
        fabric,
    ])?;
    ip(&["-n", fabric, "link", "set", &name, "master", "br0", "up"])?;
    ip(&[
        "-n",
        &netns,
        "addr",
        "add",
        &format!("{}/24", node_ip(i)),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
    // The fabric is the nodes' way out (egress tests).
    ip(&[
        "-n",
        &netns,
        "route",
        "add",
        "default",
        "via",
        &FABRIC_HOST.to_string(),
    ])?;
    let bpffs_dir = dir.join("bpf");
    podnet::bpffs::ensure_pin_dir(&bpffs_dir)?;
    let net_d = dir.join("net.d");
    fs::create_dir_all(&net_d)?;
    let agent_socket = dir.join("podnetd.sock");
    let cni_conf = net_d.join("10-podnet.conflist");
    fs::write(
        &cni_conf,
        serde_json::to_vec_pretty(&serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "podnet",
            "plugins": [{"type": "podnet", "agentSocket": agent_socket}]
        }))?,
    )?;
    layout.nodes.push(LabNode {
        name: name.clone(),
        netns,
        node_ip: node_ip(i),
        pod_cidr: String::new(),
        agent_socket,
        cni_conf,
        cni_bin_dir: cni_bin_dir.to_path_buf(),
        bpffs_dir,
        state_dir: dir.join("state"),
        pid: 0,
    });
    layout.save()?;
    progress(
        spec,
        &format!("node {name}: starting podnetd ({} mode)", layout.mode),
    );
    layout.start_agent(&name)?;
    Ok(())
}

/// Removes a lab: agents, namespaces, pins, run dir. Safe to run twice and
/// after a crash (finds leftovers by their name prefix).
pub fn down(run_dir: &Path, prefix: &str) -> anyhow::Result<()> {
    if let Ok(layout) = LabLayout::load(run_dir) {
        for server in &layout.servers {
            kill_and_wait(server.pid);
        }
        for node in &layout.nodes {
            kill_and_wait(node.pid);
        }
        for member in &layout.etcd {
            kill_and_wait(member.pid);
        }
        kill_and_wait(layout.etcd_pid);
    }
    // Agents whose pid was lost: every podnetd whose socket is in run_dir.
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(format!("podnetd .*--socket {}/", run_dir.display()))
        .status();
    // Service backends whose pid was lost: they carry the lab's prefix.
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(format!("podnet-lab serve --lab {prefix} "))
        .status();
    let listed = run(Command::new("ip").args(["netns", "list"]))?;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{prefix}-")) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if run_dir.exists() {
        // Unmount the nodes' bpffs instances (pins go with them).
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            for line in mounts.lines() {
                let Some(target) = line.split_whitespace().nth(1) else {
                    continue;
                };
                if Path::new(target).starts_with(run_dir) {
                    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        fs::remove_dir_all(run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    }
    Ok(())
}

/// One cell of the connectivity matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub kind: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// One ping from `netns` to `target`, answered within a second.
pub fn ping(netns: &str, target: Ipv4Addr) -> bool {
    command_in(netns, "ping")
        .and_then(|mut c| {
            Ok(c.args(["-c", "1", "-W", "1", &target.to_string()])
                .output()?)
        })
        .is_ok_and(|o| o.status.success())
}

/// Full connectivity check: pod <-> pod, pod -> node, node -> pod, pod ->
/// the fabric host with the source masqueraded to the pod's node IP, and,
/// when the lab has the demo Service, pod -> Service (TCP, UDP) and the
/// fabric host -> every node's NodePort.
pub fn check(layout: &LabLayout) -> anyhow::Result<Vec<Probe>> {
    let mut probes = Vec::new();
    for a in &layout.pods {
        for b in &layout.pods {
            if a.name != b.name {
                let kind = if a.node == b.node {
                    "pod->pod same node"
                } else {
                    "pod->pod cross node"
                };
                probes.push(Probe {
                    from: a.name.clone(),
                    to: b.name.clone(),
                    kind,
                    ok: ping(&a.netns, b.ip),
                    detail: b.ip.to_string(),
                });
            }
        }
        for n in &layout.nodes {
            probes.push(Probe {
                from: a.name.clone(),
                to: n.name.clone(),
                kind: "pod->node",
                ok: ping(&a.netns, n.node_ip),
                detail: n.node_ip.to_string(),
            });
            probes.push(Probe {
                from: n.name.clone(),
                to: a.name.clone(),
                kind: "node->pod",
                ok: ping(&n.netns, a.ip),
                detail: a.ip.to_string(),
            });
        }
    }
    // Egress: a TCP listener on the fabric host sees who connects.
    let port = 17_000;
    let fabric = layout.fabric_netns.clone();
    let expected = layout.pods.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = spawn_in(
        &fabric,
        move || -> anyhow::Result<BTreeMap<String, Ipv4Addr>> {
            let listener = TcpListener::bind(SocketAddrV4::new(FABRIC_HOST, port))?;
            listener.set_nonblocking(false)?;
            tx.send(()).ok();
            let mut seen = BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.len() < expected && Instant::now() < deadline {
                let (mut stream, peer) = listener.accept()?;
                let mut name = String::new();
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let _ = stream.read_to_string(&mut name);
                if let std::net::SocketAddr::V4(peer) = peer {
                    seen.insert(name, *peer.ip());
                }
            }
            Ok(seen)
        },
    )?;
    rx.recv_timeout(Duration::from_secs(5)).ok();
    for pod in &layout.pods {
        let name = pod.name.clone();
        let connected = run_in(&pod.netns, move || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddrV4::new(FABRIC_HOST, port).into(),
                Duration::from_secs(2),
            )?;
            s.write_all(name.as_bytes())
        })?;
        if let Err(e) = connected {
            probes.push(Probe {
                from: pod.name.clone(),
                to: "fabric host".into(),
                kind: "egress (masqueraded)",
                ok: false,
                detail: e.to_string(),
            });
        }
    }
    let seen = listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    for pod in &layout.pods {
        let node_ip = layout.node(&pod.node).map(|n| n.node_ip);
        if let Some(src) = seen.get(&pod.name) {
            probes.push(Probe {
                from: pod.name.clone(),
                to: "fabric host".into(),
                kind: "egress (masqueraded)",
                ok: Some(*src) == node_ip,
                detail: format!("seen from {src}"),
            });
        }
    }
    if let Some(svc) = &layout.service {
        probes.extend(service_probes(layout, svc));
    }
    probes.extend(consistency_probes(layout));
    Ok(probes)
}

/// Per node: the agent's state against the kernel's (`podnetctl nodes
/// --check`), and the nodes it forwards to against the datastore (the
/// nodes file; with etcd, against the other agents' own view of themselves).
fn consistency_probes(layout: &LabLayout) -> Vec<Probe> {
    use podnet::api::{Client, Drift, Request};
    let mut probes = Vec::new();
    for n in &layout.nodes {
        let client = Client::new(&n.agent_socket);
        let (ok, detail) = match client.call::<Vec<Drift>>(&Request::Check) {
            Ok(drift) if drift.is_empty() => (true, "maps, routes, veths, filters".to_owned()),
            Ok(drift) => (
                false,
                drift
                    .iter()
                    .map(|d| format!("{}: {}", d.kind, d.detail))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Err(e) => (false, e.to_string()),
        };
        probes.push(Probe {
            from: n.name.clone(),
            to: "its kernel state".into(),
            kind: "consistency",
            ok,
            detail,
        });
        // Every other node of the lab, as the datastore has it.
        let want: BTreeMap<String, String> = layout
            .nodes
            .iter()
            .filter(|other| other.name != n.name)
            .map(|other| (other.name.clone(), other.pod_cidr.clone()))
            .collect();
        let (ok, detail) = match client.call::<Vec<podnet::datastore::NodeRecord>>(&Request::Nodes)
        {
            Ok(list) => {
                let have: BTreeMap<String, String> = list
                    .into_iter()
                    .map(|r| (r.name, r.pod_cidr.to_string()))
                    .collect();
                (have == want, format!("{have:?}"))
            }
            Err(e) => (false, e.to_string()),
        };
        probes.push(Probe {
            from: n.name.clone(),
            to: "the datastore".into(),
            kind: "consistency",
            ok,
            detail,
        });
    }
    probes
}

/// How long a Service probe waits for its answer.
const SERVICE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries per Service cell: each picks a backend at random, so one query
/// would pass a cell half the time when only the path to one backend works.
const SERVICE_PROBE_QUERIES: usize = 6;

type ServiceAnswer = anyhow::Result<(String, SocketAddrV4)>;

/// One Service cell: [`SERVICE_PROBE_QUERIES`] queries at once, ok when
/// every one was answered by a backend; the detail says who answered.
fn service_cell(
    addr: SocketAddrV4,
    backends: &[&str],
    query: impl Fn() -> ServiceAnswer + Sync,
) -> (bool, String) {
    let answers: Vec<ServiceAnswer> = std::thread::scope(|scope| {
        let jobs: Vec<_> = (0..SERVICE_PROBE_QUERIES)
            .map(|_| scope.spawn(&query))
            .collect();
        jobs.into_iter()
            .map(|job| {
                job.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))
            })
            .collect()
    });
    // Backend -> (answers, a source address it saw).
    let mut answered: BTreeMap<String, (usize, SocketAddrV4)> = BTreeMap::new();
    let mut failures = Vec::new();
    for answer in answers {
        match answer {
            Ok((name, seen)) if backends.contains(&name.as_str()) => {
                answered.entry(name).or_insert((0, seen)).0 += 1;
            }
            Ok((name, seen)) => failures.push(format!("{name:?} is not a backend (saw {seen})")),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let who: Vec<String> = answered
        .iter()
        .map(|(name, (n, seen))| format!("{name} x{n} (saw {seen})"))
        .collect();
    let detail = if failures.is_empty() {
        format!("{addr} answered by {}", who.join(", "))
    } else {
        format!(
            "{addr}: {} of {SERVICE_PROBE_QUERIES} failed ({}){}",
            failures.len(),
            failures[0],
            if who.is_empty() {
                String::new()
            } else {
                format!("; answered by {}", who.join(", "))
            }
        )
    };
    (failures.is_empty(), detail)
}

/// The demo Service's rows: every pod to its ClusterIP over TCP and UDP,
/// and the fabric host to every node's NodePort (kube-proxy rules only;
/// the nftables variant has no NodePort). Run in parallel: a broken path
/// costs a timeout per query.
fn service_probes(layout: &LabLayout, svc: &ServiceSpec) -> Vec<Probe> {
    let backends: Vec<&str> = layout.servers.iter().map(|s| s.pod.as_str()).collect();
    let backends = backends.as_slice();
    let tcp = SocketAddrV4::new(svc.cluster_ip, svc.tcp_port);
    let udp = SocketAddrV4::new(svc.cluster_ip, svc.udp_port);
    std::thread::scope(|scope| {
        let mut jobs = Vec::new();
        for pod in &layout.pods {
            let netns = pod.netns.as_str();
            jobs.push((
                pod.name.clone(),
                "svc tcp".to_owned(),
                "pod->service tcp",
                scope.spawn(move || {
                    service_cell(tcp, backends, || {
                        services::tcp_query(netns, tcp, SERVICE_PROBE_TIMEOUT)
                    })
                }),
            ));
            jobs.push((
                pod.name.clone(),
                "svc udp".to_owned(),
                "pod->service udp",
                scope.spawn(move || {
                    service_cell(udp, backends, || {
                        services::udp_query(netns, udp, SERVICE_PROBE_TIMEOUT)
                    })
                }),
            ));
        }
        if layout.service_kind == Some(ServiceKind::KubeProxyIptables) {
            let fabric = layout.fabric_netns.as_str();
            for node in &layout.nodes {
                let addr = SocketAddrV4::new(node.node_ip, svc.node_port);
                jobs.push((
                    "fabric host".to_owned(),
                    node.name.clone(),
                    "nodeport",
                    scope.spawn(move || {
                        service_cell(addr, backends, || {
                            services::tcp_query(fabric, addr, SERVICE_PROBE_TIMEOUT)
                        })
                    }),
                ));
            }
        }
        jobs.into_iter()
            .map(|(from, to, kind, job)| {
                let (ok, detail) = job
                    .join()
                    .unwrap_or_else(|_| (false, "probe thread panicked".to_owned()));
                Probe {
                    from,
                    to,
                    kind,
                    ok,
                    detail,
                }
            })
            .collect()
    })
}

/// The matrix as text: one row per source, one column per destination.
#[must_use]
pub fn render(probes: &[Probe]) -> String {
    // Pods first, then nodes, then the outside host.
    let rank = |name: &str| {
        if name.contains("-pod") {
            0
        } else if name.starts_with("node") {
            1
        } else {
            2
        }
    };
    let mut rows: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    for p in probes {
        if !rows.contains(&p.from) {
            rows.push(p.from.clone());
        }
        if !cols.contains(&p.to) {
            cols.push(p.to.clone());
        }
    }
    rows.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    cols.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let width = cols
        .iter()
        .chain(rows.iter())
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4)
        + 1;
    let mut out = format!("{:width$}", "from \\ to");
    for c in &cols {
        let _ = write!(out, "{c:>width$}");
    }
    out.push('\n');
    for r in &rows {
        let _ = write!(out, "{r:width$}");
        for c in &cols {
            let cell = probes
                .iter()
                .find(|p| &p.from == r && &p.to == c)
                .map_or("-", |p| if p.ok { "ok" } else { "FAIL" });
            let _ = write!(out, "{cell:>width$}");
        }
        out.push('\n');
    }
    let failed: Vec<&Probe> = probes.iter().filter(|p| !p.ok).collect();
    let _ = write!(out, "\n{} checks, {} failed\n", probes.len(), failed.len());
    for f in failed {
        let _ = writeln!(
            out,
            "  FAIL {} -> {} ({}): {}",
            f.from, f.to, f.kind, f.detail
        );
    }
    out
}

/// A lab for tests: `down` on drop, even when the test fails.
pub struct LabGuard {
    pub layout: LabLayout,
}

/// What a test lab has besides nodes and pods.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The demo Service, installed as this.
    pub service: Option<ServiceKind>,
    /// Agents and plugin from this directory (see [`up_with_bins`]).
    pub bin_dir: Option<PathBuf>,
    /// Members of the etcd cluster (etcd datastore).
    pub etcd_members: usize,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            service: None,
            bin_dir: None,
            etcd_members: 1,
            agent_args: Vec::new(),
        }
    }
}

impl LabGuard {
    /// A lab without the demo Service.
    pub fn up(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
    ) -> anyhow::Result<Self> {
        Self::up_with(
            tag,
            nodes,
            pods_per_node,
            mode,
            datastore,
            LabOptions::default(),
        )
    }

    /// [`LabGuard::up`] with the demo Service installed as `kind`.
    pub fn up_with_service(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        kind: ServiceKind,
    ) -> anyhow::Result<Self> {
        let options = LabOptions {
            service: Some(kind),
            ..LabOptions::default()
        };
        Self::up_with(tag, nodes, pods_per_node, mode, datastore, options)
    }

    /// [`LabGuard::up`] running the agents and the CNI plugin from
    /// `bin_dir` when given (see [`up_with_bins`]).
    pub fn up_with_bins(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        bin_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let options = LabOptions {
            bin_dir: bin_dir.map(Path::to_path_buf),
            ..LabOptions::default()
        };
        Self::up_with(tag, nodes, pods_per_node, mode, datastore, options)
    }

    /// A lab with everything [`LabOptions`] says.
    pub fn up_with(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        options: LabOptions,
    ) -> anyhow::Result<Self> {
        let prefix = format!("pnt{tag}{}", std::process::id() % 10_000);
        let spec = LabSpec {
            nodes,
            pods_per_node,
            mode: mode.into(),
            datastore,
            run_dir: std::env::temp_dir().join(format!("podnet-lab-{prefix}")),
            prefix,
            verbose: false,
            service: options.service,
            etcd_members: options.etcd_members,
            agent_args: options.agent_args,
        };
        Ok(Self {
            layout: up_with_bins(&spec, options.bin_dir.as_deref())?,
        })
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = down(&self.layout.run_dir, &self.layout.prefix);
    }
}
