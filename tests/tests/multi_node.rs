//! Pods on different nodes of a lab (nodes file datastore): VXLAN and direct
//! routing decided in eBPF, MTU, egress masquerade, nodes joining, leaving
//! and restarting.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use podnet::api::{Client, Request};
use podnet_common::Verdict;
use podnet_tests::counters::Counter;
use podnet_tests::{
    frames,
    lab::{self, LabDatastore, LabGuard, LabNode, LabOptions, LabPod},
    privileged, spoof, traffic, wait_up_to,
};

/// A verdict's or drop reason's counter on `node`; a counter the agent does
/// not report fails the test.
fn counter(node: &LabNode, counter: impl Into<Counter>) -> u64 {
    podnet_tests::counters::read(&node.agent_socket, counter)
}

fn ping(netns: &str, ip: Ipv4Addr, extra: &[&str]) -> std::process::Output {
    lab::in_netns(netns, "ping")
        .expect("command")
        .args(["-c", "2", "-i", "0.2", "-W", "1"])
        .args(extra)
        .arg(ip.to_string())
        .output()
        .expect("ping")
}

/// The source address `to` sees when `from` connects to it.
fn seen_source(from: &LabPod, to: &LabPod) -> Ipv4Addr {
    seen_source_at(&from.netns, &to.netns, to.ip)
}

/// The source address a server on `to_ip` in `to_netns` sees when a
/// client in `from_netns` connects to it.
fn seen_source_at(from_netns: &str, to_netns: &str, to_ip: Ipv4Addr) -> Ipv4Addr {
    let addr = SocketAddrV4::new(to_ip, 18_000);
    let (tx, rx) = std::sync::mpsc::channel();
    let to_ns = to_netns.to_owned();
    let server = std::thread::spawn(move || {
        lab::on_netns_thread(&to_ns, move || {
            let listener = TcpListener::bind(addr).expect("bind");
            tx.send(()).expect("ready");
            let (mut s, peer) = listener.accept().expect("accept");
            let mut buf = [0u8; 1];
            let _ = s.read(&mut buf);
            peer
        })
        .expect("server thread")
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    lab::on_netns_thread(from_netns, move || {
        let mut s =
            TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)).expect("connect");
        s.write_all(b"x").expect("write");
    })
    .expect("client thread");
    match server.join().expect("server") {
        std::net::SocketAddr::V4(peer) => *peer.ip(),
        std::net::SocketAddr::V6(_) => panic!("IPv6 peer"),
    }
}

/// README (Multi-node, Security model): in vxlan mode a pod reaches another
/// node's address through the tunnel keeping its own address, and what the
/// node's stack routes from a pod to another node (here: the sends of a pod
/// with an egress bandwidth limit, which leave its shaper into the stack)
/// is masqueraded: nothing with a pod's address leaves a node outside the
/// tunnel.
#[test]
fn pods_reach_other_nodes_through_the_tunnel_and_the_stack_masquerades() {
    if !privileged("pods_reach_other_nodes_through_the_tunnel_and_the_stack_masquerades") {
        return;
    }
    let mut lab = LabGuard::up("nodeip", 2, 0, "vxlan", LabDatastore::File).expect("lab up");
    let layout = &mut lab.layout;
    let pod = layout.add_pod("node1", "a").expect("pod");
    let shaped = layout
        .add_pod_with(
            "node1",
            "shaped",
            &serde_json::json!({"runtimeConfig": {"bandwidth":
                {"egressRate": 100_000_000, "egressBurst": 1_000_000}}}),
        )
        .expect("pod with an egress limit");
    let node1 = layout.node("node1").expect("node1").clone();
    let node2 = layout.node("node2").expect("node2").clone();

    let encapsulated = counter(&node1, Verdict::VxlanEncapBpf);
    assert_eq!(
        seen_source_at(&pod.netns, &node2.netns, node2.node_ip),
        pod.ip,
        "node2 sees the pod's own address"
    );
    assert!(
        counter(&node1, Verdict::VxlanEncapBpf) > encapsulated,
        "through the tunnel"
    );
    let handed_to_shaper = counter(&node1, Verdict::ToShaper);
    assert_eq!(
        seen_source_at(&shaped.netns, &node2.netns, node2.node_ip),
        node1.node_ip,
        "what the stack routes to another node is masqueraded to the node's address"
    );
    assert!(
        counter(&node1, Verdict::ToShaper) > handed_to_shaper,
        "the shaped pod's sends took the stack"
    );
}

fn cross_node(tag: &str, mode: &str, datastore: LabDatastore, encap: Verdict, deliver: Verdict) {
    cross_node_with(tag, mode, datastore, (encap, deliver), &[]);
}

/// [`cross_node`] with agents started with `agent_args` as well.
fn cross_node_with(
    tag: &str,
    mode: &str,
    datastore: LabDatastore,
    (encap, deliver): (Verdict, Verdict),
    agent_args: &[&str],
) {
    let lab = LabGuard::up_with(
        tag,
        2,
        1,
        mode,
        datastore,
        LabOptions {
            agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let layout = &lab.layout;
    let probes = lab::check(layout).expect("check");
    assert!(probes.iter().all(|p| p.ok), "{}", lab::render(&probes));

    let (a, b) = (&layout.pods[0], &layout.pods[1]);
    assert_ne!(a.node, b.node);
    let (n1, n2) = (&layout.nodes[0], &layout.nodes[1]);
    let encap_before = counter(n1, encap);
    let deliver_before = counter(n2, deliver);
    traffic::transfer(&a.netns, &b.netns, b.ip, 128 << 20).expect("TCP a -> b, 128 MiB");
    traffic::transfer(&b.netns, &a.netns, a.ip, 16 << 20).expect("TCP b -> a");
    assert!(
        counter(n1, encap) - encap_before > 1000,
        "node1 sent through {encap:?}"
    );
    assert!(
        counter(n2, deliver) - deliver_before > 1000,
        "node2 delivered through {deliver:?}"
    );
    assert_eq!(
        seen_source(a, b),
        a.ip,
        "pod to pod keeps the pod's address (no NAT)"
    );
}

#[test]
fn cross_node_vxlan() {
    if !privileged("cross_node_vxlan") {
        return;
    }
    cross_node(
        "vx",
        "vxlan",
        LabDatastore::File,
        Verdict::VxlanEncapBpf,
        Verdict::VxlanDecapBpf,
    );
}

/// `--vxlan-datapath kernel`: the node's VXLAN device encapsulates and
/// decapsulates, from_overlay delivers.
#[test]
fn cross_node_vxlan_kernel() {
    if !privileged("cross_node_vxlan_kernel") {
        return;
    }
    cross_node_with(
        "vk",
        "vxlan",
        LabDatastore::File,
        (Verdict::VxlanEncap, Verdict::OverlayDeliver),
        &["--vxlan-datapath", "kernel"],
    );
}

/// `--vxlan-datapath bpf` (the default, named): from_pod encapsulates and from_underlay
/// decapsulates pod-to-pod traffic between nodes, both ways, TCP bulk
/// (TSO/GSO super-packets) included; the node's VXLAN device carries none
/// of it but still carries the node's own traffic.
#[test]
fn cross_node_vxlan_bpf() {
    if !privileged("cross_node_vxlan_bpf") {
        return;
    }
    let lab = LabGuard::up_with(
        "vb",
        2,
        1,
        "vxlan",
        LabDatastore::File,
        LabOptions {
            agent_args: vec!["--vxlan-datapath".into(), "bpf".into()],
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let layout = &lab.layout;
    let probes = lab::check(layout).expect("check");
    assert!(probes.iter().all(|p| p.ok), "{}", lab::render(&probes));
    let (a, b) = (&layout.pods[0], &layout.pods[1]);
    let (n1, n2) = (&layout.nodes[0], &layout.nodes[1]);
    let kernel_before = [
        counter(n1, Verdict::VxlanEncap),
        counter(n2, Verdict::VxlanEncap),
        counter(n1, Verdict::OverlayDeliver),
        counter(n2, Verdict::OverlayDeliver),
    ];
    let bpf_before = [
        counter(n1, Verdict::VxlanEncapBpf),
        counter(n2, Verdict::VxlanEncapBpf),
        counter(n1, Verdict::VxlanDecapBpf),
        counter(n2, Verdict::VxlanDecapBpf),
    ];
    assert!(ping(&a.netns, b.ip, &[]).status.success(), "a pings b");
    assert!(ping(&b.netns, a.ip, &[]).status.success(), "b pings a");
    traffic::transfer(&a.netns, &b.netns, b.ip, 128 << 20).expect("TCP a -> b, 128 MiB");
    traffic::transfer(&b.netns, &a.netns, a.ip, 64 << 20).expect("TCP b -> a, 64 MiB");
    udp_checksums_arrive_checked(layout, a, b);
    let bpf_after = [
        counter(n1, Verdict::VxlanEncapBpf),
        counter(n2, Verdict::VxlanEncapBpf),
        counter(n1, Verdict::VxlanDecapBpf),
        counter(n2, Verdict::VxlanDecapBpf),
    ];
    for (i, what) in [
        "node1 encapsulated in BPF",
        "node2 encapsulated in BPF",
        "node1 decapsulated in BPF",
        "node2 decapsulated in BPF",
    ]
    .into_iter()
    .enumerate()
    {
        assert!(
            bpf_after[i] - bpf_before[i] > 1000,
            "{what}: {bpf_before:?} -> {bpf_after:?}"
        );
    }
    let kernel_after = [
        counter(n1, Verdict::VxlanEncap),
        counter(n2, Verdict::VxlanEncap),
        counter(n1, Verdict::OverlayDeliver),
        counter(n2, Verdict::OverlayDeliver),
    ];
    assert_eq!(
        kernel_before, kernel_after,
        "no pod-to-pod packet took the VXLAN device"
    );
    assert_eq!(
        seen_source(a, b),
        a.ip,
        "pod to pod keeps the pod's address"
    );
    // The node's own traffic: node1 to node2's pod goes through node1's
    // VXLAN device (host route) and arrives at node2's device (not a pod's
    // source: from_underlay leaves it alone); a pod reaches the other node.
    assert!(
        ping(&n1.netns, b.ip, &[]).status.success(),
        "node1 reaches node2's pod"
    );
    assert_eq!(
        seen_source_at(&n1.netns, &b.netns, b.ip),
        n1.node_ip,
        "node1 connects to node2's pod"
    );
    assert_eq!(
        seen_source_at(&a.netns, &n2.netns, n2.node_ip),
        a.ip,
        "a pod connects to the other node, keeping its address"
    );
    assert!(
        ping(&n1.netns, n2.node_ip, &[]).status.success(),
        "the nodes reach each other"
    );
}

/// Nodes of the two VXLAN datapaths talk (the wire format is the same):
/// node2's agent restarts with `--vxlan-datapath kernel` beside node1's
/// default (bpf), and pods keep reaching each other both ways, node1 still
/// encapsulating and decapsulating in BPF, node2 through its device.
#[test]
fn vxlan_datapaths_interoperate() {
    if !privileged("vxlan_datapaths_interoperate") {
        return;
    }
    let mut lab = LabGuard::up("vi", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    lab.layout.agent_args = vec!["--vxlan-datapath".into(), "kernel".into()];
    lab.layout.stop_agent("node2").expect("stop node2");
    lab.layout
        .start_agent("node2")
        .expect("node2 with the kernel datapath");
    let layout = &lab.layout;
    let (a, b) = (&layout.pods[0], &layout.pods[1]);
    let (n1, n2) = (&layout.nodes[0], &layout.nodes[1]);
    let names = [
        (n1, Verdict::VxlanEncapBpf),
        (n1, Verdict::VxlanDecapBpf),
        (n2, Verdict::VxlanEncap),
        (n2, Verdict::OverlayDeliver),
    ];
    let before: Vec<u64> = names.iter().map(|(n, v)| counter(n, *v)).collect();
    assert!(ping(&a.netns, b.ip, &[]).status.success(), "a pings b");
    traffic::transfer(&a.netns, &b.netns, b.ip, 32 << 20).expect("TCP a -> b");
    traffic::transfer(&b.netns, &a.netns, a.ip, 32 << 20).expect("TCP b -> a");
    for ((node, verdict), before) in names.iter().zip(before) {
        assert!(
            counter(node, *verdict) - before > 100,
            "{}: {verdict:?} moved",
            node.name
        );
    }
}

/// UDP datagrams with a checksum from pod `a` (written raw, so that no
/// offload leaves the checksum to a device: the receiving stack checks it)
/// to pod `b`: a valid one arrives, a corrupted one is counted as a
/// checksum error by `b`'s stack, so the inner checksum is intact and
/// checked after the BPF encapsulation and decapsulation.
fn udp_checksums_arrive_checked(layout: &lab::LabLayout, a: &LabPod, b: &LabPod) {
    const PORT: u16 = 18_100;
    let node1 = layout.node(&a.node).expect("a's node");
    let gateway = spoof::host_veth_mac(&a.netns, &node1.netns).expect("gateway MAC");
    let a_mac = spoof::mac_of(&a.netns, "eth0").expect("a's MAC");
    let listener =
        spoof::Listener::bind(&b.netns, SocketAddrV4::new(b.ip, PORT)).expect("listener");
    let datagram = |payload: &[u8], corrupt: bool| {
        let mut udp = frames::udp_datagram(40_000, PORT, payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&a.ip.octets());
        pseudo.extend_from_slice(&b.ip.octets());
        pseudo.extend_from_slice(&[0, frames::IPPROTO_UDP]);
        pseudo.extend_from_slice(&u16::try_from(udp.len()).expect("len").to_be_bytes());
        pseudo.extend_from_slice(&udp);
        let mut sum = frames::internet_checksum(&pseudo);
        if sum == 0 {
            sum = 0xffff;
        }
        if corrupt {
            sum ^= 0x0101;
        }
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        frames::ipv4_frame((gateway, a_mac), (a.ip, b.ip), frames::IPPROTO_UDP, 0, &udp)
    };
    let errors_before = udp_checksum_errors(&b.netns);
    spoof::send_raw(
        &a.netns,
        "eth0",
        &[datagram(b"valid", false), datagram(b"corrupted", true)],
    )
    .expect("send from a");
    let seen = listener.drain(Duration::from_secs(1));
    assert!(
        seen.contains(b"valid".as_slice()),
        "the valid datagram arrived: {seen:?}"
    );
    assert!(
        !seen.contains(b"corrupted".as_slice()),
        "the corrupted one did not"
    );
    assert_eq!(
        udp_checksum_errors(&b.netns) - errors_before,
        1,
        "b's stack checked the checksums"
    );
}

/// `Udp: InCsumErrors` of the namespace `netns` (/proc/net is the reading
/// process's namespace's).
fn udp_checksum_errors(netns: &str) -> u64 {
    let out = lab::in_netns(netns, "cat")
        .expect("command")
        .arg("/proc/net/snmp")
        .output()
        .expect("cat");
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp: ")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "InCsumErrors")
        .and_then(|(_, v)| v.parse().ok())
        .expect("InCsumErrors")
}

#[test]
fn cross_node_direct() {
    if !privileged("cross_node_direct") {
        return;
    }
    cross_node(
        "dr",
        "direct",
        LabDatastore::File,
        Verdict::RedirectNeigh,
        Verdict::UnderlayDeliver,
    );
}

#[test]
fn vxlan_mtu_fits_and_one_byte_more_is_refused_loudly() {
    if !privileged("vxlan_mtu_fits_and_one_byte_more_is_refused_loudly") {
        return;
    }
    let lab = LabGuard::up("mtu", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let (a, b) = (&lab.layout.pods[0], &lab.layout.pods[1]);
    let link = lab::in_netns(&a.netns, "ip")
        .expect("command")
        .args(["-o", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("mtu 1450"),
        "pod MTU = underlay 1500 - 50 (VXLAN): {link}"
    );
    // 1450 - 20 (IPv4) - 8 (ICMP) = 1422 bytes of payload, DF set.
    let fits = ping(&a.netns, b.ip, &["-M", "do", "-s", "1422"]);
    assert!(
        fits.status.success(),
        "the largest DF packet crosses the overlay"
    );
    let too_big = ping(&a.netns, b.ip, &["-M", "do", "-s", "1423"]);
    assert!(!too_big.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&too_big.stdout),
        String::from_utf8_lossy(&too_big.stderr)
    );
    assert!(
        said.contains("message too long"),
        "one byte more fails loudly, not silently: {said}"
    );
}

#[test]
fn cross_node_vxlan_with_etcd() {
    if !privileged("cross_node_vxlan_with_etcd") {
        return;
    }
    cross_node(
        "ve",
        "vxlan",
        LabDatastore::Etcd,
        Verdict::VxlanEncapBpf,
        Verdict::VxlanDecapBpf,
    );
}

#[test]
fn cross_node_direct_with_etcd() {
    if !privileged("cross_node_direct_with_etcd") {
        return;
    }
    cross_node(
        "de",
        "direct",
        LabDatastore::Etcd,
        Verdict::RedirectNeigh,
        Verdict::UnderlayDeliver,
    );
}

fn remote_nodes(node: &LabNode) -> Vec<String> {
    let nodes: Vec<podnet::datastore::NodeRecord> = Client::new(&node.agent_socket)
        .call(&Request::Nodes)
        .expect("nodes");
    nodes.into_iter().map(|n| n.name).collect()
}

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    wait_up_to(Duration::from_secs(10), what, f);
}

#[test]
fn nodes_join_leave_and_restart() {
    if !privileged("nodes_join_leave_and_restart") {
        return;
    }
    let mut lab = LabGuard::up("jl", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let (a, b) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    let stream = traffic::Stream::start(&a.netns, &b.netns, b.ip).expect("stream");

    // A node joins while traffic runs.
    let node3 = lab.layout.join_node().expect("node3 joins");
    let c = lab
        .layout
        .add_pod(&node3, "node3-pod1")
        .expect("pod on node3");
    let n1 = lab.layout.nodes[0].clone();
    wait_until("node1 knows node3", || remote_nodes(&n1).contains(&node3));
    assert!(
        ping(&a.netns, c.ip, &[]).status.success(),
        "node1's pod reaches the new node's pod"
    );
    let (sent, received) = stream.finish().expect("stream");
    assert_eq!(sent, received, "the running stream was not disturbed");

    // It leaves: its agent stops and its entry goes from the datastore.
    lab.layout.stop_agent(&node3).expect("stop node3");
    let nodes_file = lab.layout.run_dir.join("nodes.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&nodes_file).expect("read")).expect("json");
    file["nodes"]
        .as_array_mut()
        .expect("list")
        .retain(|n| n["name"] != node3.as_str());
    std::fs::write(&nodes_file, file.to_string()).expect("write");
    wait_until("node1 forgot node3", || !remote_nodes(&n1).contains(&node3));
    let routes = lab::in_netns(&n1.netns, "ip")
        .expect("cmd")
        .args(["route"])
        .output()
        .expect("ip route");
    let c_cidr = lab.layout.node(&node3).expect("node3").pod_cidr.clone();
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains(&c_cidr),
        "node3's route is gone from node1"
    );
    assert!(
        !ping(&a.netns, c.ip, &[]).status.success(),
        "node3's pod is no longer routed"
    );

    // node2 restarts and keeps its CIDR; traffic to it goes on.
    let n2_cidr = lab.layout.nodes[1].pod_cidr.clone();
    lab.layout.stop_agent("node2").expect("stop node2");
    assert!(
        ping(&a.netns, b.ip, &[]).status.success(),
        "forwarding without node2's agent"
    );
    lab.layout.start_agent("node2").expect("restart node2");
    assert_eq!(
        lab.layout.nodes[1].pod_cidr, n2_cidr,
        "a restarted node gets its CIDR back"
    );
    assert!(ping(&a.netns, b.ip, &[]).status.success());
}

/// Records in the nodes file that would misroute (everything to one node,
/// another node's pod CIDR, this node's own, a CIDR outside the cluster)
/// are logged and ignored: never in the datapath or the routing table, and
/// the good nodes keep working.
#[test]
fn bad_datastore_records_are_never_routed() {
    if !privileged("bad_datastore_records_are_never_routed") {
        return;
    }
    let lab = LabGuard::up("bdr", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let (a, b) = (&lab.layout.pods[0], &lab.layout.pods[1]);
    let n1 = &lab.layout.nodes[0];
    let n2_cidr = lab.layout.nodes[1].pod_cidr.clone();
    let nodes_file = lab.layout.run_dir.join("nodes.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&nodes_file).expect("read")).expect("json");
    for (name, ip, cidr) in [
        ("rogue-all", "192.168.100.91", "0.0.0.0/0"),
        ("rogue-outside", "192.168.100.92", "10.99.0.0/24"),
        ("rogue-own", "192.168.100.93", n1.pod_cidr.as_str()),
        ("rogue-steal", "192.168.100.94", n2_cidr.as_str()),
    ] {
        file["nodes"]
            .as_array_mut()
            .expect("list")
            .push(serde_json::json!({"name": name, "nodeIP": ip, "podCIDR": cidr}));
    }
    std::fs::write(&nodes_file, file.to_string()).expect("write");
    // The agents poll the file every 300 ms; give them a few rounds.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        remote_nodes(n1),
        ["node2"],
        "only the good remote is routed"
    );
    let log = std::fs::read_to_string(n1.state_dir.with_file_name("podnetd.log")).expect("log");
    assert!(
        log.contains("ignoring a datastore record"),
        "refusals are logged"
    );
    let routes = lab::in_netns(&n1.netns, "ip")
        .expect("cmd")
        .args(["route"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("192.168.100.9"),
        "no route via a rogue node: {routes}"
    );
    assert!(
        ping(&a.netns, b.ip, &[]).status.success(),
        "pods of the good nodes still reach each other"
    );
}

/// The nodes file broken under running agents, as a non-atomic writer or a
/// crash leaves it (truncated to nothing, cut in half, not JSON, gone) for
/// a few seconds each while a pod on node1 pings a pod on node2 every
/// 20 ms: the agents keep the last good state (nothing lost, every route
/// there all along), log the breakage, and follow the repaired file.
#[test]
fn a_broken_nodes_file_costs_no_packet_and_no_route() {
    if !privileged("a_broken_nodes_file_costs_no_packet_and_no_route") {
        return;
    }
    let lab = LabGuard::up("bnf", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let (a, b) = (&lab.layout.pods[0], &lab.layout.pods[1]);
    let n1 = &lab.layout.nodes[0];
    let nodes_file = lab.layout.run_dir.join("nodes.json");
    let good = std::fs::read(&nodes_file).expect("read");
    let pinger = podnet_tests::ping::Pinger::start(&a.netns, b.ip, Duration::from_millis(20))
        .expect("pinger");
    let routes = podnet_tests::faults::Sampler::start(
        Duration::from_millis(100),
        podnet_tests::faults::all_routes_present(&lab.layout),
    );
    let known = {
        let nodes = lab.layout.nodes.clone();
        podnet_tests::faults::Sampler::start(Duration::from_millis(250), move || {
            for node in &nodes {
                if remote_nodes(node).len() != 1 {
                    return Err(format!("{} forgot the other node", node.name));
                }
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let breakages: [(&str, Option<Vec<u8>>); 4] = [
        ("truncated to 0 bytes", Some(Vec::new())),
        ("cut in half", Some(good[..good.len() / 2].to_vec())),
        ("not JSON", Some(b"nodes:\n  - node1\n".to_vec())),
        ("removed", None),
    ];
    for (what, contents) in &breakages {
        match contents {
            // In place, as `>` in a shell or an editor writes.
            Some(bytes) => std::fs::write(&nodes_file, bytes).expect("break the file"),
            None => std::fs::remove_file(&nodes_file).expect("remove the file"),
        }
        std::thread::sleep(Duration::from_secs(3));
        let status = lab.layout.datastore_status("node1").expect("status");
        assert!(
            !status.connected && status.last_error.is_some(),
            "{what}: node1 reports the file broken: {status:?}"
        );
        std::fs::write(&nodes_file, &good).expect("repair the file");
        wait_until("node1 reads the repaired file", || {
            lab.layout
                .datastore_status("node1")
                .is_ok_and(|s| s.connected)
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let report = pinger.finish().expect("pinger");
    routes
        .finish()
        .assert_clean("routes while the nodes file was broken");
    known
        .finish()
        .assert_clean("nodes known while the nodes file was broken");
    eprintln!("broken nodes file: {}", report.summary());
    assert_eq!(report.lost(), 0, "{}", report.summary());
    let log = std::fs::read_to_string(n1.state_dir.with_file_name("podnetd.log")).expect("log");
    let logged = log.matches("keeping the last known state").count();
    assert!(
        (breakages.len()..=2 * breakages.len()).contains(&logged),
        "each breakage logged once (a repair by a non-atomic write may break it once more): {logged}"
    );
    eprintln!(
        "FIGURE nodes file broken 4 ways x 3 s: pings sent {} lost {}, routes intact in every sample",
        report.sent,
        report.lost()
    );
}

/// The conntrack table of a node's netns (`/proc/net/nf_conntrack` is the
/// reader's netns's).
fn conntrack_entries(node: &LabNode) -> String {
    let out = lab::in_netns(&node.netns, "cat")
        .expect("command")
        .arg("/proc/net/nf_conntrack")
        .output()
        .expect("cat nf_conntrack");
    assert!(out.status.success(), "reading /proc/net/nf_conntrack");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted by the `notrack` rule of `chain` in podnet's nft table.
fn notrack_packets(node: &LabNode, chain: &str) -> u64 {
    let out = lab::in_netns(&node.netns, "nft")
        .expect("command")
        .args(["list", "chain", "ip", "podnet", chain])
        .output()
        .expect("nft list chain");
    assert!(out.status.success(), "nft list chain ip podnet {chain}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_end().ends_with(" notrack"))
        .unwrap_or_else(|| panic!("no notrack rule in {chain}:\n{text}"));
    line.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {line}"))
}

/// README (Multi-node): podnet's nft table exempts the VXLAN UDP between
/// nodes from conntrack (its masquerade chain is what loads conntrack), so
/// cross-node pod traffic leaves no conntrack entry for the tunnel flow on
/// either node, while pod traffic still flows and the stack's masquerade
/// (which needs conntrack) still rewrites what it should.
#[test]
fn vxlan_between_nodes_is_not_tracked_and_masquerade_still_works() {
    if !privileged("vxlan_between_nodes_is_not_tracked_and_masquerade_still_works") {
        return;
    }
    // The VXLAN device's datapath: there every tunnel packet passes the
    // host's IP output and input, and netfilter with them. (With the
    // default BPF datapath, pod traffic skips netfilter altogether; only
    // what the stack sends, e.g. a shaped pod's, meets the rules.)
    let options = LabOptions {
        agent_args: vec!["--vxlan-datapath".into(), "kernel".into()],
        ..LabOptions::default()
    };
    let mut lab =
        LabGuard::up_with("notrk", 2, 0, "vxlan", LabDatastore::File, options).expect("lab up");
    let layout = &mut lab.layout;
    let a = layout.add_pod("node1", "a").expect("pod a");
    let b = layout.add_pod("node2", "b").expect("pod b");
    let shaped = layout
        .add_pod_with(
            "node1",
            "shaped",
            &serde_json::json!({"runtimeConfig": {"bandwidth":
                {"egressRate": 100_000_000, "egressBurst": 1_000_000}}}),
        )
        .expect("pod with an egress limit");
    let node1 = layout.node("node1").expect("node1").clone();
    let node2 = layout.node("node2").expect("node2").clone();

    traffic::transfer(&a.netns, &b.netns, b.ip, 16 << 20).expect("TCP a -> b, 16 MiB");
    traffic::transfer(&b.netns, &a.netns, a.ip, 4 << 20).expect("TCP b -> a, 4 MiB");
    assert_eq!(seen_source(&a, &b), a.ip, "pod to pod keeps its address");
    assert_eq!(
        seen_source_at(&shaped.netns, &node2.netns, node2.node_ip),
        node1.node_ip,
        "the stack's masquerade still rewrites a pod's traffic to another node"
    );

    for node in [&node1, &node2] {
        let table = conntrack_entries(node);
        let vxlan: Vec<&str> = table
            .lines()
            .filter(|l| l.contains(" udp ") && l.contains("dport=4789"))
            .collect();
        assert!(
            vxlan.is_empty(),
            "{}: conntrack tracks the VXLAN UDP between nodes:\n{}",
            node.name,
            vxlan.join("\n")
        );
    }
    // Conntrack is on in node1's netns (the masqueraded flow is tracked),
    // so the absence above is the notrack rules' doing.
    assert!(
        conntrack_entries(&node1).contains(&format!("src={}", shaped.ip)),
        "node1 tracks the masqueraded flow"
    );
    // The counters see the tunnel's GSO packets (tens of KiB each; netfilter
    // runs before segmentation), hence a modest floor for 20 MiB.
    for node in [&node1, &node2] {
        assert!(
            notrack_packets(node, "output_notrack") > 100,
            "{}: VXLAN sends skipped conntrack",
            node.name
        );
        assert!(
            notrack_packets(node, "prerouting_notrack") > 100,
            "{}: VXLAN receives skipped conntrack",
            node.name
        );
    }
}
