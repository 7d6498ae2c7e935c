//! podnetd: the podnet node agent. Loads the datapath (programs verified and
//! loaded, maps pinned), reconciles the node's endpoints after a (re)start,
//! and serves the CNI plugin and podnetctl on a unix socket until Ctrl-C /
//! SIGTERM. Everything it pins survives it: traffic between existing pods
//! keeps flowing while the agent is down or restarting.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::Parser;
use ipnet::Ipv4Net;
use podnet::{
    agent::{self, AgentConfig, EndpointRegistry},
    api::DEFAULT_SOCKET,
    bpffs,
    datapath::Datapath,
};
use serde::Deserialize;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "podnetd", version, about = "podnet node agent")]
struct Args {
    /// Optional JSON config file with the same keys as the flags (snake_case); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// This node's pod CIDR (default: the first /24 of the cluster CIDR).
    #[arg(long)]
    pod_cidr: Option<Ipv4Net>,
    /// The whole cluster's pod network (default 10.244.0.0/16).
    #[arg(long)]
    cluster_cidr: Option<Ipv4Net>,
    /// MTU of pod interfaces (default 1500).
    #[arg(long)]
    mtu: Option<u32>,
    /// Directory on a bpffs where maps and links are pinned (default /sys/fs/bpf/podnet).
    #[arg(long, env = "PODNETD_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// Directory for endpoint records and the built-in IPAM (default /var/lib/podnet).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Unix socket the CNI plugin and podnetctl talk to.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Load, report and exit instead of serving.
    #[arg(long)]
    once: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    pod_cidr: Option<Ipv4Net>,
    cluster_cidr: Option<Ipv4Net>,
    mtu: Option<u32>,
    bpffs_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
}

fn resolve(args: &Args) -> anyhow::Result<AgentConfig> {
    let file: FileConfig = match &args.config {
        Some(path) => serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?,
        None => FileConfig::default(),
    };
    let cluster_cidr = args.cluster_cidr.or(file.cluster_cidr).unwrap_or_else(|| {
        Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16).expect("valid literal")
    });
    let pod_cidr = match args.pod_cidr.or(file.pod_cidr) {
        Some(cidr) => cidr,
        None => cluster_cidr
            .subnets(24)
            .ok()
            .and_then(|mut s| s.next())
            .unwrap_or(cluster_cidr),
    };
    anyhow::ensure!(
        cluster_cidr.contains(&pod_cidr),
        "pod CIDR {pod_cidr} is not inside the cluster CIDR {cluster_cidr}"
    );
    let node_name = match args.node_name.clone().or(file.node_name) {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("reading the hostname")?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(AgentConfig {
        node_name,
        pod_cidr: pod_cidr.trunc(),
        cluster_cidr: cluster_cidr.trunc(),
        mtu: args.mtu.or(file.mtu).unwrap_or(1500),
        bpffs_dir: args
            .bpffs_dir
            .clone()
            .or(file.bpffs_dir)
            .unwrap_or_else(|| "/sys/fs/bpf/podnet".into()),
        state_dir: args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/podnet".into()),
        socket: args
            .socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = resolve(&args)?;

    let mounted = bpffs::ensure_pin_dir(&config.bpffs_dir)
        .with_context(|| format!("preparing the pin directory {}", config.bpffs_dir.display()))?;
    if mounted {
        info!(dir = %config.bpffs_dir.display(), "mounted bpffs");
    }
    let datapath = Datapath::load(&config.bpffs_dir).context("loading the eBPF datapath")?;
    info!(attach = agent::attach_mode(), pin_dir = %config.bpffs_dir.display(), "datapath loaded");
    for program in datapath.programs()? {
        println!(
            "program {:<16} id {:<6} tag {:016x}",
            program.name, program.id, program.tag
        );
    }
    for map in datapath.maps()? {
        println!(
            "map     {:<16} id {:<6} key {}B value {}B",
            map.name, map.id, map.key_size, map.value_size
        );
    }
    if args.once {
        return Ok(());
    }

    let socket = config.socket.clone();
    info!(node = %config.node_name, pod_cidr = %config.pod_cidr, socket = %socket.display(), "starting");
    let registry = Arc::new(Mutex::new(EndpointRegistry::open(config, datapath)?));

    // Multi-threaded: a slow request (netlink, a big map dump) must not
    // hold up the plugin's ADD on another connection.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        tokio::select! {
            r = agent::serve(&socket, registry) => r,
            r = wait_for_shutdown() => {
                info!("shutting down; pinned maps and links keep forwarding");
                let _ = std::fs::remove_file(&socket);
                r
            }
        }
    })
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
