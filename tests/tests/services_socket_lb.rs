//! Services translated at the socket (`podnetd --services bpf
//! --socket-lb-cgroup`): each node's agent attaches the socket programs to
//! a cgroup of its own (made by the test, never the root cgroup), and the
//! clients run as processes of their node's cgroup inside a pod's netns.
//! Every pod that is not a backend reaches the demo Service's ClusterIP
//! over TCP and over unconnected UDP (DNS-shaped `sendto` / `recvfrom`),
//! both backends answer and see the client's own address, the UDP answer
//! reads as coming from the ClusterIP and `getpeername` on the TCP socket
//! names the ClusterIP; a Service without backends refuses the connect
//! (`ECONNREFUSED`) and the datagram; and the per-packet translation
//! counter does not move meanwhile: the socket did it. A client outside
//! the cgroup still gets the per-packet translation. A process of the
//! node itself in the cgroup (a hostNetwork pod) reaches the ClusterIP and
//! its own node's NodePorts, which nothing else in podnet translates.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use podnet_common::Verdict;
use podnet_tests::{
    lab::{LabDatastore, LabGuard, LabLayout, LabOptions, LabPod, ServiceKind},
    privileged,
    services::{NAMESPACE, ServiceSpec, TRIES, backend_names, tcp_query, wait_for_the_service},
    socket_lb::{NodeCgroup, ProbeAnswer, attach_agents, counters, probe_in},
};

/// A Service without endpoints: its frontends are in the maps with no
/// backend slot.
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn empty_service() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "empty", "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": EMPTY_CLUSTER_IP.to_string(),
            "clusterIPs": [EMPTY_CLUSTER_IP.to_string()],
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353},
            ],
        },
    })
}

fn per_packet_translations(layout: &LabLayout) -> Vec<u64> {
    layout
        .nodes
        .iter()
        .map(|n| podnet_tests::counters::read(&n.agent_socket, Verdict::ServiceTranslated))
        .collect()
}

/// The socket counters of every node, summed.
fn socket_counter(layout: &LabLayout, name: &str) -> u64 {
    layout
        .nodes
        .iter()
        .map(|n| {
            counters(n)
                .expect("the socket LB counters")
                .get(name)
                .copied()
                .expect("a known counter")
        })
        .sum()
}

/// The programs attached to `cgroup` (bpftool's list, by name).
fn attached(cgroup: &NodeCgroup) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .expect("bpftool");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until the empty Service's frontend refuses a connect from the
/// cgroup: the agent has written it.
fn wait_for_the_empty_frontend(cgroup: &NodeCgroup, netns: &str) -> ProbeAnswer {
    let addr = SocketAddrV4::new(EMPTY_CLUSTER_IP, 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = probe_in(cgroup, netns, "tcp", addr, 1)
            .expect("a probe")
            .pop()
            .expect("one answer");
        if answer.errno == Some(libc::ECONNREFUSED) || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every query answered by a backend, the socket naming `frontend`, and
/// the backend seeing `client` when given; the backends that answered.
fn check_answers(
    answers: &[ProbeAnswer],
    frontend: SocketAddrV4,
    client: Option<Ipv4Addr>,
    what: &str,
) -> BTreeSet<String> {
    assert_eq!(answers.len(), TRIES, "{what}: every query printed");
    let mut backends = BTreeSet::new();
    for answer in answers {
        let backend = answer
            .backend
            .clone()
            .unwrap_or_else(|| panic!("{what}: a query failed: {answer:?}"));
        if let Some(client) = client {
            assert_eq!(
                answer.seen_as.map(|a| *a.ip()),
                Some(client),
                "{what}: the backend saw the client's own address: {answer:?}"
            );
        }
        assert_eq!(
            answer.peer,
            Some(frontend),
            "{what}: the client's socket names the ClusterIP, not the backend: {answer:?}"
        );
        backends.insert(backend);
    }
    backends
}

/// The node's cgroup among `cgroups`.
fn cgroup_of<'a>(cgroups: &'a [(String, NodeCgroup)], node: &str) -> &'a NodeCgroup {
    &cgroups
        .iter()
        .find(|(n, _)| n == node)
        .expect("the node's cgroup")
        .1
}

/// A cgroup per node, the node's agent restarted with the socket LB on it.
fn cgroups_with_the_socket_lb(layout: &mut LabLayout) -> Vec<(String, NodeCgroup)> {
    let prefix = layout.prefix.clone();
    let cgroups: Vec<(String, NodeCgroup)> = layout
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                NodeCgroup::new(&prefix, &n.name).expect("a cgroup for the node's pods"),
            )
        })
        .collect();
    let paths: Vec<(&str, &std::path::Path)> = cgroups
        .iter()
        .map(|(n, c)| (n.as_str(), c.path()))
        .collect();
    attach_agents(layout, &paths).expect("agents with --socket-lb-cgroup");
    for (node, cgroup) in &cgroups {
        let names = attached(cgroup);
        assert_eq!(
            names.len(),
            4,
            "{node}: the four socket programs on its cgroup: {names:?}"
        );
    }
    cgroups
}

/// The translation counters before the clients' queries.
struct Before {
    per_packet: Vec<u64>,
    connects: u64,
    sends: u64,
    refused: u64,
}

impl Before {
    fn read(layout: &LabLayout) -> Self {
        Self {
            per_packet: per_packet_translations(layout),
            connects: socket_counter(layout, "connect_translated"),
            sends: socket_counter(layout, "sendmsg_translated"),
            refused: socket_counter(layout, "no_backend"),
        }
    }
}

/// Every client pod, as a process of its node's cgroup, reaches both
/// backends over TCP and UDP and names the ClusterIP as its peer; the
/// empty Service refuses it.
fn clients_in_the_cgroups(
    layout: &LabLayout,
    cgroups: &[(String, NodeCgroup)],
    clients: &[&LabPod],
    svc: &ServiceSpec,
) {
    let backends = backend_names(layout, svc);
    let tcp_frontend = SocketAddrV4::new(svc.cluster_ip, svc.tcp_port);
    let udp_frontend = SocketAddrV4::new(svc.cluster_ip, svc.udp_port);
    for client in clients {
        let cgroup = cgroup_of(cgroups, &client.node);
        for (proto, frontend) in [("tcp", tcp_frontend), ("udp", udp_frontend)] {
            let what = format!("{} {proto}", client.name);
            let answers =
                probe_in(cgroup, &client.netns, proto, frontend, TRIES).expect("the probes");
            let answered = check_answers(&answers, frontend, Some(client.ip), &what);
            assert_eq!(answered, backends, "{what}: both backends");
        }
        for (proto, port) in [("tcp", 80), ("udp", 53)] {
            let refused = probe_in(
                cgroup,
                &client.netns,
                proto,
                SocketAddrV4::new(EMPTY_CLUSTER_IP, port),
                1,
            )
            .expect("a probe of the empty Service");
            assert_eq!(
                refused[0].errno,
                Some(libc::ECONNREFUSED),
                "{} {proto}: no backend, refused: {:?}",
                client.name,
                refused[0]
            );
        }
    }
}

/// The socket did every translation of [`clients_in_the_cgroups`]; the
/// per-packet path none.
fn the_socket_translated(layout: &LabLayout, before: &Before, clients: usize) {
    assert_eq!(
        per_packet_translations(layout),
        before.per_packet,
        "no connection of the cgroups' clients reached from_pod with the ClusterIP"
    );
    let n = u64::try_from(TRIES * clients).expect("small");
    assert!(
        socket_counter(layout, "connect_translated") - before.connects >= n,
        "every TCP query translated at connect"
    );
    assert!(
        socket_counter(layout, "sendmsg_translated") - before.sends >= n,
        "every datagram translated at sendmsg"
    );
    assert!(socket_counter(layout, "recvmsg_reversed") >= n);
    assert!(socket_counter(layout, "peername_reversed") >= n);
    assert!(
        socket_counter(layout, "no_backend") - before.refused
            >= 2 * u64::try_from(clients).expect("small"),
        "the empty Service's refusals counted"
    );
}

/// A process of the node itself (a hostNetwork pod: the node's netns, its
/// node's cgroup) reaches the ClusterIP and its own node's NodePorts, TCP
/// and UDP, and both backends answer: its connections are delivered
/// through `lo` or routed by the node and never cross a TC hook of
/// podnet's, so the socket is the only place that translates them.
fn the_node_itself_reaches_cluster_ips_and_its_node_ports(
    layout: &LabLayout,
    cgroups: &[(String, NodeCgroup)],
    svc: &ServiceSpec,
) {
    let backends = backend_names(layout, svc);
    for node in &layout.nodes {
        let cgroup = cgroup_of(cgroups, &node.name);
        for (proto, frontend) in [
            ("tcp", SocketAddrV4::new(svc.cluster_ip, svc.tcp_port)),
            ("udp", SocketAddrV4::new(svc.cluster_ip, svc.udp_port)),
            ("tcp", SocketAddrV4::new(node.node_ip, svc.node_port)),
            ("udp", SocketAddrV4::new(node.node_ip, svc.udp_node_port)),
        ] {
            let what = format!("{} itself, {proto} to {frontend}", node.name);
            let answers =
                probe_in(cgroup, &node.netns, proto, frontend, TRIES).expect("the probes");
            // Which of the node's addresses the backend sees is the
            // node's routing's choice: not checked.
            let answered = check_answers(&answers, frontend, None, &what);
            assert_eq!(answered, backends, "{what}: both backends");
        }
    }
}

/// A client outside the cgroups (a thread of this test in the pod's
/// netns) still has its connection translated per packet.
fn an_outsider_is_translated_per_packet(layout: &LabLayout, client: &LabPod, svc: &ServiceSpec) {
    let before = per_packet_translations(layout);
    let frontend = SocketAddrV4::new(svc.cluster_ip, svc.tcp_port);
    let (backend, seen_as) =
        tcp_query(&client.netns, frontend, Duration::from_secs(3)).expect("per-packet query");
    assert!(backend_names(layout, svc).contains(&backend));
    assert_eq!(*seen_as.ip(), client.ip);
    let moved: u64 = per_packet_translations(layout)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .sum();
    assert!(moved >= 1, "the per-packet path translated the outsider");
}

/// A restart with the flag replaces the links: still four programs on
/// the cgroup, still translating.
fn a_restart_replaces_the_links(
    layout: &mut LabLayout,
    (node, cgroup): &(String, NodeCgroup),
    svc: &ServiceSpec,
) {
    attach_agents(layout, &[(node.as_str(), cgroup.path())]).expect("agent restarted");
    // The old links go when their pins do (the kernel may free them a
    // moment later).
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut names = attached(cgroup);
    while names.len() != 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        names = attached(cgroup);
    }
    assert_eq!(
        names.len(),
        4,
        "{node}: links replaced, not added: {names:?}"
    );
    let client = layout
        .pods
        .iter()
        .find(|p| &p.node == node && !svc.backends.contains(&p.ip))
        .expect("a client on the restarted node");
    let frontend = SocketAddrV4::new(svc.cluster_ip, svc.tcp_port);
    let after_restart =
        probe_in(cgroup, &client.netns, "tcp", frontend, 1).expect("a probe after the restart");
    assert_eq!(after_restart[0].peer, Some(frontend), "{after_restart:?}");
}

#[test]
fn cluster_ips_translated_at_the_socket() {
    if !privileged("cluster_ips_translated_at_the_socket") {
        return;
    }
    let mut lab = LabGuard::up_with(
        "ssl",
        2,
        2,
        "vxlan",
        LabDatastore::File,
        LabOptions {
            service: Some(ServiceKind::Datapath),
            ..LabOptions::default()
        },
    )
    .expect("lab up with the demo Service as objects");
    let cgroups = cgroups_with_the_socket_lb(&mut lab.layout);
    let layout = &lab.layout;
    let svc: ServiceSpec = layout.service.clone().expect("the demo Service");
    let clients: Vec<&LabPod> = layout
        .pods
        .iter()
        .filter(|p| !svc.backends.contains(&p.ip))
        .collect();
    // The Service is in the maps (asked per packet, from outside the
    // cgroups: before the counters are read).
    wait_for_the_service(
        &clients[0].netns,
        SocketAddrV4::new(svc.cluster_ip, svc.tcp_port),
    );
    layout
        .apply_objects(&[empty_service()])
        .expect("the Service without endpoints");
    for client in &clients {
        let answer = wait_for_the_empty_frontend(cgroup_of(&cgroups, &client.node), &client.netns);
        assert_eq!(
            answer.errno,
            Some(libc::ECONNREFUSED),
            "{}: a connect to a Service without backends is refused: {answer:?}",
            client.name
        );
    }
    let before = Before::read(layout);
    clients_in_the_cgroups(layout, &cgroups, &clients, &svc);
    the_socket_translated(layout, &before, clients.len());
    the_node_itself_reaches_cluster_ips_and_its_node_ports(layout, &cgroups, &svc);
    an_outsider_is_translated_per_packet(layout, clients[0], &svc);
    a_restart_replaces_the_links(&mut lab.layout, &cgroups[0], &svc);

    drop(lab);
    for (node, cgroup) in cgroups {
        cgroup
            .remove()
            .unwrap_or_else(|e| panic!("{node}'s cgroup removed: {e:#}"));
    }
}
