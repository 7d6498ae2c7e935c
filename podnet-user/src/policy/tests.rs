//! The semantics on a small cluster like the upstream netpol e2e suite's
//! (namespaces x, y, z; pods a, b, c serving 80 and 81 on TCP and UDP),
//! each case checked against both the reference and the compiled maps,
//! then random policies comparing the two.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, time::Instant};

use podnet_common::{
    endpoint::{ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    policy::{
        IDENTITY_ANY, IDENTITY_ANY_POD, IDENTITY_FIRST_CIDR_SET, IDENTITY_FIRST_POD, IDENTITY_HOST,
        IDENTITY_REMOTE_NODE, IDENTITY_UNKNOWN, IDENTITY_WORLD, POLICY_CIDR_PREFIX_BASE,
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, PolicyKey,
    },
};

use super::*;
use crate::model::cluster::{ClusterModel, ClusterObject, PodEndpointRecord, decode};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const WORLD: &str = "192.168.1.1";
const ICMP: u8 = 1;
use Direction::{Egress, Ingress};

fn namespace_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{ns: {name}, kubernetes.io/metadata.name: {name}}}}}\n---\n"
    )
}

/// A pod serving 80 and 81 on TCP and UDP, named as the e2e suite names them.
fn pod_yaml(namespace: &str, name: &str) -> String {
    let mut ports = String::new();
    for port in [80, 81] {
        for protocol in ["TCP", "UDP"] {
            let lower = protocol.to_lowercase();
            let _ = write!(
                ports,
                "{{name: serve-{port}-{lower}, containerPort: {port}, protocol: {protocol}}},"
            );
        }
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{pod: {name}}}}}\nspec: {{containers: [{{name: c, image: agnhost, ports: [{ports}]}}]}}\n---\n"
    )
}

/// A pod with one named port and the given labels.
fn named_pod_yaml(namespace: &str, name: &str, labels: &str, port_name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c, image: i, ports: [{{name: {port_name}, containerPort: {port}}}]}}]}}\n---\n"
    )
}

/// 10.0.<x=1,y=2,z=3,w=4>.<a=1,b=2,...>.
fn pod_ip(namespace: &str, name: &str) -> Ipv4Addr {
    let n = match namespace {
        "x" => 1,
        "y" => 2,
        "z" => 3,
        _ => 4,
    };
    let p = name.bytes().next().map_or(0, |b| b - b'a' + 1);
    Ipv4Addr::new(10, 0, n, p)
}

struct Cluster {
    model: ClusterModel,
    records: Vec<PodEndpointRecord>,
    local: Vec<LocalEndpoint>,
    hosts: Vec<Ipv4Addr>,
}

impl Cluster {
    /// Namespaces x, y, z, pods a, b, c in each, and `extra` objects. Every
    /// pod is local (this node's), and has a record.
    fn new(extra: &str) -> Self {
        let mut yaml = String::new();
        for namespace in ["x", "y", "z"] {
            yaml.push_str(&namespace_yaml(namespace));
            for pod in ["a", "b", "c"] {
                yaml.push_str(&pod_yaml(namespace, pod));
            }
        }
        yaml.push_str(extra);
        Self::from_objects(decode(&yaml).expect("decodes"))
    }

    fn from_objects(objects: Vec<ClusterObject>) -> Self {
        let mut model = ClusterModel::new();
        model.replace_all(objects, 1);
        let records: Vec<PodEndpointRecord> = model
            .objects(crate::model::cluster::Kind::Pod, None)
            .map(|o| PodEndpointRecord {
                node: "node-1".into(),
                namespace: o.namespace().unwrap_or_default().to_owned(),
                name: o.name().to_owned(),
                ip: pod_ip(o.namespace().unwrap_or_default(), o.name()),
            })
            .collect();
        let local = records
            .iter()
            .map(|r| LocalEndpoint {
                ip: r.ip,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            })
            .collect();
        Self {
            model,
            records,
            local,
            hosts: vec![NODE],
        }
    }

    fn input(&self) -> PolicyInput<'_> {
        PolicyInput {
            model: &self.model,
            pods: self.records.iter().collect(),
            local: &self.local,
            host_addresses: &self.hosts,
        }
    }

    fn plan(&self) -> PolicyPlan {
        compile(&self.input(), &mut IdentityAllocator::default())
    }

    fn endpoint(&self, pod: &str) -> &LocalEndpoint {
        let (namespace, name) = pod.split_once('/').expect("ns/name");
        self.local
            .iter()
            .find(|e| e.namespace == namespace && e.name == name)
            .expect("a local pod")
    }
}

/// "x/a" is a pod's IP, anything else an address.
fn address(peer: &str) -> Ipv4Addr {
    match peer.split_once('/') {
        Some((namespace, name)) => pod_ip(namespace, name),
        None => peer.parse().expect("an address"),
    }
}

type Case<'a> = (&'a str, Direction, &'a str, u8, u16, bool);

/// Each case: (local pod, direction, peer, protocol, port, allowed), the
/// reference and the compiled maps must both say so.
fn check(policies: &str, cases: &[Case]) -> (Cluster, PolicyPlan) {
    let cluster = Cluster::new(policies);
    let plan = cluster.plan();
    for &(pod, direction, peer, protocol, port, allowed) in cases {
        let endpoint = cluster.endpoint(pod);
        let peer = address(peer);
        let evaluation = evaluate(&cluster.input(), endpoint, direction, peer, protocol, port);
        let what = format!("{pod} {direction} {peer} {protocol}/{port}");
        assert_eq!(
            evaluation.is_allowed(),
            allowed,
            "reference: {what}: {evaluation:?}"
        );
        assert_eq!(
            plan.allows(endpoint.ip, direction, peer, protocol, port),
            allowed,
            "compiled: {what}"
        );
        if let (Some(rule), Evaluation::Allowed(rules)) = (
            plan.lookup(endpoint.ip, direction, peer, protocol, port),
            &evaluation,
        ) {
            assert!(rules.contains(rule), "{what}: {rule} not in {rules:?}");
        }
    }
    (cluster, plan)
}

fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
    )
}

const TCP_: u8 = TCP;

#[test]
fn no_policy_allows_everything_and_compiles_nothing() {
    let (cluster, plan) = check(
        "",
        &[
            ("x/a", Ingress, "y/b", TCP_, 80, true),
            ("x/a", Egress, WORLD, UDP, 53, true),
        ],
    );
    assert!(plan.endpoints.values().all(|f| *f == 0));
    assert_eq!(plan.endpoints.len(), 9);
    assert!(plan.rules.is_empty() && plan.cidrs.is_empty() && plan.rule_table.is_empty());
    assert_eq!(plan.identities.len(), 10, "9 pods and the node");
    assert_eq!(plan.identities[&NODE], IDENTITY_HOST);
    assert_eq!(plan.identity_labels.len(), 9);
    let endpoint = cluster.endpoint("x/a");
    assert_eq!(
        evaluate(&cluster.input(), endpoint, Ingress, NODE, TCP_, 80),
        Evaluation::NotSelected
    );
}

#[test]
fn default_deny_ingress_isolates_selected_pods_only() {
    let (cluster, plan) = check(
        &policy("x", "deny", "{podSelector: {}}"),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, false),
            ("x/a", Ingress, "y/b", UDP, 81, false),
            ("x/a", Ingress, WORLD, ICMP, 0, false),
            ("x/a", Ingress, "10.0.9.9", TCP_, 80, false),
            // The node's own traffic always gets in.
            ("x/a", Ingress, &NODE.to_string(), TCP_, 80, true),
            ("x/a", Egress, "y/b", TCP_, 80, true),
            ("y/a", Ingress, "x/a", TCP_, 80, true),
        ],
    );
    assert_eq!(plan.endpoints[&address("x/a")], ENDPOINT_F_POLICY_INGRESS);
    assert_eq!(plan.endpoints[&address("y/a")], 0);
    assert!(plan.rules.is_empty(), "a default deny adds no entries");
    let evaluation = evaluate(
        &cluster.input(),
        cluster.endpoint("x/b"),
        Ingress,
        address("y/a"),
        TCP_,
        80,
    );
    assert_eq!(
        evaluation,
        Evaluation::Denied {
            selecting: vec![("x".into(), "deny".into())]
        }
    );
    assert_eq!(
        evaluation.to_string(),
        "denied: isolated by x/deny and no rule allows it"
    );
    let from_node = evaluate(
        &cluster.input(),
        cluster.endpoint("x/b"),
        Ingress,
        NODE,
        TCP_,
        80,
    );
    assert_eq!(from_node, Evaluation::Allowed(Vec::new()));
    assert!(from_node.to_string().contains("own node"), "{from_node}");
}

#[test]
fn a_policy_without_spec_denies_ingress_to_its_namespace() {
    let (_, plan) = check(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bare, namespace: y}\n",
        &[
            ("y/a", Ingress, "x/a", TCP_, 80, false),
            ("y/a", Egress, "x/a", TCP_, 80, true),
            ("x/a", Ingress, "y/a", TCP_, 80, true),
        ],
    );
    assert_eq!(plan.endpoints[&address("y/c")], ENDPOINT_F_POLICY_INGRESS);
}

#[test]
fn policy_types_default_from_the_rules() {
    // Egress rules without policyTypes: both directions.
    let (_, plan) = check(
        &policy(
            "x",
            "both",
            "{podSelector: {matchLabels: {pod: a}}, egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, false),
            ("x/a", Egress, "x/b", TCP_, 80, true),
            ("x/a", Egress, "x/c", TCP_, 80, false),
        ],
    );
    assert_eq!(
        plan.endpoints[&address("x/a")],
        ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS
    );
    // An empty egress list: Ingress only.
    let (_, plan) = check(
        &policy("x", "p", "{podSelector: {}, egress: []}"),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, false),
            ("x/a", Egress, "x/b", TCP_, 80, true),
        ],
    );
    assert_eq!(plan.endpoints[&address("x/a")], ENDPOINT_F_POLICY_INGRESS);
    // Explicit types win: Egress only, the ingress rules ignored.
    let (_, plan) = check(
        &policy(
            "x",
            "p",
            "{podSelector: {}, policyTypes: [Egress], ingress: [{}]}",
        ),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, true),
            ("x/a", Egress, "x/b", TCP_, 80, false),
            ("x/a", Egress, WORLD, UDP, 53, false),
        ],
    );
    assert_eq!(plan.endpoints[&address("x/a")], ENDPOINT_F_POLICY_EGRESS);
    assert!(
        plan.rule_table.is_empty(),
        "the ignored rules have no number"
    );
}

#[test]
fn pod_selector_peers_are_of_the_policys_namespace() {
    check(
        &policy(
            "x",
            "p",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, true),
            ("x/a", Ingress, "x/b", UDP, 9999, true),
            ("x/a", Ingress, "x/b", ICMP, 0, true),
            ("x/a", Ingress, "y/b", TCP_, 80, false),
            ("x/a", Ingress, "x/c", TCP_, 80, false),
            ("x/a", Ingress, WORLD, TCP_, 80, false),
            ("x/b", Ingress, "x/c", TCP_, 80, true),
        ],
    );
}

#[test]
fn namespace_selectors_and_their_and_with_pod_selectors() {
    check(
        &policy(
            "x",
            "ns",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
        ),
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "y/c", TCP_, 80, true),
            ("x/a", Ingress, "x/b", TCP_, 80, false),
            ("x/a", Ingress, "z/b", TCP_, 80, false),
        ],
    );
    check(
        &policy(
            "x",
            "and",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y, z]}]}, podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        &[
            ("x/a", Ingress, "y/b", TCP_, 80, true),
            ("x/a", Ingress, "z/b", TCP_, 80, true),
            ("x/a", Ingress, "y/a", TCP_, 80, false),
            ("x/a", Ingress, "x/b", TCP_, 80, false),
        ],
    );
    // Two peers are an OR.
    check(
        &policy(
            "x",
            "or",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "x/b", TCP_, 80, true),
            ("x/a", Ingress, "z/b", TCP_, 80, false),
            ("x/a", Ingress, "x/c", TCP_, 80, false),
        ],
    );
}

#[test]
fn a_namespace_without_the_name_label_still_has_it_for_selectors() {
    let extra = "apiVersion: v1\nkind: Namespace\nmetadata: {name: w}\n---\n".to_owned()
        + &pod_yaml("w", "a")
        + &policy(
            "x",
            "p",
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: w}}}]}]}",
        );
    check(
        &extra,
        &[
            ("x/a", Ingress, "w/a", TCP_, 80, true),
            ("x/a", Ingress, "y/a", TCP_, 80, false),
        ],
    );
}

#[test]
fn every_pod_and_every_peer() {
    let (_, plan) = check(
        &policy(
            "x",
            "pods",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}}]}]}",
        ),
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "z/c", UDP, 1, true),
            ("x/a", Ingress, WORLD, TCP_, 80, false),
            ("x/a", Ingress, "10.0.9.9", TCP_, 80, false),
        ],
    );
    let any_pod = plan
        .rules
        .keys()
        .filter(|(_, k)| k.identity == IDENTITY_ANY_POD)
        .count();
    assert_eq!(
        (any_pod, plan.rules.len()),
        (1, 1),
        "one entry: {:?}",
        plan.rules
    );
    for spec in [
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{}]}",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: []}]}",
    ] {
        let (_, plan) = check(
            &policy("x", "all", spec),
            &[
                ("x/a", Ingress, "y/a", TCP_, 80, true),
                ("x/a", Ingress, WORLD, ICMP, 0, true),
                ("x/a", Ingress, "10.0.9.9", SCTP, 7, true),
            ],
        );
        let key = plan.rules.keys().next().expect("an entry");
        assert_eq!(
            (key.0, key.1.identity),
            (POLICY_PREFIX_ANY_PROTOCOL, IDENTITY_ANY)
        );
    }
}

#[test]
fn ip_blocks_match_pod_addresses_and_leave_excepts_out() {
    let (_, plan) = check(
        &(policy(
            "x",
            "blocks",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}]}, {from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/23]}}], ports: [{port: 81}]}]}",
        ) + &policy(
            "x",
            "world",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}], ports: [{protocol: UDP}]}]}",
        )),
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "y/b", TCP_, 80, false),
            ("x/a", Ingress, "y/b", TCP_, 81, false),
            // 10.0.2.0/23 is a hole in 10.0.0.0/16.
            ("x/a", Ingress, "z/b", TCP_, 81, false),
            ("x/a", Ingress, "10.0.3.200", TCP_, 81, false),
            ("x/a", Ingress, "x/b", TCP_, 81, true),
            ("x/a", Ingress, "x/b", TCP_, 80, false),
            ("x/a", Ingress, "10.0.4.1", TCP_, 81, true),
            ("x/a", Ingress, "10.1.0.1", TCP_, 81, false),
            ("x/a", Ingress, WORLD, UDP, 53, true),
            ("x/a", Ingress, WORLD, TCP_, 53, false),
            ("x/a", Ingress, "192.169.0.1", UDP, 53, false),
        ],
    );
    // The points: the three blocks and the two excepts; the /32 and the
    // /23 are holes (the /24 is in the /23 but not the other way).
    assert_eq!(plan.cidrs.len(), 5);
    let hole = plan
        .cidrs
        .iter()
        .find(|((prefix, _), _)| *prefix == POLICY_CIDR_PREFIX_BASE + 32)
        .map(|(_, set)| *set);
    assert_eq!(hole, Some(IDENTITY_UNKNOWN));
    assert_eq!(
        plan.cidrs
            .values()
            .filter(|s| **s == IDENTITY_UNKNOWN)
            .count(),
        2
    );
    assert!(
        plan.cidrs
            .values()
            .all(|s| *s == IDENTITY_UNKNOWN || *s >= IDENTITY_FIRST_CIDR_SET)
    );
}

#[test]
fn ip_blocks_for_egress_and_ipv6_blocks() {
    check(
        &policy(
            "x",
            "egress",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}, {ipBlock: {cidr: 'fd00::/8'}}]}]}",
        ),
        &[
            ("x/a", Egress, WORLD, TCP_, 443, true),
            ("x/a", Egress, "y/a", TCP_, 443, false),
            ("x/a", Egress, &NODE.to_string(), TCP_, 443, false),
            ("x/a", Ingress, "y/a", TCP_, 443, true),
        ],
    );
}

#[test]
fn numeric_ports_protocols_and_ranges() {
    let (_, plan) = check(
        &policy(
            "x",
            "ports",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80}, {protocol: UDP, port: 81}, {protocol: SCTP}, {protocol: TCP, port: 1000, endPort: 2000}]}]}",
        ),
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "y/a", TCP_, 81, false),
            ("x/a", Ingress, "y/a", UDP, 81, true),
            ("x/a", Ingress, "y/a", UDP, 80, false),
            ("x/a", Ingress, "y/a", SCTP, 80, true),
            ("x/a", Ingress, "y/a", SCTP, 65535, true),
            ("x/a", Ingress, "y/a", TCP_, 999, false),
            ("x/a", Ingress, "y/a", TCP_, 1000, true),
            ("x/a", Ingress, "y/a", TCP_, 1500, true),
            ("x/a", Ingress, "y/a", TCP_, 2000, true),
            ("x/a", Ingress, "y/a", TCP_, 2001, false),
            ("x/a", Ingress, WORLD, ICMP, 0, false),
        ],
    );
    let sctp = plan
        .rules
        .keys()
        .filter(|(prefix, key)| *prefix == POLICY_PREFIX_ANY_PORT && key.protocol == SCTP)
        .count();
    assert_eq!(sctp, 1);
    let tcp80 = PolicyKey {
        endpoint: u32::from_ne_bytes(address("x/a").octets()),
        identity: IDENTITY_ANY,
        direction: Ingress.as_u8(),
        protocol: TCP,
        port: 80u16.to_be(),
    };
    assert!(plan.rules.contains_key(&(96, tcp80)), "network order port");
}

#[test]
fn named_ports_for_ingress_are_the_selected_pods() {
    let extra = named_pod_yaml("x", "d", "pod: a", "serve-80-tcp", 8080)
        + &policy(
            "x",
            "named",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-80-tcp}, {protocol: UDP, port: serve-81-udp}, {port: nope}]}]}",
        );
    check(
        &extra,
        &[
            ("x/a", Ingress, "y/a", TCP_, 80, true),
            ("x/a", Ingress, "y/a", TCP_, 81, false),
            ("x/a", Ingress, "y/a", UDP, 81, true),
            ("x/a", Ingress, "y/a", UDP, 80, false),
            // d names 8080 serve-80-tcp and has no UDP port.
            ("x/d", Ingress, "y/a", TCP_, 8080, true),
            ("x/d", Ingress, "y/a", TCP_, 80, false),
            ("x/d", Ingress, "y/a", UDP, 81, false),
        ],
    );
}

#[test]
fn named_ports_for_egress_are_the_peers() {
    let extra = named_pod_yaml("w", "d", "app: web, v: '1'", "web", 8080)
        + &named_pod_yaml("w", "e", "app: web, v: '2'", "web", 9090)
        + &namespace_yaml("w")
        + &policy(
            "x",
            "to-web",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: w}}}], ports: [{port: web}]}]}",
        )
        + &policy(
            "x",
            "block-web",
            "{podSelector: {matchLabels: {pod: b}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.4.0/24, except: [10.0.4.5/32]}}], ports: [{port: web}, {port: 53, protocol: UDP}]}]}",
        )
        + &policy(
            "x",
            "any-web",
            "{podSelector: {matchLabels: {pod: c}}, policyTypes: [Egress], egress: [{ports: [{port: web}]}, {to: [{namespaceSelector: {}}], ports: [{port: serve-81-udp, protocol: UDP}]}]}",
        );
    check(
        &extra,
        &[
            ("x/a", Egress, "w/d", TCP_, 8080, true),
            ("x/a", Egress, "w/d", TCP_, 9090, false),
            ("x/a", Egress, "w/e", TCP_, 9090, true),
            ("x/a", Egress, "w/e", TCP_, 8080, false),
            ("x/a", Egress, "y/a", TCP_, 8080, false),
            ("x/b", Egress, "w/d", TCP_, 8080, true),
            ("x/b", Egress, "w/d", TCP_, 9090, false),
            ("x/b", Egress, "w/e", TCP_, 9090, false),
            ("x/b", Egress, "w/e", UDP, 53, false),
            ("x/b", Egress, "10.0.4.77", UDP, 53, true),
            ("x/b", Egress, "10.0.4.77", TCP_, 8080, false),
            ("x/c", Egress, "w/d", TCP_, 8080, true),
            ("x/c", Egress, "w/e", TCP_, 9090, true),
            ("x/c", Egress, "w/e", TCP_, 8080, false),
            ("x/c", Egress, WORLD, TCP_, 8080, false),
            ("x/c", Egress, "y/b", UDP, 81, true),
            ("x/c", Egress, "y/b", UDP, 80, false),
            ("x/c", Egress, "w/d", UDP, 81, false),
        ],
    );
}

#[test]
fn rules_add_up_and_the_lowest_number_holds_a_shared_entry() {
    let (cluster, plan) = check(
        &(policy(
            "x",
            "p1",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]}",
        ) + &policy(
            "x",
            "p2",
            "{podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}, {from: [{podSelector: {matchLabels: {pod: c}}}]}]}",
        )),
        &[
            ("x/a", Ingress, "x/b", TCP_, 80, true),
            ("x/a", Ingress, "x/b", TCP_, 81, false),
            ("x/a", Ingress, "x/c", TCP_, 81, true),
            ("x/b", Ingress, "x/b", TCP_, 80, true),
            ("x/b", Ingress, "x/a", TCP_, 80, false),
        ],
    );
    let a = address("x/a");
    let rule = |policy: &str, index| RuleRef {
        namespace: "x".into(),
        policy: policy.into(),
        direction: Ingress,
        index,
    };
    assert_eq!(
        plan.rule_table,
        [rule("p1", 0), rule("p2", 0), rule("p2", 1)]
    );
    assert_eq!(
        plan.lookup(a, Ingress, address("x/b"), TCP, 80),
        Some(&rule("p1", 0))
    );
    assert_eq!(
        plan.lookup(address("x/b"), Ingress, address("x/b"), TCP, 80),
        Some(&rule("p2", 0))
    );
    assert_eq!(
        plan.lookup(a, Ingress, address("x/c"), UDP, 5),
        Some(&rule("p2", 1))
    );
    assert_eq!(plan.lookup(a, Ingress, address("x/b"), TCP, 81), None);
    let evaluation = evaluate(
        &cluster.input(),
        cluster.endpoint("x/a"),
        Ingress,
        address("x/b"),
        TCP,
        80,
    );
    assert_eq!(
        evaluation,
        Evaluation::Allowed(vec![rule("p1", 0), rule("p2", 0)])
    );
    assert_eq!(
        evaluation.to_string(),
        "allowed by x/p1 ingress[0], x/p2 ingress[0]"
    );
}

#[test]
fn peer_identities() {
    let cluster = Cluster::new("");
    let plan = cluster.plan();
    let a = plan.identities[&address("x/a")];
    assert!((IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR_SET).contains(&a));
    assert_eq!(plan.peer_identity(address("x/a"), |_| true), a);
    assert_eq!(plan.peer_identity(NODE, |_| true), IDENTITY_HOST);
    assert_eq!(
        plan.peer_identity(address(WORLD), |p| p == address(WORLD)),
        IDENTITY_REMOTE_NODE
    );
    assert_eq!(
        plan.peer_identity(address(WORLD), |_| false),
        IDENTITY_WORLD
    );
    assert_eq!(plan.identity_labels[&a].namespace, "x");
}

#[test]
fn a_pod_bound_to_a_node_gets_its_identity_only_from_that_nodes_record() {
    // x/d is bound to node-1 (spec.nodeName); node-2 claims another
    // address for it: that address stays without the pod's identity.
    let bound = "apiVersion: v1\nkind: Pod\nmetadata: {name: d, namespace: x, labels: {pod: d}}\nspec: {nodeName: node-1, containers: [{name: c, image: i}]}\n---\n";
    let mut cluster = Cluster::new(bound);
    let forged = Ipv4Addr::new(10, 9, 9, 9);
    cluster.records.push(PodEndpointRecord {
        node: "node-2".into(),
        namespace: "x".into(),
        name: "d".into(),
        ip: forged,
    });
    let plan = cluster.plan();
    assert!(
        plan.identities.contains_key(&address("x/d")),
        "node-1's own record counts"
    );
    assert!(
        !plan.identities.contains_key(&forged),
        "node-2 cannot speak for a pod bound to node-1"
    );
}

#[test]
fn pods_with_the_same_labels_share_an_identity() {
    let extra =
        named_pod_yaml("x", "d", "pod: a", "p", 1) + &named_pod_yaml("y", "d", "pod: a", "p", 1);
    let plan = Cluster::new(&extra).plan();
    let identity = |pod| plan.identities[&address(pod)];
    assert_eq!(identity("x/a"), identity("x/d"));
    assert_ne!(identity("x/a"), identity("y/a"));
    assert_eq!(identity("y/a"), identity("y/d"));
    assert_eq!(plan.identity_labels.len(), 9);
}

#[test]
fn identities_are_stable_across_compiles_and_restarts() {
    let cluster = Cluster::new("");
    let mut identities = IdentityAllocator::default();
    let first = compile(&cluster.input(), &mut identities);
    // An unrelated change: a policy and a new pod.
    let changed = Cluster::new(&(policy("x", "p", "{podSelector: {}}") + &pod_yaml("z", "d")));
    let second = compile(&changed.input(), &mut identities);
    for (ip, identity) in &first.identities {
        assert_eq!(second.identities.get(ip), Some(identity), "{ip}");
    }
    let new = second.identities[&address("z/d")];
    assert!(
        first
            .identities
            .values()
            .all(|i| *i < new || *i == IDENTITY_HOST)
    );
    // A label change moves the pod to another identity, never an old one.
    let relabelled = Cluster::new(&named_pod_yaml("y", "a", "pod: other", "p", 1));
    // (the extra document replaces y/a: same key, later wins)
    let third = compile(&relabelled.input(), &mut identities);
    let moved = third.identities[&address("y/a")];
    assert_ne!(moved, first.identities[&address("y/a")]);
    assert!(moved > new, "a fresh number");
    assert_eq!(
        third.identities[&address("x/a")],
        first.identities[&address("x/a")]
    );
    // A restarted agent seeded from the maps keeps the numbers.
    let mut restarted = IdentityAllocator::default();
    restarted.seed(third.identity_labels.iter().map(|(n, l)| (l.clone(), *n)));
    let again = compile(&relabelled.input(), &mut restarted);
    assert_eq!(again.identities, third.identities);
    assert_eq!(again, third);
}

#[test]
fn an_endpoint_without_a_pod_object_is_default_denied_with_no_named_ports() {
    let mut cluster = Cluster::new(&policy(
        "x",
        "p",
        "{podSelector: {}, ingress: [{ports: [{port: serve-80-tcp}, {port: 81}]}]}",
    ));
    cluster.local.push(LocalEndpoint {
        ip: Ipv4Addr::new(10, 0, 1, 99),
        namespace: "x".into(),
        name: "ghost".into(),
    });
    let plan = cluster.plan();
    let ghost = Ipv4Addr::new(10, 0, 1, 99);
    assert_eq!(plan.endpoints[&ghost], ENDPOINT_F_POLICY_INGRESS);
    assert!(!plan.identities.contains_key(&ghost));
    assert!(!plan.allows(ghost, Ingress, address("y/a"), TCP, 80));
    assert!(plan.allows(ghost, Ingress, address("y/a"), TCP, 81));
    let endpoint = cluster.local.last().expect("pushed");
    assert!(!evaluate(&cluster.input(), endpoint, Ingress, address("y/a"), TCP, 80).is_allowed());
}

#[test]
fn explain_a_pod() {
    let cluster = Cluster::new(
        &(policy("x", "deny", "{podSelector: {}}")
            + &policy(
                "x",
                "web",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchLabels: {ns: y}}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.0.9.0/24]}}], ports: [{port: serve-80-tcp}, {protocol: UDP, port: 1000, endPort: 2000}]}], egress: [{}]}",
            )),
    );
    let input = cluster.input();
    assert_eq!(pod_policies(&input, "x", "nope"), None);
    let explained = pod_policies(&input, "x", "a").expect("a pod");
    assert!(explained.ingress.isolated && explained.egress.isolated);
    assert_eq!(explained.ingress.policies.len(), 2);
    assert_eq!(explained.ip, Some(address("x/a")));
    let text = explained.to_string();
    for expected in [
        "pod x/a (10.0.1.1)",
        "ingress: isolated by 2 policies",
        "traffic from the pod's own node is always allowed",
        "x/deny: no rules (allows nothing)",
        "rule 0: from pods pod=b in namespace x; every pod in namespaces ns=y; 10.0.0.0/8 except 10.0.9.0/24 on TCP/serve-80-tcp (80), UDP/1000-2000",
        "egress: isolated by 1 policy",
        "rule 0: to every peer on every port",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let other = pod_policies(&input, "y", "a").expect("a pod").to_string();
    assert!(other.contains("ingress: not isolated"), "{other}");
    let json = serde_json::to_string(&explained).expect("encodes");
    assert_eq!(
        serde_json::from_str::<PodPolicies>(&json).expect("decodes"),
        explained
    );
}

#[test]
fn wire_forms() {
    let rule = RuleRef {
        namespace: "x".into(),
        policy: "p".into(),
        direction: Egress,
        index: 2,
    };
    assert_eq!(
        serde_json::to_string(&rule).expect("encodes"),
        r#"{"namespace":"x","policy":"p","direction":"egress","index":2}"#
    );
    assert_eq!(Ingress.to_string(), "ingress");
    assert_eq!((Ingress.as_u8(), Egress.as_u8()), (0, 1));
    for evaluation in [
        Evaluation::NotSelected,
        Evaluation::Allowed(vec![rule]),
        Evaluation::Denied {
            selecting: vec![("x".into(), "p".into())],
        },
    ] {
        let json = serde_json::to_string(&evaluation).expect("encodes");
        assert_eq!(
            serde_json::from_str::<Evaluation>(&json).expect("decodes"),
            evaluation
        );
    }
}

/// A deterministic generator (xorshift64*).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("small")
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn random_selector(random: &mut Random, key: &str, values: &[&str]) -> String {
    match random.below(6) {
        0 => "{}".to_owned(),
        1 | 2 => format!("{{matchLabels: {{{key}: {}}}}}", random.pick(values)),
        3 => format!(
            "{{matchExpressions: [{{key: {key}, operator: In, values: [{}, {}]}}]}}",
            random.pick(values),
            random.pick(values)
        ),
        4 => format!(
            "{{matchExpressions: [{{key: {key}, operator: NotIn, values: [{}]}}]}}",
            random.pick(values)
        ),
        _ => format!(
            "{{matchExpressions: [{{key: role, operator: {}}}]}}",
            random.pick(&["Exists", "DoesNotExist"])
        ),
    }
}

fn random_cidr(random: &mut Random) -> (String, u8) {
    let bits = *random.pick(&[0u8, 8, 16, 22, 24, 30, 32]);
    let address = Ipv4Addr::new(
        *random.pick(&[10u8, 10, 10, 192]),
        0,
        *random.pick(&[0u8, 1, 2, 3]),
        *random.pick(&[0u8, 1, 2, 3, 4, 200]),
    );
    let net = ipnet::Ipv4Net::new(address, bits).expect("bits").trunc();
    (net.to_string(), bits)
}

fn random_peer(random: &mut Random) -> String {
    match random.below(6) {
        0 => format!(
            "{{podSelector: {}}}",
            random_selector(random, "pod", &["a", "b", "c"])
        ),
        1 => format!(
            "{{namespaceSelector: {}}}",
            random_selector(random, "ns", &NAMESPACES)
        ),
        2 => format!(
            "{{namespaceSelector: {}, podSelector: {}}}",
            random_selector(random, "ns", &NAMESPACES),
            random_selector(random, "pod", &["a", "b", "c"])
        ),
        3 => "{namespaceSelector: {}}".to_owned(),
        _ => {
            let (cidr, bits) = random_cidr(random);
            let mut except = Vec::new();
            for _ in 0..random.below(3) {
                // An except inside the block.
                let inner = u8::try_from(random.below(usize::from(33 - bits.min(32))))
                    .expect("small")
                    + bits;
                let base: Ipv4Addr = cidr
                    .split('/')
                    .next()
                    .expect("cidr")
                    .parse()
                    .expect("address");
                let offset = u32::try_from(random.below(1 << (32 - u32::from(bits)).min(12)))
                    .expect("small");
                let address = Ipv4Addr::from(u32::from(base) + offset);
                let net = ipnet::Ipv4Net::new(address, inner.min(32))
                    .expect("bits")
                    .trunc();
                if inner > bits {
                    except.push(net.to_string());
                }
            }
            format!(
                "{{ipBlock: {{cidr: '{cidr}', except: [{}]}}}}",
                except
                    .iter()
                    .map(|e| format!("'{e}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

fn random_port(random: &mut Random) -> String {
    let protocol = random.pick(&["", "protocol: TCP, ", "protocol: UDP, ", "protocol: SCTP, "]);
    let port = match random.below(7) {
        0 => String::new(),
        1 => format!("port: {}", random.pick(&[80, 81, 8000])),
        2 => format!(
            "port: {}, endPort: {}",
            random.pick(&[79, 80]),
            random.pick(&[81, 8001])
        ),
        3 => "port: web".to_owned(),
        _ => format!(
            "port: serve-{}-{}",
            random.pick(&[80, 81]),
            random.pick(&["tcp", "udp"])
        ),
    };
    format!("{{{protocol}{port}}}")
}

fn random_rules(random: &mut Random, peers: &str) -> String {
    let mut rules = Vec::new();
    for _ in 0..random.below(4) {
        let mut rule = Vec::new();
        match random.below(5) {
            0 => {}
            1 => rule.push(format!("{peers}: []")),
            _ => rule.push(format!(
                "{peers}: [{}]",
                (0..=random.below(2))
                    .map(|_| random_peer(random))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        match random.below(4) {
            0 => {}
            1 => rule.push("ports: []".to_owned()),
            _ => rule.push(format!(
                "ports: [{}]",
                (0..=random.below(2))
                    .map(|_| random_port(random))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        rules.push(format!("{{{}}}", rule.join(", ")));
    }
    format!("[{}]", rules.join(", "))
}

fn random_cluster(random: &mut Random) -> Cluster {
    let mut yaml = String::new();
    for namespace in NAMESPACES {
        if random.chance(80) {
            yaml.push_str(&namespace_yaml(namespace));
        }
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            if i >= 3 && random.chance(50) {
                continue;
            }
            let pod = random.pick(&["a", "b", "c"]);
            let role = random.pick(&["", ", role: r1", ", role: r2"]);
            // The named ports are a function of the namespace and labels
            // (the identity), so per-identity resolution is exact.
            let web = 8000 + (namespace.len() + pod.len() * 7 + role.len()) % 3;
            let mut ports = String::new();
            for port in [80, 81] {
                for protocol in ["TCP", "UDP"] {
                    if !(port + role.len() + protocol.len()).is_multiple_of(3) {
                        let _ = write!(
                            ports,
                            "{{name: serve-{port}-{}, containerPort: {port}, protocol: {protocol}}},",
                            protocol.to_lowercase()
                        );
                    }
                }
            }
            let _ = write!(
                yaml,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{pod: {pod}{role}}}}}\nspec: {{containers: [{{name: c, image: i, ports: [{ports}{{name: web, containerPort: {web}}}]}}]}}\n---\n"
            );
        }
    }
    for p in 0..=random.below(4) {
        let namespace = random.pick(&NAMESPACES);
        let types = random.pick(&[
            "",
            "policyTypes: [Ingress], ",
            "policyTypes: [Egress], ",
            "policyTypes: [Ingress, Egress], ",
        ]);
        let ingress = if random.chance(80) {
            format!(", ingress: {}", random_rules(random, "from"))
        } else {
            String::new()
        };
        let egress = if random.chance(70) {
            format!(", egress: {}", random_rules(random, "to"))
        } else {
            String::new()
        };
        let selector = random_selector(random, "pod", &["a", "b", "c"]);
        yaml.push_str(&policy(
            namespace,
            &format!("p{p}"),
            &format!("{{{types}podSelector: {selector}{ingress}{egress}}}"),
        ));
    }
    let objects = decode(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut cluster = Cluster::from_objects(objects);
    // A pod IP without a Pod object.
    cluster.records.push(PodEndpointRecord {
        node: "node-2".into(),
        namespace: "x".into(),
        name: "gone".into(),
        ip: Ipv4Addr::new(10, 0, 1, 200),
    });
    cluster
}

#[test]
fn compiled_lookups_agree_with_the_reference_on_random_policies() {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut checked = [0usize; 2];
    for round in 0..300 {
        let cluster = random_cluster(&mut random);
        let plan = cluster.plan();
        assert_eq!(cluster.plan(), plan, "round {round}: deterministic");
        let mut peers: Vec<Ipv4Addr> = cluster.records.iter().map(|r| r.ip).collect();
        peers.extend([
            NODE,
            address(WORLD),
            Ipv4Addr::new(10, 0, 2, 200),
            Ipv4Addr::new(10, 9, 0, 1),
        ]);
        for _ in 0..200 {
            let endpoint = random.pick(&cluster.local).clone();
            let direction = *random.pick(&Direction::BOTH);
            let peer = *random.pick(&peers);
            let protocol = *random.pick(&[TCP, TCP, UDP, SCTP, ICMP]);
            let port = if protocol == ICMP {
                0
            } else {
                *random.pick(&[80, 81, 79, 8000, 8001, 8002, 443])
            };
            let evaluation = evaluate(&cluster.input(), &endpoint, direction, peer, protocol, port);
            let flag = match direction {
                Ingress => ENDPOINT_F_POLICY_INGRESS,
                Egress => ENDPOINT_F_POLICY_EGRESS,
            };
            let what = || {
                let policies: Vec<String> = cluster
                    .model
                    .objects(crate::model::cluster::Kind::NetworkPolicy, None)
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                format!(
                    "round {round}: {} {direction} {peer} {protocol}/{port}: {evaluation:?}\n{}",
                    endpoint.name,
                    policies.join("\n")
                )
            };
            assert_eq!(
                plan.endpoints[&endpoint.ip] & flag != 0,
                evaluation != Evaluation::NotSelected,
                "{}",
                what()
            );
            assert_eq!(
                plan.allows(endpoint.ip, direction, peer, protocol, port),
                evaluation.is_allowed(),
                "{}",
                what()
            );
            match (
                &evaluation,
                plan.lookup(endpoint.ip, direction, peer, protocol, port),
            ) {
                (Evaluation::Allowed(rules), Some(rule)) => {
                    assert!(rules.contains(rule), "{}", what());
                }
                (Evaluation::Denied { .. }, found) => assert_eq!(found, None, "{}", what()),
                _ => {}
            }
            if evaluation != Evaluation::NotSelected {
                checked[usize::from(evaluation.is_allowed())] += 1;
            }
        }
    }
    // Both verdicts are well represented.
    assert!(checked.iter().all(|c| *c > 3000), "{checked:?}");
}

#[test]
#[ignore = "timing: run with --ignored --nocapture"]
fn compiles_ten_thousand_rules_quickly() {
    let mut yaml = String::new();
    for namespace in NAMESPACES {
        yaml.push_str(&namespace_yaml(namespace));
    }
    // 1,000 identities.
    for i in 0..1000 {
        let namespace = NAMESPACES[i % 3];
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {namespace}, labels: {{app: a{i}, tier: t{}}}}}\nspec: {{containers: [{{name: c, image: i, ports: [{{name: web, containerPort: {}}}]}}]}}\n---\n",
            i % 10,
            8000 + i % 7
        );
    }
    // 1,000 policies of 10 rules each.
    for p in 0..1000 {
        let mut rules = Vec::new();
        for r in 0..10 {
            rules.push(match r % 4 {
                0 => format!("{{from: [{{podSelector: {{matchLabels: {{tier: t{}}}}}}}], ports: [{{port: {}}}]}}", r, 80 + p % 50),
                1 => format!("{{from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: 1000, endPort: {}}}]}}", p, 1000 + r * 100),
                2 => format!("{{from: [{{ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.{}.0/24]}}}}]}}", p % 200, p % 200, r),
                _ => "{ports: [{port: web}]}".to_owned(),
            });
        }
        let namespace = NAMESPACES[p % 3];
        let _ = write!(
            yaml,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{p}, namespace: {namespace}}}\nspec: {{podSelector: {{matchLabels: {{tier: t{}}}}}, ingress: [{}]}}\n---\n",
            p % 10,
            rules.join(", ")
        );
    }
    let objects = decode(&yaml).expect("decodes");
    let mut model = ClusterModel::new();
    model.replace_all(objects, 1);
    let records: Vec<PodEndpointRecord> = (0..1000u32)
        .map(|i| PodEndpointRecord {
            node: "n".into(),
            namespace: NAMESPACES[i as usize % 3].into(),
            name: format!("p{i}"),
            ip: Ipv4Addr::from(0x0a64_0000 + i),
        })
        .collect();
    // 30 local endpoints.
    let local: Vec<LocalEndpoint> = records[..30]
        .iter()
        .map(|r| LocalEndpoint {
            ip: r.ip,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        })
        .collect();
    let input = PolicyInput {
        model: &model,
        pods: records.iter().collect(),
        local: &local,
        host_addresses: &[NODE],
    };
    let mut identities = IdentityAllocator::default();
    let start = Instant::now();
    let plan = compile(&input, &mut identities);
    let elapsed = start.elapsed();
    println!(
        "compile: {elapsed:?}: {} rules, {} identities, {} rule entries, {} CIDR entries",
        plan.rule_table.len(),
        plan.identity_labels.len(),
        plan.rules.len(),
        plan.cidrs.len()
    );
    assert_eq!(plan.rule_table.len(), 10_000);
    assert_eq!(plan.identity_labels.len(), 1000);
    let _ = BTreeMap::<u32, u32>::new();
}
