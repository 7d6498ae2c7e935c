//! Building a lab (`up`: fabric, etcd, nodes, pods, the Service), adding a
//! node to a running one, and removing it all (`down`).

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    model::{
        FABRIC_HOST, LabDatastore, LabEtcdMember, LabLayout, LabNode, LabSpec, ServiceKind,
        default_lease_ttl, etcd_address, node_ip,
    },
    processes::{apply_service, kill_and_wait},
};
use crate::{bins, netns::run};

pub(super) fn progress(spec: &LabSpec, msg: &str) {
    if spec.verbose {
        eprintln!("lab: {msg}");
    }
}

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
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
            etcd_tls: self.etcd_tls,
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
    anyhow::ensure!(
        !spec.etcd_tls || spec.datastore == LabDatastore::Etcd,
        "--etcd-tls needs --datastore etcd"
    );
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
        agent_args: agent_args_for(spec),
        etcd_tls: spec.etcd_tls,
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
    layout.etcd_tls = spec.etcd_tls;
    let scheme = if spec.etcd_tls { "https" } else { "http" };
    if spec.etcd_tls {
        // Every member's address in etcd's certificate; `root` for the
        // lab's own tools; the nodes' certificates as they are added.
        let addresses: Vec<Ipv4Addr> = (1..=spec.etcd_members).map(etcd_address).collect();
        crate::etcd_tls::Pki::generate(&layout.etcd_pki_dir(), &addresses, &["root"])?;
    }
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
            client_url: format!("{scheme}://{address}:2379"),
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
    layout.setup_etcd_auth()?;
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

/// The agents' arguments: the spec's, and `--services bpf` when the
/// datapath translates the demo Service (unless the spec says otherwise).
fn agent_args_for(spec: &LabSpec) -> Vec<String> {
    let mut args = spec.agent_args.clone();
    if spec.service == Some(ServiceKind::Datapath)
        && !args.iter().any(|a| a.starts_with("--services"))
    {
        args.extend(["--services".to_owned(), "bpf".to_owned()]);
    }
    args
}
