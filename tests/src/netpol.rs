//! NetworkPolicy end to end, as the upstream suite
//! (kubernetes test/e2e/network/netpol) checks it: the lab's e2e model
//! (namespaces x, y, z with pods a, b, c; [`crate::lab::LabLayout::add_e2e_model`])
//! is probed pod to pod, all 81 pairs, per port/protocol, and the observed
//! truth table is compared with the expected one ([`Reachability`]).
//!
//! Probes run from inside the client pod's netns, on a thread entered into
//! it per probe (no process per probe), [`PARALLEL`] at once: TCP connects with a 1 s timeout and
//! reads the server's name; UDP sends a datagram and waits 500 ms for the
//! answer, twice. A reachable pair counts only when the server that
//! answered is the one probed.
//!
//! UDP probes take their source ports in sequence per netns
//! ([`next_udp_source_port`]), not the kernel's random pick: podnet keeps a
//! tracked UDP flow for 120 s across policy changes (established flows
//! survive a change, as in Cilium and Calico), so a probe that happened to
//! reuse the 5-tuple of a probe allowed a minute earlier rides that entry
//! and shows a denied pair as reachable. With ~100 such entries per pair
//! and ~90 denied UDP probes per round over 28,232 ephemeral ports, a
//! random pick collides in roughly one round in three (CI saw it once).
//!
//! Timing on the development machine (2 CPUs, 2-node lab, debug build):
//! one full probe of the four port/protocols (324 probes) takes about
//! 0.05 s when everything is reachable, and 5.1 s when 40 of the 81 pairs
//! are denied on every table (160 probes timing out: TCP after its 1 s, UDP
//! after 2 x 500 ms, [`PARALLEL`] at once).
//!
//! SCTP is not probed: this machine's kernel has no SCTP sockets
//! (`CONFIG_IP_SCTP` is not set).

pub mod cases;

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt as _,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::lab::LabLayout;

/// The e2e model's namespaces and pods (kubernetes/test/e2e/network/netpol).
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The ports the model's pods serve (on TCP and on UDP).
pub const PORTS: [u16; 2] = [80, 81];

/// TCP: connect and greeting read timeout of one probe.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(1);
/// UDP: how long one try waits for the answer.
pub const UDP_WAIT: Duration = Duration::from_millis(500);
/// UDP: datagrams sent before a pair counts as unreachable.
pub const UDP_TRIES: u32 = 2;
/// Probes in flight at once.
pub const PARALLEL: usize = 32;

/// A protocol of the model. (No SCTP: see the module's documentation.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => anyhow::bail!("protocol {s:?}: tcp or udp (no SCTP on this kernel)"),
        }
    }
}

/// The four port/protocols every case is probed on: 80/TCP, 81/TCP,
/// 80/UDP, 81/UDP.
pub const PORT_PROTOCOLS: [(u16, Protocol); 4] = [
    (80, Protocol::Tcp),
    (81, Protocol::Tcp),
    (80, Protocol::Udp),
    (81, Protocol::Udp),
];

/// The model's pods as the tables name them: `x/a`, `x/b`, ... `z/c`.
#[must_use]
pub fn model_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |pod| format!("{ns}/{pod}")))
        .collect()
}

/// Whether `pod` (`ns/name`) matches `pattern`: `ns/name`, `ns/*`, `*/name`
/// or `*`.
fn matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (Some((pns, pname)), Some((ns, name))) = (pattern.split_once('/'), pod.split_once('/'))
    else {
        return pattern == pod;
    };
    (pns == "*" || pns == ns) && (pname == "*" || pname == name)
}

/// The expected reachability of one port/protocol over the model's pods,
/// built as upstream's `Reachability` is: a default for every pair, then
/// changes. Self-traffic (a pod to itself) is always expected allowed: it
/// never crosses the datapath, and upstream's model allows it too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pods: Vec<String>,
    /// `cells[from][to]`.
    cells: Vec<Vec<bool>>,
}

impl Reachability {
    /// Every pair of `pods` (`ns/name`) set to `default`.
    #[must_use]
    pub fn new(pods: &[String], default: bool) -> Self {
        Self {
            pods: pods.to_vec(),
            cells: vec![vec![default; pods.len()]; pods.len()],
        }
    }

    /// The e2e model's nine pods, every pair set to `default`.
    #[must_use]
    pub fn model(default: bool) -> Self {
        Self::new(&model_pods(), default)
    }

    /// The pods, in table order.
    #[must_use]
    pub fn pods(&self) -> &[String] {
        &self.pods
    }

    /// Sets every pair whose client matches `from` and whose server
    /// matches `to` (`ns/name`, `ns/*`, `*/name` or `*`).
    pub fn expect_peer(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        for i in 0..self.pods.len() {
            if !matches(from, &self.pods[i]) {
                continue;
            }
            for j in 0..self.pods.len() {
                if matches(to, &self.pods[j]) {
                    self.cells[i][j] = allowed;
                }
            }
        }
        self
    }

    /// Everything into `pod` (a pattern as in [`Self::expect_peer`]).
    pub fn expect_all_ingress(&mut self, pod: &str, allowed: bool) -> &mut Self {
        self.expect_peer("*", pod, allowed)
    }

    /// Everything out of `pod` (a pattern as in [`Self::expect_peer`]).
    pub fn expect_all_egress(&mut self, pod: &str, allowed: bool) -> &mut Self {
        self.expect_peer(pod, "*", allowed)
    }

    /// Every pair from a pod of namespace `ns` to `to`.
    pub fn expect_from_namespace(&mut self, ns: &str, to: &str, allowed: bool) -> &mut Self {
        self.expect_peer(&format!("{ns}/*"), to, allowed)
    }

    /// Every pair from `from` to a pod of namespace `ns`.
    pub fn expect_to_namespace(&mut self, from: &str, ns: &str, allowed: bool) -> &mut Self {
        self.expect_peer(from, &format!("{ns}/*"), allowed)
    }

    /// Whether `from` may reach `to` (indices into [`Self::pods`]).
    #[must_use]
    pub fn allowed(&self, from: usize, to: usize) -> bool {
        from == to || self.cells[from][to]
    }

    /// Whether the pair (`ns/name`) is expected reachable.
    #[must_use]
    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        let i = self.pods.iter().position(|p| p == from)?;
        let j = self.pods.iter().position(|p| p == to)?;
        Some(self.allowed(i, j))
    }

    /// The table as a grid (`1` reachable, `0` not).
    #[must_use]
    pub fn render(&self) -> String {
        grid(
            &self.pods,
            |i, j| if self.allowed(i, j) { "1" } else { "0" },
        )
    }
}

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub reachable: bool,
    /// Who answered, or why not.
    pub detail: String,
}

/// The observed table of one port/protocol.
#[derive(Debug, Clone)]
pub struct Observed {
    pub port: u16,
    pub protocol: Protocol,
    pub pods: Vec<String>,
    /// `cells[from][to]`.
    pub cells: Vec<Vec<ProbeResult>>,
    /// How long the probe took (its share when probed with others).
    pub took: Duration,
}

impl Observed {
    /// The table as a grid (`1` reachable, `0` not).
    #[must_use]
    pub fn render(&self) -> String {
        grid(&self.pods, |i, j| {
            if self.cells[i][j].reachable { "1" } else { "0" }
        })
    }

    /// Whether every pair is as `expected` says.
    #[must_use]
    pub fn matches(&self, expected: &Reachability) -> bool {
        self.wrong(expected).is_empty()
    }

    /// The pairs that differ from `expected`: (from, to).
    #[must_use]
    pub fn wrong(&self, expected: &Reachability) -> Vec<(usize, usize)> {
        let mut wrong = Vec::new();
        for i in 0..self.pods.len() {
            for j in 0..self.pods.len() {
                let want = expected.get(&self.pods[i], &self.pods[j]).unwrap_or(i == j);
                if self.cells[i][j].reachable != want {
                    wrong.push((i, j));
                }
            }
        }
        wrong
    }
}

/// A table over `pods`, rows the clients and columns the servers, as
/// upstream prints its truth tables.
fn grid<'a>(pods: &[String], cell: impl Fn(usize, usize) -> &'a str) -> String {
    let mut out = String::from("-");
    for pod in pods {
        let _ = write!(out, "\t{pod}");
    }
    out.push('\n');
    for (i, from) in pods.iter().enumerate() {
        out.push_str(from);
        for j in 0..pods.len() {
            let _ = write!(out, "\t{}", cell(i, j));
        }
        out.push('\n');
    }
    out
}

/// Expected against observed, as upstream prints a failed comparison: the
/// grid of `.` (as expected) and `X` (wrong), both tables, and every wrong
/// pair with what the probe saw. Empty when they match.
#[must_use]
pub fn diff(expected: &Reachability, observed: &Observed) -> String {
    let wrong = observed.wrong(expected);
    if wrong.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{}/{}: {} of {} pairs wrong\ncomparison (. as expected, X wrong; rows from, columns to):\n",
        observed.port,
        observed.protocol,
        wrong.len(),
        observed.pods.len() * observed.pods.len()
    );
    out.push_str(&grid(&observed.pods, |i, j| {
        if wrong.contains(&(i, j)) { "X" } else { "." }
    }));
    out.push_str("expected (1 reachable, 0 not):\n");
    out.push_str(&expected.render());
    out.push_str("observed:\n");
    out.push_str(&observed.render());
    for (i, j) in wrong {
        let cell = &observed.cells[i][j];
        let _ = writeln!(
            out,
            "  {} -> {}: expected {}, observed {} ({})",
            observed.pods[i],
            observed.pods[j],
            if cell.reachable {
                "blocked"
            } else {
                "reachable"
            },
            if cell.reachable {
                "reachable"
            } else {
                "blocked"
            },
            cell.detail
        );
    }
    out
}

/// Panics with the [`diff`] unless `observed` is as `expected`.
pub fn assert_table(expected: &Reachability, observed: &Observed) {
    let diff = diff(expected, observed);
    assert!(diff.is_empty(), "reachability differs:\n{diff}");
}

/// The model's pods of the lab in table order: (`ns/name`, netns, IP,
/// lab name).
fn lab_pods(layout: &LabLayout) -> anyhow::Result<Vec<(String, String, Ipv4Addr, String)>> {
    model_pods()
        .into_iter()
        .map(|id| {
            let pod = layout
                .pods
                .iter()
                .find(|p| format!("{}/{}", p.k8s_namespace(), p.k8s_name()) == id)
                .with_context(|| format!("the lab has no pod {id} (add the e2e model)"))?;
            Ok((id, pod.netns.clone(), pod.ip, pod.name.clone()))
        })
        .collect()
}

/// Probes all 81 pairs of the model on `port`/`protocol`.
pub fn probe(layout: &LabLayout, port: u16, protocol: Protocol) -> anyhow::Result<Observed> {
    let mut tables = probe_many(layout, &[(port, protocol)])?;
    tables.pop().context("one table")
}

/// Probes all 81 pairs of the model on each of `port_protocols`, every
/// probe of every table in one pool of [`PARALLEL`] threads.
pub fn probe_many(
    layout: &LabLayout,
    port_protocols: &[(u16, Protocol)],
) -> anyhow::Result<Vec<Observed>> {
    let started = Instant::now();
    let pods = lab_pods(layout)?;
    let count = pods.len();
    let jobs: Vec<(usize, usize, usize)> = (0..port_protocols.len())
        .flat_map(|table| {
            (0..count).flat_map(move |from| (0..count).map(move |to| (table, from, to)))
        })
        .collect();
    let results: Mutex<Vec<Option<ProbeResult>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(jobs.len()) {
            scope.spawn(|| {
                loop {
                    let job = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(table, from, to)) = jobs.get(job) else {
                        return;
                    };
                    let (port, protocol) = port_protocols[table];
                    let (_, _, ip, name) = &pods[to];
                    let addr = SocketAddrV4::new(*ip, port);
                    let want = name.clone();
                    // A thread of its own inside the client's netns.
                    let result = crate::netns::run_in(&pods[from].1, move || {
                        probe_one(addr, protocol, &want)
                    })
                    .unwrap_or_else(|e| ProbeResult {
                        reachable: false,
                        detail: format!("entering {}'s netns: {e:#}", pods[from].0),
                    });
                    if let Ok(mut results) = results.lock() {
                        results[job] = Some(result);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a probe thread panicked"))?;
    let took = started.elapsed();
    let ids: Vec<String> = pods.iter().map(|(id, _, _, _)| id.clone()).collect();
    let mut tables = Vec::new();
    let mut results = results.into_iter();
    for &(port, protocol) in port_protocols {
        let mut cells = Vec::with_capacity(count);
        for _ in 0..count {
            let row = results
                .by_ref()
                .take(count)
                .map(|r| r.context("a probe did not run"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            cells.push(row);
        }
        tables.push(Observed {
            port,
            protocol,
            pods: ids.clone(),
            cells,
            took,
        });
    }
    Ok(tables)
}

/// One probe from the calling thread's netns: reachable when the server
/// at `addr` answers with `want` (its lab name).
#[must_use]
pub fn probe_one(addr: SocketAddrV4, protocol: Protocol, want: &str) -> ProbeResult {
    let answer = match protocol {
        Protocol::Tcp => tcp_probe(addr, TCP_TIMEOUT),
        Protocol::Udp => udp_probe(addr, UDP_WAIT, UDP_TRIES),
    };
    match answer {
        Ok(name) if name == want => ProbeResult {
            reachable: true,
            detail: format!("{name} answered"),
        },
        Ok(name) => ProbeResult {
            reachable: false,
            detail: format!("{name} answered instead of {want}"),
        },
        Err(e) => ProbeResult {
            reachable: false,
            detail: format!("{e:#}"),
        },
    }
}

/// Connects to `addr` from the calling thread's netns and returns the name
/// the server greets with (`<name> <peer>\n`). `timeout` bounds the
/// connect and the read each.
pub fn tcp_probe(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.contains(&b'\n') && line.len() < 512 {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the greeting of {addr}"))?;
        anyhow::ensure!(n > 0, "{addr} closed before its greeting");
        line.extend_from_slice(&buf[..n]);
    }
    first_word(&line).with_context(|| format!("greeting of {addr}"))
}

/// Sends a datagram to `addr` from the calling thread's netns and waits
/// `wait` for the answer (`<name> <peer> <datagram>`), `tries` times;
/// returns the name. The socket is connected: only `addr` may answer.
pub fn udp_probe(addr: SocketAddrV4, wait: Duration, tries: u32) -> anyhow::Result<String> {
    let socket = bind_udp_probe_socket()?;
    socket
        .connect(addr)
        .with_context(|| format!("connecting UDP to {addr}"))?;
    socket.set_read_timeout(Some(wait.max(Duration::from_millis(10))))?;
    let mut buf = vec![0u8; 2048];
    let mut last_err = anyhow::anyhow!("no UDP answer from {addr} in {tries} x {wait:?}");
    for _ in 0..tries.max(1) {
        if let Err(e) = socket.send(b"probe") {
            // An ICMP error caused by an earlier try (ECONNREFUSED).
            last_err = anyhow::Error::new(e).context(format!("UDP to {addr}"));
            continue;
        }
        match socket.recv(&mut buf) {
            Ok(len) => return first_word(&buf[..len]).with_context(|| format!("UDP from {addr}")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => last_err = anyhow::Error::new(e).context(format!("UDP from {addr}")),
        }
    }
    Err(last_err)
}

/// The source ports UDP probes cycle through, per netns.
const UDP_SOURCE_PORTS: std::ops::Range<u16> = 20_000..60_000;

/// Next source port for a UDP probe from the calling thread's netns: ports
/// are handed out in sequence, so one netns reuses a port only after
/// 40,000 probes (over 1,000 rounds of the model: minutes, longer than the
/// 120 s a tracked UDP flow lives). `None` when the netns cannot be named.
fn next_udp_source_port() -> Option<u16> {
    static NEXT: Mutex<Option<HashMap<u64, u16>>> = Mutex::new(None);
    let netns = std::fs::metadata("/proc/thread-self/ns/net").ok()?.ino();
    let mut next = NEXT.lock().ok()?;
    let port = next
        .get_or_insert_with(HashMap::new)
        .entry(netns)
        .or_insert(UDP_SOURCE_PORTS.start);
    let taken = *port;
    *port = if taken + 1 >= UDP_SOURCE_PORTS.end {
        UDP_SOURCE_PORTS.start
    } else {
        taken + 1
    };
    Some(taken)
}

/// A UDP socket on the next sequential source port ([`next_udp_source_port`]);
/// on a port already in use, the following ones; the kernel's pick when none
/// of a few is free.
fn bind_udp_probe_socket() -> std::io::Result<UdpSocket> {
    for _ in 0..8 {
        let Some(port) = next_udp_source_port() else {
            break;
        };
        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
}

fn first_word(bytes: &[u8]) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(bytes);
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("an empty answer")
}

/// How long a step's tables may take to show (upstream polls its probes
/// too): the policy has to travel from the datastore to every agent.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Probes until every table of `expect` is observed or `within` has passed
/// (at least two full probes before a failure). `Ok`: how long it took; `Err`: the
/// diffs of the last probe.
pub fn wait_tables(
    layout: &LabLayout,
    expect: &cases::Expect,
    within: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let port_protocols: Vec<(u16, Protocol)> = expect.0.iter().map(|(p, q, _)| (*p, *q)).collect();
    let mut rounds = 0;
    loop {
        let observed = probe_many(layout, &port_protocols).map_err(|e| format!("{e:#}"))?;
        rounds += 1;
        let diffs: String = observed
            .iter()
            .zip(&expect.0)
            .map(|(observed, (_, _, expected))| diff(expected, observed))
            .collect();
        if diffs.is_empty() {
            return Ok(started.elapsed());
        }
        // At least two rounds: the first starts the moment the step was
        // written, before the change can have reached every node (~0.2 s),
        // and a round with denied pairs takes ~5 s of timeouts, so a
        // first round that saw a pod still open would otherwise be the
        // only one.
        if started.elapsed() >= within && rounds >= 2 {
            return Err(diffs);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one case's steps, then always removes what it made: its
/// policies are deleted and, when it relabelled, every Pod and Namespace
/// of the lab is re-applied with the model's labels. `Err`: the diff (or
/// error) of the step that failed.
pub fn run_case(layout: &LabLayout, case: &cases::Case) -> Result<(), String> {
    use std::collections::BTreeMap;
    let mut applied: BTreeMap<(String, String), cases::Policy> = BTreeMap::new();
    let mut relabelled = false;
    let mut result = Ok(());
    for (i, step) in case.steps.iter().enumerate() {
        let outcome = match step {
            cases::Step::Apply(policies) => policies.iter().try_for_each(|p| {
                applied.insert((p.namespace.clone(), p.name.clone()), p.clone());
                layout
                    .podnetctl_stdin("apply", &p.yaml)
                    .map_err(|e| format!("applying {}/{}: {e:#}", p.namespace, p.name))
            }),
            cases::Step::Delete(policies) => policies.iter().try_for_each(|p| {
                applied.remove(&(p.namespace.clone(), p.name.clone()));
                layout
                    .podnetctl_stdin("delete", &p.yaml)
                    .map_err(|e| format!("deleting {}/{}: {e:#}", p.namespace, p.name))
            }),
            cases::Step::PodLabels(pod, labels) => {
                relabelled = true;
                relabel_pod(layout, pod, labels).map_err(|e| format!("relabelling {pod}: {e:#}"))
            }
            cases::Step::NamespaceLabels(ns, labels) => {
                relabelled = true;
                let extra = labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                layout
                    .apply_objects(&[LabLayout::namespace_object(ns, &extra)])
                    .map_err(|e| format!("relabelling namespace {ns}: {e:#}"))
            }
            cases::Step::Expect(expect) => wait_tables(layout, expect, SETTLE)
                .map(|took| eprintln!("  step {}: tables as expected after {took:.1?}", i + 1)),
        };
        if let Err(e) = outcome {
            result = Err(format!("step {} of {}: {e}", i + 1, case.steps.len()));
            break;
        }
    }
    let mut cleanup = Vec::new();
    for policy in applied.values() {
        if let Err(e) = layout.podnetctl_stdin("delete", &policy.yaml) {
            cleanup.push(format!(
                "deleting {}/{}: {e:#}",
                policy.namespace, policy.name
            ));
        }
    }
    if relabelled && let Err(e) = layout.describe_pods() {
        cleanup.push(format!("restoring the model's labels: {e:#}"));
    }
    match (result, cleanup.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => Err(format!("cleaning up: {}", cleanup.join("; "))),
        (Err(e), true) => Err(e),
        (Err(e), false) => Err(format!("{e}\n(and cleaning up: {})", cleanup.join("; "))),
    }
}

/// Re-applies the Pod `ns/name` with the model's labels and `labels`.
fn relabel_pod(layout: &LabLayout, pod: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let lab_pod = layout
        .pods
        .iter()
        .find(|p| format!("{}/{}", p.k8s_namespace(), p.k8s_name()) == pod)
        .with_context(|| format!("no pod {pod}"))?;
    let extra = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    layout.apply_objects(&[LabLayout::pod_object(lab_pod, &extra)])
}

/// Runs `cases` in order, each from a fully open table (checked first: a
/// case that does not start open is failed without running). Prints a line
/// per case; returns the failed ones with their diffs.
pub fn run_cases(layout: &LabLayout, cases: &[cases::Case]) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let started = Instant::now();
        eprintln!(
            "case {}/{} {} (upstream: {})",
            i + 1,
            cases.len(),
            case.name,
            case.upstream
        );
        let outcome = wait_tables(layout, &cases::Expect::open(), SETTLE)
            .map_err(|diff| format!("the table was not open before the case:\n{diff}"))
            .and_then(|_| run_case(layout, case));
        match outcome {
            Ok(()) => eprintln!("case {}: ok in {:.1?}", case.name, started.elapsed()),
            Err(e) => {
                eprintln!(
                    "case {}: FAILED in {:.1?}\n{e}",
                    case.name,
                    started.elapsed()
                );
                failed.push((case.name.to_owned(), e));
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_pairs_and_keeps_self_traffic() {
        let mut r = Reachability::model(true);
        r.expect_all_ingress("x/a", false);
        assert_eq!(r.get("y/b", "x/a"), Some(false));
        assert_eq!(r.get("x/a", "x/a"), Some(true), "self is always allowed");
        assert_eq!(r.get("x/a", "y/b"), Some(true));
        r.expect_from_namespace("x", "x/a", true);
        assert_eq!(r.get("x/b", "x/a"), Some(true));
        assert_eq!(r.get("z/b", "x/a"), Some(false));
        r.expect_to_namespace("*/c", "z", false);
        assert_eq!(r.get("y/c", "z/a"), Some(false));
        assert_eq!(r.get("y/b", "z/a"), Some(true));
        r.expect_all_egress("z/*", false);
        assert_eq!(r.get("z/a", "x/b"), Some(false));
    }

    #[test]
    fn diff_marks_the_wrong_pairs() {
        let expected = Reachability::model(true);
        let pods = model_pods();
        let ok = ProbeResult {
            reachable: true,
            detail: String::new(),
        };
        let mut cells = vec![vec![ok; 9]; 9];
        cells[1][2] = ProbeResult {
            reachable: false,
            detail: "timed out".into(),
        };
        let observed = Observed {
            port: 80,
            protocol: Protocol::Tcp,
            pods,
            cells,
            took: Duration::ZERO,
        };
        let diff = diff(&expected, &observed);
        assert!(diff.contains("1 of 81 pairs wrong"), "{diff}");
        assert!(diff.contains("x/b\t.\t.\tX\t."), "{diff}");
        assert!(diff.contains("x/b -> x/c: expected reachable"), "{diff}");
    }
}
