//! The lab's long-running processes besides etcd: the agents (started
//! through `crate::podnetd`), the pods the CNI plugin attaches, the demo
//! Service's rules and its backend servers.

use std::{
    fs,
    net::SocketAddrV4,
    os::unix::process::CommandExt as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    model::{LabDatastore, LabLayout, LabNode, LabPod, LabServer, ServiceKind},
    up::ip,
};
use crate::{
    bins,
    netns::command_in,
    podnetd::{self, Lifetime, Podnetd},
    services::{self, ServiceSpec},
};

/// The namespace the lab's pods are in (`K8S_POD_NAMESPACE`).
pub const LAB_NAMESPACE: &str = "default";

/// The ports every e2e model pod serves, on TCP and on UDP.
pub const E2E_SERVE_PORTS: [u16; 2] = [80, 81];

/// A lab name of the e2e model's pods: `<x|y|z>-<a|b|c>`.
fn is_e2e_pod_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(namespace, pod)| {
        super::objects::E2E_NAMESPACES.contains(&namespace)
            && super::objects::E2E_PODS.contains(&pod)
    })
}

impl LabLayout {
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
        self.add_pod_in(node_name, pod_name, (LAB_NAMESPACE, pod_name), extra)
    }

    /// Creates a pod on `node` whose lab name is `pod_name` and whose
    /// Kubernetes namespace and name are `k8s` (what the plugin is told).
    pub fn add_pod_in(
        &mut self,
        node_name: &str,
        pod_name: &str,
        k8s: (&str, &str),
        extra: &serde_json::Value,
    ) -> anyhow::Result<LabPod> {
        let (namespace, name) = k8s;
        let node = self.node(node_name).context("no such node")?.clone();
        let netns = format!("{}-{pod_name}", self.prefix);
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let path = format!("/var/run/netns/{netns}");
        // As kubelet names a pod to its CNI plugin.
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
             K8S_POD_INFRA_CONTAINER_ID={netns}"
        );
        let (ok, result) = self.cni_with(
            &node,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &netns),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &cni_args),
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
            namespace: Some(namespace.to_owned()),
            pod_name: Some(name.to_owned()),
        };
        self.pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// Starts (or restarts) the agent of `node`, detached, and waits for it.
    pub fn start_agent(&mut self, node_name: &str) -> anyhow::Result<()> {
        self.start_agent_with_env(node_name, &[])
    }

    /// [`Self::start_agent`] with `env` added to the agent's environment
    /// (a test build's fail points and faults).
    pub fn start_agent_with_env(
        &mut self,
        node_name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == node_name)
            .context("no such node")?;
        let datastore = match self.datastore {
            LabDatastore::File => format!("file:{}", self.run_dir.join("nodes.json").display()),
            LabDatastore::Etcd => format!("etcd:{}", self.etcd_endpoints().join(",")),
        };
        let etcd_args = match self.datastore {
            LabDatastore::Etcd => self.etcd_agent_args(node_name)?,
            LabDatastore::File => Vec::new(),
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
        .args(&etcd_args)
        .args(&self.agent_args)
        .envs(env.iter().copied())
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
    pub fn cluster_cidr(&self) -> String {
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
        if kind == ServiceKind::Datapath {
            let nodes: Vec<String> = backends.iter().map(|p| p.node.clone()).collect();
            self.apply_objects(&services::demo_service_objects(&svc, &nodes))
                .context("applying the demo Service's objects")?;
            self.wait_for_node_ports(&svc);
            return Ok(());
        }
        let cidr = self.cluster_cidr();
        for node in &self.nodes {
            apply_service(&node.netns, kind, &svc, &cidr)
                .with_context(|| format!("installing the demo Service on {}", node.name))?;
        }
        Ok(())
    }

    /// Waits (up to 5 s in all) until the fabric host reaches the demo
    /// Service's NodePort on every node, i.e. every agent has compiled the
    /// objects just applied into its maps (a check run at once would
    /// otherwise race the agents' watches). One that never answers is left
    /// for the check to report.
    fn wait_for_node_ports(&self, svc: &ServiceSpec) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for node in &self.nodes {
            let addr = std::net::SocketAddrV4::new(node.node_ip, svc.node_port);
            while std::time::Instant::now() < deadline
                && services::tcp_query(
                    &self.fabric_netns,
                    addr,
                    std::time::Duration::from_millis(300),
                )
                .is_err()
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
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
                    // The objects stay in the datastore; the lab's goes
                    // with it.
                    ServiceKind::Datapath => Ok(()),
                };
                if let Err(e) = removed {
                    errors.push(format!("{}: {e:#}", node.name));
                }
            }
        }
        // Only the Service's backends: the e2e model's servers stay.
        let backends: Vec<String> = self
            .service
            .iter()
            .flat_map(|svc| svc.backends.iter())
            .filter_map(|ip| self.pods.iter().find(|p| p.ip == *ip))
            .map(|p| p.name.clone())
            .collect();
        let (stop, keep): (Vec<LabServer>, Vec<LabServer>) = self
            .servers
            .drain(..)
            .partition(|s| backends.contains(&s.pod) || !is_e2e_pod_name(&s.pod));
        for server in stop {
            kill_and_wait(server.pid);
        }
        self.servers = keep;
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
        self.spawn_server(pod, &[svc.target_tcp_port], &[svc.target_udp_port])?;
        self.wait_server(pod, svc.target_tcp_port)
    }

    /// Starts the NetworkPolicy e2e model's servers: every pod of the model
    /// (namespaces x, y, z) serves TCP and UDP on ports 80 and 81, answering
    /// with its lab name (`x-a`, ...), as upstream's agnhost serves on every
    /// port/protocol of the model. Recorded in the layout's servers, so
    /// `down` kills them; a pod already serving is left alone. Returns once
    /// every server answers on TCP 80 at its pod's own IP.
    ///
    /// SCTP is not served: this machine's kernel has no SCTP sockets
    /// (`CONFIG_IP_SCTP` is not set), so upstream's SCTP port/protocols are
    /// left out of the model.
    pub fn start_e2e_servers(&mut self) -> anyhow::Result<()> {
        let pods: Vec<LabPod> = self
            .pods
            .iter()
            .filter(|p| is_e2e_pod_name(&p.name))
            .filter(|p| !self.servers.iter().any(|s| s.pod == p.name))
            .cloned()
            .collect();
        for pod in &pods {
            self.spawn_server(pod, &E2E_SERVE_PORTS, &E2E_SERVE_PORTS)?;
        }
        for pod in &pods {
            self.wait_server(pod, E2E_SERVE_PORTS[0])?;
        }
        Ok(())
    }

    /// Starts `podnet-lab serve` in `pod` on the given ports, detached, and
    /// records it in the layout (before anything can fail after the spawn).
    fn spawn_server(&mut self, pod: &LabPod, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
        let log_path = self.run_dir.join(format!("serve-{}.log", pod.name));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = command_in(&pod.netns, bins::binary("podnet-lab"))?;
        // `--lab` is only there for `down`'s fallback to find it.
        command.args(["serve", "--lab", &self.prefix, "--name", &pod.name]);
        for port in tcp {
            command.arg("--tcp").arg(port.to_string());
        }
        for port in udp {
            command.arg("--udp").arg(port.to_string());
        }
        let child = command
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
        self.save()
    }

    /// Waits until the server in `pod` answers on TCP `port` at the pod's
    /// own IP (from inside the pod).
    fn wait_server(&self, pod: &LabPod, port: u16) -> anyhow::Result<()> {
        let log_path = self.run_dir.join(format!("serve-{}.log", pod.name));
        let addr = SocketAddrV4::new(pod.ip, port);
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
pub(super) fn apply_service(
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
        ServiceKind::Datapath => Ok(()),
    }
}

pub(super) fn kill_and_wait(pid: u32) {
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
