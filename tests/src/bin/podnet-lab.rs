//! podnet-lab: builds, checks and removes a multi-node lab on this machine
//! (`cargo xtask lab ...` runs it). See `podnet_tests::lab`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use podnet_tests::lab::{self, LabDatastore, LabLayout, LabSpec, ServiceKind};

#[derive(Debug, Parser)]
#[command(
    name = "podnet-lab",
    about = "a podnet cluster of network namespaces on this machine"
)]
struct Cli {
    /// Where the lab keeps its state and lab.json.
    #[arg(long, global = true, default_value = lab::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Prefix of the lab's namespace names.
    #[arg(long, global = true, default_value = "pnlab")]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab: nodes, agents, pods.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "direct"])]
        mode: String,
        #[arg(long, default_value = "file", value_parser = ["file", "etcd"])]
        datastore: String,
        /// Members of the etcd cluster (with --datastore etcd): 1, or 3 for
        /// a cluster that survives losing one.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        etcd_members: u8,
        /// etcd over TLS with --client-cert-auth: a CA, etcd's certificate
        /// and each node's client certificate in <run dir>/etcd-pki; the
        /// agents get --etcd-ca/--etcd-cert/--etcd-key.
        #[arg(long)]
        etcd_tls: bool,
        /// An extra argument for every podnetd (repeat it), e.g.
        /// `--agent-arg=--node-grace-period=30s`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// The demo Service: kube-proxy's iptables rules, plain nftables
        /// DNAT, podnet's datapath (`bpf`: cluster objects, agents with
        /// `--services bpf`), or none.
        #[arg(long, default_value = "iptables", value_parser = ["iptables", "nft", "bpf", "none"])]
        service: String,
        /// `e2e`: also the upstream NetworkPolicy e2e model's pods
        /// (namespaces x, y, z with pods a, b, c, spread over the nodes),
        /// each serving TCP and UDP on 80 and 81 (`probe --table`).
        #[arg(long, value_parser = ["e2e"])]
        pod_model: Option<String>,
    },
    /// Nodes, pods, IPs, agent health.
    Status,
    /// Full connectivity matrix; exit code 1 on any failure.
    Check,
    /// Remove everything the lab made (safe twice, safe after a crash).
    Down,
    /// The soak: its own 2-node lab under ping floods and iperf3 while every
    /// agent is restarted (SIGTERM and SIGKILL alternately); exit code 1 on
    /// any loss. Runs apart from `up`'s lab.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "direct"])]
        mode: String,
        /// Restarts of each agent, spread over the soak.
        #[arg(long, default_value_t = 10)]
        restarts: usize,
    },
    /// The lab's etcd members: status (default), or stop/kill/start one.
    Etcd {
        #[arg(value_parser = ["status", "stop", "kill", "start"], default_value = "status")]
        action: String,
        /// The member (etcd1, etcd2, ...); stop/kill/start only.
        member: Option<String>,
    },
    /// Cluster objects: `get KIND [NAME...] [-n NS | -A] [-o wide|yaml|json]`
    /// from the lab's datastore (podnetctl get, with the operator's
    /// credential). With a node's name instead of a kind:
    /// `get NODE [/metrics|/healthz|/readyz] [--addr IP:PORT]` GETs a path
    /// from that node's agent over HTTP (podnetd --metrics-addr) inside its
    /// netns, prints the body, exit code 1 unless 200.
    Get {
        /// A kind (pods, netpol, ...) or a node (node1, ...).
        what: String,
        /// The rest of podnetctl get's arguments, or the node's path and
        /// --addr.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write cluster objects to the lab's datastore with the operator's
    /// credential: podnetctl apply's arguments (-f FILE|-, -n NS, --json).
    Apply {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Delete cluster objects from the lab's datastore: podnetctl delete's
    /// arguments (-f FILE|-, -n NS).
    Delete {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Probe like the NetworkPolicy e2e suite: one address over TCP or UDP
    /// (prints who answered; exit code 1 if nobody did), from a pod's netns
    /// with --from; or, with --table, all 81 pairs of the e2e model's pods
    /// (`up --pod-model e2e`) on 80/TCP, 81/TCP, 80/UDP and 81/UDP, printed
    /// as truth tables (rows from, columns to; 1 reachable, 0 not).
    Probe(ProbeArgs),
    /// A server in a pod (run by the lab inside the pod): a demo Service
    /// backend, or an e2e model pod on 80 and 81 (TCP and UDP).
    #[command(hide = true)]
    Serve {
        /// The lab's prefix: lets `down` find servers whose pid was lost.
        #[arg(long)]
        lab: String,
        /// The pod's name, sent in every answer.
        #[arg(long)]
        name: String,
        /// A TCP port to serve (repeat it).
        #[arg(long)]
        tcp: Vec<u16>,
        /// A UDP port to serve (repeat it).
        #[arg(long)]
        udp: Vec<u16>,
    },
}

/// `podnet-lab probe`'s arguments.
#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// The client: a pod's lab name (x-a, ...). Default: this netns.
    #[arg(long)]
    from: Option<String>,
    /// Connect to IP:PORT and read the server's name (1 s timeout).
    #[arg(long, conflicts_with_all = ["udp", "table"])]
    tcp: Option<std::net::SocketAddrV4>,
    /// Send a datagram to IP:PORT and wait for the answer (2 x 500 ms).
    #[arg(long, conflicts_with = "table")]
    udp: Option<std::net::SocketAddrV4>,
    /// The e2e model's full tables.
    #[arg(long)]
    table: bool,
}

/// `podnet-lab get NODE [PATH] [--addr IP:PORT]`: a node agent's HTTP
/// endpoint.
#[derive(Debug, Parser)]
#[command(name = "podnet-lab get NODE")]
struct AgentGet {
    /// /metrics, /healthz or /readyz.
    #[arg(default_value = "/metrics")]
    path: String,
    /// Where the agent listens in its netns.
    #[arg(long, default_value = "127.0.0.1:9962")]
    addr: std::net::SocketAddr,
}

/// Runs podnetctl `command` on the lab's datastore and exits with its
/// exit code.
fn objects(run_dir: &std::path::Path, command: &str, args: Vec<String>) -> anyhow::Result<()> {
    let layout = LabLayout::load(run_dir)?;
    let args: Vec<String> = std::iter::once(command.to_owned()).chain(args).collect();
    let status = layout
        .podnetctl_objects(&args)?
        .status()
        .context("running podnetctl")?;
    std::process::exit(status.code().unwrap_or(1))
}

/// `get`: cluster objects, or a node agent's HTTP endpoint when `what` is
/// one of the lab's nodes (kinds are never node names: node1, node2, ...).
fn get(run_dir: &std::path::Path, what: String, args: Vec<String>) -> anyhow::Result<()> {
    let layout = LabLayout::load(run_dir)?;
    let Some(node) = layout.node(&what) else {
        let args = std::iter::once(what).chain(args).collect();
        return objects(run_dir, "get", args);
    };
    let agent = AgentGet::parse_from(std::iter::once(what.clone()).chain(args));
    let answer = podnet_tests::scrape::get(&node.netns, agent.addr, &agent.path)?;
    print!("{}", answer.body);
    if answer.status != 200 {
        eprintln!("GET {} on {what}: HTTP {}", agent.path, answer.status);
        std::process::exit(1);
    }
    Ok(())
}

/// `--service`'s value.
fn service_kind(service: &str) -> Option<ServiceKind> {
    match service {
        "iptables" => Some(ServiceKind::KubeProxyIptables),
        "nft" => Some(ServiceKind::Nftables),
        "bpf" => Some(ServiceKind::Datapath),
        _ => None,
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up {
            nodes,
            pods_per_node,
            mode,
            datastore,
            etcd_members,
            etcd_tls,
            agent_args,
            service,
            pod_model,
        } => {
            let spec = LabSpec {
                nodes,
                pods_per_node,
                mode,
                datastore: if datastore == "etcd" {
                    LabDatastore::Etcd
                } else {
                    LabDatastore::File
                },
                prefix: cli.prefix,
                run_dir: cli.run_dir.clone(),
                verbose: true,
                service: service_kind(&service),
                etcd_members: usize::from(etcd_members),
                agent_args,
                etcd_tls,
            };
            let mut layout = lab::up(&spec)?;
            // Every pod with its Kubernetes namespace, name and labels in
            // the datastore, as an operator would have them.
            if pod_model.is_some() {
                layout.add_e2e_model()?;
            } else {
                layout.describe_pods()?;
            }
            println!(
                "lab up: {} nodes, {} pods; layout in {}",
                layout.nodes.len(),
                layout.pods.len(),
                cli.run_dir.join("lab.json").display()
            );
            Ok(())
        }
        Cmd::Status => status(&cli.run_dir),
        Cmd::Check => {
            let layout = LabLayout::load(&cli.run_dir)?;
            anyhow::ensure!(!layout.pods.is_empty(), "the lab has no pods to check");
            println!("lab check: {}", lab::check_plan(&layout).describe());
            let probes = lab::check(&layout)?;
            print!("{}", lab::render(&probes));
            if probes.iter().any(|p| !p.ok) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Soak {
            minutes,
            mode,
            restarts,
        } => {
            let report = podnet_tests::soak::run(&mode, minutes, restarts)?;
            print!("{}", report.render());
            if report.lost() > 0 || !report.iperf_ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Down => {
            lab::down(&cli.run_dir, &cli.prefix)?;
            println!("lab down");
            Ok(())
        }
        Cmd::Etcd { action, member } => {
            let mut layout = LabLayout::load(&cli.run_dir)?;
            anyhow::ensure!(!layout.etcd.is_empty(), "the lab has no etcd");
            let name = || member.clone().context("which member? (etcd1, etcd2, ...)");
            match action.as_str() {
                "stop" => layout.stop_etcd_member(&name()?)?,
                "kill" => layout.kill_etcd_member(&name()?)?,
                "start" => layout.start_etcd_member(&name()?)?,
                _ => {}
            }
            print_etcd(&layout);
            Ok(())
        }
        Cmd::Get { what, args } => get(&cli.run_dir, what, args),
        Cmd::Apply { args } => objects(&cli.run_dir, "apply", args),
        Cmd::Delete { args } => objects(&cli.run_dir, "delete", args),
        Cmd::Probe(args) => probe(&cli.run_dir, args),
        Cmd::Serve {
            lab: _,
            name,
            tcp,
            udp,
        } => podnet_tests::services::serve(&name, &tcp, &udp),
    }
}

/// `probe`: one address from a pod (or this netns), or the e2e tables.
fn probe(run_dir: &std::path::Path, args: ProbeArgs) -> anyhow::Result<()> {
    use podnet_tests::netpol::{self, PORT_PROTOCOLS, UDP_TRIES, UDP_WAIT};
    let ProbeArgs {
        from,
        tcp,
        udp,
        table,
    } = args;
    if table {
        let layout = LabLayout::load(run_dir)?;
        let started = std::time::Instant::now();
        for observed in netpol::probe_many(&layout, &PORT_PROTOCOLS)? {
            println!("{}/{}:", observed.port, observed.protocol);
            print!("{}", observed.render());
        }
        println!("probed in {:.2?}", started.elapsed());
        return Ok(());
    }
    let answer = move || match (tcp, udp) {
        (Some(addr), _) => netpol::tcp_probe(addr, netpol::TCP_TIMEOUT),
        (None, Some(addr)) => netpol::udp_probe(addr, UDP_WAIT, UDP_TRIES),
        (None, None) => Err(anyhow::anyhow!("--tcp IP:PORT, --udp IP:PORT or --table")),
    };
    let answer = match from {
        Some(pod) => {
            let layout = LabLayout::load(run_dir)?;
            let netns = layout
                .pod(&pod)
                .with_context(|| format!("no pod {pod} in the lab"))?
                .netns
                .clone();
            lab::on_netns_thread(&netns, answer)?
        }
        None => answer(),
    };
    match answer {
        Ok(name) => {
            println!("{name}");
            Ok(())
        }
        Err(e) => {
            eprintln!("unreachable: {e:#}");
            std::process::exit(1)
        }
    }
}

/// `status`: nodes, agents, pods, etcd, the demo Service.
fn status(run_dir: &std::path::Path) -> anyhow::Result<()> {
    let layout = LabLayout::load(run_dir)?;
    println!(
        "mode {}  datastore {:?}  fabric {}",
        layout.mode, layout.datastore, layout.fabric_netns
    );
    println!(
        "{:<8} {:<16} {:<16} {:<8} {:<28} NETNS",
        "NODE", "NODE IP", "POD CIDR", "AGENT", "DATASTORE"
    );
    for n in &layout.nodes {
        let health = podnet::api::Client::new(&n.agent_socket)
            .call::<podnet::api::AgentStatus>(&podnet::api::Request::Status)
            .map_or_else(|_| "DOWN".to_owned(), |s| format!("up ({})", s.endpoints));
        let datastore = layout.datastore_status(&n.name).map_or_else(
            |_| "?".to_owned(),
            |s| match (s.connected, s.endpoint) {
                (true, Some(e)) => e,
                (true, None) => "connected".to_owned(),
                (false, _) => "DISCONNECTED".to_owned(),
            },
        );
        println!(
            "{:<8} {:<16} {:<16} {:<8} {:<28} {}",
            n.name, n.node_ip, n.pod_cidr, health, datastore, n.netns
        );
    }
    if !layout.etcd.is_empty() {
        println!();
        print_etcd(&layout);
    }
    println!();
    println!("{:<14} {:<8} {:<16} NETNS", "POD", "NODE", "IP");
    for p in &layout.pods {
        println!("{:<14} {:<8} {:<16} {}", p.name, p.node, p.ip, p.netns);
    }
    print_service(&layout);
    Ok(())
}

fn print_etcd(layout: &LabLayout) {
    let leader = layout.etcd_leader().ok().flatten();
    println!("{:<8} {:<26} {:<10} ROLE", "ETCD", "CLIENT URL", "PID");
    for m in &layout.etcd {
        let role = match (m.pid, &leader) {
            (0, _) => "stopped",
            (_, Some(l)) if *l == m.name => "leader",
            _ => "member",
        };
        println!("{:<8} {:<26} {:<10} {role}", m.name, m.client_url, m.pid);
    }
}

fn print_service(layout: &LabLayout) {
    println!();
    let Some(svc) = &layout.service else {
        println!("service: none");
        return;
    };
    let how = match layout.service_kind {
        Some(ServiceKind::KubeProxyIptables) => "kube-proxy iptables rules",
        Some(ServiceKind::Nftables) => "nftables DNAT (table ip svcdemo), no NodePort",
        Some(ServiceKind::Datapath) => {
            "Service and EndpointSlice objects, translated by podnet's datapath, no NodePort"
        }
        None => "?",
    };
    println!("service {} ({how})", svc.name);
    let node_port = if layout.service_kind == Some(ServiceKind::KubeProxyIptables) {
        format!(
            "  NodePort tcp {} -> {}",
            svc.node_port, svc.target_tcp_port
        )
    } else {
        String::new()
    };
    println!(
        "  ClusterIP {}  tcp {} -> {}  udp {} -> {}{node_port}",
        svc.cluster_ip, svc.tcp_port, svc.target_tcp_port, svc.udp_port, svc.target_udp_port,
    );
    for ip in &svc.backends {
        let pod = layout.pods.iter().find(|p| p.ip == *ip);
        let server = pod.and_then(|p| layout.servers.iter().find(|s| s.pod == p.name));
        let alive = server.is_some_and(|s| {
            i32::try_from(s.pid).is_ok_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            })
        });
        println!(
            "  backend {:<16} {:<14} server {}",
            ip,
            pod.map_or("?", |p| p.name.as_str()),
            match (server, alive) {
                (Some(s), true) => format!("pid {}", s.pid),
                (Some(s), false) => format!("pid {} (not running)", s.pid),
                (None, _) => "none".to_owned(),
            }
        );
    }
}
