//! podnetctl: what podnet is doing on this node. Asks the agent; when the
//! agent is down, reads the pinned maps directly (status, endpoints,
//! counters).

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use podnet::{
    api::{
        AgentStatus, Client, ClientError, CounterTotals, DEFAULT_SOCKET, DatastoreStatus,
        DropEventRecord, EndpointStatus, FlowShare, IpamStatus, MonitorHello, MonitorMessage,
        Request, StackFlowStatus, services::ServicesAnswer, tables::TableFill,
    },
    cni::result::format_mac,
    datapath::Datapath,
    datastore::NodeRecord,
};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "podnetctl",
    version,
    about = "inspect the podnet agent and datapath on this node"
)]
struct Cli {
    /// The agent's socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pin directory to read when the agent is down.
    #[arg(long, global = true, default_value = podnet::bpffs::DEFAULT_PIN_DIR)]
    bpffs_dir: PathBuf,
    /// JSON output for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Agent health, node, pod CIDR.
    Status,
    /// Local endpoints with their datapath state and counters.
    Endpoints,
    /// Packets by verdict and drops by reason.
    Counters,
    /// Built-in IPAM reservations.
    Ipam,
    /// The other nodes this node forwards to (from the datastore).
    Nodes {
        /// Compare the agent's state with the kernel's (remote map, host
        /// routes, endpoint map, veths and their filters, the Service maps
        /// and the node config's services flag): print the drift, exit 1
        /// when there is any.
        #[arg(long)]
        check: bool,
    },
    /// The datastore as the agent follows it: connected or not, and every
    /// other node with its state (live, unreachable, gone).
    Datastore,
    /// Flows the datapath hands to the host stack (replies of Service, NodePort
    /// and hostPort connections: conntrack must see them).
    Flows {
        /// Each pod's share of the table instead: entries it holds, flows
        /// not tracked because it held its limit, and the limit.
        #[arg(long)]
        owners: bool,
    },
    /// What the datapath would do with a packet a local pod sends: run
    /// through a scratch copy of from_pod (BPF_PROG_TEST_RUN), no traffic,
    /// no counter moves.
    Explain {
        /// The sending pod: its IP or container ID (a pod of this node).
        #[arg(long)]
        from: String,
        /// `IP[:port][/tcp|udp|icmp]` (default ICMP echo; TCP with a port).
        #[arg(long)]
        to: String,
        /// Send from this source address instead of the pod's own (what a
        /// forged packet meets).
        #[arg(long)]
        src: Option<Ipv4Addr>,
    },
    /// The NetworkPolicies that select a pod and the rules they allow,
    /// per direction (a pod no policy selects is open that way).
    Policy {
        /// The pod: `NAMESPACE/NAME`.
        pod: String,
    },
    /// The Services the datapath translates (podnetd --services bpf): a
    /// line per frontend (ClusterIP:port/protocol) with its id, session
    /// affinity and backend slots in order.
    Services,
    /// Stream the datapath's events live, one line each (with --json one
    /// JSON object per line), with the pod each belongs to, until
    /// interrupted. Drop events are rate-limited per CPU; drops over the
    /// limit are summed in a `suppressed` line once a second.
    Monitor {
        /// Only drops (the only kind of event today).
        #[arg(long)]
        drops: bool,
    },
    /// etcd least privilege (operator, as etcd's root): create the
    /// operator's user and role and one user and role per --node (its own
    /// keys only; it logs in with its client certificate, common name
    /// podnet-node-<name>), then turn etcd's authentication on. With
    /// --add-node on a cluster whose authentication is on already: only
    /// the nodes' users and roles.
    EtcdAuth(EtcdAuthArgs),
    /// Write cluster objects (Namespaces, Pods, NetworkPolicies, Services,
    /// EndpointSlices; YAML or JSON, several documents or a List) to the
    /// datastore, as kubectl apply: every object is checked first, one
    /// invalid object stores nothing; an unchanged object writes nothing;
    /// one carrying a resourceVersion is written only over that revision.
    Apply(ObjectFileArgs),
    /// Delete cluster objects: those of the files (-f, by kind, namespace
    /// and name), or KIND NAME... (in -n NS, default: default).
    Delete(DeleteArgs),
    /// Show cluster objects from the datastore: KIND [NAME...] as a table,
    /// or -o yaml|json; `get pods -o wide` adds each pod's node and IP from
    /// the endpoint records the agents publish.
    Get(GetArgs),
    /// Release a node that left for good (the operator's, etcd): its pod
    /// CIDR claim, durable record and tombstones go now, whatever the
    /// release delay; refused while it has a lease. With etcd's roles on
    /// no agent may release another node: this is how.
    Release(ReleaseArgs),
}

#[derive(Debug, clap::Args)]
struct ReleaseArgs {
    /// The node's name.
    node: String,
    #[command(flatten)]
    store: StoreArgs,
}

/// Where the cluster objects are: the datastore and how to log in to it.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The datastore, as podnetd's --datastore: file:PATH (the nodes file;
    /// the objects are beside it) or etcd:URL[,URL...].
    #[arg(long, env = "PODNET_DATASTORE")]
    datastore: podnet::datastore::DatastoreSpec,
    /// How to log in to etcd (the operator's client certificate, common
    /// name podnet-operator, where authentication is on).
    #[command(flatten)]
    access: podnet::datastore::etcd::EtcdAccessFiles,
}

#[derive(Debug, clap::Args)]
struct ObjectFileArgs {
    /// A file (YAML or JSON), a directory (its .yaml, .yml and .json
    /// files) or - (standard input); repeat it for several.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// The namespace of objects that name none (one that names another is
    /// refused).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Args)]
struct DeleteArgs {
    /// A file (YAML or JSON), a directory (its .yaml, .yml and .json
    /// files) or - (standard input); repeat it for several.
    #[arg(short = 'f', long = "filename", required_unless_present = "kind")]
    files: Vec<PathBuf>,
    /// Instead of -f: the kind (as get's) ...
    #[arg(conflicts_with = "files", requires = "names")]
    kind: Option<podnet::model::cluster::Kind>,
    /// ... and the names.
    names: Vec<String>,
    /// The namespace (-f: of objects that name none; default: default).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Args)]
struct GetArgs {
    /// namespaces (ns), pods (po), networkpolicies (netpol), services
    /// (svc), endpointslices; singular, plural or short, as kubectl's.
    kind: podnet::model::cluster::Kind,
    /// Only these objects (default: every one).
    names: Vec<String>,
    /// The namespace (default: default).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Every namespace (adds a NAMESPACE column).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output: the table (default), wide (pods: node and IP), yaml or json
    /// (the objects, resourceVersion = the datastore's revision).
    #[arg(short = 'o', long, value_parser = ["wide", "yaml", "json"])]
    output: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Args)]
struct EtcdAuthArgs {
    /// etcd client URLs, comma-separated (as podnetd's --datastore etcd:...).
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// How to log in (root's client certificate: common name root).
    #[command(flatten)]
    access: podnet::datastore::etcd::EtcdAccessFiles,
    /// File holding the password etcd's root user is created with (default:
    /// none, root logs in with a client certificate whose common name is
    /// root).
    #[arg(long)]
    root_password_file: Option<PathBuf>,
    /// A node to create a user and role for (repeat it).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Authentication is on already: only add the nodes.
    #[arg(long)]
    add_node: bool,
}

/// `podnetctl etcd-auth`.
fn release(args: &ReleaseArgs) -> anyhow::Result<()> {
    use podnet::datastore::{
        DatastoreSpec,
        etcd::{EtcdAccess, EtcdDatastore},
    };
    let DatastoreSpec::Etcd(endpoints) = &args.store.datastore else {
        anyhow::bail!(
            "release is for etcd; in a nodes file, remove the node's entry (its CIDR is free then)"
        );
    };
    let access = EtcdAccess::load(&args.store.access)?;
    access.check_endpoints(endpoints)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let released = runtime.block_on(async {
        let mut store =
            EtcdDatastore::connect(endpoints, std::time::Duration::from_secs(10), &access).await?;
        store
            .release_node(&args.node)
            .await
            .with_context(|| format!("releasing node {}", args.node))
    })?;
    let Some(released) = released else {
        anyhow::bail!(
            "node {} changed while it was being released (it came back?): look again",
            args.node
        );
    };
    println!(
        "released node {}: pod CIDRs {:?}, record and tombstones removed",
        released.name, released.cidrs
    );
    Ok(())
}

fn etcd_auth(args: &EtcdAuthArgs) -> anyhow::Result<()> {
    use podnet::datastore::etcd::{EtcdAccess, EtcdDatastore};
    let access = EtcdAccess::load(&args.access)?;
    access.check_endpoints(&args.etcd)?;
    let root_password = args
        .root_password_file
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
                .with_context(|| format!("reading {}", path.display()))
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut store =
            EtcdDatastore::connect(&args.etcd, std::time::Duration::from_secs(10), &access).await?;
        if args.add_node {
            for node in &args.nodes {
                store
                    .add_node_user(node)
                    .await
                    .with_context(|| format!("adding {node}'s etcd user"))?;
            }
        } else {
            store
                .setup_auth(root_password.as_deref(), &args.nodes)
                .await
                .context("setting up etcd's users and roles")?;
        }
        anyhow::Ok(())
    })?;
    for node in &args.nodes {
        println!(
            "{node}: etcd user {} (its own keys only)",
            podnet::datastore::etcd::node_user(node)
        );
    }
    println!(
        "operator: etcd user {} (everything under /podnet/)",
        podnet::datastore::etcd::OPERATOR_USER
    );
    Ok(())
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

/// Whether an error means "no agent" (fall back to the pins).
fn agent_down(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable { .. })
}

fn from_pins(cli: &Cli) -> anyhow::Result<Datapath> {
    eprintln!(
        "podnetctl: agent not reachable at {}; reading pinned maps in {}",
        cli.socket.display(),
        cli.bpffs_dir.display()
    );
    anyhow::ensure!(
        podnet::bpffs::is_bpffs(&cli.bpffs_dir).unwrap_or(false),
        "{} is not a bpffs with podnet's pins",
        cli.bpffs_dir.display()
    );
    // Opening pins of another layout would migrate them: the agent's job,
    // when it starts (the running programs of the other build keep
    // forwarding with them meanwhile).
    let layouts = podnet::pinned_maps::object_layouts(podnet::datapath::EBPF_OBJECT)?;
    let other = podnet::pinned_maps::incompatible(&cli.bpffs_dir, &layouts);
    anyhow::ensure!(
        other.is_empty(),
        "the maps pinned in {} ({}) are another podnet build's; podnetctl reads them once this \
         build's agent has started (and migrated them)",
        cli.bpffs_dir.display(),
        other.join(", ")
    );
    Datapath::load(&cli.bpffs_dir).context("opening the pinned maps")
}

fn print_counters(c: &CounterTotals) {
    println!("{:<24} {:>14}", "VERDICT", "PACKETS");
    for (k, v) in &c.verdicts {
        println!("{k:<24} {v:>14}");
    }
    println!();
    println!("{:<24} {:>14}", "DROP REASON", "PACKETS");
    for (k, v) in &c.drops {
        println!("{k:<24} {v:>14}");
    }
}

fn status(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    match client.call::<AgentStatus>(&Request::Status) {
        Ok(s) => print(cli.json, &s, |s| {
            println!("agent        running ({})", cli.socket.display());
            println!("node         {}", s.node.node_name);
            println!(
                "pod CIDR     {} (gateway {})",
                s.node.pod_cidr, s.node.gateway
            );
            println!("cluster CIDR {}", s.node.cluster_cidr);
            println!("MTU          {}", s.node.mtu);
            println!("endpoints    {}", s.endpoints);
            println!("attach       {}", s.attach_mode);
            println!("pins         {}", s.bpffs_dir.display());
            println!("programs     {}", s.programs.join(", "));
            for what in &s.pending {
                println!("pending      {what}");
            }
            if let Some(objects) = &s.cluster_objects {
                println!("cluster objects: {}", objects.summary());
                if let Some(policy) = &objects.policy {
                    println!("policy       {}", policy.summary());
                }
                for what in &objects.publish.pending {
                    println!("pending      pod records: {what}");
                }
            }
            if let Some(services) = &s.services {
                println!("services     {}", services.summary());
            }
            print_tables(&s.tables, s.tables_error.as_deref());
            for record in &s.unreadable_records {
                println!(
                    "UNREADABLE   endpoint record kept aside, endpoint not installed: {}",
                    record.display()
                );
            }
        }),
        Err(e) if agent_down(&e) => {
            let mut dp = from_pins(cli)?;
            let endpoints = dp.endpoints()?.len();
            let (tables, error) = match podnet::agent::table_fill(&cli.bpffs_dir) {
                Ok(tables) => (tables, None),
                Err(e) => (Vec::new(), Some(format!("{:#}", anyhow::Error::from(e)))),
            };
            let value = serde_json::json!({
                "agent": "down",
                "endpoints_in_datapath": endpoints,
                "tables": tables,
                "tables_error": error,
            });
            print(cli.json, &value, |_| {
                println!("agent        DOWN ({})", cli.socket.display());
                println!("datapath     {endpoints} endpoints in the pinned map (still forwarding)");
                print_tables(&tables, error.as_deref());
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The flow tables' lines of `status`: entries / capacity, flagged when
/// nearly full.
fn print_tables(tables: &[TableFill], error: Option<&str>) {
    for t in tables {
        println!("{:<12} {}", t.table, t.summary());
    }
    if let Some(error) = error {
        println!("tables       not counted: {error}");
    }
}

fn endpoints(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    match client.call::<Vec<EndpointStatus>>(&Request::ListEndpoints) {
        Ok(list) => print(cli.json, &list, |list| {
            println!(
                "{:<16} {:<10} {:<16} {:<16} {:<18} {:>5} {:>5} {:>10} {:>12}  LIMITS (RATE/BURST)",
                "IP",
                "IFNAME",
                "CONTAINER",
                "HOST VETH",
                "POD MAC",
                "MAP",
                "PROG",
                "TX PKTS",
                "TX BYTES"
            );
            for e in list {
                let cid: String = e.endpoint.owner.container_id.chars().take(15).collect();
                let limits = e
                    .endpoint
                    .bandwidth
                    .map_or_else(|| "-".to_owned(), |b| b.to_string());
                println!(
                    "{:<16} {:<10} {:<16} {:<16} {:<18} {:>5} {:>5} {:>10} {:>12}  {limits}",
                    e.endpoint.ip,
                    e.endpoint.owner.ifname,
                    cid,
                    e.endpoint.host_ifname,
                    format_mac(&e.endpoint.pod_mac),
                    if e.in_datapath { "yes" } else { "NO" },
                    if e.attached { "yes" } else { "NO" },
                    e.tx_packets,
                    e.tx_bytes
                );
            }
        }),
        Err(e) if agent_down(&e) => {
            let mut dp = from_pins(cli)?;
            let list: Vec<(Ipv4Addr, u32, String)> = dp
                .endpoints()?
                .into_iter()
                .map(|(ip, i)| (ip, i.host_ifindex, format_mac(&i.pod_mac)))
                .collect();
            print(cli.json, &list, |list| {
                println!("{:<16} {:>12} {:<18}", "IP", "HOST IFINDEX", "POD MAC");
                for (ip, ifindex, mac) in list {
                    println!("{ip:<16} {ifindex:>12} {mac:<18}");
                }
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The agent's answer to `request`; when the agent is down, what
/// `from_pins` reads from the pinned maps instead (the same data).
fn call_or_pins<T: serde::de::DeserializeOwned>(
    cli: &Cli,
    client: &Client,
    request: &Request,
    from_pins: impl FnOnce(&Cli) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match client.call::<T>(request) {
        Ok(answer) => Ok(answer),
        Err(e) if agent_down(&e) => from_pins(cli),
        Err(e) => Err(e.into()),
    }
}

fn counters(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let totals = call_or_pins(cli, client, &Request::Counters, |cli| {
        Ok(podnet::agent::counter_totals(from_pins(cli)?.counters()?))
    })?;
    print(cli.json, &totals, print_counters)
}

fn ipam(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    {
        let s: IpamStatus = client
            .call(&Request::Ipam)
            .context("asking the agent for IPAM state")?;
        print(cli.json, &s, |s| {
            let used: std::collections::HashSet<_> =
                s.networks.values().flatten().map(|r| r.ip).collect();
            println!(
                "pod CIDR {}  ({} of {} addresses in use)",
                s.pod_cidr,
                used.len(),
                s.capacity
            );
            if let Some(store) = &s.store {
                println!("store    {} (shared by every network)", store.display());
            }
            println!(
                "{:<12} {:<16} {:<40} {:<10}",
                "NETWORK", "IP", "CONTAINER", "IFNAME"
            );
            for (net, list) in &s.networks {
                for r in list {
                    println!(
                        "{:<12} {:<16} {:<40} {:<10}",
                        net, r.ip, r.holder.owner.container_id, r.holder.owner.ifname
                    );
                }
            }
        })
    }
}

fn nodes(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    match client.call::<Vec<NodeRecord>>(&Request::Nodes) {
        Ok(list) => print(cli.json, &list, |list| {
            println!("{:<16} {:<16} POD CIDR", "NODE", "NODE IP");
            for n in list {
                println!("{:<16} {:<16} {}", n.name, n.node_ip, n.pod_cidr);
            }
        }),
        Err(e) if agent_down(&e) => {
            let list: Vec<(String, String)> = from_pins(cli)?
                .remotes()?
                .into_iter()
                .filter(|entry| !entry.node_address)
                .map(|entry| (entry.cidr.to_string(), entry.node_ip.to_string()))
                .collect();
            print(cli.json, &list, |list| {
                println!("{:<18} NODE IP", "POD CIDR");
                for (cidr, ip) in list {
                    println!("{cidr:<18} {ip}");
                }
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn check(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let drift: Vec<podnet::api::Drift> = client
        .call(&Request::Check)
        .context("asking the agent (the check compares its state with the kernel's)")?;
    print(cli.json, &drift, |drift| {
        if drift.is_empty() {
            println!("consistent: the maps, routes, veths and filters match the agent's state");
        }
        for d in drift {
            println!("{:<14} {}", d.kind, d.detail);
        }
    })?;
    if !drift.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn format_unix_ms(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = now.saturating_sub(ms);
    format!("{}.{} s ago", ago / 1000, (ago % 1000) / 100)
}

fn datastore(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let s: DatastoreStatus = client.call(&Request::Datastore)?;
    print(cli.json, &s, |s| {
        println!("backend      {}", s.backend);
        println!(
            "connected    {}{}",
            if s.connected {
                "yes"
            } else {
                "NO (forwarding with the last known state)"
            },
            s.endpoint
                .as_ref()
                .map_or_else(String::new, |e| format!(" ({e})"))
        );
        if let Some(ms) = s.last_sync_ms {
            println!("last sync    {}", format_unix_ms(ms));
        }
        if let Some(e) = &s.last_error {
            println!("last error   {e}");
        }
        if let (Some(grace), Some(release)) = (s.node_grace_period_s, s.cidr_release_after_s) {
            println!(
                "grace        {grace} s (routes to a node without a lease), CIDR released after {release} s"
            );
        }
        for problem in &s.claim_problems {
            println!("CLAIMS       {problem}");
        }
        println!();
        println!(
            "{:<16} {:<16} {:<18} {:<12} {:<7} SINCE",
            "NODE", "NODE IP", "POD CIDR", "STATE", "ROUTED"
        );
        for n in &s.nodes {
            let state = format!("{:?}", n.state).to_lowercase();
            println!(
                "{:<16} {:<16} {:<18} {:<12} {:<7} {}",
                n.record.name,
                n.record.node_ip.to_string(),
                n.record.pod_cidr.to_string(),
                state,
                if n.routed { "yes" } else { "no" },
                n.since
                    .map_or_else(String::new, |t| format_unix_ms(t.saturating_mul(1000)))
            );
        }
    })
}

fn flows(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let list: Vec<StackFlowStatus> = call_or_pins(cli, client, &Request::StackFlows, |cli| {
        Ok(podnet::agent::stack_flows(&mut from_pins(cli)?)?)
    })?;
    print(cli.json, &list, |list| {
        println!(
            "{:<6} {:<22} {:<22} {:>8} STATE",
            "PROTO", "FROM (to the stack)", "TO", "IDLE S"
        );
        for f in list {
            println!(
                "{:<6} {:<22} {:<22} {:>8} {}",
                f.proto,
                format!("{}:{}", f.src, f.src_port),
                format!("{}:{}", f.dst, f.dst_port),
                f.idle_s,
                f.state
            );
        }
    })
}

fn flow_shares(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let list: Vec<FlowShare> = call_or_pins(cli, client, &Request::FlowShares, |cli| {
        let limit = from_pins(cli)?.config()?.stack_flows_limit();
        Ok(podnet::agent::flow_shares(&cli.bpffs_dir, limit)?)
    })?;
    print(cli.json, &list, |list| {
        println!(
            "{:<16} {:>8} {:>8} {:>10}",
            "POD IP", "FLOWS", "LIMIT", "REFUSED"
        );
        for s in list {
            println!(
                "{:<16} {:>8} {:>8} {:>10}",
                s.ip, s.flows, s.limit, s.refused
            );
        }
    })
}

/// `unix_ns` as an RFC 3339 UTC time with microseconds.
fn format_utc(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One line for a drop event: time, reason, pod, ifindex, program, 5-tuple.
fn drop_line(e: &DropEventRecord) -> String {
    let pod = e.pod.as_ref().map_or_else(
        || "pod=-".to_owned(),
        |p| {
            let cid: String = p.container_id.chars().take(12).collect();
            format!("pod={cid}/{} ({}, {})", p.ifname, p.ip, p.host_ifname)
        },
    );
    let tuple = if e.proto == "0" {
        "not IPv4".to_owned()
    } else if e.src_port == 0 && e.dst_port == 0 {
        format!("{} {} -> {}", e.proto, e.src, e.dst)
    } else {
        format!(
            "{} {}:{} -> {}:{}",
            e.proto, e.src, e.src_port, e.dst, e.dst_port
        )
    };
    let identities = match e.identities.as_slice() {
        [src, dst] => format!(
            " identities {} ({}) -> {} ({})",
            src.id, src.name, dst.id, dst.name
        ),
        _ => String::new(),
    };
    let service = e
        .service
        .as_ref()
        .map(|s| format!(" service {s}"))
        .unwrap_or_default();
    format!(
        "{} drop {} {pod} ifindex={} {} {tuple} len={} cpu={}{identities}{service}",
        format_utc(e.time_unix_ns),
        e.reason,
        e.ifindex,
        e.program,
        e.len,
        e.cpu
    )
}

fn monitor(cli: &Cli, client: &Client, drops_only: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let (hello, messages) = client
        .stream::<MonitorHello, MonitorMessage>(&Request::Monitor { drops_only })
        .context("asking the agent for its events")?;
    if !cli.json {
        eprintln!(
            "podnetctl: listening for drop events (at most {} per second and CPU; the rest are \
             summed in 'suppressed' lines once a second); Ctrl-C to stop",
            hello.drop_events_per_sec_per_cpu
        );
    }
    let mut out = std::io::stdout().lock();
    for message in messages {
        let message = message.context("reading the agent's events")?;
        if cli.json {
            serde_json::to_writer(&mut out, &message)?;
            writeln!(out)?;
        } else {
            let line = match &message {
                MonitorMessage::Drop(e) => drop_line(e),
                MonitorMessage::Suppressed {
                    time_unix_ns,
                    reason,
                    count,
                } => format!(
                    "{} suppressed {reason}: {count} more drops in the last second, over the \
                     rate limit ({}/s per CPU): counted, not shown",
                    format_utc(*time_unix_ns),
                    hello.drop_events_per_sec_per_cpu
                ),
                MonitorMessage::Lost { count } => format!(
                    "{} lost {count} messages: podnetctl read too slowly",
                    format_utc(now_unix_ns())
                ),
            };
            writeln!(out, "{line}")?;
        }
        // Live: every line as it comes, also into a pipe.
        out.flush()?;
    }
    anyhow::bail!("the agent closed the event stream")
}

fn main() -> anyhow::Result<()> {
    // Behave like a Unix filter when the reader goes away (`podnetctl ... |
    // head`): die quietly on SIGPIPE instead of panicking on EPIPE, which is
    // what Rust's runtime makes of the ignored signal.
    // SAFETY: installing the default disposition for SIGPIPE before any
    // other thread exists has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let client = Client::new(&cli.socket);
    match cli.command {
        Cmd::Status => status(&cli, &client),
        Cmd::Endpoints => endpoints(&cli, &client),
        Cmd::Counters => counters(&cli, &client),
        Cmd::Ipam => ipam(&cli, &client),
        Cmd::Nodes { check: false } => nodes(&cli, &client),
        Cmd::Nodes { check: true } => check(&cli, &client),
        Cmd::Datastore => datastore(&cli, &client),
        Cmd::Flows { owners: false } => flows(&cli, &client),
        Cmd::Flows { owners: true } => flow_shares(&cli, &client),
        Cmd::Explain {
            ref from,
            ref to,
            src,
        } => explain(&cli, &client, from, to, src),
        Cmd::Monitor { drops } => monitor(&cli, &client, drops),
        Cmd::Policy { ref pod } => policy(&cli, &client, pod),
        Cmd::Services => services(&cli, &client),
        Cmd::EtcdAuth(ref args) => etcd_auth(args),
        Cmd::Apply(ref args) => objects_command(cli.json, ObjectsCommand::Apply(args)),
        Cmd::Delete(ref args) => objects_command(cli.json, ObjectsCommand::Delete(args)),
        Cmd::Get(ref args) => objects_command(cli.json, ObjectsCommand::Get(args)),
        Cmd::Release(ref args) => release(args),
    }
}

fn policy(cli: &Cli, client: &Client, pod: &str) -> anyhow::Result<()> {
    let (namespace, name) = pod
        .split_once('/')
        .with_context(|| format!("{pod:?}: name the pod as NAMESPACE/NAME"))?;
    let answer: Option<podnet::policy::PodPolicies> = client.call(&Request::Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })?;
    let answer = answer.with_context(|| format!("no Pod {namespace}/{name} in the cluster"))?;
    print(cli.json, &answer, |p| print!("{p}"))
}

fn services(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    let answer: ServicesAnswer = client.call(&Request::Services)?;
    print(cli.json, &answer, |a| print!("{a}"))
}

fn explain(
    cli: &Cli,
    client: &Client,
    from: &str,
    to: &str,
    src: Option<Ipv4Addr>,
) -> anyhow::Result<()> {
    use podnet::explain::{Destination, ExplainRequest, Explanation};
    let (to, port, proto) = ExplainRequest::parse_to(to).map_err(anyhow::Error::msg)?;
    let request = ExplainRequest {
        from: from.to_owned(),
        to,
        port,
        proto,
        forged_source: src,
    };
    let answer: Explanation = client.call(&Request::Explain { request })?;
    print(cli.json, &answer, |e| {
        let r = &e.request;
        let port = r.port.map_or_else(String::new, |p| format!(":{p}"));
        println!(
            "packet      {:?} {} -> {}{port} from pod {} ({}, {} on {})",
            r.proto,
            r.forged_source.unwrap_or(e.sender.ip),
            r.to,
            e.sender.ip,
            e.sender.container_id,
            e.sender.ifname,
            e.sender.host_ifname
        );
        println!(
            "verdict     {}{} ({})",
            e.verdict,
            e.drop_reason
                .as_ref()
                .map_or_else(String::new, |reason| format!(": {reason}")),
            e.action
        );
        let goes = match &e.destination {
            Destination::LocalPod {
                ip,
                container_id,
                host_veth,
                shaped,
            } => format!(
                "local pod {ip} ({}) via {host_veth}{}",
                container_id.as_deref().unwrap_or("?"),
                if *shaped {
                    ", through its host veth's egress (ingress limit)"
                } else {
                    " (bpf_redirect_peer)"
                }
            ),
            Destination::Tunnel {
                node_ip,
                node_name,
                vni,
                device,
            } => format!(
                "node {} ({node_ip}) through {device}, VXLAN VNI {vni}, outer destination {node_ip}",
                node_name.as_deref().unwrap_or("?")
            ),
            Destination::Underlay {
                node_ip,
                node_name,
                next_hop,
                device,
            } => format!(
                "node {} ({node_ip}) on the underlay: out of {device}, next hop {next_hop}",
                node_name.as_deref().unwrap_or("?")
            ),
            Destination::Shaper { device } => {
                format!("the pod's shaper {device} (egress limit), then the host stack")
            }
            Destination::HostStack { why } => format!("the host stack: {why}"),
            Destination::Dropped { reason } => format!("nowhere: dropped ({reason})"),
        };
        if let Some(service) = &e.service {
            print_service_translation(service);
        }
        println!("goes to     {goes}");
        if let (Some(ttl), Some(mac)) = (e.ttl_out, &e.dst_mac_out) {
            println!(
                "rewritten   TTL {} -> {ttl}, destination MAC {mac}",
                e.ttl_in
            );
        }
        if let Some(policy) = &e.policy {
            println!("egress      {}", policy.egress.describe());
            match &policy.ingress {
                Some(side) => println!("ingress     {}", side.describe()),
                None => println!("ingress     not a pod of the cluster: no policy of its"),
            }
            // The scratch run leaves the policy maps out: say what they add.
            let denied = |side: &podnet::explain::PolicySide| !side.evaluation.is_allowed();
            if denied(&policy.egress) {
                println!("policy      the datapath drops it: policy_denied_egress");
            } else if policy.ingress.as_ref().is_some_and(denied) {
                println!(
                    "policy      the datapath drops it: policy_denied_ingress (on the receiver's node)"
                );
            }
        }
    })
}

/// `podnetctl explain`'s `service` line.
fn print_service_translation(service: &podnet::explain::ServiceTranslation) {
    let name = service.service.as_deref().unwrap_or("a Service");
    match &service.backend {
        Some(backend) => println!(
            "service     {name} {} -> {backend}: backend 1 of {} ({}), a new connection draws one",
            service.frontend,
            service.backends.len(),
            service.backends.join(", ")
        ),
        None => println!(
            "service     {name} {} has no backend: new connections are dropped",
            service.frontend
        ),
    }
}

/// `apply`, `delete` or `get`.
#[derive(Clone, Copy)]
enum ObjectsCommand<'a> {
    Apply(&'a ObjectFileArgs),
    Delete(&'a DeleteArgs),
    Get(&'a GetArgs),
}

/// What `apply`, `delete` or `get` does once the datastore is open.
enum ObjectsWork {
    Apply(Vec<podnet::objects_ctl::Prepared>),
    Delete(Vec<podnet::model::cluster::ObjectKey>),
    Get(podnet::objects_ctl::GetRequest),
    /// An apply with objects refused (reported): nothing to do but fail.
    Refused,
}

/// The objects of `-f` (and `-n`), read and decoded before the datastore
/// is touched; a bad file is kubectl's `error: ...`, exit 1.
fn objects_of_files(
    files: &[PathBuf],
    namespace: Option<&str>,
    command: &'static str,
) -> Vec<podnet::model::cluster::ClusterObject> {
    use podnet::objects_ctl::{objects_of, read_sources};
    let objects = read_sources(files, std::io::stdin().lock())
        .and_then(|sources| objects_of(&sources, namespace, command));
    objects.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    })
}

/// The work of `command` and where its datastore is; every object of an
/// `apply` is checked here, and one refused ends the command (exit 1)
/// before the datastore is opened: nothing is written.
fn objects_work<'a>(
    command: ObjectsCommand<'a>,
    console: &mut podnet::objects_ctl::Console<'_>,
) -> anyhow::Result<(ObjectsWork, &'a StoreArgs)> {
    use podnet::objects_ctl::{self as ctl, GetRequest, OutputFormat};
    Ok(match command {
        ObjectsCommand::Apply(args) => {
            let objects = objects_of_files(&args.files, args.namespace.as_deref(), "apply");
            match ctl::prepare_apply(&objects) {
                Ok(prepared) => (ObjectsWork::Apply(prepared), &args.store),
                Err(refused) => {
                    ctl::report_refused(&refused, console)?;
                    (ObjectsWork::Refused, &args.store)
                }
            }
        }
        ObjectsCommand::Delete(args) => {
            let keys = match args.kind {
                Some(kind) => args
                    .names
                    .iter()
                    .map(|name| podnet::model::cluster::ObjectKey {
                        kind,
                        namespace: kind.namespaced().then(|| {
                            args.namespace
                                .clone()
                                .unwrap_or_else(|| podnet::model::cluster::DEFAULT_NAMESPACE.into())
                        }),
                        name: name.clone(),
                    })
                    .collect(),
                None => objects_of_files(&args.files, args.namespace.as_deref(), "delete")
                    .iter()
                    .map(podnet::model::cluster::ClusterObject::key)
                    .collect(),
            };
            (ObjectsWork::Delete(keys), &args.store)
        }
        ObjectsCommand::Get(args) => {
            let output = match args.output.as_deref() {
                Some("wide") => OutputFormat::Wide,
                Some("yaml") => OutputFormat::Yaml,
                Some("json") => OutputFormat::Json,
                _ => OutputFormat::Table,
            };
            let request = GetRequest {
                kind: args.kind,
                names: args.names.clone(),
                namespace: args.namespace.clone(),
                all_namespaces: args.all_namespaces,
                output,
            };
            (ObjectsWork::Get(request), &args.store)
        }
    })
}

/// Each datastore's store type is its own: the one generic run,
/// monomorphised per store.
async fn run_objects<S: podnet::datastore::objects::ObjectStore>(
    store: &mut S,
    work: &ObjectsWork,
    console: &mut podnet::objects_ctl::Console<'_>,
) -> Result<(), podnet::objects_ctl::CtlError> {
    use podnet::objects_ctl as ctl;
    match work {
        ObjectsWork::Apply(objects) => ctl::apply(store, objects, console).await,
        ObjectsWork::Delete(objects) => ctl::delete(store, objects, console).await,
        ObjectsWork::Get(request) => ctl::get(store, request, console).await,
        ObjectsWork::Refused => Ok(()),
    }
}

/// `apply`, `delete` and `get`: straight to the datastore (no agent), as
/// calicoctl. Exit 1 when any object was refused, not found or in conflict.
fn objects_command(json: bool, command: ObjectsCommand<'_>) -> anyhow::Result<()> {
    use podnet::datastore::{DatastoreSpec, objects};
    use podnet::objects_ctl::{Console, CtlError, Outcome};
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let mut console = Console::new(&mut out, &mut err, json);
    let (work, store) = objects_work(command, &mut console)?;
    if matches!(work, ObjectsWork::Refused) {
        // Nothing is written: the datastore is not even opened.
        console.finish()?;
        std::process::exit(1);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async {
        match &store.datastore {
            DatastoreSpec::File(path) => {
                // A mistyped path would otherwise become a new, empty store
                // that no agent reads.
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                anyhow::ensure!(
                    dir.is_dir(),
                    "--datastore file:{}: no directory {} (the nodes file's directory, where \
                     the agents' datastore is)",
                    path.display(),
                    dir.display()
                );
                let mut objects = objects::file::FileObjectStore::beside(path);
                Ok(run_objects(&mut objects, &work, &mut console).await)
            }
            DatastoreSpec::Etcd(endpoints) => {
                let access = podnet::datastore::etcd::EtcdAccess::load(&store.access)
                    .context("setting up the etcd connection")?;
                access.check_endpoints(endpoints)?;
                let mut objects = objects::etcd::EtcdObjectStore::connect(
                    endpoints,
                    &access,
                    std::time::Duration::from_secs(10),
                )
                .await
                .with_context(|| format!("connecting to etcd ({})", endpoints.join(",")))?;
                Ok(run_objects(&mut objects, &work, &mut console).await)
            }
            DatastoreSpec::None => anyhow::bail!(
                "--datastore none has no cluster objects: give file:PATH or etcd:URL[,URL...] \
                 (or set PODNET_DATASTORE)"
            ),
        }
    })?;
    match result {
        Ok(()) => {}
        Err(CtlError::Usage(message)) => {
            eprintln!("error: {message}");
            std::process::exit(1);
        }
        Err(e) => return Err(e).context("reading the datastore"),
    }
    if console.finish()? == Outcome::Failed {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_utc(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        // A leap day.
        assert_eq!(
            format_utc(1_709_164_800_000_000_000),
            "2024-02-29T00:00:00.000000Z"
        );
    }
}
