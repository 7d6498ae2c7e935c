//! The compiler's rules, one case each, and the frontend ids.

use std::{collections::BTreeSet, net::Ipv4Addr};

use podnet_common::service::SERVICE_PORT_WORDS;

use super::*;
use crate::model::cluster::{ClusterModel, decode};

const NODE: &str = "node-1";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

fn model(yaml: &str) -> ClusterModel {
    let mut model = ClusterModel::new();
    model.replace_all(decode(yaml).expect("decodes"), 1);
    model
}

fn plan(yaml: &str) -> ServicePlan {
    compile(&model(yaml), NODE, Some(NODE_IP))
}

/// Service `web` in `x` with ClusterIP 10.96.0.10 and `extra` spec lines
/// (indented two spaces) after its ports.
fn service(ports: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\nspec:\n  clusterIP: {CLUSTER_IP}\n  ports: [{ports}]\n{extra}---\n"
    )
}

/// An EndpointSlice of `web` with `ports` and `endpoints` (flow YAML).
fn slice(name: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: x, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{ports}]\nendpoints: [{endpoints}]\n---\n"
    )
}

fn frontend(port: u16, protocol: u8) -> Frontend {
    Frontend {
        address: CLUSTER_IP,
        port,
        protocol,
    }
}

fn backend(last: u8, port: u16) -> BackendAddress {
    BackendAddress {
        address: Ipv4Addr::new(10, 244, 0, last),
        port,
    }
}

fn backends_of(plan: &ServicePlan, port: u16, protocol: u8) -> Vec<BackendAddress> {
    plan.frontends.get(&frontend(port, protocol)).map_or_else(
        || panic!("no frontend {port}/{protocol}: {plan:?}"),
        |f| f.backends.clone(),
    )
}

#[test]
fn ready_endpoints_are_the_backends_and_absent_ready_means_ready() {
    let yaml = service("{port: 80, targetPort: 8080}", "")
        + &slice(
            "web-1",
            "{port: 8080}",
            "{addresses: [10.244.0.3]}, \
             {addresses: [10.244.0.1], conditions: {ready: true}}, \
             {addresses: [10.244.0.2], conditions: {ready: false}}",
        );
    let plan = plan(&yaml);
    assert_eq!(plan.frontends.len(), 1);
    let f = &plan.frontends[&frontend(80, 6)];
    assert_eq!(f.backends, [backend(1, 8080), backend(3, 8080)]);
    assert_eq!(f.service.to_string(), "x/web");
    assert_eq!(f.affinity_timeout_s, 0);
    assert_eq!(f.entry(7).backends, 2);
    assert_eq!(f.entry(7).id, 7);
}

#[test]
fn without_a_ready_endpoint_the_serving_terminating_ones_are_used() {
    let yaml = service("{port: 80}", "")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.1], conditions: {ready: false, serving: true, terminating: true}}, \
             {addresses: [10.244.0.2], conditions: {ready: false, terminating: true}}, \
             {addresses: [10.244.0.3], conditions: {ready: false, serving: false, terminating: true}}, \
             {addresses: [10.244.0.4], conditions: {ready: false, serving: true}}",
        );
    assert_eq!(
        backends_of(&plan(&yaml), 80, 6),
        [backend(1, 80), backend(2, 80)],
        "serving (or unsaid) and terminating; not serving or not terminating: out"
    );
    // One ready endpoint: the terminating ones are not used any more.
    let yaml = yaml.replace(
        "{addresses: [10.244.0.4], conditions: {ready: false, serving: true}}",
        "{addresses: [10.244.0.4], conditions: {ready: true}}",
    );
    assert_eq!(backends_of(&plan(&yaml), 80, 6), [backend(4, 80)]);
}

#[test]
fn slice_ports_match_the_service_port_by_name_and_protocol() {
    let yaml = service(
        "{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}",
        "",
    ) + &slice(
        "web-1",
        "{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: UDP}",
        "{addresses: [10.244.0.1]}",
    ) + &slice(
        "web-2",
        "{name: http, port: 9090}",
        "{addresses: [10.244.0.2]}",
    );
    let plan = plan(&yaml);
    assert_eq!(plan.frontends.len(), 3);
    assert_eq!(
        backends_of(&plan, 80, 6),
        [backend(1, 8080), backend(2, 9090)],
        "each slice gives its own number for the name"
    );
    assert_eq!(backends_of(&plan, 53, 17), [backend(1, 5353)]);
    assert!(
        backends_of(&plan, 53, 6).is_empty(),
        "the slice's dns-tcp is UDP: no TCP backend"
    );
    assert_eq!(plan.frontends[&frontend(80, 6)].port_name, "http");
    assert_eq!(
        plan.backend_ports(),
        BTreeSet::from([5353, 8080, 9090]),
        "the bitmap's ports"
    );
    assert_eq!(plan.backend_count(), 3);
}

#[test]
fn an_unnamed_service_port_takes_the_unnamed_slice_port() {
    let yaml = service("{port: 80}", "")
        + &slice(
            "web-1",
            "{name: other, port: 9999}, {port: 8080}",
            "{addresses: [10.244.0.1]}",
        );
    assert_eq!(backends_of(&plan(&yaml), 80, 6), [backend(1, 8080)]);
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let yaml = service("{port: 80}", "  internalTrafficPolicy: Local\n")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.1], nodeName: node-1}, \
             {addresses: [10.244.0.2], nodeName: node-2}, \
             {addresses: [10.244.0.3]}",
        );
    assert_eq!(backends_of(&plan(&yaml), 80, 6), [backend(1, 80)]);
    // The fallback is taken among this node's endpoints: a ready one
    // elsewhere does not keep the local terminating one out.
    let yaml = service("{port: 80}", "  internalTrafficPolicy: Local\n")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.1], nodeName: node-1, conditions: {ready: false, terminating: true}}, \
             {addresses: [10.244.0.2], nodeName: node-2}",
        );
    assert_eq!(backends_of(&plan(&yaml), 80, 6), [backend(1, 80)]);
    // No local endpoint: a frontend without backends (its connections are
    // refused, never sent to another node).
    let yaml = service("{port: 80}", "  internalTrafficPolicy: Local\n")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.2], nodeName: node-2}",
        );
    assert!(backends_of(&plan(&yaml), 80, 6).is_empty());
    // Cluster (the default): every node's.
    let yaml = service("{port: 80}", "")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.2], nodeName: node-2}",
        );
    assert_eq!(backends_of(&plan(&yaml), 80, 6), [backend(2, 80)]);
}

fn node_port_backends(plan: &ServicePlan, port: u16) -> Option<&FrontendPlan> {
    plan.frontends.get(&Frontend {
        address: NODE_IP,
        port,
        protocol: 6,
    })
}

#[test]
fn a_node_port_is_a_frontend_of_the_nodes_address_chosen_by_external_traffic_policy() {
    let endpoints = "{addresses: [10.244.0.1], nodeName: node-1}, \
                     {addresses: [10.244.0.2], nodeName: node-2}";
    // Cluster (the default): every node's endpoints, as the ClusterIP's;
    // the NodePort is in the ports' bitmap beside the backend port.
    let yaml = service(
        "{port: 80, targetPort: 8080, nodePort: 30080}",
        "  type: NodePort\n",
    ) + &slice("web-1", "{port: 8080}", endpoints);
    let cluster = plan(&yaml);
    let node_port = node_port_backends(&cluster, 30_080).expect("the NodePort's frontend");
    assert!(node_port.node_port);
    assert_eq!(node_port.backends, [backend(1, 8080), backend(2, 8080)]);
    assert_eq!(backends_of(&cluster, 80, 6), node_port.backends);
    assert!(!cluster.frontends[&frontend(80, 6)].node_port);
    assert_eq!(cluster.watched_ports(), BTreeSet::from([8080, 30_080]));
    assert_eq!(cluster.backend_ports(), BTreeSet::from([8080]));
    // Local: this node's only, whatever internalTrafficPolicy says for the
    // ClusterIP.
    let yaml = service(
        "{port: 80, targetPort: 8080, nodePort: 30080}",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
    ) + &slice("web-1", "{port: 8080}", endpoints);
    let local = plan(&yaml);
    assert_eq!(
        node_port_backends(&local, 30_080).map(|f| f.backends.clone()),
        Some(vec![backend(1, 8080)])
    );
    assert_eq!(backends_of(&local, 80, 6).len(), 2);
    // Local without a local endpoint: a frontend without backends (the
    // node refuses its connections).
    let yaml = service(
        "{port: 80, targetPort: 8080, nodePort: 30080}",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
    ) + &slice(
        "web-1",
        "{port: 8080}",
        "{addresses: [10.244.0.2], nodeName: node-2}",
    );
    assert_eq!(
        node_port_backends(&plan(&yaml), 30_080).map(|f| f.backends.len()),
        Some(0)
    );
    // A ClusterIP Service has no NodePort, nor has a node without an
    // address (local mode).
    let yaml =
        service("{port: 80, targetPort: 8080}", "") + &slice("web-1", "{port: 8080}", endpoints);
    assert!(node_port_backends(&plan(&yaml), 30_080).is_none());
    let yaml = service(
        "{port: 80, targetPort: 8080, nodePort: 30080}",
        "  type: NodePort\n",
    ) + &slice("web-1", "{port: 8080}", endpoints);
    let without_address = compile(&model(&yaml), NODE, None);
    assert_eq!(without_address.frontends.len(), 1);
}

#[test]
fn headless_external_name_and_ipv6_services_have_no_frontend() {
    let headless = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n";
    let none = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {ports: [{port: 80}]}\n---\n";
    let v6 = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]}\n---\n";
    let external = "apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: x}\nspec: {type: ExternalName, externalName: example.com}\n---\n";
    let endpoints = slice("web-1", "{port: 80}", "{addresses: [10.244.0.1]}");
    let plan = plan(&format!("{headless}{none}{v6}{external}{endpoints}"));
    assert!(plan.frontends.is_empty(), "{plan:?}");
    // Dual stack, IPv6 first: the IPv4 ClusterIP is the frontend.
    let dual = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], ports: [{port: 80}]}\n---\n";
    let plan = super::tests::plan(&format!("{dual}{endpoints}"));
    assert_eq!(backends_of(&plan, 80, 6), [backend(1, 80)]);
}

#[test]
fn a_service_without_endpoints_has_frontends_without_backends() {
    let plan = plan(&service("{name: a, port: 80}, {name: b, port: 81}", ""));
    assert_eq!(plan.frontends.len(), 2);
    assert!(plan.frontends.values().all(|f| f.backends.is_empty()));
    assert!(plan.backend_ports().is_empty());
    // A slice of another address type or another Service gives nothing.
    let other = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: o, namespace: x, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.0.9]}]\n---\n";
    let v6 = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: v6, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00::9']}]\n---\n";
    let plan = super::tests::plan(&(service("{port: 80}", "") + other + v6));
    assert!(backends_of(&plan, 80, 6).is_empty());
}

#[test]
fn client_ip_affinity_gives_its_timeout() {
    let plan_with = |extra: &str| plan(&service("{port: 80}", extra));
    assert_eq!(
        plan_with("  sessionAffinity: ClientIP\n").frontends[&frontend(80, 6)].affinity_timeout_s,
        DEFAULT_AFFINITY_TIMEOUT_S
    );
    assert_eq!(
        plan_with(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
        )
        .frontends[&frontend(80, 6)]
            .affinity_timeout_s,
        60
    );
    assert_eq!(
        plan_with("  sessionAffinity: None\n").frontends[&frontend(80, 6)].affinity_timeout_s,
        0
    );
}

#[test]
fn backends_are_deduplicated_and_sorted() {
    let yaml = service("{port: 80}", "")
        + &slice(
            "web-1",
            "{port: 80}",
            "{addresses: [10.244.0.9]}, {addresses: [10.244.0.2]}",
        )
        + &slice(
            "web-2",
            "{port: 80}",
            "{addresses: [10.244.0.2]}, {addresses: [10.244.0.1, 10.244.0.7]}",
        );
    assert_eq!(
        backends_of(&plan(&yaml), 80, 6),
        [backend(1, 80), backend(2, 80), backend(9, 80)],
        "one endpoint, one backend (its first address)"
    );
}

#[test]
fn a_frontend_claimed_twice_stays_with_the_first_service() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}, {port: 80, protocol: UDP, name: u}]}\n---\n";
    let plan = plan(yaml);
    assert_eq!(plan.frontends[&frontend(80, 6)].service.name, "a");
    assert_eq!(plan.frontends[&frontend(80, 17)].service.name, "b");
    assert_eq!(plan.conflicts.len(), 1, "{:?}", plan.conflicts);
    assert!(plan.conflicts[0].starts_with("x/b 10.96.0.10:80/tcp"));
}

#[test]
fn the_port_bitmap_has_a_bit_per_backend_port() {
    let words = port_words(&BTreeSet::from([0, 63, 64, 8080, 65535]));
    assert_eq!(words.len(), SERVICE_PORT_WORDS as usize);
    for port in [0, 63, 64, 8080, 65535] {
        assert!(port_set(&words, port), "{port}");
    }
    assert!(!port_set(&words, 80));
    assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 5);
    assert_eq!(words[0], 1 | (1 << 63));
    assert_eq!(words[1], 1);
}

#[test]
fn keys_and_values_are_in_network_order() {
    let f = frontend(80, 6);
    let key = f.key();
    assert_eq!(key.address.to_ne_bytes(), [10, 96, 0, 10]);
    assert_eq!(key.port.to_ne_bytes(), [0, 80]);
    assert_eq!(Frontend::from_key(&key), f);
    let b = backend(1, 8080);
    assert_eq!(b.value().port.to_ne_bytes(), 8080u16.to_be_bytes());
    assert_eq!(BackendAddress::from_value(&b.value()), b);
    assert_eq!(f.to_string(), "10.96.0.10:80/tcp");
    assert_eq!(b.to_string(), "10.244.0.1:8080");
}

#[test]
fn frontend_ids_are_stable_and_reused_only_after_release() {
    let mut ids = FrontendIds::default();
    let (a, b, c) = (frontend(80, 6), frontend(81, 6), frontend(82, 6));
    assert_eq!(ids.assign(a), Some(1));
    assert_eq!(ids.assign(b), Some(2));
    assert_eq!(ids.assign(a), Some(1), "an id stays with its frontend");
    ids.retain(|f| *f != a);
    assert_eq!(ids.get(&a), None);
    assert_eq!(ids.assign(c), Some(3), "a fresh id before a released one");
    assert_eq!(ids.assign(a), Some(4));
    // Fresh ids exhausted: released ones come back, the lowest first.
    ids.retain(|f| *f != b);
    ids.set_next(u32::MAX);
    assert_eq!(ids.assign(b), Some(1));
    assert_eq!(ids.assign(frontend(83, 6)), Some(2));
    assert_eq!(ids.assign(frontend(84, 6)), None, "every id held");
}

#[test]
fn frontend_ids_are_seeded_from_the_pinned_map() {
    let (a, b, c) = (frontend(80, 6), frontend(81, 6), frontend(82, 6));
    let mut ids = FrontendIds::default();
    ids.seed([(a, 7), (b, 3), (c, 7), (frontend(83, 6), 0)]);
    assert_eq!(ids.get(&a), Some(7));
    assert_eq!(ids.get(&b), Some(3));
    assert_eq!(ids.get(&c), None, "7 is a's");
    assert_eq!(ids.assign(c), Some(8), "after the highest seeded");
    assert_eq!(ids.all().len(), 3);
}

#[test]
fn slices_are_matched_by_namespace_and_service_name() {
    // Two Services named `web` in two namespaces, each with its own slice,
    // and a slice of another Service: each frontend gets its own
    // namespace's endpoints only.
    let other = Ipv4Addr::new(10, 96, 0, 11);
    let yaml = service("{port: 80}", "")
        + &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: y}}\nspec:\n  clusterIP: {other}\n  ports: [{{port: 80}}]\n---\n"
        )
        + &slice("web-1", "{port: 80}", "{addresses: [10.244.0.1]}")
        + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-y, namespace: y, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.0.2]}]\n---\n"
        + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-1, namespace: x, labels: {kubernetes.io/service-name: api}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.0.3]}]\n---\n";
    let plan = plan(&yaml);
    assert_eq!(backends_of(&plan, 80, 6), [backend(1, 80)]);
    let y = plan
        .frontends
        .get(&Frontend {
            address: other,
            port: 80,
            protocol: 6,
        })
        .expect("y/web's frontend");
    assert_eq!(y.backends, [backend(2, 80)]);
}
