//! The scale part: the two lookups whose cost grows with the cluster, each
//! measured where it bites and interleaved, round by round in a drawn order,
//! with its 1-entry case.
//!
//! - **Remote trie** (`scale-trie`): cross-node TCP (direct mode) from a pod
//!   on node1 to a pod on node2, with node1's remote trie holding only what
//!   the cluster put there (node2's CIDR and the two node addresses) or
//!   filled to capacity (65,536 CIDRs) such that the destination's address
//!   lies under 32 nested prefixes (/1 .. /32), so every packet's lookup
//!   walks 32 trie nodes, the deepest an IPv4 LPM walk gets. Every prefix
//!   on that path leads to node2 (whichever matches, the packet goes where
//!   the real one sends it); the rest are nested /24 .. /32 chains in
//!   100.64.0.0/10, which no lab address is in. node1's agent is stopped
//!   for the part (its datapath stays, as on an agent restart): it would
//!   remove the filler at its next datastore resync.
//! - **Endpoints** (`scale-endpoints`): same-node UDP from one pod to many
//!   endpoints, each a real veth whose peer sits in a sink namespace with
//!   the endpoint's address, handed to the agent over its socket as CNI ADD
//!   does: one node holds 1 such endpoint, the other 4,096, and the sender
//!   cycles through all of its node's endpoints, so every packet's endpoint
//!   lookup hits a different entry. The figure is datagrams received per
//!   second (64-byte payloads: per-packet costs, where a lookup shows). The
//!   receiver notes each datagram's destination (`IP_PKTINFO`), which proves
//!   every endpoint was reached. The sink's side grows too (4,096 local
//!   addresses and devices instead of 1), so the ratio is, if anything,
//!   pessimistic for podnet.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{IoSliceMut, Write as _},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use podnet::datapath::{Datapath, PinnedMapReader};
use podnet_common::counters::Verdict;

use super::{
    BenchOptions, Figure,
    bpf_cost::BpfStatsSwitch,
    figure,
    rounds::progress,
    tools::{Pair, rss_kib, throughput},
    topology::podnet_lab,
};
use crate::{
    netns::run_in as on_netns_thread,
    netns::{NetNs, run},
    node::{Node, Pod},
};

/// The trie's 1-entry case and its full case (dataplane names).
pub const TRIE_ONE: &str = "podnet-direct 1 CIDR";
pub const TRIE_FULL: &str = "podnet-direct full trie";
/// The endpoints' 1-entry case and its scaled case.
pub const ENDPOINTS_ONE: &str = "podnet 1 endpoint";
pub const ENDPOINTS_MANY: &str = "podnet many endpoints";

/// The prefixes a scale trie adds to what the cluster put there: every
/// prefix of `dest` from /1 to /32 except `dest_cidr` (already there), all
/// to `dest_node`, then nested /24 .. /32 chains in 100.64.0.0/10 to an
/// absent node, `count` in all.
#[must_use]
pub fn nested_prefixes(
    dest: Ipv4Addr,
    dest_cidr: Ipv4Net,
    dest_node: Ipv4Addr,
    count: usize,
) -> Vec<(Ipv4Net, Ipv4Addr)> {
    let mut out: Vec<(Ipv4Net, Ipv4Addr)> = (1..=32u8)
        .filter(|&len| len != dest_cidr.prefix_len())
        .filter_map(|len| Ipv4Net::new(dest, len).ok().map(|n| (n.trunc(), dest_node)))
        .take(count)
        .collect();
    let absent = Ipv4Addr::new(192, 168, 100, 250);
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    let mut i = 0u32;
    while out.len() < count {
        // Chain i / 9: a /24, and inside it /25 .. /32 on its first address.
        let network = Ipv4Addr::from(base + (i / 9) * 256);
        #[allow(clippy::cast_possible_truncation, reason = "i % 9 < 9")]
        let len = 24 + (i % 9) as u8;
        if let Ok(net) = Ipv4Net::new(network, len) {
            out.push((net, absent));
        }
        i += 1;
    }
    out
}

/// How many of `prefixes` contain `ip`: the depth of its trie walk.
#[must_use]
pub fn prefixes_containing(prefixes: &[Ipv4Net], ip: Ipv4Addr) -> usize {
    prefixes.iter().filter(|p| p.contains(&ip)).count()
}

fn verdict_count(pin_dir: &Path, verdict: Verdict) -> anyhow::Result<u64> {
    Ok(PinnedMapReader::open(pin_dir)?.counters()?.verdict(verdict))
}

/// The evidence of a scale run (what `bench --quick` checks), one figure
/// per count.
fn push_counts<const N: usize>(
    figures: &mut Vec<Figure>,
    (scenario, dataplane): (&str, &str),
    counts: [(&str, u64); N],
) {
    for (metric, n) in counts {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        figures.push(figure(scenario, dataplane, metric, "count", vec![n as f64]));
    }
}

/// Cross-node throughput with node1's trie as the cluster made it and
/// filled to capacity, interleaved (the filler is added before and removed
/// after each full-trie run).
pub fn measure_trie(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    progress("scale: remote trie: building a direct-mode lab");
    let (mut lab, pair) = podnet_lab("bst", "direct", &[], None)?;
    let node1 = lab.layout.nodes[0].clone();
    let node2 = lab.layout.nodes[1].clone();
    lab.layout
        .stop_agent(&node1.name)
        .context("stopping node1's agent")?;
    let mut dp = Datapath::load(&node1.bpffs_dir).context("node1's datapath")?;
    let existing = dp.remotes()?.len();
    let total = if opts.quick {
        4_096
    } else {
        podnet_common::names::MAX_REMOTE_CIDRS as usize
    };
    let dest_cidr: Ipv4Net = node2.pod_cidr.parse().context("node2's pod CIDR")?;
    let filler = nested_prefixes(
        pair.server_ip,
        dest_cidr,
        node2.node_ip,
        total.saturating_sub(existing),
    );
    let mut on_path: Vec<Ipv4Net> = filler.iter().map(|(n, _)| *n).collect();
    on_path.push(dest_cidr);
    let depth = prefixes_containing(&on_path, pair.server_ip);

    let _stats_off = BpfStatsSwitch::set(false)?;
    let mut rng = opts.rng("scale-trie");
    let (mut one, mut full) = (Vec::new(), Vec::new());
    let (mut entries, mut path_packets) = (0, 0);
    for round in 1..=opts.rounds {
        let full_first = rng.below(2) == 1;
        for full_trie in [full_first, !full_first] {
            progress(&format!(
                "scale: remote trie: round {round}/{}: {}",
                opts.rounds,
                if full_trie { TRIE_FULL } else { TRIE_ONE }
            ));
            if !full_trie {
                one.push(throughput(&pair, opts.seconds)?);
                continue;
            }
            for (net, node) in &filler {
                dp.upsert_remote(*net, *node)?;
            }
            entries = dp.remotes()?.len();
            let before = verdict_count(&node1.bpffs_dir, Verdict::RedirectNeigh)?;
            full.push(throughput(&pair, opts.seconds)?);
            path_packets += verdict_count(&node1.bpffs_dir, Verdict::RedirectNeigh)? - before;
            for (net, _) in &filler {
                dp.remove_remote(*net)?;
            }
        }
    }
    figures.push(figure(
        "scale-trie",
        TRIE_ONE,
        "tcp_throughput",
        "Gbit/s",
        one,
    ));
    figures.push(figure(
        "scale-trie",
        TRIE_FULL,
        "tcp_throughput",
        "Gbit/s",
        full,
    ));
    push_counts(
        figures,
        ("scale-trie", TRIE_FULL),
        [
            ("trie_entries", entries as u64),
            ("prefixes_on_path", depth as u64),
            ("path_packets", path_packets),
        ],
    );
    drop(lab);
    Ok(())
}

/// A node whose endpoints are veths into one sink namespace, and a pod that
/// sends to them. Field order is drop order: the pod, the sink (its veths
/// take the host ends with them), then the node.
struct EndpointsNode {
    sender: Pod,
    sink: NetNs,
    node: Node,
    endpoints: Vec<Ipv4Addr>,
}

/// UDP port the sink listens on.
const SINK_PORT: u16 = 19_100;

impl EndpointsNode {
    fn new(tag: &str, pod_cidr: &str, endpoints: u32) -> anyhow::Result<(Self, Option<f64>)> {
        let node = Node::start(tag, pod_cidr)?;
        let idle_rss = node.agent_pid().and_then(rss_kib);
        let sender = node.add_pod(&format!("{tag}-sender"))?;
        let sink = NetNs::new(&format!("{tag}sink"))?;
        let endpoints = register_sinks(&node, &sink, endpoints)?;
        Ok((
            Self {
                sender,
                sink,
                node,
                endpoints,
            },
            idle_rss,
        ))
    }

    /// Datagrams received per second (thousands) and the endpoints that
    /// received any, over `seconds` of the sender cycling through them.
    fn send_spread(&self, seconds: u64) -> anyhow::Result<(f64, usize)> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = self.sink.name().to_owned();
        let receiver_stop = Arc::clone(&stop);
        let receiving = std::thread::spawn(move || {
            on_netns_thread(&sink, move || receive(&receiver_stop, &ready_tx)).and_then(|r| r)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the sink's receiver did not start")?;
        let dests = self.endpoints.clone();
        let sent = on_netns_thread(self.sender.netns.name(), move || send(&dests, seconds))?;
        // What is still queued for the receiver counts: it was delivered.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let (received, seen) = receiving
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        sent?;
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let kpps = received as f64 / seconds as f64 / 1e3;
        Ok((kpps, seen))
    }
}

/// Sends 64-byte datagrams round-robin to `dests` for `seconds`.
fn send(dests: &[Ipv4Addr], seconds: u64) -> anyhow::Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("sender socket")?;
    let payload = [0x5a_u8; 64];
    // The gateway's ARP answer first, so the run starts on the fast path.
    for dest in dests.iter().take(4) {
        let _ = socket.send_to(&payload, SocketAddrV4::new(*dest, SINK_PORT));
    }
    std::thread::sleep(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    'run: loop {
        for dest in dests {
            // Errors (a full backlog) are the datapath's business here:
            // the figure is what arrives.
            let _ = socket.send_to(&payload, SocketAddrV4::new(*dest, SINK_PORT));
            sent += 1;
            if sent.is_multiple_of(1024) && Instant::now() >= deadline {
                break 'run;
            }
        }
    }
    Ok(sent)
}

/// Receives until `stop`: datagrams and the distinct destinations seen.
fn receive(stop: &AtomicBool, ready: &mpsc::Sender<()>) -> anyhow::Result<(u64, usize)> {
    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt,
    };
    let socket = UdpSocket::bind(("0.0.0.0", SINK_PORT)).context("sink socket")?;
    setsockopt(&socket, sockopt::Ipv4PacketInfo, &true).context("IP_PKTINFO")?;
    let _ = setsockopt(&socket, sockopt::RcvBuf, &(4 << 20));
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let _ = ready.send(());
    let mut buf = [0u8; 256];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let mut seen = HashSet::new();
    let mut received = 0u64;
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<SockaddrIn>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(msg) => {
                received += 1;
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                        seen.insert(info.ipi_addr.s_addr);
                    }
                }
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok((received, seen.len()));
                }
            }
            Err(e) => return Err(e).context("receiving"),
        }
    }
}

/// Creates `count` veths from the node to `sink`, each sink end with an
/// address of the node's pod CIDR (after the gateway and the node's real
/// pods), and hands them to the node's agent as CNI ADD would (its own host
/// veth name, the sink end's MAC). Returns the addresses.
fn register_sinks(node: &Node, sink: &NetNs, count: u32) -> anyhow::Result<Vec<Ipv4Addr>> {
    use podnet::{api, cni::plugin::AgentApi as _, ipam::Owner};
    let owner = |i: u32| Owner {
        container_id: format!("sink-{i}"),
        ifname: "eth0".into(),
    };
    let first = node
        .pod_cidr
        .parse::<Ipv4Net>()
        .context("the node's pod CIDR")?
        .network();
    let address = |i: u32| Ipv4Addr::from(u32::from(first) + 16 + i);
    let peer = |i: u32| format!("snk{i}");
    let (mut host_batch, mut sink_batch) = (String::new(), String::new());
    for i in 0..count {
        let host = podnet::cni::plugin::host_ifname(&owner(i));
        writeln!(
            host_batch,
            "link add {host} type veth peer name {} netns {}",
            peer(i),
            sink.name()
        )?;
        writeln!(host_batch, "link set {host} up")?;
        writeln!(sink_batch, "addr add {}/32 dev {}", address(i), peer(i))?;
        writeln!(sink_batch, "link set {} up", peer(i))?;
    }
    ip_batch(node.netns.name(), &host_batch)?;
    ip_batch(sink.name(), &sink_batch)?;
    let host_links = links(node.netns.name())?;
    let sink_links = links(sink.name())?;
    let agent = api::Client::new(&node.socket());
    for i in 0..count {
        let name = podnet::cni::plugin::host_ifname(&owner(i));
        let (host_ifindex, host_mac) = host_links
            .iter()
            .find(|l| l.0 == name)
            .map(|l| (l.1, l.2))
            .with_context(|| format!("veth {name} after creating it"))?;
        let pod_mac = sink_links
            .iter()
            .find(|l| l.0 == peer(i))
            .map(|l| l.2)
            .with_context(|| format!("sink end of {name}"))?;
        let endpoint = api::Endpoint {
            owner: owner(i),
            network: "podnet".into(),
            netns: sink.path(),
            ip: address(i),
            host_ifname: name.clone(),
            host_ifindex,
            pod_mac,
            host_mac,
            bandwidth: None,
            pod: None,
        };
        agent
            .add_endpoint(&endpoint)
            .with_context(|| format!("agent: adding endpoint {name}"))?;
    }
    Ok((0..count).map(address).collect())
}

fn ip_batch(netns: &str, batch: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .as_mut()
        .context("ip -batch stdin")?
        .write_all(batch.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "ip -n {netns} -batch");
    Ok(())
}

/// (name, ifindex, MAC) of every link in `netns`.
fn links(netns: &str) -> anyhow::Result<Vec<(String, u32, [u8; 6])>> {
    let json: serde_json::Value = serde_json::from_slice(
        &run(Command::new("ip").args(["-n", netns, "-j", "link", "show"]))?.stdout,
    )?;
    Ok(json
        .as_array()
        .context("ip -j link")?
        .iter()
        .filter_map(|l| {
            Some((
                l["ifname"].as_str()?.to_owned(),
                u32::try_from(l["ifindex"].as_u64()?).ok()?,
                l["address"]
                    .as_str()
                    .and_then(podnet::cni::result::parse_mac)?,
            ))
        })
        .collect())
}

/// Same-node UDP packet rate to 1 and to many endpoints, interleaved, and
/// the agent's memory idle and holding the endpoints.
pub fn measure_endpoints(opts: &BenchOptions, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let many = if opts.quick { 512 } else { 4_096 };
    progress(&format!(
        "scale: endpoints: a node with 1 endpoint and one with {many}"
    ));
    let (one, _) = EndpointsNode::new("bse1", "10.244.8.0/24", 1)?;
    let (scaled, idle_rss) = EndpointsNode::new("bsen", "10.244.32.0/19", many)?;
    let _stats_off = BpfStatsSwitch::set(false)?;
    let mut rng = opts.rng("scale-endpoints");
    let (mut one_runs, mut many_runs) = (Vec::new(), Vec::new());
    let (mut reached, mut path_packets) = (usize::MAX, 0);
    for round in 1..=opts.rounds {
        let many_first = rng.below(2) == 1;
        for use_many in [many_first, !many_first] {
            let (name, node) = if use_many {
                (ENDPOINTS_MANY, &scaled)
            } else {
                (ENDPOINTS_ONE, &one)
            };
            progress(&format!(
                "scale: endpoints: round {round}/{}: {name}",
                opts.rounds
            ));
            let pins = node.node.bpffs.path();
            let before = verdict_count(pins, Verdict::RedirectPeer)?;
            let (kpps, seen) = node
                .send_spread(opts.seconds)
                .with_context(|| format!("{name}: UDP to the endpoints"))?;
            if use_many {
                path_packets += verdict_count(pins, Verdict::RedirectPeer)? - before;
                reached = reached.min(seen);
                many_runs.push(kpps);
            } else {
                one_runs.push(kpps);
            }
        }
    }
    figures.push(figure(
        "scale-endpoints",
        ENDPOINTS_ONE,
        "udp_kpps",
        "kpps",
        one_runs,
    ));
    figures.push(figure(
        "scale-endpoints",
        ENDPOINTS_MANY,
        "udp_kpps",
        "kpps",
        many_runs,
    ));
    push_counts(
        figures,
        ("scale-endpoints", ENDPOINTS_MANY),
        [
            ("endpoint_entries", scaled.endpoints.len() as u64),
            ("endpoints_reached", reached as u64),
            ("path_packets", path_packets),
        ],
    );
    for (dataplane, rss) in [
        ("podnetd idle", idle_rss),
        (
            "podnetd holding the endpoints",
            scaled.node.agent_pid().and_then(rss_kib),
        ),
    ] {
        if let Some(rss) = rss {
            figures.push(figure(
                "scale-endpoints",
                dataplane,
                "agent_rss",
                "KiB",
                vec![rss],
            ));
        }
    }
    Ok(())
}

/// Pair of the trie lab (for the doc's sake: what is measured).
#[allow(dead_code)]
fn _pair_doc(_: &Pair) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_sits_under_every_prefix_length() {
        let dest = Ipv4Addr::new(10, 244, 1, 2);
        let cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let node = Ipv4Addr::new(192, 168, 100, 11);
        let filler = nested_prefixes(dest, cidr, node, 65_533);
        assert_eq!(filler.len(), 65_533);
        let mut nets: Vec<Ipv4Net> = filler.iter().map(|(n, _)| *n).collect();
        let distinct: HashSet<_> = nets.iter().collect();
        assert_eq!(distinct.len(), nets.len(), "no prefix twice");
        assert!(
            !nets.contains(&cidr),
            "the cluster's own entry is left alone"
        );
        nets.push(cidr);
        assert_eq!(prefixes_containing(&nets, dest), 32);
        // Whatever matches the destination leads to its node.
        assert!(
            filler
                .iter()
                .filter(|(n, _)| n.contains(&dest))
                .all(|(_, via)| *via == node)
        );
        // The rest touch no lab address (pods 10.244/16, nodes 192.168/16).
        for (n, via) in &filler {
            if !n.contains(&dest) {
                assert!(
                    "100.64.0.0/10".parse::<Ipv4Net>().unwrap().contains(n),
                    "{n} via {via}"
                );
            }
        }
    }
}
