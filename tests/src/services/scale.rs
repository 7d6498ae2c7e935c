//! Many ClusterIP Services at once, written the two ways kube-proxy writes
//! them: iptables mode (one KUBE-SERVICES rule per Service port, matched
//! in chain order, a KUBE-SVC chain per port and a KUBE-SEP chain per
//! endpoint) and nftables mode (table `ip kube-proxy`: one `service-ips`
//! verdict map keyed by address, protocol and port, a `service-` chain per
//! port that picks an `endpoint-` chain with `numgen random`). Both are
//! loaded with one `iptables-restore` / `nft -f` call, and each has its
//! entry points (the jumps from the built-in chains; the hooked base
//! chains) apart, so that a bench can switch one mode's rules on for the
//! packets while the other's stay loaded but unreached.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::rules::{
    FILTER_CHAINS, JUMPS, MASQ_MARK, ServicePort, base32_16, jump_args, write_port,
};
use crate::netns::command_in;

/// A ClusterIP Service with TCP ports only, as both modes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIpService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<TcpPort>,
    pub backends: Vec<Ipv4Addr>,
}

/// A port of a [`ClusterIpService`]: its name, the Service port and the
/// endpoints' port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPort {
    pub name: String,
    pub port: u16,
    pub target: u16,
}

impl ClusterIpService {
    /// Its ports as the iptables rules name them (`namespace/name:port`).
    fn service_ports(&self) -> Vec<ServicePort> {
        self.ports
            .iter()
            .map(|p| ServicePort {
                name: format!("{}/{}:{}", self.namespace, self.name, p.name),
                proto: "tcp",
                port: p.port,
                target: p.target,
                node_port: None,
            })
            .collect()
    }

    /// The Service and its EndpointSlice as cluster objects (every
    /// endpoint ready), for podnet's own translation.
    #[must_use]
    pub fn objects(&self) -> [serde_json::Value; 2] {
        let ports: Vec<serde_json::Value> = self
            .ports
            .iter()
            .map(|p| {
                serde_json::json!({"name": p.name, "protocol": "TCP", "port": p.port,
                                   "targetPort": p.target})
            })
            .collect();
        let slice_ports: Vec<serde_json::Value> = self
            .ports
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "protocol": "TCP", "port": p.target}))
            .collect();
        let endpoints: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|b| serde_json::json!({"addresses": [b.to_string()], "conditions": {"ready": true}}))
            .collect();
        [
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": self.cluster_ip.to_string(),
                    "clusterIPs": [self.cluster_ip.to_string()],
                    "ports": ports,
                },
            }),
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-1", self.name),
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": self.name},
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": slice_ports,
            }),
        ]
    }
}

/// An `iptables-restore --noflush` input with every chain and rule
/// kube-proxy's iptables mode writes for `services` (each with
/// endpoints), except the jumps from the built-in chains
/// ([`kube_proxy_iptables_jumps`]): KUBE-SERVICES has one rule per
/// Service port in the order of `services`, which is the order a packet
/// is matched in. Declaring a chain flushes it, so loading a larger set
/// over a smaller one (the same names first) replaces it.
#[must_use]
pub fn kube_proxy_iptables_rules(services: &[ClusterIpService], cluster_cidr: &str) -> String {
    let mut s = String::from("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    s.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        s,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    s.push_str("COMMIT\n*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for svc in services {
        for port in svc.service_ports() {
            let _ = writeln!(s, ":{} - [0:0]", port.svc_chain());
            for backend in &svc.backends {
                let _ = writeln!(s, ":{} - [0:0]", port.sep_chain(*backend));
            }
        }
    }
    let _ = writeln!(
        s,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(s, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(s, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    for svc in services {
        for port in svc.service_ports() {
            write_port(&mut s, svc.cluster_ip, &svc.backends, &port, cluster_cidr);
        }
    }
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    s.push_str("COMMIT\n");
    s
}

/// An `iptables-restore --noflush` input inserting (`on`) or deleting
/// kube-proxy's jumps from the built-in chains into its own: what makes
/// packets meet the rules of [`kube_proxy_iptables_rules`]. Deleting
/// fails when they are not there: call it only after inserting.
#[must_use]
pub fn kube_proxy_iptables_jumps(on: bool) -> String {
    let verb = if on { "-I" } else { "-D" };
    let mut s = String::new();
    for table in ["filter", "nat"] {
        let _ = writeln!(s, "*{table}");
        for (_, chain, matches, comment, target) in JUMPS.iter().filter(|j| j.0 == table) {
            let _ = writeln!(s, "{verb} {chain} {}", jump_args(matches, comment, target));
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// nftables' kube-proxy chain-name base: the first 8 characters of the
/// base32 of the name's sha256, a dash, the name (`hashAndTruncate`; our
/// names are far below its length limit).
fn nft_chain_base(name: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let hash = Sha256::digest(name.as_bytes());
    format!("{}-{name}", &base32_16(&hash)[..8])
}

/// The hooked base chains of kube-proxy's nftables mode, their
/// declarations, and their rules.
const NFT_BASE_CHAINS: [(&str, &str); 8] = [
    (
        "filter-prerouting-pre-dnat",
        "type filter hook prerouting priority -110 ;",
    ),
    (
        "filter-output-pre-dnat",
        "type filter hook output priority -110 ;",
    ),
    ("filter-forward", "type filter hook forward priority 0 ;"),
    ("filter-input", "type filter hook input priority 0 ;"),
    ("filter-output", "type filter hook output priority 0 ;"),
    ("nat-output", "type nat hook output priority -100 ;"),
    (
        "nat-postrouting",
        "type nat hook postrouting priority 100 ;",
    ),
    ("nat-prerouting", "type nat hook prerouting priority -100 ;"),
];
const NFT_BASE_RULES: [(&str, &str); 11] = [
    (
        "filter-prerouting-pre-dnat",
        "ct state new jump firewall-check",
    ),
    (
        "filter-forward",
        "ct state new jump service-endpoints-check",
    ),
    ("filter-forward", "ct state new jump cluster-ips-check"),
    ("filter-input", "ct state new jump nodeport-endpoints-check"),
    ("filter-input", "ct state new jump service-endpoints-check"),
    ("filter-output", "ct state new jump service-endpoints-check"),
    ("filter-output-pre-dnat", "ct state new jump firewall-check"),
    ("filter-output", "ct state new jump cluster-ips-check"),
    ("nat-output", "jump services"),
    ("nat-postrouting", "jump masquerading"),
    ("nat-prerouting", "jump services"),
];

/// kube-proxy's sets and verdict maps: kind, name, type, comment.
const NFT_CONTAINERS: [(&str, &str, &str, &str); 7] = [
    ("set", "cluster-ips", "ipv4_addr", "Active ClusterIPs"),
    (
        "set",
        "nodeport-ips",
        "ipv4_addr",
        "IPs that accept NodePort traffic",
    ),
    (
        "map",
        "firewall-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "destinations that are subject to LoadBalancerSourceRanges",
    ),
    (
        "map",
        "no-endpoint-nodeports",
        "inet_proto . inet_service : verdict",
        "vmap to drop or reject packets to service nodeports with no endpoints",
    ),
    (
        "map",
        "no-endpoint-services",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "vmap to drop or reject packets to services with no endpoints",
    ),
    (
        "map",
        "service-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "ClusterIP, ExternalIP and LoadBalancer IP traffic",
    ),
    (
        "map",
        "service-nodeports",
        "inet_proto . inet_service : verdict",
        "NodePort traffic",
    ),
];

/// An `nft -f` script replacing table `ip kube-proxy` with what
/// kube-proxy's nftables mode (v1.31+) writes for `services` (each with
/// endpoints), modelled on `pkg/proxy/nftables/proxier.go` and its test
/// dumps: the sets and verdict maps, the helper chains, a `service-`
/// chain per port (masquerade mark for sources outside `cluster_cidr`,
/// then `numgen random mod N vmap` to the endpoints) and an `endpoint-`
/// chain per endpoint (hairpin mark, DNAT), the `service-ips` elements.
/// Without the hooked base chains ([`kube_proxy_nft_hooks`]): loaded, the
/// table sees no packet.
#[must_use]
pub fn kube_proxy_nft_rules(
    services: &[ClusterIpService],
    cluster_cidr: &str,
    service_cidr: &str,
    node_ip: Ipv4Addr,
) -> String {
    let t = "ip kube-proxy";
    let mut s = format!("table {t}\ndelete table {t}\n");
    let _ = writeln!(s, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for (kind, name, ty, comment) in NFT_CONTAINERS {
        let _ = writeln!(
            s,
            "add {kind} {t} {name} {{ type {ty} ; comment \"{comment}\" ; }}"
        );
    }
    for chain in [
        "cluster-ips-check",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nodeport-endpoints-check",
        "services",
        "service-endpoints-check",
    ] {
        let _ = writeln!(s, "add chain {t} {chain}");
    }
    let _ = writeln!(
        s,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    for (chain, rule) in [
        (
            "cluster-ips-check",
            "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
                .to_owned(),
        ),
        (
            "cluster-ips-check",
            format!(
                "ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
            ),
        ),
        (
            "firewall-check",
            "ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned(),
        ),
        (
            "mark-for-masquerade",
            format!("mark set mark or {MASQ_MARK}"),
        ),
        ("masquerading", format!("mark and {MASQ_MARK} == 0 return")),
        ("masquerading", format!("mark set mark xor {MASQ_MARK}")),
        ("masquerading", "masquerade fully-random".to_owned()),
        (
            "nodeport-endpoints-check",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned(),
        ),
        ("reject-chain", "reject".to_owned()),
        (
            "services",
            "ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        ),
        (
            "services",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned(),
        ),
        (
            "service-endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
        ),
    ] {
        let _ = writeln!(s, "add rule {t} {chain} {rule}");
    }
    let _ = writeln!(s, "add element {t} nodeport-ips {{ {node_ip} }}");
    for svc in services {
        write_nft_service(&mut s, svc, cluster_cidr);
    }
    s
}

/// The chains, rules and elements of one Service with endpoints.
fn write_nft_service(s: &mut String, svc: &ClusterIpService, cluster_cidr: &str) {
    let t = "ip kube-proxy";
    let ip = svc.cluster_ip;
    for port in &svc.ports {
        let base = format!("{}/{}/tcp/{}", svc.namespace, svc.name, port.name);
        let service_chain = format!("service-{}", nft_chain_base(&base));
        let endpoint_chains: Vec<(Ipv4Addr, String)> = svc
            .backends
            .iter()
            .map(|b| {
                let name = format!("{base}__{b}/{}", port.target);
                (*b, format!("endpoint-{}", nft_chain_base(&name)))
            })
            .collect();
        // Every chain before the rules that jump to it (kube-proxy
        // declares them first too): nft refuses a jump to a chain it does
        // not know yet.
        let _ = writeln!(s, "add chain {t} {service_chain}");
        for (_, chain) in &endpoint_chains {
            let _ = writeln!(s, "add chain {t} {chain}");
        }
        let _ = writeln!(
            s,
            "add rule {t} {service_chain} ip daddr {ip} ip saddr != {cluster_cidr} jump mark-for-masquerade"
        );
        let picks: Vec<String> = endpoint_chains
            .iter()
            .enumerate()
            .map(|(i, (_, chain))| format!("{i} : goto {chain}"))
            .collect();
        let _ = writeln!(
            s,
            "add rule {t} {service_chain} numgen random mod {} vmap {{ {} }}",
            endpoint_chains.len(),
            picks.join(" , ")
        );
        for (backend, chain) in &endpoint_chains {
            let _ = writeln!(
                s,
                "add rule {t} {chain} ip saddr {backend} jump mark-for-masquerade"
            );
            let _ = writeln!(
                s,
                "add rule {t} {chain} meta l4proto tcp dnat to {backend}:{}",
                port.target
            );
        }
        let _ = writeln!(
            s,
            "add element {t} service-ips {{ {ip} . tcp . {} : goto {service_chain} }}",
            port.port
        );
    }
    let _ = writeln!(s, "add element {t} cluster-ips {{ {ip} }}");
}

/// An `nft -f` script adding (`on`) or removing the hooked base chains of
/// table `ip kube-proxy` and their jumps: what makes packets meet the
/// rules of [`kube_proxy_nft_rules`]. Either way it can run twice.
#[must_use]
pub fn kube_proxy_nft_hooks(on: bool) -> String {
    let t = "ip kube-proxy";
    let mut s = String::new();
    for (chain, hook) in NFT_BASE_CHAINS {
        // Declared first (a no-op when there), so flush and delete always
        // find it.
        let _ = writeln!(s, "add chain {t} {chain} {{ {hook} }}");
        let _ = writeln!(s, "flush chain {t} {chain}");
        if !on {
            let _ = writeln!(s, "delete chain {t} {chain}");
        }
    }
    if on {
        for (chain, rule) in NFT_BASE_RULES {
            let _ = writeln!(s, "add rule {t} {chain} {rule}");
        }
    }
    s
}

/// Feeds `input` to `iptables-restore --noflush` in `netns`.
pub fn iptables_restore(netns: &str, input: &str) -> anyhow::Result<()> {
    let mut cmd = command_in(netns, "iptables-restore")?;
    cmd.arg("--noflush");
    super::feed(cmd, input)
}

/// Feeds `script` to `nft -f -` in `netns`.
pub fn nft_script(netns: &str, script: &str) -> anyhow::Result<()> {
    let mut cmd = command_in(netns, "nft")?;
    cmd.args(["-f", "-"]);
    super::feed(cmd, script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: [u8; 4], backends: &[[u8; 4]]) -> ClusterIpService {
        ClusterIpService {
            namespace: "ns1".into(),
            name: name.into(),
            cluster_ip: Ipv4Addr::from(ip),
            ports: vec![TcpPort {
                name: "p80".into(),
                port: 80,
                target: 80,
            }],
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
        }
    }

    #[test]
    fn nft_chain_names_match_kube_proxy() {
        // From kube-proxy's own tests (pkg/proxy/nftables/proxier_test.go).
        assert_eq!(
            nft_chain_base("ns1/svc1/tcp/p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_chain_base("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn nft_rules_have_kube_proxy_shape() {
        // kube-proxy's svc4 of TestOverallNFTablesRules.
        let mut svc = service(
            "svc4",
            [172, 30, 0, 44],
            &[[10, 180, 0, 4], [10, 180, 0, 5]],
        );
        svc.namespace = "ns4".into();
        let script = kube_proxy_nft_rules(
            &[svc],
            "10.0.0.0/8",
            "172.30.0.0/16",
            Ipv4Addr::new(192, 168, 0, 2),
        );
        for line in [
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        ] {
            assert!(script.contains(line), "{line}\nnot in\n{script}");
        }
        assert!(!script.contains("hook"), "no base chain: no packet sees it");
        assert!(
            kube_proxy_nft_hooks(true)
                .contains("add rule ip kube-proxy nat-prerouting jump services")
        );
        assert!(kube_proxy_nft_hooks(false).contains("delete chain ip kube-proxy nat-prerouting"));
    }

    #[test]
    fn iptables_rules_match_services_in_the_given_order() {
        let services = [
            service("a", [10, 96, 0, 1], &[[10, 0, 0, 1], [10, 0, 0, 2]]),
            service("b", [10, 96, 0, 2], &[[10, 0, 0, 3], [10, 0, 0, 4]]),
        ];
        let rules = kube_proxy_iptables_rules(&services, "10.244.0.0/16");
        let order: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(order.len(), 3, "a port each, then the nodeports jump");
        assert!(order[0].contains("-d 10.96.0.1 "));
        assert!(order[1].contains("-d 10.96.0.2 "));
        assert!(order[2].ends_with("-j KUBE-NODEPORTS"));
        assert_eq!(rules.matches("--probability 0.5000000000").count(), 2);
        assert!(!rules.contains("-I PREROUTING"), "the jumps are apart");
        let on = kube_proxy_iptables_jumps(true);
        assert!(on.contains(
            "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert_eq!(
            kube_proxy_iptables_jumps(false).matches("-D ").count(),
            on.matches("-I ").count()
        );
    }
}
