//! The Service's rules: what kube-proxy's iptables mode writes for it
//! (chain names hashed as kube-proxy hashes them), the same Service as a
//! plain nftables script, and applying or removing either in a node.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::{NAMESPACE, ServiceSpec};
use crate::netns::command_in;

/// kube-proxy's default masquerade bit (`--iptables-masquerade-bit=14`).
pub(super) const MASQ_MARK: &str = "0x4000";
/// Port names: they are part of the `ServicePortName` kube-proxy hashes.
const TCP_PORT_NAME: &str = "http";
const UDP_PORT_NAME: &str = "dns";

/// RFC 4648 base32 of the first 10 bytes (16 characters), which is all of
/// the encoding kube-proxy keeps.
pub(super) fn base32_16(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    for chunk in bytes[..10].chunks(5) {
        let mut bits = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let mut group = [0u8; 8];
        for slot in group.iter_mut().rev() {
            *slot = ALPHABET[usize::try_from(bits & 31).unwrap_or(0)];
            bits >>= 5;
        }
        out.extend(group.iter().map(|c| char::from(*c)));
    }
    out
}

/// kube-proxy's chain hash: sha256 of the concatenated parts, base32, 16
/// characters (`portProtoHash`, `servicePortEndpointChainName`).
pub(super) fn chain_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    base32_16(&hasher.finalize())
}

/// One port of the Service as kube-proxy sees it.
pub(super) struct ServicePort {
    /// `namespace/name:port-name`.
    pub(super) name: String,
    pub(super) proto: &'static str,
    pub(super) port: u16,
    pub(super) target: u16,
    pub(super) node_port: Option<u16>,
}

impl ServicePort {
    pub(super) fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", chain_hash(&[&self.name, self.proto]))
    }

    pub(super) fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", chain_hash(&[&self.name, self.proto]))
    }

    pub(super) fn sep_chain(&self, backend: Ipv4Addr) -> String {
        let endpoint = format!("{backend}:{}", self.target);
        format!(
            "KUBE-SEP-{}",
            chain_hash(&[&self.name, self.proto, &endpoint])
        )
    }
}

fn ports(svc: &ServiceSpec) -> [ServicePort; 2] {
    [
        ServicePort {
            name: format!("{NAMESPACE}/{}:{TCP_PORT_NAME}", svc.name),
            proto: "tcp",
            port: svc.tcp_port,
            target: svc.target_tcp_port,
            node_port: Some(svc.node_port),
        },
        ServicePort {
            name: format!("{NAMESPACE}/{}:{UDP_PORT_NAME}", svc.name),
            proto: "udp",
            port: svc.udp_port,
            target: svc.target_udp_port,
            node_port: None,
        },
    ]
}

/// The jump rules kube-proxy keeps in the built-in chains
/// (`iptablesJumpChains`, inserted with `EnsureRule(Prepend, ...)` rather
/// than through iptables-restore): table, source chain, match arguments,
/// comment, target chain.
pub(super) const JUMPS: &[(&str, &str, &[&str], &str, &str)] = &[
    (
        "filter",
        "INPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "INPUT",
        &[],
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        &[],
        "kubernetes forwarding rules",
        "KUBE-FORWARD",
    ),
    (
        "filter",
        "INPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        &["-m", "conntrack", "--ctstate", "NEW"],
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "nat",
        "OUTPUT",
        &[],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        &[],
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        &[],
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
];

pub(super) const FILTER_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
];

/// The nat chains of `svc`, in the order kube-proxy declares them.
fn nat_chains(svc: &ServiceSpec) -> Vec<String> {
    let mut chains: Vec<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .map(String::from)
    .to_vec();
    for port in ports(svc) {
        if svc.backends.is_empty() {
            continue;
        }
        chains.push(port.svc_chain());
        if port.node_port.is_some() {
            chains.push(port.ext_chain());
        }
        chains.extend(svc.backends.iter().map(|b| port.sep_chain(*b)));
    }
    chains
}

/// The arguments of a jump rule as one iptables-restore line (after the
/// `-I CHAIN`).
pub(super) fn jump_args(matches: &[&str], comment: &str, target: &str) -> String {
    format!(
        "{} -m comment --comment \"{comment}\" -j {target}",
        matches.join(" ")
    )
    .trim_start()
    .to_owned()
}

/// An `iptables-restore --noflush` input installing `svc` the way
/// kube-proxy's iptables mode (v1.2x) does: the filter table's KUBE-FORWARD
/// (drop INVALID, accept marked and established forwarding), the nat
/// table's KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* DNAT chains with random
/// load balancing, masquerading of traffic from outside `cluster_cidr` and
/// of hairpin traffic, the NodePort through KUBE-NODEPORTS -> KUBE-EXT-*,
/// and the jump rules from the built-in chains. Marks are written as
/// kube-proxy writes them (`--or-mark`, `--xor-mark`); `iptables-save` shows
/// them as `--set-xmark 0x4000/0x4000` and `0x4000/0x0`.
#[must_use]
pub fn kube_proxy_iptables(svc: &ServiceSpec, cluster_cidr: &str) -> String {
    let mut s = String::new();
    let ip = svc.cluster_ip;
    s.push_str("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    if svc.backends.is_empty() {
        // kube-proxy rejects traffic to a Service without endpoints instead
        // of letting it time out.
        for port in ports(svc) {
            let (name, proto, p) = (&port.name, port.proto, port.port);
            let _ = writeln!(
                s,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {proto} -p {proto} -d {ip} --dport {p} -j REJECT --reject-with icmp-port-unreachable"
            );
            if let Some(np) = port.node_port {
                let _ = writeln!(
                    s,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j REJECT --reject-with icmp-port-unreachable"
                );
            }
        }
    }
    s.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        s,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    for (table, chain, matches, comment, target) in JUMPS {
        if *table == "filter" {
            let _ = writeln!(s, "-I {chain} {}", jump_args(matches, comment, target));
        }
    }
    s.push_str("COMMIT\n*nat\n");
    for chain in nat_chains(svc) {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        s,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(s, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(s, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    if !svc.backends.is_empty() {
        for port in ports(svc) {
            write_port(&mut s, svc.cluster_ip, &svc.backends, &port, cluster_cidr);
        }
    }
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for (table, chain, matches, comment, target) in JUMPS {
        if *table == "nat" {
            let _ = writeln!(s, "-I {chain} {}", jump_args(matches, comment, target));
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The nat rules of one port with endpoints (`backends`) of the Service
/// at `ip`, in kube-proxy's order.
pub(super) fn write_port(
    s: &mut String,
    ip: Ipv4Addr,
    backends: &[Ipv4Addr],
    port: &ServicePort,
    cluster_cidr: &str,
) {
    let (name, proto, p) = (&port.name, port.proto, port.port);
    let svc_chain = port.svc_chain();
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {p} -j {svc_chain}"
    );
    if let Some(np) = port.node_port {
        let ext = port.ext_chain();
        let _ = writeln!(
            s,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext}"
        );
        let _ = writeln!(
            s,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(s, "-A {ext} -j {svc_chain}");
    }
    // Traffic from outside the pod network (a node itself) is masqueraded
    // so the backend's reply comes back through this node.
    let _ = writeln!(
        s,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {p} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
    );
    let n = backends.len();
    for (i, backend) in backends.iter().enumerate() {
        let target = format!("{backend}:{}", port.target);
        let sep = port.sep_chain(*backend);
        if i + 1 < n {
            // Rule i is reached by 1 - i/n of the traffic and keeps 1/(n-i)
            // of it: every endpoint gets 1/n.
            let left = u32::try_from(n - i).unwrap_or(u32::MAX);
            let _ = writeln!(
                s,
                "-A {svc_chain} -m comment --comment \"{name} -> {target}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / f64::from(left)
            );
        } else {
            let _ = writeln!(
                s,
                "-A {svc_chain} -m comment --comment \"{name} -> {target}\" -j {sep}"
            );
        }
    }
    for backend in backends {
        let sep = port.sep_chain(*backend);
        // Hairpin: a backend reaching itself through the Service must see
        // the node as the source, or its reply would never be un-NATed.
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {name} -s {backend} -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {backend}:{}",
            port.target
        );
    }
}

/// The counterpart of [`kube_proxy_iptables`] for the chains (the jump rules
/// are deleted one by one first, see [`remove_kube_proxy_iptables`]): every
/// chain flushed by its declaration, then deleted (what `kube-proxy
/// --cleanup` does).
fn kube_proxy_iptables_cleanup(svc: &ServiceSpec) -> String {
    let mut s = String::from("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for chain in FILTER_CHAINS {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n*nat\n");
    let chains = nat_chains(svc);
    for chain in &chains {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for chain in &chains {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n");
    s
}

/// `svc` as plain nftables DNAT (table `ip svcdemo`): ClusterIP TCP and UDP
/// to a random backend, for traffic arriving (prerouting) and from the node
/// itself (output), plus masquerading of hairpin traffic (a backend reaching
/// itself through the Service). No NodePort and no masquerading of other
/// traffic: the smallest NAT a Service needs. Re-applying replaces it.
#[must_use]
pub fn nft_dnat(svc: &ServiceSpec) -> String {
    let ip = svc.cluster_ip;
    let mut rules = String::new();
    let n = svc.backends.len();
    if n > 0 {
        for (proto, port, target) in [
            ("tcp", svc.tcp_port, svc.target_tcp_port),
            ("udp", svc.udp_port, svc.target_udp_port),
        ] {
            let map: Vec<String> = svc
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect();
            let _ = writeln!(
                rules,
                "    ip daddr {ip} {proto} dport {port} dnat to numgen random mod {n} map {{ {} }} : {target}",
                map.join(", ")
            );
        }
    }
    let hairpin = if n > 0 {
        let pairs: Vec<String> = svc.backends.iter().map(|b| format!("{b} . {b}")).collect();
        format!(
            "    ct status dnat ip saddr . ip daddr {{ {} }} masquerade\n",
            pairs.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        "{remove}table ip svcdemo {{\n  \
           chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n  \
           chain output {{\n    type nat hook output priority -100; policy accept;\n{rules}  }}\n  \
           chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{hairpin}  }}\n\
         }}\n",
        remove = nft_remove()
    )
}

/// Removes what [`nft_dnat`] installed; a no-op when it is not there (the
/// table is declared first, so the delete always finds it).
#[must_use]
pub fn nft_remove() -> String {
    "table ip svcdemo\ndelete table ip svcdemo\n".into()
}

/// Runs `cmd` with `input` on stdin; an error carries its stderr.
pub fn feed(mut cmd: Command, input: &str) -> anyhow::Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin of the child")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {cmd:?}"))?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}\ninput was:\n{input}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// Installs `svc` in `netns` as kube-proxy's iptables mode does (after
/// removing an earlier copy, so it can run twice).
pub fn apply_kube_proxy_iptables(
    netns: &str,
    svc: &ServiceSpec,
    cluster_cidr: &str,
) -> anyhow::Result<()> {
    remove_kube_proxy_iptables(netns, svc)?;
    let mut cmd = command_in(netns, "iptables-restore")?;
    cmd.arg("--noflush");
    feed(cmd, &kube_proxy_iptables(svc, cluster_cidr))
        .with_context(|| format!("installing the kube-proxy rules in {netns}"))
}

/// Removes what [`apply_kube_proxy_iptables`] installed; fine when nothing is
/// there.
pub fn remove_kube_proxy_iptables(netns: &str, svc: &ServiceSpec) -> anyhow::Result<()> {
    for (table, chain, matches, comment, target) in JUMPS {
        // A rule inserted twice needs two deletes; -D fails once none is left.
        for _ in 0..8 {
            let deleted = command_in(netns, "iptables")?
                .args(["-t", table, "-D", chain])
                .args(*matches)
                .args(["-m", "comment", "--comment", comment, "-j", target])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running iptables")?
                .success();
            if !deleted {
                break;
            }
        }
    }
    let mut cmd = command_in(netns, "iptables-restore")?;
    cmd.arg("--noflush");
    feed(cmd, &kube_proxy_iptables_cleanup(svc))
        .with_context(|| format!("removing the kube-proxy chains in {netns}"))
}

/// Installs `svc` in `netns` as [`nft_dnat`].
pub fn apply_nft(netns: &str, svc: &ServiceSpec) -> anyhow::Result<()> {
    let mut cmd = command_in(netns, "nft")?;
    cmd.args(["-f", "-"]);
    feed(cmd, &nft_dnat(svc)).with_context(|| format!("installing table ip svcdemo in {netns}"))
}

/// Removes what [`apply_nft`] installed.
pub fn remove_nft(netns: &str) -> anyhow::Result<()> {
    let mut cmd = command_in(netns, "nft")?;
    cmd.args(["-f", "-"]);
    feed(cmd, &nft_remove()).with_context(|| format!("removing table ip svcdemo in {netns}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::demo_service;

    #[test]
    fn chain_names_match_kube_proxy() {
        // From kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go).
        assert_eq!(chain_hash(&["ns1/svc1:p80", "tcp"]), "XPGD46QRK7WJZT7O");
        assert_eq!(
            chain_hash(&["ns1/svc1:p80", "tcp", "10.180.0.1:80"]),
            "SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let svc = demo_service(vec![
            Ipv4Addr::new(10, 244, 0, 2),
            Ipv4Addr::new(10, 244, 1, 2),
        ]);
        let rules = kube_proxy_iptables(&svc, "10.244.0.0/16");
        let [tcp, udp] = ports(&svc);
        let svc_tcp = tcp.svc_chain();
        assert!(rules.contains(&format!(
            "-A {svc_tcp} -m comment --comment \"default/demo:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ\n"
        )));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        let sep = udp.sep_chain(Ipv4Addr::new(10, 244, 1, 2));
        assert!(rules.contains(&format!(
            "-A {sep} -m comment --comment default/demo:dns -m udp -p udp -j DNAT --to-destination 10.244.1.2:5353\n"
        )));
        assert!(rules.contains(&format!(
            "-A KUBE-NODEPORTS -m comment --comment default/demo:http -m tcp -p tcp --dport 30080 -j {}\n",
            tcp.ext_chain()
        )));
        assert!(rules.contains(
            "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        // The nodeports jump is the last rule of KUBE-SERVICES.
        let last = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last.ends_with("-j KUBE-NODEPORTS"));
        // The last endpoint takes what is left, without a statistic match.
        assert_eq!(rules.matches("--probability").count(), 2);
    }

    #[test]
    fn probabilities_split_evenly() {
        let svc = demo_service(vec![
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        ]);
        let rules = kube_proxy_iptables(&svc, "10.244.0.0/16");
        assert!(rules.contains("--probability 0.3333333333 "));
        assert!(rules.contains("--probability 0.5000000000 "));
    }

    #[test]
    fn nft_maps_every_backend() {
        let svc = demo_service(vec![
            Ipv4Addr::new(10, 244, 0, 2),
            Ipv4Addr::new(10, 244, 1, 2),
        ]);
        let script = nft_dnat(&svc);
        assert!(script.contains(
            "ip daddr 10.96.0.10 udp dport 53 dnat to numgen random mod 2 map { 0 : 10.244.0.2, 1 : 10.244.1.2 } : 5353"
        ));
        assert!(script.starts_with(&nft_remove()));
    }
}
