//! The NetworkPolicy cases, as data: the policies a case applies (and any
//! relabelling it does), then the tables it expects on 80/TCP, 81/TCP,
//! 80/UDP and 81/UDP. Every expectation is written by hand from the
//! Kubernetes NetworkPolicy semantics, as the upstream suite writes its own
//! (kubernetes test/e2e/network/netpol/network_policy.go); each case names
//! the upstream test it mirrors.
//!
//! The model's labels: namespaces `ns: <name>` (and
//! `kubernetes.io/metadata.name`), pods `pod: <name>`; every pod serves 80
//! and 81 on TCP and UDP, named `serve-<port>-<protocol>`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{PORT_PROTOCOLS, Protocol, Reachability};
use crate::lab::LabLayout;

/// One NetworkPolicy of a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// The whole object, as YAML.
    pub yaml: String,
}

/// A NetworkPolicy `name` in `namespace` whose spec is `spec` (YAML flow
/// style, e.g. `{podSelector: {}, policyTypes: [Ingress]}`).
#[must_use]
pub fn np(namespace: &str, name: &str, spec: &str) -> Policy {
    Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        yaml: format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        ),
    }
}

/// The tables a step expects, one per port/protocol of [`PORT_PROTOCOLS`].
#[derive(Debug, Clone)]
pub struct Expect(pub Vec<(u16, Protocol, Reachability)>);

impl Expect {
    /// The same table on every port/protocol.
    #[must_use]
    pub fn all(table: &Reachability) -> Self {
        Self::per(|_, _| table.clone())
    }

    /// A table per port/protocol.
    #[must_use]
    pub fn per(table: impl Fn(u16, Protocol) -> Reachability) -> Self {
        Self(
            PORT_PROTOCOLS
                .iter()
                .map(|&(port, protocol)| (port, protocol, table(port, protocol)))
                .collect(),
        )
    }

    /// Everything reachable.
    #[must_use]
    pub fn open() -> Self {
        Self::all(&Reachability::model(true))
    }
}

/// What a case does, in order.
#[derive(Debug, Clone)]
pub enum Step {
    /// `podnetctl apply` of the policies (a policy already applied is
    /// updated in place).
    Apply(Vec<Policy>),
    /// `podnetctl delete` of the policies.
    Delete(Vec<Policy>),
    /// Re-applies the Pod `ns/name` with its model labels and these.
    PodLabels(&'static str, Vec<(&'static str, &'static str)>),
    /// Re-applies the Namespace with its model labels and these.
    NamespaceLabels(&'static str, Vec<(&'static str, &'static str)>),
    /// Polls until the tables are observed, or the settle time passes.
    Expect(Expect),
}

/// One case: a name, the upstream test it mirrors, its steps.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    /// The upstream test (network_policy.go) it mirrors.
    pub upstream: &'static str,
    pub steps: Vec<Step>,
}

/// What the cases need to know about the lab: the pods' IPs (`ns/name`)
/// and the cluster CIDR the pods' IPs come from.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub ips: BTreeMap<String, Ipv4Addr>,
    pub cluster_cidr: String,
}

impl Ctx {
    #[must_use]
    pub fn of(layout: &LabLayout) -> Self {
        Self {
            ips: layout
                .pods
                .iter()
                .map(|p| (format!("{}/{}", p.k8s_namespace(), p.k8s_name()), p.ip))
                .collect(),
            cluster_cidr: layout.cluster_cidr(),
        }
    }

    /// The /32 of a pod's IP (`ns/name`); `0.0.0.0/32` for a pod the lab
    /// does not have (the case then fails on its tables).
    #[must_use]
    pub fn ip32(&self, pod: &str) -> String {
        format!(
            "{}/32",
            self.ips.get(pod).copied().unwrap_or(Ipv4Addr::UNSPECIFIED)
        )
    }
}

/// A case from its parts.
fn case(name: &'static str, upstream: &'static str, steps: Vec<Step>) -> Case {
    Case {
        name,
        upstream,
        steps,
    }
}

/// A case that applies `policies` and expects `expect`.
fn simple(
    name: &'static str,
    upstream: &'static str,
    policies: Vec<Policy>,
    expect: Expect,
) -> Case {
    case(
        name,
        upstream,
        vec![Step::Apply(policies), Step::Expect(expect)],
    )
}

/// Open, then `f` applied.
fn table(f: impl FnOnce(&mut Reachability)) -> Reachability {
    let mut r = Reachability::model(true);
    f(&mut r);
    r
}

/// Only `port`/`protocol` gets `on`; the other port/protocols get `off`.
fn only_on(port: u16, protocol: Protocol, on: &Reachability, off: &Reachability) -> Expect {
    Expect::per(|p, proto| {
        if (p, proto) == (port, protocol) {
            on.clone()
        } else {
            off.clone()
        }
    })
}

/// Into x/a: nothing (but itself).
fn x_a_isolated() -> Reachability {
    table(|r| {
        r.expect_all_ingress("x/a", false);
    })
}

/// Every case, in the order they run.
#[must_use]
#[allow(clippy::too_many_lines, reason = "the cases are one table of data")]
pub fn all(ctx: &Ctx) -> Vec<Case> {
    vec![
        simple(
            "default-deny-ingress",
            "should support a 'default-deny-ingress' policy",
            vec![np(
                "x",
                "deny-ingress",
                "{podSelector: {}, policyTypes: [Ingress]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/*", false);
            })),
        ),
        // The same without policyTypes: a policy without rules is implied
        // Ingress.
        simple(
            "default-deny-ingress-implied-policy-types",
            "should support a 'default-deny-ingress' policy",
            vec![np("x", "deny-ingress", "{podSelector: {}}")],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/*", false);
            })),
        ),
        simple(
            "default-deny-egress",
            "should deny egress from all pods in a namespace",
            vec![np(
                "x",
                "deny-egress",
                "{podSelector: {}, policyTypes: [Egress]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/*", false);
            })),
        ),
        simple(
            "default-deny-all",
            "should support a 'default-deny-all' policy",
            vec![np(
                "x",
                "deny-all",
                "{podSelector: {}, policyTypes: [Ingress, Egress]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/*", false);
                r.expect_all_egress("x/*", false);
            })),
        ),
        simple(
            "allow-all-ingress-beside-deny",
            "should support allow-all policy",
            vec![
                np(
                    "x",
                    "deny-ingress",
                    "{podSelector: {}, policyTypes: [Ingress]}",
                ),
                np("x", "allow-all", "{podSelector: {}, ingress: [{}]}"),
            ],
            Expect::open(),
        ),
        simple(
            "allow-all-egress-beside-deny",
            "should support allow-all policy (its egress form, `egress: [{}]`)",
            vec![
                np(
                    "x",
                    "deny-egress",
                    "{podSelector: {}, policyTypes: [Egress]}",
                ),
                np(
                    "x",
                    "allow-all-egress",
                    "{podSelector: {}, egress: [{}], policyTypes: [Egress]}",
                ),
            ],
            Expect::open(),
        ),
        simple(
            "ingress-from-all-namespaces",
            "should enforce policy to allow ingress traffic from pods in all namespaces",
            vec![np(
                "x",
                "allow-all-ns",
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}",
            )],
            Expect::open(),
        ),
        simple(
            "ingress-from-same-namespace-only",
            "should deny ingress from pods on other namespaces",
            vec![np(
                "x",
                "same-ns",
                "{podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/*", false);
                r.expect_peer("x/*", "x/*", true);
            })),
        ),
        simple(
            "ingress-pod-selector-same-namespace",
            "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            vec![np(
                "x",
                "allow-b",
                "{podSelector: {matchLabels: {pod: a}}, \
                 ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_peer("x/b", "x/a", true);
            })),
        ),
        simple(
            "ingress-namespace-selector",
            "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            vec![np(
                "x",
                "allow-ns-y",
                "{podSelector: {matchLabels: {pod: a}}, \
                 ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_from_namespace("y", "x/a", true);
            })),
        ),
        simple(
            "ingress-namespace-selector-match-expressions",
            "should enforce policy based on NamespaceSelector with MatchExpressions",
            vec![np(
                "x",
                "allow-not-y",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
                 {matchExpressions: [{key: ns, operator: NotIn, values: [y]}]}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_from_namespace("x", "x/a", true);
                r.expect_from_namespace("z", "x/a", true);
            })),
        ),
        // The label the API server sets on every namespace.
        simple(
            "ingress-namespace-selector-default-label",
            "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            vec![np(
                "x",
                "allow-ns-y-default-label",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: \
                 [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_from_namespace("y", "x/a", true);
            })),
        ),
        // Two peers: either matches (OR).
        simple(
            "ingress-pod-selector-or-namespace-selector",
            "should enforce policy based on PodSelector or NamespaceSelector",
            vec![np(
                "x",
                "pod-or-ns",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [\
                 {namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}, \
                 {podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_from_namespace("y", "x/a", true);
                r.expect_from_namespace("z", "x/a", true);
                r.expect_peer("x/b", "x/a", true);
            })),
        ),
        // One peer with both: both must match (AND).
        simple(
            "ingress-pod-selector-and-namespace-selector",
            "should enforce policy based on PodSelector and NamespaceSelector",
            vec![np(
                "x",
                "pod-and-ns",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [\
                 {namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, \
                 podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_peer("y/b", "x/a", true);
                r.expect_peer("z/b", "x/a", true);
            })),
        ),
        simple(
            "ingress-multiple-pod-selectors-and-namespace-selectors",
            "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            vec![np(
                "x",
                "pods-and-ns",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [\
                 {namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, \
                 podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                for from in ["y/b", "y/c", "z/b", "z/c"] {
                    r.expect_peer(from, "x/a", true);
                }
            })),
        ),
        simple(
            "ingress-any-pod-selectors",
            "should enforce policy based on any PodSelectors",
            vec![np(
                "x",
                "any-pods",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [\
                 {podSelector: {matchLabels: {pod: b}}}, {podSelector: {matchLabels: {pod: c}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_peer("x/b", "x/a", true);
                r.expect_peer("x/c", "x/a", true);
            })),
        ),
        // A port without a protocol is TCP: UDP stays denied.
        simple(
            "ingress-port-number",
            "should enforce policy based on Ports",
            vec![np(
                "x",
                "allow-81",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{\
                 from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]}",
            )],
            only_on(
                81,
                Protocol::Tcp,
                &table(|r| {
                    r.expect_all_ingress("x/a", false);
                    r.expect_from_namespace("y", "x/a", true);
                }),
                &x_a_isolated(),
            ),
        ),
        // Two policies on one pod: their allows add up.
        simple(
            "stacked-policies-add-up",
            "should enforce multiple, stacked policies with overlapping podSelectors",
            vec![
                np(
                    "x",
                    "allow-80",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{\
                     from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80, protocol: TCP}]}]}",
                ),
                np(
                    "x",
                    "allow-81",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{\
                     from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81, protocol: TCP}]}]}",
                ),
            ],
            Expect::per(|_, protocol| {
                if protocol == Protocol::Tcp {
                    table(|r| {
                        r.expect_all_ingress("x/a", false);
                        r.expect_from_namespace("y", "x/a", true);
                    })
                } else {
                    x_a_isolated()
                }
            }),
        ),
        simple(
            "ingress-named-port",
            "should allow ingress access on one named port",
            vec![np(
                "x",
                "allow-serve-81-tcp",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-81-tcp}]}]}",
            )],
            only_on(
                81,
                Protocol::Tcp,
                &Reachability::model(true),
                &x_a_isolated(),
            ),
        ),
        simple(
            "ingress-named-port-from-namespace",
            "should allow ingress access from namespace on one named port",
            vec![np(
                "x",
                "allow-serve-80-tcp-from-y",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{\
                 from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: serve-80-tcp}]}]}",
            )],
            only_on(
                80,
                Protocol::Tcp,
                &table(|r| {
                    r.expect_all_ingress("x/a", false);
                    r.expect_from_namespace("y", "x/a", true);
                }),
                &x_a_isolated(),
            ),
        ),
        // A named port with its protocol: the name resolves on the server.
        simple(
            "egress-named-port-udp",
            "should allow egress access on one named port",
            vec![np(
                "x",
                "allow-serve-81-udp",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], \
                 egress: [{ports: [{port: serve-81-udp, protocol: UDP}]}]}",
            )],
            only_on(
                81,
                Protocol::Udp,
                &Reachability::model(true),
                &table(|r| {
                    r.expect_all_egress("x/a", false);
                }),
            ),
        ),
        simple(
            "ingress-port-range",
            "no test of this name upstream: endPort (NetworkPolicyEndPort), TCP",
            vec![np(
                "x",
                "allow-81-82",
                "{podSelector: {matchLabels: {pod: a}}, \
                 ingress: [{ports: [{protocol: TCP, port: 81, endPort: 82}]}]}",
            )],
            only_on(
                81,
                Protocol::Tcp,
                &Reachability::model(true),
                &x_a_isolated(),
            ),
        ),
        simple(
            "ingress-port-range-udp",
            "no test of this name upstream: endPort (NetworkPolicyEndPort), UDP",
            vec![np(
                "x",
                "allow-udp-80-81",
                "{podSelector: {matchLabels: {pod: a}}, \
                 ingress: [{ports: [{protocol: UDP, port: 80, endPort: 81}]}]}",
            )],
            Expect::per(|_, protocol| {
                if protocol == Protocol::Udp {
                    Reachability::model(true)
                } else {
                    x_a_isolated()
                }
            }),
        ),
        simple(
            "ingress-protocol-udp-only",
            "should not allow access by TCP when a policy specifies only UDP; should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            vec![np(
                "x",
                "allow-udp",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: UDP}]}]}",
            )],
            Expect::per(|_, protocol| {
                if protocol == Protocol::Udp {
                    Reachability::model(true)
                } else {
                    x_a_isolated()
                }
            }),
        ),
        simple(
            "egress-to-namespace",
            "should enforce egress policy allowing traffic to a server in a different namespace based on NamespaceSelector",
            vec![np(
                "x",
                "egress-to-y",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], \
                 egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_to_namespace("x/a", "y", true);
            })),
        ),
        simple(
            "egress-to-pod-and-namespace",
            "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            vec![np(
                "x",
                "egress-to-y-b",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [\
                 {namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_peer("x/a", "y/b", true);
            })),
        ),
        // Egress rules without policyTypes: Ingress is implied as well
        // (every policy without policyTypes affects Ingress), so x/a takes
        // nothing in.
        simple(
            "implied-policy-types-egress-rules-only",
            "should enforce egress policy allowing traffic to a server in a different namespace based on NamespaceSelector (policyTypes implied)",
            vec![np(
                "x",
                "egress-to-y-implied",
                "{podSelector: {matchLabels: {pod: a}}, \
                 egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_to_namespace("x/a", "y", true);
                r.expect_all_ingress("x/a", false);
            })),
        ),
        simple(
            "ingress-and-egress-together",
            "should work with Ingress, Egress specified together",
            vec![np(
                "x",
                "in-y-out-z",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress], \
                 ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}], \
                 egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}]}]}",
            )],
            Expect::all(&table(|r| {
                r.expect_all_ingress("x/a", false);
                r.expect_from_namespace("y", "x/a", true);
                r.expect_all_egress("x/a", false);
                r.expect_to_namespace("x/a", "z", true);
            })),
        ),
        // Both sides must allow: y lets x/a in, but x/a may only go to z.
        simple(
            "client-side-egress-deny-beats-server-allow",
            "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            vec![
                np(
                    "x",
                    "a-egress-to-z",
                    "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], \
                     egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}]}]}",
                ),
                np(
                    "y",
                    "only-from-x-a",
                    "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}, \
                     podSelector: {matchLabels: {pod: a}}}]}]}",
                ),
            ],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_to_namespace("x/a", "z", true);
                r.expect_all_ingress("y/*", false);
            })),
        ),
        simple(
            "ingress-and-egress-controlled-independently",
            "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
            vec![
                np(
                    "x",
                    "deny-egress-a",
                    "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}",
                ),
                np(
                    "x",
                    "allow-egress-a-to-b",
                    "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], \
                     egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]}",
                ),
            ],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_peer("x/a", "x/b", true);
            })),
        ),
        simple(
            "egress-allow-all-takes-precedence",
            "should enforce multiple egress policies with egress allow-all policy taking precedence",
            vec![
                np(
                    "x",
                    "a-egress-80",
                    "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], \
                     egress: [{ports: [{port: 80, protocol: TCP}]}]}",
                ),
                np(
                    "x",
                    "a-egress-all",
                    "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{}]}",
                ),
            ],
            Expect::open(),
        ),
        case(
            "deletion-restores-open",
            "should stop enforcing policies after they are deleted",
            vec![
                Step::Apply(vec![np(
                    "x",
                    "deny-all",
                    "{podSelector: {}, policyTypes: [Ingress, Egress]}",
                )]),
                Step::Expect(Expect::all(&table(|r| {
                    r.expect_all_ingress("x/*", false);
                    r.expect_all_egress("x/*", false);
                }))),
                Step::Delete(vec![np(
                    "x",
                    "deny-all",
                    "{podSelector: {}, policyTypes: [Ingress, Egress]}",
                )]),
                Step::Expect(Expect::open()),
            ],
        ),
        case(
            "updated-policy",
            "should enforce updated policy",
            vec![
                Step::Apply(vec![np(
                    "x",
                    "allow-one-port",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81}]}]}",
                )]),
                Step::Expect(only_on(
                    81,
                    Protocol::Tcp,
                    &Reachability::model(true),
                    &x_a_isolated(),
                )),
                Step::Apply(vec![np(
                    "x",
                    "allow-one-port",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80}]}]}",
                )]),
                Step::Expect(only_on(
                    80,
                    Protocol::Tcp,
                    &Reachability::model(true),
                    &x_a_isolated(),
                )),
            ],
        ),
        case(
            "ingress-from-updated-namespace",
            "should allow ingress access from updated namespace",
            vec![
                Step::Apply(vec![np(
                    "x",
                    "allow-ns2-updated",
                    "{podSelector: {matchLabels: {pod: a}}, \
                     ingress: [{from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]}]}",
                )]),
                Step::Expect(Expect::all(&x_a_isolated())),
                Step::NamespaceLabels("y", vec![("ns2", "updated")]),
                Step::Expect(Expect::all(&table(|r| {
                    r.expect_all_ingress("x/a", false);
                    r.expect_from_namespace("y", "x/a", true);
                }))),
            ],
        ),
        case(
            "ingress-from-updated-pod",
            "should allow ingress access from updated pod",
            vec![
                Step::Apply(vec![np(
                    "x",
                    "allow-pod2-updated",
                    "{podSelector: {matchLabels: {pod: a}}, \
                     ingress: [{from: [{podSelector: {matchLabels: {pod2: updated}}}]}]}",
                )]),
                Step::Expect(Expect::all(&x_a_isolated())),
                Step::PodLabels("x/b", vec![("pod2", "updated")]),
                Step::Expect(Expect::all(&table(|r| {
                    r.expect_all_ingress("x/a", false);
                    r.expect_peer("x/b", "x/a", true);
                }))),
            ],
        ),
        case(
            "ingress-denied-to-updated-pod",
            "should deny ingress access to updated pod",
            vec![
                Step::Apply(vec![np(
                    "x",
                    "deny-isolated",
                    "{podSelector: {matchLabels: {target: isolated}}, policyTypes: [Ingress]}",
                )]),
                Step::Expect(Expect::open()),
                Step::PodLabels("x/a", vec![("target", "isolated")]),
                Step::Expect(Expect::all(&x_a_isolated())),
            ],
        ),
        simple(
            "egress-ip-block-except",
            "should enforce except clause while egress access to server in CIDR block",
            vec![np(
                "x",
                "egress-cidr-except-y-b",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], \
                     egress: [{{to: [{{ipBlock: {{cidr: {}, except: [{}]}}}}]}}]}}",
                    ctx.cluster_cidr,
                    ctx.ip32("y/b")
                ),
            )],
            Expect::all(&table(|r| {
                r.expect_peer("x/a", "y/b", false);
            })),
        ),
        simple(
            "egress-ip-block-one-server",
            "should allow egress access to server in CIDR block",
            vec![np(
                "x",
                "egress-to-y-b-cidr",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], \
                     egress: [{{to: [{{ipBlock: {{cidr: {}}}}}]}}]}}",
                    ctx.ip32("y/b")
                ),
            )],
            Expect::all(&table(|r| {
                r.expect_all_egress("x/a", false);
                r.expect_peer("x/a", "y/b", true);
            })),
        ),
        simple(
            "egress-ip-block-overlapping-except-and-cidr",
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            vec![np(
                "x",
                "egress-cidr-overlap",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [\
                     {{to: [{{ipBlock: {{cidr: {}, except: [{}]}}}}]}}, \
                     {{to: [{{ipBlock: {{cidr: {}}}}}]}}]}}",
                    ctx.cluster_cidr,
                    ctx.ip32("y/b"),
                    ctx.ip32("y/b")
                ),
            )],
            Expect::open(),
        ),
        simple(
            "ingress-ip-block-except",
            "should enforce except clause while egress access to server in CIDR block (its ingress form)",
            vec![np(
                "x",
                "ingress-cidr-except-z-c",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, \
                     ingress: [{{from: [{{ipBlock: {{cidr: {}, except: [{}]}}}}]}}]}}",
                    ctx.cluster_cidr,
                    ctx.ip32("z/c")
                ),
            )],
            Expect::all(&table(|r| {
                r.expect_peer("z/c", "x/a", false);
            })),
        ),
    ]
}
