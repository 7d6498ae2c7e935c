//! podnetd: the podnet node agent. Loads the datapath (programs verified and
//! loaded, maps pinned), reconciles the node's endpoints after a (re)start,
//! and serves the CNI plugin and podnetctl on a unix socket until Ctrl-C /
//! SIGTERM. Everything it pins survives it: traffic between existing pods
//! keeps flowing while the agent is down or restarting.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use podnet::{
    agent::{
        self, Agent, AgentConfig,
        cluster::{self, Mode, NodeNetwork, VxlanDatapath},
        cluster_objects::{self, ClusterObjects, SharedConnection},
        follow::{self, EtcdFollow},
        join,
        metrics::{AgentInfo, AgentMetrics, CniOps},
    },
    api::{DEFAULT_SOCKET, services::ServicesMode},
    bpffs,
    datapath::{Datapath, FlowSweeper, PinnedMapReader},
    datastore::{
        DatastoreError, DatastoreSpec, JoinRequest,
        etcd::{EtcdAccess, EtcdAccessFiles, EtcdDatastore},
        file::{self, FileDatastore, Follower},
        membership::{Policy, format_duration, parse_duration},
        objects::{ObjectStoreError, file::FileObjectStore},
    },
    install, netlink,
};
use podnet_common::node;
use serde::Deserialize;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "podnetd",
    version,
    about = "podnet node agent",
    // `podnetd --mtu 1400 install-cni` would drop the agent's flags
    // silently: the install takes its own.
    args_conflicts_with_subcommands = true
)]
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
    /// The Services' ClusterIP range (default 10.96.0.0/12, Kubernetes'
    /// own): a policy-selected pod's connection to it is judged after the
    /// node's DNAT, against the backend pod.
    #[arg(long)]
    service_cidr: Option<Ipv4Net>,
    /// Who translates Services (ClusterIPs): kube-proxy (the node's
    /// kube-proxy in the stack; default) or bpf (the datapath, from the
    /// Services and EndpointSlices in the datastore: run no kube-proxy for
    /// ClusterIPs then).
    #[arg(long, value_enum)]
    services: Option<ServicesMode>,
    /// With --services bpf: the cgroup v2 directory of the node's pods
    /// (not the hierarchy's root), whose processes' connections and UDP
    /// datagrams to a ClusterIP go to a backend at connect / sendmsg
    /// (cgroup socket programs) instead of being translated per packet.
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
    /// MTU of pod interfaces (default 1500).
    #[arg(long)]
    mtu: Option<u32>,
    /// Entries of the stack-flows table (flows through the node's NAT:
    /// Services, NodePorts, hostPorts) one pod may hold; the flows it opens
    /// beyond that are not tracked (default: an eighth of the table, 16384).
    #[arg(long)]
    stack_flows_per_endpoint: Option<u32>,
    /// Directory on a bpffs where maps and links are pinned (default /sys/fs/bpf/podnet).
    #[arg(long, env = "PODNETD_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// Directory for endpoint records and the built-in IPAM (default /var/lib/podnet).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Unix socket the CNI plugin and podnetctl talk to.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where the cluster lives: none (one node), file:PATH (a nodes file) or etcd:URL[,URL...].
    #[arg(long)]
    datastore: Option<DatastoreSpec>,
    /// How pods reach other nodes: vxlan (default with a datastore), direct, or local (no cluster).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// This node's underlay address (default: the first address of --underlay-dev).
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// The underlay device (default: the device holding --node-ip).
    #[arg(long)]
    underlay_dev: Option<String>,
    /// VXLAN network identifier.
    #[arg(long)]
    vni: Option<u32>,
    /// VXLAN UDP port (default 4789).
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// vxlan mode: who encapsulates, bpf (the pod's program, out of the
    /// underlay device; the underlay's program decapsulates; default) or
    /// kernel (the node's VXLAN device).
    #[arg(long, value_enum)]
    vxlan_datapath: Option<VxlanDatapath>,
    /// TTL of this node's etcd lease (seconds): how long after the agent
    /// vanishes other nodes keep routing to it.
    #[arg(long, default_value_t = 30)]
    etcd_lease_ttl: u64,
    #[command(flatten)]
    etcd_access: EtcdAccessFiles,
    /// etcd: how long other nodes keep routing to a node whose lease has
    /// expired (it may be restarting or cut off; its pods may be running)
    /// before they remove it, e.g. 90s, 10m (default 10m).
    #[arg(long, value_parser = parse_duration)]
    node_grace_period: Option<std::time::Duration>,
    /// etcd: how long after its lease expired a node's pod CIDR claim is
    /// released for other nodes to take; not shorter than the grace period
    /// (default 24h).
    #[arg(long, value_parser = parse_duration)]
    cidr_release_after: Option<std::time::Duration>,
    /// Serve Prometheus metrics (/metrics) and health probes (/healthz,
    /// /readyz) over HTTP on this address, e.g. 127.0.0.1:9962, or the
    /// node's address for a scraper off the node (default: off).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Log lines as plain text (default) or one JSON object per line.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Load, report and exit instead of serving.
    #[arg(long)]
    once: bool,
    /// Without a subcommand, podnetd runs the agent.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Copy the CNI plugin to <cni-bin-dir>/podnet and write
    /// <cni-conf-dir>/10-podnet.conflist, atomically and only when changed
    /// (prints "written" or "unchanged" for each); then exit.
    InstallCni(InstallCniArgs),
}

#[derive(Debug, clap::Args)]
struct InstallCniArgs {
    /// Where runtimes look for CNI plugins.
    #[arg(long, env = "PODNETD_CNI_BIN_DIR", default_value = install::DEFAULT_CNI_BIN_DIR)]
    cni_bin_dir: PathBuf,
    /// Where runtimes look for network configurations.
    #[arg(long, env = "PODNETD_CNI_CONF_DIR", default_value = install::DEFAULT_CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// The plugin binary to install (default: `podnet` next to this podnetd).
    #[arg(long, env = "PODNETD_PLUGIN_SOURCE")]
    plugin_source: Option<PathBuf>,
    /// The agent's socket as the plugin sees it (the conf's agentSocket).
    #[arg(long, env = "PODNETD_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pod MTU written into the conf (default: none, the agent's MTU applies).
    #[arg(long, env = "PODNETD_CNI_MTU")]
    mtu: Option<u32>,
}

fn install_cni(args: InstallCniArgs) -> anyhow::Result<()> {
    let plugin_source = match args.plugin_source {
        Some(path) => path,
        None => std::env::current_exe()
            .context("finding podnetd's own path")?
            .with_file_name(install::PLUGIN_FILE),
    };
    let options = install::InstallOptions {
        plugin_source,
        cni_bin_dir: args.cni_bin_dir,
        cni_conf_dir: args.cni_conf_dir,
        agent_socket: args.socket,
        mtu: args.mtu,
    };
    let report = install::install(&options).context("installing the CNI plugin and conf")?;
    println!("{}", report.plugin);
    println!("{}", report.conflist);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    pod_cidr: Option<Ipv4Net>,
    cluster_cidr: Option<Ipv4Net>,
    service_cidr: Option<Ipv4Net>,
    services: Option<ServicesMode>,
    socket_lb_cgroup: Option<PathBuf>,
    mtu: Option<u32>,
    stack_flows_per_endpoint: Option<u32>,
    bpffs_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    datastore: Option<String>,
    mode: Option<Mode>,
    node_ip: Option<Ipv4Addr>,
    underlay_dev: Option<String>,
    vni: Option<u32>,
    vxlan_port: Option<u16>,
    vxlan_datapath: Option<VxlanDatapath>,
    node_grace_period: Option<String>,
    cidr_release_after: Option<String>,
    metrics_addr: Option<SocketAddr>,
    log_format: Option<LogFormat>,
}

/// Everything the agent runs with.
struct Resolved {
    config: AgentConfig,
    datastore: DatastoreSpec,
    network: NodeNetwork,
    /// The pod CIDR was given (flag or file), not to be chosen by the datastore.
    fixed_pod_cidr: bool,
    /// When a node without a lease is removed and its CIDR released.
    policy: Policy,
    /// How to reach etcd (TLS, client certificate, user).
    etcd_access: EtcdAccess,
}

fn read_file_config(args: &Args) -> anyhow::Result<FileConfig> {
    Ok(match &args.config {
        Some(path) => serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?,
        None => FileConfig::default(),
    })
}

/// The grace period and release delay: flags, else the config file, else
/// the defaults (see [`Policy`] for why those).
fn resolve_policy(args: &Args, file: &FileConfig) -> anyhow::Result<Policy> {
    let from_file = |value: &Option<String>, what: &str| {
        value
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{what} in the config file: {e}"))
    };
    let grace = match args.node_grace_period {
        Some(d) => d,
        None => from_file(&file.node_grace_period, "node_grace_period")?
            .unwrap_or(Policy::DEFAULT_NODE_GRACE_PERIOD),
    };
    let release = match args.cidr_release_after {
        Some(d) => d,
        None => from_file(&file.cidr_release_after, "cidr_release_after")?
            .unwrap_or(Policy::DEFAULT_CIDR_RELEASE_AFTER),
    };
    Policy::new(grace, release).map_err(|e| anyhow::anyhow!(e))
}

/// The node's place on the underlay: none for a single node without an
/// address, else found from the flags and the config file.
fn resolve_network(args: &Args, file: &FileConfig, mode: Mode) -> anyhow::Result<NodeNetwork> {
    if mode == Mode::Local && args.node_ip.or(file.node_ip).is_none() {
        return Ok(NodeNetwork {
            mode,
            node_ip: Ipv4Addr::UNSPECIFIED,
            underlay_dev: String::new(),
            underlay_ifindex: 0,
            underlay_mtu: 1500,
            vni: 1,
            vxlan_port: node::VXLAN_PORT,
            masquerade: false,
            vxlan_datapath: VxlanDatapath::default(),
        });
    }
    let dev = args.underlay_dev.clone().or(file.underlay_dev.clone());
    let (node_ip, link) = cluster::find_underlay(
        &mut netlink::Kernel,
        args.node_ip.or(file.node_ip),
        dev.as_deref(),
    )
    .context("finding the underlay")?;
    Ok(NodeNetwork {
        mode,
        node_ip,
        underlay_dev: link.name,
        underlay_ifindex: link.index,
        underlay_mtu: link.mtu,
        vni: args.vni.or(file.vni).unwrap_or(1),
        vxlan_port: args
            .vxlan_port
            .or(file.vxlan_port)
            .unwrap_or(node::VXLAN_PORT),
        masquerade: mode != Mode::Local,
        vxlan_datapath: args
            .vxlan_datapath
            .or(file.vxlan_datapath)
            .unwrap_or_default(),
    })
}

fn resolve(args: &Args, file: FileConfig) -> anyhow::Result<Resolved> {
    let policy = resolve_policy(args, &file)?;
    let datastore: DatastoreSpec = match (&args.datastore, &file.datastore) {
        (Some(spec), _) => spec.clone(),
        (None, Some(spec)) => spec.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        (None, None) => DatastoreSpec::None,
    };
    let mode = args
        .mode
        .or(file.mode)
        .unwrap_or(if datastore == DatastoreSpec::None {
            Mode::Local
        } else {
            Mode::Vxlan
        });
    let network = resolve_network(args, &file, mode)?;
    let cluster_cidr = args.cluster_cidr.or(file.cluster_cidr).unwrap_or_else(|| {
        Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16).expect("valid literal")
    });
    let fixed_pod_cidr = args.pod_cidr.or(file.pod_cidr).is_some();
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
    let config = AgentConfig {
        node_name,
        pod_cidr: pod_cidr.trunc(),
        cluster_cidr: cluster_cidr.trunc(),
        service_cidr: args
            .service_cidr
            .or(file.service_cidr)
            .unwrap_or_else(podnet::agent::default_service_cidr)
            .trunc(),
        services: args.services.or(file.services).unwrap_or_default(),
        socket_lb_cgroup: args.socket_lb_cgroup.clone().or(file.socket_lb_cgroup),
        mtu: node::effective_pod_mtu(args.mtu.or(file.mtu), network.pod_mtu()),
        stack_flows_per_endpoint: args
            .stack_flows_per_endpoint
            .or(file.stack_flows_per_endpoint)
            .unwrap_or(0),
        bpffs_dir: args
            .bpffs_dir
            .clone()
            .or(file.bpffs_dir)
            .unwrap_or_else(|| bpffs::DEFAULT_PIN_DIR.into()),
        state_dir: args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| agent::DEFAULT_STATE_DIR.into()),
        socket: args
            .socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
    };
    if let Some(cgroup) = &config.socket_lb_cgroup {
        anyhow::ensure!(
            config.services == ServicesMode::Bpf,
            "--socket-lb-cgroup translates the datapath's Services: it needs --services bpf"
        );
        podnet::datapath::check_cgroup(cgroup).context("--socket-lb-cgroup")?;
    }
    let etcd_access =
        EtcdAccess::load(&args.etcd_access).context("setting up the etcd connection")?;
    if let DatastoreSpec::Etcd(endpoints) = &datastore {
        etcd_access
            .check_endpoints(endpoints)
            .context("checking --datastore against the etcd TLS flags")?;
    }
    Ok(Resolved {
        config,
        datastore,
        network,
        fixed_pod_cidr,
        policy,
        etcd_access,
    })
}

fn join_request(resolved: &Resolved) -> JoinRequest {
    JoinRequest {
        name: resolved.config.node_name.clone(),
        node_ip: resolved.network.node_ip,
        pod_cidr: resolved.fixed_pod_cidr.then_some(resolved.config.pod_cidr),
        preferred: None,
        cluster_cidr: resolved.config.cluster_cidr,
        node_prefix: 24,
    }
}

/// Joins the cluster through the configured datastore (see
/// [`agent::join`]) and caches the pod CIDR for the next start.
fn join(
    resolved: &mut Resolved,
    runtime: &tokio::runtime::Runtime,
    lease_ttl: std::time::Duration,
) -> anyhow::Result<()> {
    let state_dir = resolved.config.state_dir.clone();
    let cached = join::read_cached_cidr(&state_dir);
    let request = join_request(resolved);
    let backoff = join::Backoff::default();
    resolved.config.pod_cidr = match &resolved.datastore {
        DatastoreSpec::None => return Ok(()),
        DatastoreSpec::File(path) => runtime.block_on(join::join(
            || {
                let store = Follower::new(FileDatastore::new(path), file::FOLLOW_RESYNC);
                async move { Ok::<_, DatastoreError>(store) }
            },
            &request,
            cached,
            backoff,
        ))?,
        // Claimed and published at once: a claim without a record would
        // look like a node that went away to the other agents.
        DatastoreSpec::Etcd(endpoints) => runtime.block_on(join::join(
            || EtcdDatastore::connect(endpoints, lease_ttl, &resolved.etcd_access),
            &request,
            cached,
            backoff,
        ))?,
    };
    join::write_cached_cidr(&state_dir, resolved.config.pod_cidr)?;
    Ok(())
}

/// Retries what could not be set up (see `Agent::retry_pending`:
/// the node's network, endpoints' filters at start, host routes) with
/// backoff, 1 s doubling up to 30 s while something is pending, every 5 s
/// otherwise. What runs keeps running meanwhile.
fn retry_pending(registry: Arc<Mutex<Agent>>, network: NodeNetwork, ready: bool) {
    const IDLE: std::time::Duration = std::time::Duration::from_secs(5);
    std::thread::spawn(move || {
        let mut failures = u32::from(!ready);
        loop {
            let wait = if failures == 0 {
                IDLE
            } else {
                std::time::Duration::from_secs(1 << (failures - 1).min(5))
                    .min(std::time::Duration::from_secs(30))
            };
            std::thread::sleep(wait);
            let Ok(mut reg) = registry.lock() else { return };
            failures = if reg.retry_pending(&network) {
                0
            } else {
                failures.saturating_add(1)
            };
        }
    });
}

/// Every [`FLOW_SWEEP_INTERVAL`]: removes the stack flows that expired and
/// recounts each endpoint's share (see `podnet::datapath::FlowSweeper`), on
/// a thread of its own with its own map handles (the agent's lock is not
/// taken). Says when pods held their limit and flows went untracked.
fn sweep_stack_flows(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    const FLOW_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
    let mut sweeper =
        FlowSweeper::open(pin_dir).context("opening the stack-flows maps for the sweeper")?;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(FLOW_SWEEP_INTERVAL);
            match sweeper.sweep() {
                Ok(report) if report.newly_refused > 0 => tracing::warn!(
                    refused = report.newly_refused,
                    live = report.live,
                    "flows through the stack not tracked: pods at their share of the \
                     stack-flows table (podnetctl flows --owners)"
                ),
                Ok(report) => tracing::debug!(
                    live = report.live,
                    expired = report.expired_removed,
                    "stack flows swept"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "sweeping the stack flows"),
            }
        }
    });
    Ok(())
}

/// Logs to stderr, as text or one JSON object per line (the event's fields
/// at the top level, beside `timestamp`, `level` and `target`).
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The CNI operation counters and the metrics registry; with `addr`, the
/// metrics and health server on it too (bound now: a wrong address fails
/// the start). Served from the start, so that a liveness probe passes while
/// the agent waits for the datastore; /readyz says what it waits for.
fn telemetry(
    resolved: &Resolved,
    addr: Option<SocketAddr>,
) -> anyhow::Result<(CniOps, Arc<AgentMetrics>)> {
    let cni_ops = CniOps::default();
    let metrics = Arc::new(AgentMetrics::new(
        &AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: clap::ValueEnum::to_possible_value(&resolved.network.mode)
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
            node: resolved.config.node_name.clone(),
            datastore: resolved.datastore.backend().to_owned(),
        },
        &cni_ops,
    ));
    if let Some(addr) = addr {
        // Its own thread and runtime: scrapes never compete with the CNI
        // plugin's requests for this runtime's threads.
        agent::http::start(addr, Arc::clone(&metrics))?;
        info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    Ok((cni_ops, metrics))
}

/// What was loaded: every program and map with its kernel id.
fn print_loaded(datapath: &Datapath) -> anyhow::Result<()> {
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
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(Command::InstallCni(install)) = args.command.take() {
        init_logging(LogFormat::Text);
        return install_cni(install);
    }
    let file = read_file_config(&args)?;
    init_logging(
        args.log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    );
    // A test build's fail point is fixed (and said) before anything is done.
    podnet::failpoint::announce("podnetd");
    let metrics_addr = args.metrics_addr.or(file.metrics_addr);
    let mut resolved = resolve(&args, file)?;
    // Multi-threaded: a slow request (netlink, a big map dump) must not
    // hold up the plugin's ADD on another connection.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (cni_ops, metrics) = telemetry(&resolved, metrics_addr.filter(|_| !args.once))?;
    let lease_ttl = std::time::Duration::from_secs(args.etcd_lease_ttl);
    join(&mut resolved, &runtime, lease_ttl)?;
    let config = resolved.config.clone();

    let mounted = bpffs::ensure_pin_dir(&config.bpffs_dir)
        .with_context(|| format!("preparing the pin directory {}", config.bpffs_dir.display()))?;
    if mounted {
        info!(dir = %config.bpffs_dir.display(), "mounted bpffs");
    }
    let datapath = Datapath::load(&config.bpffs_dir).context("loading the eBPF datapath")?;
    info!(attach = agent::attach_mode(), pin_dir = %config.bpffs_dir.display(), "datapath loaded");
    print_loaded(&datapath)?;
    if args.once {
        return Ok(());
    }

    let socket = config.socket.clone();
    info!(node = %config.node_name, pod_cidr = %config.pod_cidr, socket = %socket.display(), "starting");
    let mut registry = Agent::open(config, datapath, &resolved.network)?;
    let ready = registry.retry_pending(&resolved.network);
    let registry = Arc::new(Mutex::new(registry));
    metrics.attach(
        Arc::clone(&registry),
        PinnedMapReader::open(&resolved.config.bpffs_dir)
            .context("opening the pinned maps for the metrics")?,
    );
    retry_pending(Arc::clone(&registry), resolved.network.clone(), ready);
    sweep_stack_flows(&resolved.config.bpffs_dir)?;
    // The agent's etcd connection, shared with the cluster objects' tasks.
    let connection = SharedConnection::default();
    follow_datastore(&runtime, &resolved, &registry, lease_ttl, &connection)?;
    follow_cluster_objects(&runtime, &resolved, &registry, &connection)?;
    let monitor = agent::monitor::MonitorHub::new();
    runtime.spawn(agent::monitor::run_logged(
        monitor.clone(),
        resolved.config.bpffs_dir.clone(),
        Arc::clone(&registry),
    ));
    runtime.block_on(async move {
        tokio::select! {
            r = agent::serve(&socket, registry, cni_ops, monitor) => r,
            r = wait_for_shutdown() => {
                info!("shutting down; pinned maps and links keep forwarding");
                let _ = std::fs::remove_file(&socket);
                r
            }
        }
    })
}

/// Follows the configured datastore (the other nodes) on `runtime`; with
/// none, says so in the agent's status.
fn follow_datastore(
    runtime: &tokio::runtime::Runtime,
    resolved: &Resolved,
    registry: &Arc<Mutex<Agent>>,
    lease_ttl: std::time::Duration,
    connection: &SharedConnection,
) -> anyhow::Result<()> {
    match &resolved.datastore {
        DatastoreSpec::None => {
            registry
                .lock()
                .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
                .set_datastore_status(podnet::api::DatastoreStatus {
                    backend: resolved.datastore.backend().into(),
                    connected: true,
                    ..podnet::api::DatastoreStatus::default()
                });
        }
        DatastoreSpec::File(path) => {
            runtime.spawn(follow::follow_file(
                path.clone(),
                Arc::clone(registry),
                resolved.network.clone(),
            ));
        }
        DatastoreSpec::Etcd(endpoints) => {
            info!(
                grace = %format_duration(resolved.policy.node_grace_period),
                release_after = %format_duration(resolved.policy.cidr_release_after),
                "nodes whose lease expires stay routed for the grace period; their CIDR is released after the release delay"
            );
            let mut request = join_request(resolved);
            request.pod_cidr = Some(resolved.config.pod_cidr);
            runtime.spawn(follow::follow_etcd(
                EtcdFollow {
                    endpoints: endpoints.clone(),
                    access: resolved.etcd_access.clone(),
                    lease_ttl,
                    policy: resolved.policy,
                    request,
                    connection: connection.clone(),
                },
                Arc::clone(registry),
                resolved.network.clone(),
            ));
        }
    }
    Ok(())
}

/// After the cluster objects' store failed, how long their tasks wait for
/// the agent's next etcd session before they use the current one again.
const OBJECTS_NEWER_CONNECTION: std::time::Duration = std::time::Duration::from_secs(2);
/// The pause before the cluster objects' watch connects and lists again.
const OBJECTS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts publishing this node's endpoint records and following the
/// cluster objects (a datastore's only: with none there is no cluster).
fn follow_cluster_objects(
    runtime: &tokio::runtime::Runtime,
    resolved: &Resolved,
    registry: &Arc<Mutex<Agent>>,
    connection: &SharedConnection,
) -> anyhow::Result<()> {
    let node = resolved.config.node_name.clone();
    let backend = resolved.datastore.backend();
    let (handle, tasks) = ClusterObjects::new(&node, backend);
    match &resolved.datastore {
        DatastoreSpec::None => return Ok(()),
        DatastoreSpec::File(path) => {
            let store = FileObjectStore::beside(path);
            let connect = move || {
                let store = store.clone();
                async move { Ok::<_, ObjectStoreError>(store) }
            };
            runtime.spawn(cluster_objects::publish(
                node,
                connect.clone(),
                tasks.wanted,
                tasks.publish,
                cluster_objects::Timing::default(),
            ));
            runtime.spawn(cluster_objects::follow(
                connect,
                Arc::clone(&tasks.view),
                OBJECTS_RETRY,
            ));
        }
        DatastoreSpec::Etcd(_) => {
            runtime.spawn(cluster_objects::publish(
                node,
                connection.connector(OBJECTS_NEWER_CONNECTION),
                tasks.wanted,
                tasks.publish,
                cluster_objects::Timing::default(),
            ));
            runtime.spawn(cluster_objects::follow(
                connection.connector(OBJECTS_NEWER_CONNECTION),
                Arc::clone(&tasks.view),
                OBJECTS_RETRY,
            ));
        }
    }
    // NetworkPolicy: compiled from the view into the policy maps, on a
    // thread of its own (see `agent::policy`).
    let (policy_registry, policy_view, policy_state) =
        (Arc::clone(registry), tasks.view, tasks.policy);
    std::thread::Builder::new()
        .name("policy".to_owned())
        .spawn(move || podnet::agent::policy::run(&policy_registry, &policy_view, &policy_state))
        .context("starting the policy sync")?;
    // Services in the datapath: compiled from the view into the Service
    // maps, on a thread of its own (see `agent::services`).
    if resolved.config.services == ServicesMode::Bpf {
        let (services_registry, services_view, services_state) =
            (Arc::clone(registry), handle.view(), tasks.services);
        // The NodePorts' frontends are the node's underlay address.
        let node_ip = (resolved.network.mode != Mode::Local).then_some(resolved.network.node_ip);
        std::thread::Builder::new()
            .name("services".to_owned())
            .spawn(move || {
                podnet::agent::services::run(
                    &services_registry,
                    &services_view,
                    &services_state,
                    node_ip,
                );
            })
            .context("starting the Services sync")?;
    }
    registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
        .set_cluster_objects(handle);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_mode_from_the_flag_or_the_file_default_kube_proxy() {
        let args = Args::try_parse_from(["podnetd", "--services", "bpf"]).expect("parses");
        assert_eq!(args.services, Some(ServicesMode::Bpf));
        let args = Args::try_parse_from(["podnetd", "--services", "kube-proxy"]).expect("parses");
        assert_eq!(args.services, Some(ServicesMode::KubeProxy));
        assert!(Args::try_parse_from(["podnetd", "--services", "ipvs"]).is_err());
        let file: FileConfig =
            serde_json::from_str(r#"{"services": "bpf"}"#).expect("the file's key");
        assert_eq!(file.services, Some(ServicesMode::Bpf));
        let args = Args::try_parse_from(["podnetd"]).expect("parses");
        let resolved = resolve(&args, FileConfig::default()).expect("resolves");
        assert_eq!(resolved.config.services, ServicesMode::KubeProxy);
        let resolved = resolve(&args, file).expect("resolves");
        assert_eq!(resolved.config.services, ServicesMode::Bpf);
    }

    #[test]
    fn the_socket_lb_needs_services_bpf_and_a_cgroup2_directory() {
        let not_bpf =
            Args::try_parse_from(["podnetd", "--socket-lb-cgroup", "/tmp"]).expect("parses");
        let e = resolve(&not_bpf, FileConfig::default())
            .err()
            .expect("refused");
        assert!(format!("{e:#}").contains("--services bpf"), "{e:#}");
        let not_cgroup =
            Args::try_parse_from(["podnetd", "--services", "bpf", "--socket-lb-cgroup", "/tmp"])
                .expect("parses");
        let e = resolve(&not_cgroup, FileConfig::default())
            .err()
            .expect("refused");
        assert!(
            format!("{e:#}").contains("not a cgroup v2 directory"),
            "{e:#}"
        );
        let file: FileConfig =
            serde_json::from_str(r#"{"socket_lb_cgroup": "/tmp"}"#).expect("the file's key");
        assert_eq!(file.socket_lb_cgroup, Some(PathBuf::from("/tmp")));
    }
}
