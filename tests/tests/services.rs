//! Services and every other NAT on a node, from pods, on the lab: the
//! Service rules as kube-proxy's iptables mode writes them and as a plain
//! nftables DNAT, ClusterIP over TCP and UDP with backends on the client's
//! node and on the other node (vxlan and direct), hairpin, NodePort, a
//! hostPort through the reference portmap plugin, a Service connection
//! across agent restarts, and plain pod-to-pod traffic still on the fast
//! path. The replies of every such flow must pass the node that translated
//! it (see `podnet-ebpf/src/flows.rs`); without that they reach the client
//! from the backend's own address and are dropped.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use podnet_common::Verdict;
use podnet_tests::{
    lab::{self, LabDatastore, LabGuard, LabLayout, LabNode, LabPod, ServiceKind},
    privileged,
    services::{
        self, QUERY_TIMEOUT, ServiceSessions, ServiceSpec, backend_name, backend_names,
        clients_reach_the_service, query_all, wait_for_the_service,
    },
    traffic,
};
use serde_json::{Value, json};

/// `verdict`'s counter on `node`; a counter the agent does not report fails
/// the test.
fn counter(node: &LabNode, verdict: Verdict) -> u64 {
    podnet_tests::counters::read(&node.agent_socket, verdict)
}

fn pod<'a>(layout: &'a LabLayout, name: &str) -> &'a LabPod {
    layout
        .pods
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

fn node<'a>(layout: &'a LabLayout, name: &str) -> &'a LabNode {
    layout
        .node(name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn service(layout: &LabLayout) -> ServiceSpec {
    layout.service.clone().expect("the lab has its Service")
}

/// The backend pod itself reaches the Service; when the Service picks it,
/// kube-proxy's hairpin masquerade makes it see the node's address.
fn hairpin(layout: &LabLayout) {
    let svc = service(layout);
    let me = pod(layout, &backend_name(layout, svc.backends[0])).clone();
    let seen = query_all(
        &me.netns,
        SocketAddrV4::new(svc.cluster_ip, svc.tcp_port),
        false,
    );
    let own = seen
        .get(&me.name)
        .unwrap_or_else(|| panic!("{} never reached itself: {seen:?}", me.name));
    let node_ip = node(layout, &me.node).node_ip;
    assert_eq!(
        own,
        &BTreeSet::from([node_ip]),
        "hairpin traffic is masqueraded to the node (KUBE-MARK-MASQ)"
    );
}

/// A host outside the cluster reaches every node's NodePort, and the
/// NodePort reaches both backends; a pod reaches its own node's NodePort.
fn node_ports(layout: &LabLayout) {
    let svc = service(layout);
    let backends = backend_names(layout, &svc);
    for n in &layout.nodes {
        let addr = SocketAddrV4::new(n.node_ip, svc.node_port);
        let seen = query_all(&layout.fabric_netns, addr, false);
        let answered: BTreeSet<String> = seen.keys().cloned().collect();
        assert_eq!(answered, backends, "fabric host -> {addr}");
    }
    let client = layout
        .pods
        .iter()
        .find(|p| !svc.backends.contains(&p.ip))
        .expect("a pod that is not a backend");
    let own_node = node(layout, &client.node).node_ip;
    let seen = query_all(
        &client.netns,
        SocketAddrV4::new(own_node, svc.node_port),
        false,
    );
    let answered: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(
        answered, backends,
        "{} -> its own node's NodePort",
        client.name
    );
}

/// Plain pod-to-pod traffic, same node and cross node, is forwarded by the
/// fast path and never tracked or handed to the stack.
fn pod_to_pod_stays_on_the_fast_path(layout: &LabLayout, cross_verdict: Verdict) {
    let (n1, n2) = (node(layout, "node1"), node(layout, "node2"));
    let a = pod(layout, "node1-pod2");
    let same = pod(layout, "node1-pod1");
    let cross = pod(layout, "node2-pod2");
    let stack_counters = || -> Vec<(u64, u64)> {
        [n1, n2]
            .iter()
            .map(|n| {
                (
                    counter(n, Verdict::StackFlow),
                    counter(n, Verdict::StackFlowTracked),
                )
            })
            .collect()
    };
    // The Service flows of the parts before may still send a last packet
    // (a FIN's ACK, a retransmission) through the stack: start counting
    // once the stack-flow counters held still for a second, so that what
    // moves them below is this part's pod-to-pod traffic alone.
    let mut before = stack_counters();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = stack_counters();
        if now == before {
            break;
        }
        before = now;
    }
    let (peer_before, cross_before) = (
        counter(n1, Verdict::RedirectPeer),
        counter(n1, cross_verdict),
    );
    traffic::transfer(&a.netns, &same.netns, same.ip, 16 << 20).expect("TCP same node");
    traffic::transfer(&a.netns, &cross.netns, cross.ip, 16 << 20).expect("TCP cross node");
    traffic::transfer(&cross.netns, &a.netns, a.ip, 16 << 20).expect("TCP cross node back");
    // 16 MiB is a few hundred GSO packets each way.
    assert!(
        counter(n1, Verdict::RedirectPeer) - peer_before > 100,
        "same node: redirect_peer"
    );
    assert!(
        counter(n1, cross_verdict) - cross_before > 100,
        "cross node: {cross_verdict:?}"
    );
    let after = stack_counters();
    assert_eq!(
        before, after,
        "no pod-to-pod packet was tracked or handed to the stack (stack_flow, stack_flow_tracked per node)"
    );
}

/// A UDP request through a DNAT to a port nobody listens on: the backend's
/// ICMP port unreachable names the translated flow; it must go through the
/// client node's stack too, where conntrack translates the embedded header
/// back, so the client's connected socket sees the refusal (instead of an
/// ICMP error about a flow it never had, which the kernel ignores).
fn icmp_errors_follow_the_flow(layout: &LabLayout) {
    let client = pod(layout, "node1-pod2");
    let client_node = node(layout, &client.node);
    let closed_port: u16 = 9_999;
    for (i, backend) in ["node1-pod1", "node2-pod1"].into_iter().enumerate() {
        let backend_ip = pod(layout, backend).ip;
        let vip = Ipv4Addr::new(10, 96, 1, u8::try_from(10 + i).expect("small"));
        let rules = format!(
            "table ip icmptest {{\n chain pre {{\n type nat hook prerouting priority dstnat;\n \
             ip daddr {vip} udp dport {closed_port} dnat to {backend_ip}\n }}\n}}\n"
        );
        let mut nft = lab::in_netns(&client_node.netns, "nft").expect("command");
        nft.args(["-f", "-"]);
        services::feed(nft, &rules).expect("nft rules");
        let refused = lab::on_netns_thread(&client.netns, move || {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(SocketAddrV4::new(vip, closed_port))?;
            socket.set_read_timeout(Some(QUERY_TIMEOUT))?;
            socket.send(b"anyone there?")?;
            let mut buf = [0u8; 64];
            Ok::<_, std::io::Error>(socket.recv(&mut buf).map_err(|e| e.kind()))
        })
        .expect("netns thread")
        .expect("UDP socket");
        assert_eq!(
            refused,
            Err(std::io::ErrorKind::ConnectionRefused),
            "the port unreachable from {backend} reached the client as a refusal"
        );
        let status = lab::in_netns(&client_node.netns, "nft")
            .expect("command")
            .args(["delete", "table", "ip", "icmptest"])
            .status()
            .expect("nft");
        assert!(status.success());
    }
}

fn services_in_mode(tag: &str, mode: &str, cross_verdict: Verdict) {
    services_in_mode_with(tag, mode, cross_verdict, &[]);
}

/// [`services_in_mode`] with agents started with `agent_args` as well.
fn services_in_mode_with(tag: &str, mode: &str, cross_verdict: Verdict, agent_args: &[&str]) {
    let mut lab = LabGuard::up_with(
        tag,
        2,
        2,
        mode,
        LabDatastore::File,
        lab::LabOptions {
            service: Some(ServiceKind::KubeProxyIptables),
            agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
            ..lab::LabOptions::default()
        },
    )
    .expect("lab up with the demo Service");
    // Loose reverse-path filtering, as systemd and Ubuntu set it on nodes.
    for n in &lab.layout.nodes {
        let status = lab::in_netns(&n.netns, "sysctl")
            .expect("command")
            .args(["-qw", "net.ipv4.conf.all.rp_filter=2"])
            .status()
            .expect("sysctl");
        assert!(status.success(), "rp_filter on {}", n.name);
    }
    let probes = lab::check(&lab.layout).expect("check");
    assert!(probes.iter().all(|p| p.ok), "{}", lab::render(&probes));

    // kube-proxy's iptables mode.
    clients_reach_the_service(&lab.layout);
    hairpin(&lab.layout);
    node_ports(&lab.layout);
    for n in &lab.layout.nodes {
        assert!(
            counter(n, Verdict::StackFlow) > 0,
            "{}: Service replies were handed to the stack",
            n.name
        );
    }

    // The same Service as a plain nftables DNAT.
    lab.layout
        .install_service(ServiceKind::Nftables)
        .expect("nftables Service");
    clients_reach_the_service(&lab.layout);
    icmp_errors_follow_the_flow(&lab.layout);

    pod_to_pod_stays_on_the_fast_path(&lab.layout, cross_verdict);
}

#[test]
fn services_and_node_ports_vxlan() {
    if !privileged("services_and_node_ports_vxlan") {
        return;
    }
    services_in_mode("svx", "vxlan", Verdict::VxlanEncapBpf);
}

/// The default (bpf) VXLAN datapath above must still let a Service flow's
/// replies meet conntrack (from_underlay leaves VXLAN of flows the stack
/// tracked to the VXLAN device, see `flows`); the device's datapath here.
#[test]
fn services_and_node_ports_vxlan_kernel() {
    if !privileged("services_and_node_ports_vxlan_kernel") {
        return;
    }
    services_in_mode_with(
        "svk",
        "vxlan",
        Verdict::VxlanEncap,
        &["--vxlan-datapath", "kernel"],
    );
}

#[test]
fn services_and_node_ports_direct() {
    if !privileged("services_and_node_ports_direct") {
        return;
    }
    services_in_mode("sdr", "direct", Verdict::RedirectNeigh);
}

/// A connection to a Service (backend on the other node) keeps working
/// while both agents restart: the flow state is pinned, the filters stay on
/// the veths and the node devices' links are re-pointed, never removed.
#[test]
fn a_service_connection_survives_agent_restarts() {
    if !privileged("a_service_connection_survives_agent_restarts") {
        return;
    }
    service_connections_survive_agent_restarts("srs", ServiceKind::KubeProxyIptables);
}

/// The same with podnet translating the Service (`--services bpf`): the
/// connection table and the Service maps are pinned, and a restarted
/// agent rewrites the maps make-before-break, so no connection breaks and
/// none moves to another backend, TCP or UDP.
#[test]
fn a_translated_service_connection_survives_agent_restarts() {
    if !privileged("a_translated_service_connection_survives_agent_restarts") {
        return;
    }
    service_connections_survive_agent_restarts("srb", ServiceKind::Datapath);
}

/// Sessions from one pod to both backends of the demo Service (TCP, and a
/// UDP flow with a fixed 5-tuple) keep working and keep their backend
/// while each agent is stopped and started again, three rounds.
fn service_connections_survive_agent_restarts(tag: &str, kind: ServiceKind) {
    let mut lab = LabGuard::up_with_service(tag, 2, 2, "vxlan", LabDatastore::File, kind)
        .expect("lab up with the demo Service");
    let svc = service(&lab.layout);
    let client = pod(&lab.layout, "node1-pod2").clone();
    wait_for_the_service(
        &client.netns,
        SocketAddrV4::new(svc.cluster_ip, svc.tcp_port),
    );
    let mut sessions = ServiceSessions::to_cluster_ip(&lab.layout, &client.name).expect("sessions");
    for round in 0..3 {
        for name in ["node1", "node2"] {
            lab.layout.stop_agent(name).expect("stop agent");
            sessions
                .check(&format!("with {name}'s agent down, round {round}"))
                .unwrap_or_else(|e| panic!("{e:#}"));
            lab.layout.start_agent(name).expect("start agent");
            sessions
                .check(&format!("after {name}'s restart, round {round}"))
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
}

/// A hostPort through the reference portmap plugin chained after podnet:
/// another pod on the node and a host outside the cluster reach the pod at
/// the node's IP and the host port.
#[test]
fn host_port_through_portmap() {
    if !privileged("host_port_through_portmap") {
        return;
    }
    let mut lab = LabGuard::up("hpt", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let n1 = node(&lab.layout, "node1").clone();
    let host_port: u16 = 18_080;
    let target_port: u16 = 8080;
    let pod = add_pod_with_host_port(&mut lab.layout, &n1, "hp", host_port, target_port);
    let svc = services::demo_service(vec![pod.ip]);
    lab.layout
        .start_server(&pod, &svc)
        .expect("server in the hostPort pod");

    let addr = SocketAddrV4::new(n1.node_ip, host_port);
    for from in [
        pod_ns(&lab.layout, "node1-pod1"),
        pod_ns(&lab.layout, "node2-pod1"),
        lab.layout.fabric_netns.clone(),
    ] {
        let (backend, _) = services::tcp_query(&from, addr, QUERY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{from} -> hostPort {addr}: {e:#}"));
        assert_eq!(backend, pod.name, "{from} reached the hostPort pod");
    }
    assert!(
        counter(&n1, Verdict::StackFlow) > 0,
        "replies went to the stack"
    );
}

fn pod_ns(layout: &LabLayout, name: &str) -> String {
    pod(layout, name).netns.clone()
}

/// Creates pod `name` on `node` as a runtime does with the conflist
/// podnet + portmap: podnet's ADD, then portmap's with podnet's result as
/// prevResult and the port mapping as runtimeConfig.
fn add_pod_with_host_port(
    layout: &mut LabLayout,
    node: &LabNode,
    name: &str,
    host_port: u16,
    container_port: u16,
) -> LabPod {
    let pod = layout.add_pod(&node.name, name).expect("podnet ADD");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": pod.ifname, "sandbox": format!("/var/run/netns/{}", pod.netns)}],
        "ips": [{"address": format!("{}/32", pod.ip), "interface": 0}],
    });
    let conf: Value = json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": host_port, "containerPort": container_port, "protocol": "tcp"}
        ]},
        "prevResult": prev,
    });
    let out = podnet_tests::run_cni_plugin(
        lab::in_netns(&node.netns, "/usr/lib/cni/portmap").expect("command"),
        "/usr/lib/cni",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &pod.container_id),
            ("CNI_NETNS", &format!("/var/run/netns/{}", pod.netns)),
            ("CNI_IFNAME", &pod.ifname),
        ],
        conf.to_string().as_bytes(),
    )
    .expect("run portmap");
    assert!(
        out.status.success(),
        "portmap ADD: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pod
}
