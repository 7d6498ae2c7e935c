//! The metrics port and the agent's socket under load, with the agent's
//! descriptors limited (`RLIMIT_NOFILE`): hundreds of parallel scrapes and
//! connections that never send a request (what any pod can do to a port on
//! its node's address) must not stall CNI ADD/DEL, stop /healthz or end
//! the agent; running out of descriptors on the agent's socket (a root
//! client opening connections) must not end it either.
//!
//! Timings on a shared machine are noisy: the bounds are "completes within
//! seconds" against "hangs", and the measured latencies are printed.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use podnet_tests::{
    netns,
    node::{Node, Pod},
    podnetd::open_descriptors,
    privileged, wait_up_to,
};

/// The agent's descriptor limit: what it holds at rest (about 70: BPF
/// maps and programs, the socket LB's verified programs among them, its
/// sockets, its two runtimes', the metrics' map readers) plus a few dozen,
/// as in the report that found the agent dying (48, with fewer at rest).
/// Checked against what it really holds below: it grows with the
/// datapath.
const NOFILE: u64 = 112;
/// Scraping threads, and the requests each keeps in flight at once.
const SCRAPERS: usize = 30;
const IN_FLIGHT: usize = 10;
/// Connections opened to the metrics port that never send a request.
const IDLE_CONNECTIONS: usize = 200;
/// ADD+DEL rounds timed while the port is flooded.
const ROUNDS: usize = 5;
/// An ADD or DEL that takes longer than this is stuck, not slow.
const STUCK: Duration = Duration::from_secs(10);

/// What the scrapers saw.
#[derive(Debug, Default)]
struct ScrapeStats {
    ok: u64,
    /// Closed or refused without an answer, or a non-200 answer.
    refused: u64,
    /// Connect or read timed out.
    timed_out: u64,
}

/// One HTTP/1.0 `GET path`; the status, `None` when the connection was
/// closed or reset without one; `Err` on a timeout.
fn get_status(addr: SocketAddr, path: &str, limit: Duration) -> Result<Option<u16>, ()> {
    let mut stream = match TcpStream::connect_timeout(&addr, limit) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(()),
        Err(_) => return Ok(None),
    };
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return Ok(None);
    }
    read_status(&mut stream)
}

fn read_status(stream: &mut TcpStream) -> Result<Option<u16>, ()> {
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(());
        }
        Err(_) => return Ok(None),
    }
    let text = String::from_utf8_lossy(&raw);
    Ok(text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok()))
}

/// [`SCRAPERS`] threads in `netns`, each keeping [`IN_FLIGHT`] `/metrics`
/// requests open at once, until `stop`.
fn flood_scrapes(
    netns: &str,
    addr: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<ScrapeStats>> {
    (0..SCRAPERS)
        .map(|_| {
            let stop = Arc::clone(stop);
            netns::spawn_in(netns, move || {
                let mut stats = ScrapeStats::default();
                let limit = Duration::from_secs(15);
                while !stop.load(Ordering::Relaxed) {
                    let mut open = Vec::new();
                    for _ in 0..IN_FLIGHT {
                        match TcpStream::connect_timeout(&addr, limit) {
                            Ok(mut s) => {
                                let _ = s.set_read_timeout(Some(limit));
                                if write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")
                                    .is_ok()
                                {
                                    open.push(s);
                                } else {
                                    stats.refused += 1;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                                stats.timed_out += 1;
                            }
                            Err(_) => stats.refused += 1,
                        }
                    }
                    for mut s in open {
                        match read_status(&mut s) {
                            Ok(Some(200)) => stats.ok += 1,
                            Ok(_) => stats.refused += 1,
                            Err(()) => stats.timed_out += 1,
                        }
                    }
                }
                stats
            })
            .expect("a scraper thread in the node's netns")
        })
        .collect()
}

/// What the /healthz prober saw.
#[derive(Debug, Default)]
struct Probes {
    ok: u64,
    failed: u64,
    slowest_ok: Duration,
    /// The longest time without a successful probe.
    longest_gap: Duration,
}

/// Probes `/healthz` every 100 ms (2 s timeout each, like a kubelet probe
/// with a generous timeout) until `stop`.
fn probe_health(netns: &str, addr: SocketAddr, stop: &Arc<AtomicBool>) -> JoinHandle<Probes> {
    let stop = Arc::clone(stop);
    netns::spawn_in(netns, move || {
        let mut probes = Probes::default();
        let mut last_ok = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let ok = get_status(addr, "/healthz", Duration::from_secs(2)) == Ok(Some(200));
            // Since the last answer, this probe's own wait included.
            probes.longest_gap = probes.longest_gap.max(last_ok.elapsed());
            if ok {
                probes.ok += 1;
                probes.slowest_ok = probes.slowest_ok.max(started.elapsed());
                last_ok = Instant::now();
            } else {
                probes.failed += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        probes
    })
    .expect("the prober thread in the node's netns")
}

/// Connections to `addr` from inside `netns` that never send anything.
fn idle_connections(netns: &str, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    netns::run_in(netns, move || {
        (0..count)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
            .collect()
    })
    .expect("connecting in the node's netns")
}

/// One ADD then DEL of a pod through the real plugin: how long each took.
fn add_del(node: &Node, id: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let pod: Pod = node
        .add_pod(id)
        .unwrap_or_else(|e| panic!("ADD {id}: {e:#}"));
    let add = started.elapsed();
    let started = Instant::now();
    let del = node.del_pod(&pod).expect("DEL ran");
    let took = started.elapsed();
    assert!(del.success, "DEL {id}: {del:?}\n{}", node.agent_log());
    (add, took)
}

fn healthz(node: &Node, addr: SocketAddr) -> Option<u16> {
    netns::run_in(node.netns.name(), move || {
        get_status(addr, "/healthz", Duration::from_secs(2))
            .ok()
            .flatten()
    })
    .expect("probing in the node's netns")
}

fn assert_alive(node: &mut Node) {
    assert!(
        node.wait_agent_exit(Duration::ZERO).is_none(),
        "the agent exited; its log:\n{}",
        node.agent_log()
    );
}

/// A node whose agent serves metrics on `addr` with [`NOFILE`]
/// descriptors, ready; what it holds at rest is printed and leaves room.
fn limited_node(tag: &str, pod_cidr: &str, addr: SocketAddr) -> Node {
    let node = Node::start_with_agent_args_and_nofile(
        tag,
        pod_cidr,
        &["--metrics-addr", &addr.to_string()],
        NOFILE,
    )
    .expect("node");
    wait_up_to(Duration::from_secs(15), "/readyz answers 200", || {
        netns::run_in(node.netns.name(), move || {
            get_status(addr, "/readyz", Duration::from_secs(2)) == Ok(Some(200))
        })
        .unwrap_or(false)
    });
    let pid = node.agent_pid().expect("the agent runs");
    let at_rest = open_descriptors(pid).expect("the agent's descriptors");
    eprintln!("the agent holds {at_rest} descriptors at rest; its limit is {NOFILE}");
    // What the metrics port may hold, and the one it is accepting.
    let metrics = podnet::agent::http::connection_limit(Some(NOFILE)) + 1;
    assert!(
        at_rest + metrics + 8 <= usize::try_from(NOFILE).expect("fits"),
        "the limit leaves the agent room for an ADD with the metrics port full"
    );
    node
}

fn print_latencies(what: &str, took: &[(Duration, Duration)]) {
    let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let adds: Vec<String> = took.iter().map(|(a, _)| ms(a)).collect();
    let dels: Vec<String> = took.iter().map(|(_, d)| ms(d)).collect();
    eprintln!("{what}: ADD ms {adds:?}, DEL ms {dels:?}");
}

#[test]
fn scrape_floods_neither_stall_cni_nor_stop_health_nor_kill_the_agent() {
    if !privileged("scrape_floods_neither_stall_cni_nor_stop_health_nor_kill_the_agent") {
        return;
    }
    let addr: SocketAddr = "127.0.0.1:9962".parse().expect("address");
    let mut node = limited_node("mflood", "10.244.33.0/24", addr);

    // Unloaded ADD/DEL latency, for comparison.
    let quiet: Vec<_> = (0..2)
        .map(|i| add_del(&node, &format!("mflood-q{i}")))
        .collect();
    print_latencies("unloaded", &quiet);

    let stop = Arc::new(AtomicBool::new(false));
    let probing = probe_health(node.netns.name(), addr, &stop);
    // Connections that never send a request, far more than the agent has
    // descriptors, then hundreds of parallel scrapes.
    let idle = idle_connections(node.netns.name(), addr, IDLE_CONNECTIONS);
    eprintln!("{} idle connections open", idle.len());
    let scrapers = flood_scrapes(node.netns.name(), addr, &stop);
    std::thread::sleep(Duration::from_secs(1));

    let mut loaded = Vec::new();
    for i in 0..ROUNDS {
        let (add, del) = add_del(&node, &format!("mflood-{i}"));
        assert!(add < STUCK && del < STUCK, "ADD {add:?}, DEL {del:?}");
        loaded.push((add, del));
    }
    // Long enough for every idle connection to time out on the server.
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    let mut stats = ScrapeStats::default();
    for scraper in scrapers {
        let s = scraper.join().expect("scraper");
        stats.ok += s.ok;
        stats.refused += s.refused;
        stats.timed_out += s.timed_out;
    }
    let probes = probing.join().expect("prober");
    print_latencies("while scraped", &loaded);
    eprintln!("scrapes: {stats:?}; /healthz probes: {probes:?}");

    assert_alive(&mut node);
    assert!(
        stats.ok > 0,
        "some scrapes were answered: {stats:?}\n{}",
        node.agent_log()
    );
    assert!(
        probes.ok > 0,
        "/healthz answered during the flood: {probes:?}"
    );
    assert!(
        probes.longest_gap < Duration::from_secs(10),
        "/healthz went unanswered for {:?} during the flood\n{}",
        probes.longest_gap,
        node.agent_log()
    );
    wait_up_to(
        Duration::from_secs(10),
        "/healthz answers after the flood",
        || healthz(&node, addr) == Some(200),
    );
    let after = add_del(&node, "mflood-after");
    print_latencies("after", &[after]);
    assert_alive(&mut node);
}

#[test]
fn running_out_of_descriptors_on_the_agent_socket_does_not_end_the_agent() {
    if !privileged("running_out_of_descriptors_on_the_agent_socket_does_not_end_the_agent") {
        return;
    }
    let addr: SocketAddr = "127.0.0.1:9963".parse().expect("address");
    let mut node = limited_node("mfds", "10.244.34.0/24", addr);

    // More connections to the agent's socket than it has descriptors, none
    // sending a request; metrics connections while they are held.
    let socket = node.socket();
    let held: Vec<UnixStream> = (0..2 * NOFILE)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    eprintln!("{} connections held to the agent's socket", held.len());
    let during = idle_connections(node.netns.name(), addr, 20);
    std::thread::sleep(Duration::from_secs(2));
    drop(during);
    drop(held);
    // The agent drops connections that sent nothing after its request
    // timeout (5 s) and accepts what waited.
    std::thread::sleep(Duration::from_secs(1));
    assert_alive(&mut node);
    wait_up_to(Duration::from_secs(15), "/healthz answers again", || {
        healthz(&node, addr) == Some(200)
    });
    let started = Instant::now();
    let mut after = None;
    while after.is_none() && started.elapsed() < Duration::from_secs(15) {
        assert_alive(&mut node);
        if podnet::api::Client::new(&socket)
            .call::<podnet::api::NodeInfo>(&podnet::api::Request::Node)
            .is_ok()
        {
            after = Some(started.elapsed());
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let after = after.unwrap_or_else(|| {
        panic!(
            "the agent's socket does not answer again\n{}",
            node.agent_log()
        )
    });
    eprintln!("the socket answered again {after:?} after the flood");
    let took = add_del(&node, "mfds-after");
    print_latencies("after the socket flood", &[took]);
    assert_alive(&mut node);
    let log = node.agent_log();
    assert!(
        log.contains("Too many open files") || log.contains("os error 24"),
        "the agent ran out of descriptors (else the test tested nothing):\n{log}"
    );
}
