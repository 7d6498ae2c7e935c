//! A demo Kubernetes Service for the lab: the rules kube-proxy's iptables
//! mode writes for it (or the same Service as a plain nftables script),
//! backend servers that run inside pods, and client probes.
//!
//! The rules are the point: pods reaching a ClusterIP through DNAT only work
//! when the datapath lets both directions of the connection through the
//! node's conntrack, so the lab installs the Service exactly as a cluster
//! would and checks it like any other connectivity.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::netns::{command_in, run_in};

/// The namespace the demo Service lives in (part of kube-proxy's chain
/// hashes and comments).
pub const NAMESPACE: &str = "default";
/// kube-proxy's default masquerade bit (`--iptables-masquerade-bit=14`).
const MASQ_MARK: &str = "0x4000";
/// Port names: they are part of the `ServicePortName` kube-proxy hashes.
const TCP_PORT_NAME: &str = "http";
const UDP_PORT_NAME: &str = "dns";

/// A ClusterIP Service with one TCP port (also exposed as a NodePort) and
/// one UDP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub tcp_port: u16,
    pub udp_port: u16,
    pub node_port: u16,
    pub target_tcp_port: u16,
    pub target_udp_port: u16,
    pub backends: Vec<Ipv4Addr>,
}

/// The lab's Service: ClusterIP 10.96.0.10 (the first address kube-dns
/// gets in a kubeadm cluster), TCP 80 -> 8080, UDP 53 -> 5353 (DNS-shaped),
/// NodePort 30080 -> 8080.
#[must_use]
pub fn demo_service(backends: Vec<Ipv4Addr>) -> ServiceSpec {
    ServiceSpec {
        name: "demo".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        tcp_port: 80,
        udp_port: 53,
        node_port: 30_080,
        target_tcp_port: 8080,
        target_udp_port: 5353,
        backends,
    }
}

/// RFC 4648 base32 of the first 10 bytes (16 characters), which is all of
/// the encoding kube-proxy keeps.
fn base32_16(bytes: &[u8]) -> String {
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
fn chain_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    base32_16(&hasher.finalize())
}

/// One port of the Service as kube-proxy sees it.
struct ServicePort {
    /// `namespace/name:port-name`.
    name: String,
    proto: &'static str,
    port: u16,
    target: u16,
    node_port: Option<u16>,
}

impl ServicePort {
    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", chain_hash(&[&self.name, self.proto]))
    }

    fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", chain_hash(&[&self.name, self.proto]))
    }

    fn sep_chain(&self, backend: Ipv4Addr) -> String {
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
const JUMPS: &[(&str, &str, &[&str], &str, &str)] = &[
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

const FILTER_CHAINS: &[&str] = &[
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
fn jump_args(matches: &[&str], comment: &str, target: &str) -> String {
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
            write_port(&mut s, svc, &port, cluster_cidr);
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

/// The nat rules of one port with endpoints, in kube-proxy's order.
fn write_port(s: &mut String, svc: &ServiceSpec, port: &ServicePort, cluster_cidr: &str) {
    let (name, proto, p, ip) = (&port.name, port.proto, port.port, svc.cluster_ip);
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
    let n = svc.backends.len();
    for (i, backend) in svc.backends.iter().enumerate() {
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
    for backend in &svc.backends {
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

/// The backend server (`podnet-lab serve`), run inside a pod's netns until
/// killed. TCP: per connection a line `<name> <peer ip>:<peer port>`, then
/// an echo of everything until EOF. UDP: per datagram a reply from the same
/// socket, `<name> <peer ip>:<peer port> ` followed by the datagram.
pub fn serve(name: &str, tcp_port: u16, udp_port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, tcp_port))
        .with_context(|| format!("binding TCP port {tcp_port}"))?;
    let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_port))
        .with_context(|| format!("binding UDP port {udp_port}"))?;
    eprintln!("serve {name}: tcp 0.0.0.0:{tcp_port}, udp 0.0.0.0:{udp_port}");
    let udp_name = name.to_owned();
    std::thread::spawn(move || serve_udp(&udp, &udp_name));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    if let Err(e) = serve_tcp(stream, &name) {
                        eprintln!("serve {name}: tcp connection: {e:#}");
                    }
                });
            }
            Err(e) => eprintln!("serve {name}: accept: {e}"),
        }
    }
    Ok(())
}

fn serve_tcp(mut stream: TcpStream, name: &str) -> anyhow::Result<()> {
    let peer = stream.peer_addr()?;
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    let mut reader = stream.try_clone()?;
    std::io::copy(&mut reader, &mut stream)?;
    Ok(())
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                let mut reply = format!("{name} {peer} ").into_bytes();
                reply.extend_from_slice(&buf[..len]);
                if let Err(e) = socket.send_to(&reply, peer) {
                    eprintln!("serve {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("serve {name}: udp receive: {e}");
                // Not a busy loop if the error repeats.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `<name> <ip>:<port>` as the server writes it.
fn parse_hello(text: &str) -> anyhow::Result<(String, SocketAddrV4)> {
    let (name, addr) = text
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("unexpected greeting {text:?}"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("unexpected address in greeting {text:?}"))?;
    Ok((name.to_owned(), addr))
}

/// The greeting line, read a byte at a time so nothing after it (echoed
/// data) is consumed.
fn read_greeting(stream: &mut TcpStream) -> anyhow::Result<(String, SocketAddrV4)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 {
        let n = stream.read(&mut byte).context("reading the greeting")?;
        anyhow::ensure!(
            n == 1,
            "connection closed before the greeting ({} bytes)",
            line.len()
        );
        if byte[0] == b'\n' {
            return parse_hello(&String::from_utf8_lossy(&line));
        }
        line.push(byte[0]);
    }
    anyhow::bail!("greeting too long")
}

fn connect(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr.into(), timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Connects to `addr` from inside `netns` and returns who answered: the
/// backend's name and the source address the backend saw.
pub fn tcp_query(
    netns: &str,
    addr: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddrV4)> {
    run_in(netns, move || {
        let mut stream = connect(addr, timeout)?;
        read_greeting(&mut stream).with_context(|| format!("TCP to {addr}"))
    })?
}

/// A DNS query for `demo.default.svc.cluster.local` A: the server does not
/// parse it, but the bytes on the wire look like what pods send to a DNS
/// Service.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags: recursion desired; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["demo", NAMESPACE, "svc", "cluster", "local"] {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    // Root, QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends a DNS-shaped datagram to `addr` from inside `netns` and returns
/// who answered (backend name, the source address the backend saw). The
/// socket is connected, as a resolver's is: a reply from any other address
/// than `addr` (an un-NATed reply straight from a backend) is not accepted.
pub fn udp_query(
    netns: &str,
    addr: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddrV4)> {
    run_in(netns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket
            .connect(addr)
            .with_context(|| format!("connecting UDP to {addr}"))?;
        let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(0x5a5a);
        let query = dns_query(id);
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        // A few tries: the first datagram can be lost while neighbours are
        // resolved along the path.
        let mut last_err = anyhow::anyhow!("no reply from {addr} within {timeout:?}");
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            socket.set_read_timeout(Some(left.min(timeout / 3).max(Duration::from_millis(50))))?;
            socket
                .send(&query)
                .with_context(|| format!("UDP to {addr}"))?;
            match socket.recv(&mut buf) {
                Ok(len) => return parse_udp_reply(&buf[..len], &query),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    // E.g. ECONNREFUSED from an ICMP error; retry until the
                    // deadline, the path may still be settling.
                    last_err = anyhow::Error::new(e).context(format!("UDP from {addr}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Err(last_err)
    })?
}

fn parse_udp_reply(reply: &[u8], query: &[u8]) -> anyhow::Result<(String, SocketAddrV4)> {
    // `<name> <addr> <payload>`: the payload may hold any byte, so split on
    // the first two spaces only.
    let mut parts = reply.splitn(3, |b| *b == b' ');
    let name = parts.next().context("empty reply")?;
    let addr = parts.next().context("no address in the reply")?;
    let payload = parts.next().unwrap_or_default();
    anyhow::ensure!(
        payload == query,
        "the reply does not echo the query ({} bytes back)",
        payload.len()
    );
    parse_hello(&format!(
        "{} {}",
        String::from_utf8_lossy(name),
        String::from_utf8_lossy(addr)
    ))
}

/// Connect and read timeout of a [`TcpSession`].
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// A long-lived TCP connection to a backend (through a Service or not).
/// The socket belongs to the netns it was opened in, so the session can be
/// used from any thread afterwards.
pub struct TcpSession {
    stream: TcpStream,
    /// The backend that answered.
    pub backend: String,
    /// The source address the backend saw.
    pub seen_as: SocketAddrV4,
}

/// Opens a [`TcpSession`] to `addr` from inside `netns`.
pub fn tcp_session(netns: &str, addr: SocketAddrV4) -> anyhow::Result<TcpSession> {
    run_in(netns, move || {
        let mut stream = connect(addr, SESSION_TIMEOUT)?;
        let (backend, seen_as) =
            read_greeting(&mut stream).with_context(|| format!("TCP to {addr}"))?;
        Ok(TcpSession {
            stream,
            backend,
            seen_as,
        })
    })?
}

impl TcpSession {
    /// Sends `msg` and checks that exactly it comes back.
    pub fn echo(&mut self, msg: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(msg)
            .with_context(|| format!("writing to the session with {}", self.backend))?;
        let mut back = vec![0u8; msg.len()];
        self.stream
            .read_exact(&mut back)
            .with_context(|| format!("reading the echo from {}", self.backend))?;
        anyhow::ensure!(back == msg, "{} echoed something else", self.backend);
        Ok(())
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn udp_reply_parses() {
        let query = dns_query(7);
        let mut reply = b"node1-pod1 10.244.0.3:40000 ".to_vec();
        reply.extend_from_slice(&query);
        let (name, addr) = parse_udp_reply(&reply, &query).unwrap();
        assert_eq!(name, "node1-pod1");
        assert_eq!(addr, "10.244.0.3:40000".parse().unwrap());
        assert!(parse_udp_reply(b"x 1.2.3.4:5 other", &query).is_err());
    }
}
