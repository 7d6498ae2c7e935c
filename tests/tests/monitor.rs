//! `podnetctl monitor`: drop events from the datapath, through the agent,
//! with the pod they belong to; and the per-CPU rate limit under a flood of
//! forged frames, with every drop still counted and every event that was not
//! sent accounted for as suppressed.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use podnet_common::event::DEFAULT_DROP_EVENTS_PER_SEC;
use podnet_tests::{bins, node::Node, privileged, spoof};
use serde_json::Value;

const PORT: u16 = 7011;
const FLOOD: usize = 5000;

/// `podnetctl --json monitor --drops`, its stdout lines collected by a
/// thread; killed when dropped.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Monitor {
    fn start(node: &Node) -> Self {
        let mut child = std::process::Command::new(bins::binary("podnetctl"))
            .arg("--socket")
            .arg(node.socket())
            .args(["--json", "monitor", "--drops"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start podnetctl monitor");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("monitor printed no JSON ({e}): {line}"));
                sink.lock().expect("lines").push(value);
            }
        });
        Self { child, lines }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// The first drop event from index `from` on whose source is `src`.
    fn drop_from(&self, from: usize, src: Ipv4Addr) -> Option<Value> {
        self.lines()
            .into_iter()
            .skip(from)
            .find(|l| l["type"] == "drop" && l["src"] == src.to_string())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spoofed_drops(node: &Node) -> u64 {
    node.counter("spoofed_source_ip").expect("counters")
}

#[test]
fn monitor_shows_spoofed_drops_with_their_pod_and_rate_limits_a_flood() {
    if !privileged("monitor_shows_spoofed_drops_with_their_pod_and_rate_limits_a_flood") {
        return;
    }
    let node = Node::start("mon", "10.244.7.0/24").expect("node");
    let attacker = node.add_pod("monitor-attacker").expect("ADD attacker");
    let target = node.add_pod("monitor-target").expect("ADD target");
    let pod_mac = spoof::mac_of(attacker.netns.name(), "eth0").expect("pod MAC");
    let gw_mac =
        spoof::host_veth_mac(attacker.netns.name(), node.netns.name()).expect("gateway MAC");
    let endpoints = node.podnetctl(&["endpoints"]).expect("endpoints");
    let host_ifindex = endpoints
        .as_array()
        .expect("endpoint list")
        .iter()
        .find(|e| e["endpoint"]["owner"]["container_id"] == attacker.container_id.as_str())
        .and_then(|e| e["endpoint"]["host_ifindex"].as_u64())
        .expect("the attacker's host veth ifindex");
    let forged = |src: Ipv4Addr, tag: &str| {
        spoof::udp_frame(
            (gw_mac, pod_mac),
            (src, target.ip),
            PORT,
            format!("forged-{tag}").as_bytes(),
        )
    };
    let probe_src = Ipv4Addr::new(10, 244, 7, 250);
    let flood_src = Ipv4Addr::new(10, 244, 7, 251);

    let monitor = Monitor::start(&node);
    // The stream starts when the agent has the subscription: probe until
    // one forged frame's event shows (each probe waits for its own).
    let mut event = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while event.is_none() && Instant::now() < deadline {
        spoof::send_raw(attacker.netns.name(), "eth0", &[forged(probe_src, "probe")])
            .expect("send a forged frame");
        let wait = Instant::now() + Duration::from_secs(1);
        while event.is_none() && Instant::now() < wait {
            event = monitor.drop_from(0, probe_src);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let event = event.unwrap_or_else(|| {
        panic!(
            "no drop event for a forged source within 15 s; monitor printed {:?}; agent log:\n{}",
            monitor.lines(),
            node.agent_log()
        )
    });
    assert_eq!(event["reason"], "spoofed_source_ip", "{event}");
    assert_eq!(event["program"], "from_pod", "{event}");
    assert_eq!(
        event["pod"]["container_id"],
        attacker.container_id.as_str(),
        "{event}"
    );
    assert_eq!(event["pod"]["ip"], attacker.ip.to_string(), "{event}");
    assert_eq!(event["pod"]["ifname"], "eth0", "{event}");
    assert_eq!(event["pod"]["matched"], "veth", "{event}");
    assert_eq!(event["ifindex"].as_u64(), Some(host_ifindex), "{event}");
    assert_eq!(
        event["src"],
        probe_src.to_string(),
        "the forged source: {event}"
    );
    assert_eq!(event["dst"], target.ip.to_string(), "{event}");
    assert_eq!(event["proto"], "udp", "{event}");
    assert_eq!(event["dst_port"].as_u64(), Some(u64::from(PORT)), "{event}");
    assert_eq!(event["src_port"].as_u64(), Some(40_000), "{event}");

    // A flood: far more forged frames than the rate lets through.
    let seen_before = monitor.lines().len();
    let drops_before = spoofed_drops(&node);
    let frames: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| forged(flood_src, &i.to_string()))
        .collect();
    let started = Instant::now();
    spoof::send_raw(attacker.netns.name(), "eth0", &frames).expect("send the flood");
    let flood_secs = started.elapsed().as_secs_f64();
    // Suppressed counts are published once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let dropped = spoofed_drops(&node) - drops_before;
    let after: Vec<Value> = monitor.lines().into_iter().skip(seen_before).collect();
    assert!(
        !after.iter().any(|l| l["type"] == "lost"),
        "the monitor kept up: {after:?}"
    );
    let events = after
        .iter()
        .filter(|l| l["type"] == "drop" && l["src"] == flood_src.to_string())
        .inspect(|l| {
            assert_eq!(l["reason"], "spoofed_source_ip", "{l}");
            assert_eq!(
                l["pod"]["container_id"],
                attacker.container_id.as_str(),
                "{l}"
            );
        })
        .count() as u64;
    let suppressed: u64 = after
        .iter()
        .filter(|l| l["type"] == "suppressed" && l["reason"] == "spoofed_source_ip")
        .map(|l| l["count"].as_u64().expect("a count"))
        .sum();
    eprintln!(
        "flood: {FLOOD} frames in {flood_secs:.3} s: {dropped} dropped, {events} events, \
         {suppressed} suppressed"
    );
    assert_eq!(
        dropped, FLOOD as u64,
        "every forged frame dropped and counted"
    );
    // Per CPU: a burst of one second's worth, then the rate.
    // Every CPU that may run the program has its own bucket.
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as f64;
    let limit = (cpus * f64::from(DEFAULT_DROP_EVENTS_PER_SEC) * (1.0 + flood_secs)).ceil();
    assert!(
        events >= 1 && (events as f64) <= limit,
        "{events} events for {FLOOD} drops in {flood_secs:.3} s (limit {limit} on {cpus} CPUs)"
    );
    assert_eq!(
        events + suppressed,
        dropped,
        "every drop is either reported or summed as suppressed ({events} events, {suppressed} suppressed)"
    );
}
