//! Services translated by podnet's datapath (`--services bpf`), on the lab
//! with no kube-proxy rules at all: the demo Service and its EndpointSlice
//! are cluster objects in the datastore, every agent fills its Service
//! maps from them, and from_pod translates. Every pod that is not a
//! backend reaches the ClusterIP over TCP and UDP, both backends (one on
//! its node, one on the other) answer, each sees the client's own address,
//! and the client sees the answers come from the ClusterIP (its sockets
//! are connected to it). In vxlan and in direct mode.
//!
//! NodePorts too: the fabric host (outside the cluster) reaches the demo
//! Service's NodePorts (TCP and UDP) on every node's address and is
//! answered by both backends, the one on the node it dialled seeing the client's address
//! and the other the node's (SNAT); a pod reaches its own node's NodePort;
//! an `externalTrafficPolicy: Local` NodePort answers only on the node
//! with a backend, which sees the client's address.
//!
//! Hairpin: a backend reaching a Service (ClusterIP over TCP and UDP, and
//! its node's NodePort) whose only endpoint is itself is answered by
//! itself, which sees the hairpin source address.
//!
//! ICMP errors: a UDP NodePort whose backend has no socket on its target
//! port is refused on every node (the backend's or another, which SNATs):
//! the backend's port unreachable reaches the fabric host about the
//! NodePort, and its connected socket fails with `ECONNREFUSED`.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use podnet_common::{DropReason, Verdict, service::HAIRPIN_SOURCE};
use podnet_tests::{
    lab::{self, LabDatastore, LabGuard, LabLayout, LabOptions, ServiceKind},
    privileged,
    services::{
        ServiceSpec, backend_name, backend_names, clients_reach_the_service, query_all, tcp_query,
        wait_for_the_service,
    },
};

fn services_in_the_datapath(tag: &str, mode: &str) {
    let lab = LabGuard::up_with(
        tag,
        2,
        2,
        mode,
        LabDatastore::File,
        LabOptions {
            service: Some(ServiceKind::Datapath),
            ..LabOptions::default()
        },
    )
    .expect("lab up with the demo Service as objects");
    let svc = lab.layout.service.clone().expect("the demo Service");
    // No node has a rule for the ClusterIP: whatever reaches it is
    // podnet's doing.
    for node in &lab.layout.nodes {
        for tool in ["iptables-save", "nft"] {
            let mut cmd = lab::in_netns(&node.netns, tool).expect("command");
            if tool == "nft" {
                cmd.args(["list", "ruleset"]);
            }
            let rules = cmd.output().expect(tool);
            assert!(
                !String::from_utf8_lossy(&rules.stdout).contains(&svc.cluster_ip.to_string()),
                "{}: {tool} has a rule for the ClusterIP",
                node.name
            );
        }
    }
    // The maps are filled within a second of the apply.
    let client = lab
        .layout
        .pods
        .iter()
        .find(|p| !svc.backends.contains(&p.ip))
        .expect("a client pod");
    wait_for_the_service(
        &client.netns,
        std::net::SocketAddrV4::new(svc.cluster_ip, svc.tcp_port),
    );
    clients_reach_the_service(&lab.layout);
    node_ports_reach_every_backend(&lab.layout, &svc);
    a_local_node_port_answers_only_where_its_backend_is(&lab.layout, &svc);
    a_backend_that_draws_itself_answers_itself(&lab.layout, &svc);
    a_closed_node_port_is_refused_by_the_backends_icmp_error(&lab.layout, &svc);
    explain_names_the_translation(&lab.layout, client, &svc);
    a_udp_flow_follows_its_backend_away(&lab.layout, client, &svc);
    for node in &lab.layout.nodes {
        let translated =
            podnet_tests::counters::read(&node.agent_socket, Verdict::ServiceTranslated);
        assert!(
            translated > 0,
            "{}: its pods' connections were translated in the datapath",
            node.name
        );
    }
}

#[test]
fn cluster_ips_in_the_datapath_vxlan() {
    if !privileged("cluster_ips_in_the_datapath_vxlan") {
        return;
    }
    services_in_the_datapath("sbv", "vxlan");
}

#[test]
fn cluster_ips_in_the_datapath_direct() {
    if !privileged("cluster_ips_in_the_datapath_direct") {
        return;
    }
    services_in_the_datapath("sbd", "direct");
}

/// `podnetctl explain` to the ClusterIP names the Service, the frontend and
/// the backend it follows, and where that backend is.
fn explain_names_the_translation(
    layout: &podnet_tests::lab::LabLayout,
    client: &podnet_tests::lab::LabPod,
    svc: &podnet_tests::services::ServiceSpec,
) {
    let node = layout.node(&client.node).expect("the client's node");
    let to = format!("{}:{}", svc.cluster_ip, svc.tcp_port);
    let out = std::process::Command::new(podnet_tests::bins::binary("podnetctl"))
        .arg("--socket")
        .arg(&node.agent_socket)
        .args([
            "--json",
            "explain",
            "--from",
            &client.container_id,
            "--to",
            &to,
        ])
        .output()
        .expect("podnetctl explain");
    assert!(
        out.status.success(),
        "podnetctl explain {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let service = &answer["service"];
    assert_eq!(service["service"], "default/demo", "{answer}");
    assert_eq!(service["frontend"], format!("{to}/tcp"), "{answer}");
    let backend = service["backend"].as_str().expect("a backend");
    let backends: Vec<String> = svc
        .backends
        .iter()
        .map(|ip| format!("{ip}:{}", svc.target_tcp_port))
        .collect();
    assert!(backends.iter().any(|b| b == backend), "{answer}");
    assert_eq!(
        service["backends"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    // The backend followed is on the client's node or the other one: the
    // run says which, as for a pod address.
    let same_node = layout
        .pods
        .iter()
        .any(|p| p.node == client.node && backend.starts_with(&format!("{}:", p.ip)));
    let verdict = answer["verdict"].as_str().unwrap_or_default();
    if same_node {
        assert_eq!(verdict, "redirect_peer", "{answer}");
    } else {
        assert!(
            ["vxlan_encap_bpf", "vxlan_encap", "redirect_neigh"].contains(&verdict),
            "{answer}"
        );
    }
}

/// kubernetes/kubernetes#59368: a client keeps sending on one UDP 5-tuple
/// while its backend leaves the Service. Its datagrams must reach a live
/// backend within a moment, not the one that left, as long as it keeps
/// sending.
fn a_udp_flow_follows_its_backend_away(
    layout: &podnet_tests::lab::LabLayout,
    client: &podnet_tests::lab::LabPod,
    svc: &podnet_tests::services::ServiceSpec,
) {
    let flow = podnet_tests::services::udp_session(
        &client.netns,
        std::net::SocketAddrV4::new(svc.cluster_ip, svc.udp_port),
    )
    .expect("a UDP flow");
    let first = flow.ask().expect("the flow's first answer");
    let leaving = layout
        .pods
        .iter()
        .find(|p| p.name == first)
        .expect("the backend that answered");
    let staying: Vec<_> = layout
        .pods
        .iter()
        .filter(|p| svc.backends.contains(&p.ip) && p.ip != leaving.ip)
        .collect();
    let remaining = podnet_tests::services::ServiceSpec {
        backends: staying.iter().map(|p| p.ip).collect(),
        ..svc.clone()
    };
    let nodes: Vec<String> = staying.iter().map(|p| p.node.clone()).collect();
    layout
        .apply_objects(&podnet_tests::services::demo_service_objects(
            &remaining, &nodes,
        ))
        .expect("the EndpointSlice without the backend that answered");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let answer = flow.ask().expect("the flow keeps being answered");
        if staying.iter().any(|p| p.name == answer) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 5 s the flow still reaches {answer}, which left the Service"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The fabric host reaches the NodePort on every node and both backends
/// answer: the one on the node dialled sees the fabric host's address (no
/// SNAT for a local backend), the other sees the dialled node's (SNAT, so
/// that its replies come back through that node). A pod reaches its own
/// node's NodePort, and both backends see the pod.
fn node_ports_reach_every_backend(layout: &LabLayout, svc: &ServiceSpec) {
    let backends = backend_names(layout, svc);
    for node in &layout.nodes {
        for (port, udp) in [(svc.node_port, false), (svc.udp_node_port, true)] {
            let addr = SocketAddrV4::new(node.node_ip, port);
            let seen = query_all(&layout.fabric_netns, addr, udp);
            fabric_host_reached_both_backends(layout, node, &backends, &seen, addr);
        }
        assert!(
            podnet_tests::counters::read(&node.agent_socket, Verdict::NodePortSnat) > 0,
            "{}: connections to the other node's backend were SNATed",
            node.name
        );
        assert!(
            podnet_tests::counters::read(&node.agent_socket, Verdict::ToNodePortClient) > 0,
            "{}: replies left for the fabric host past the stack",
            node.name
        );
    }
    let client = layout
        .pods
        .iter()
        .find(|p| !svc.backends.contains(&p.ip))
        .expect("a pod that is not a backend");
    let own_node = layout.node(&client.node).expect("the client's node");
    let seen = query_all(
        &client.netns,
        SocketAddrV4::new(own_node.node_ip, svc.node_port),
        false,
    );
    let answered: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(
        answered, backends,
        "{} -> its own node's NodePort",
        client.name
    );
    for (backend, sources) in &seen {
        assert_eq!(
            sources,
            &BTreeSet::from([client.ip]),
            "{backend} saw {}",
            client.name
        );
    }
}

/// The fabric host's queries to `addr` (a NodePort of `node`) were
/// answered by every one of `backends`: the one on `node` saw the fabric
/// host's address (no SNAT for a local backend), the other `node`'s.
fn fabric_host_reached_both_backends(
    layout: &LabLayout,
    node: &podnet_tests::lab::LabNode,
    backends: &BTreeSet<String>,
    seen: &std::collections::BTreeMap<String, BTreeSet<std::net::Ipv4Addr>>,
    addr: SocketAddrV4,
) {
    let answered: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(&answered, backends, "fabric host -> {addr}");
    for (backend, sources) in seen {
        let on_this_node = layout
            .pods
            .iter()
            .any(|p| &p.name == backend && p.node == node.name);
        let expected = if on_this_node {
            layout.fabric_host
        } else {
            node.node_ip
        };
        assert_eq!(
            sources,
            &BTreeSet::from([expected]),
            "{backend} (on {} the node dialled: {on_this_node}) saw the client {addr}'s queries from",
            node.name
        );
    }
}

/// A NodePort with `externalTrafficPolicy: Local` whose only endpoint is
/// the first backend: its node answers with it, which sees the fabric
/// host's own address; the other node answers nothing and counts the
/// refused connections (`service_no_backend`), as kube-proxy's rules drop
/// them.
fn a_local_node_port_answers_only_where_its_backend_is(layout: &LabLayout, svc: &ServiceSpec) {
    const LOCAL_NODE_PORT: u16 = 30_081;
    let backend_ip = svc.backends[0];
    let backend = backend_name(layout, backend_ip);
    let backend_node = node_of(layout, backend_ip);
    layout
        .apply_objects(&one_endpoint_service(
            "demo-local",
            "10.96.0.11",
            &[ServicePort {
                name: "http",
                protocol: "TCP",
                port: svc.tcp_port,
                target_port: svc.target_tcp_port,
                node_port: Some(LOCAL_NODE_PORT),
            }],
            Some("Local"),
            (backend_ip, &backend_node),
        ))
        .expect("apply the Local NodePort");
    for node in &layout.nodes {
        let addr = SocketAddrV4::new(node.node_ip, LOCAL_NODE_PORT);
        if node.name == backend_node {
            wait_for_the_service(&layout.fabric_netns, addr);
            let seen = query_all(&layout.fabric_netns, addr, false);
            let answered: BTreeSet<String> = seen.keys().cloned().collect();
            assert_eq!(
                answered,
                BTreeSet::from([backend.clone()]),
                "fabric host -> {addr}"
            );
            assert_eq!(
                seen.get(&backend),
                Some(&BTreeSet::from([layout.fabric_host])),
                "{backend} saw the fabric host's own address"
            );
        } else {
            let refused_before =
                podnet_tests::counters::read(&node.agent_socket, DropReason::ServiceNoBackend);
            // Until the maps have the frontend, the stack answers with an
            // RST; from then on nothing answers.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let answer = tcp_query(&layout.fabric_netns, addr, Duration::from_millis(500));
                if answer.is_err()
                    && podnet_tests::counters::read(
                        &node.agent_socket,
                        DropReason::ServiceNoBackend,
                    ) > refused_before
                {
                    break;
                }
                assert!(
                    answer.is_err(),
                    "{addr} answered ({answer:?}) on a node without a backend"
                );
                assert!(
                    Instant::now() < deadline,
                    "{addr} was never refused by the datapath"
                );
            }
        }
    }
}

/// Hairpin: a Service whose only endpoint is the first backend, reached
/// from that backend itself, on its ClusterIP over TCP and UDP and on its
/// own node's NodePort: every query is answered, by the backend itself,
/// which sees the hairpin source (its own address would be dropped as a
/// martian on its eth0, and its reply would never leave its loopback).
fn a_backend_that_draws_itself_answers_itself(layout: &LabLayout, svc: &ServiceSpec) {
    const SELF_CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 12);
    const SELF_NODE_PORT: u16 = 30_082;
    let backend_ip = svc.backends[0];
    let backend = layout
        .pods
        .iter()
        .find(|p| p.ip == backend_ip)
        .expect("the backend pod");
    let node = layout.node(&backend.node).expect("the backend's node");
    layout
        .apply_objects(&one_endpoint_service(
            "demo-self",
            &SELF_CLUSTER_IP.to_string(),
            &[
                ServicePort {
                    name: "http",
                    protocol: "TCP",
                    port: svc.tcp_port,
                    target_port: svc.target_tcp_port,
                    node_port: Some(SELF_NODE_PORT),
                },
                ServicePort {
                    name: "dns",
                    protocol: "UDP",
                    port: svc.udp_port,
                    target_port: svc.target_udp_port,
                    node_port: None,
                },
            ],
            None,
            (backend_ip, &backend.node),
        ))
        .expect("apply the Service of one backend");
    let hairpin = std::net::Ipv4Addr::from(HAIRPIN_SOURCE);
    let before = podnet_tests::counters::read(&node.agent_socket, Verdict::ServiceHairpin);
    let tcp = SocketAddrV4::new(SELF_CLUSTER_IP, svc.tcp_port);
    wait_for_the_service(&backend.netns, tcp);
    for (addr, udp) in [
        (tcp, false),
        (SocketAddrV4::new(SELF_CLUSTER_IP, svc.udp_port), true),
        (SocketAddrV4::new(node.node_ip, SELF_NODE_PORT), false),
    ] {
        let seen = query_all(&backend.netns, addr, udp);
        assert_eq!(
            seen,
            std::collections::BTreeMap::from([(backend.name.clone(), BTreeSet::from([hairpin]))]),
            "{} -> {addr} ({}): answered by itself, from the hairpin source",
            backend.name,
            if udp { "UDP" } else { "TCP" }
        );
    }
    assert!(
        podnet_tests::counters::read(&node.agent_socket, Verdict::ServiceHairpin) > before,
        "{}: service_hairpin counted",
        node.name
    );
}

/// A UDP NodePort (its one endpoint the first backend) whose target port
/// nothing listens on: the backend's kernel answers the fabric host's
/// datagram with port unreachable, which must leave the node dialled
/// about the NodePort, or the fabric host's socket never hears of it. On
/// the backend's node the error is the local backend's reply (from_pod);
/// on the other node it comes back to the SNAT address, from the other
/// node (from_overlay or from_underlay), and is made the client's again.
fn a_closed_node_port_is_refused_by_the_backends_icmp_error(layout: &LabLayout, svc: &ServiceSpec) {
    const CLOSED_NODE_PORT: u16 = 30_054;
    const CLOSED_TARGET_PORT: u16 = 5_999;
    let backend_ip = svc.backends[0];
    let backend_node = node_of(layout, backend_ip);
    layout
        .apply_objects(&one_endpoint_service(
            "demo-closed",
            "10.96.0.13",
            &[ServicePort {
                name: "dns",
                protocol: "UDP",
                port: 53,
                target_port: CLOSED_TARGET_PORT,
                node_port: Some(CLOSED_NODE_PORT),
            }],
            None,
            (backend_ip, &backend_node),
        ))
        .expect("apply the closed NodePort");
    for node in &layout.nodes {
        let addr = SocketAddrV4::new(node.node_ip, CLOSED_NODE_PORT);
        // Until the agent has the frontend, the node's own stack refuses
        // the datagram; from then on the backend does. Both say
        // ECONNREFUSED, so the refusal must come with the backend's port
        // unreachable counted as a packet for a NodePort client.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before =
                podnet_tests::counters::read(&node.agent_socket, Verdict::ToNodePortClient);
            let outcome = podnet_tests::netns::run_in(&layout.fabric_netns, move || {
                let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
                socket.connect(addr)?;
                socket.set_read_timeout(Some(Duration::from_millis(500)))?;
                socket.send(b"anyone?")?;
                let mut buf = [0u8; 64];
                socket.recv(&mut buf).map(|_| ())
            })
            .expect("run in the fabric netns");
            let refused =
                matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
            let translated =
                podnet_tests::counters::read(&node.agent_socket, Verdict::ToNodePortClient)
                    > before;
            if refused && translated {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fabric host -> {addr}/udp (on {}; nothing listens behind it on {backend_node}): \
                 {outcome:?}, the backend's port unreachable translated: {translated}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A port of [`one_endpoint_service`].
struct ServicePort {
    name: &'static str,
    protocol: &'static str,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
}

/// A NodePort Service `name` at `cluster_ip` with `ports` (its
/// `externalTrafficPolicy` when given) and its EndpointSlice of one ready
/// endpoint, `endpoint`'s address on its node.
fn one_endpoint_service(
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    external_traffic_policy: Option<&str>,
    endpoint: (std::net::Ipv4Addr, &str),
) -> [serde_json::Value; 2] {
    let service_ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| {
            let mut port = serde_json::json!({"name": p.name, "protocol": p.protocol,
                "port": p.port, "targetPort": p.target_port});
            if let Some(node_port) = p.node_port {
                port["nodePort"] = node_port.into();
            }
            port
        })
        .collect();
    let slice_ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "protocol": p.protocol, "port": p.target_port}))
        .collect();
    let mut spec = serde_json::json!({
        "type": "NodePort",
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ports": service_ports,
    });
    if let Some(policy) = external_traffic_policy {
        spec["externalTrafficPolicy"] = policy.into();
    }
    [
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }),
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [endpoint.0.to_string()],
                           "conditions": {"ready": true},
                           "nodeName": endpoint.1}],
            "ports": slice_ports,
        }),
    ]
}

/// The name of the node the pod with `ip` runs on.
fn node_of(layout: &LabLayout, ip: std::net::Ipv4Addr) -> String {
    layout
        .pods
        .iter()
        .find(|p| p.ip == ip)
        .map(|p| p.node.clone())
        .expect("the pod's node")
}
