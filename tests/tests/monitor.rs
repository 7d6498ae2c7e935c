//! `podnetctl monitor`: drop events from the datapath, through the agent,
//! with the pod they belong to; and the per-CPU rate limit under a flood of
//! forged frames, with every drop still counted and every event that was not
//! sent accounted for as suppressed.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use podnet_common::{DropReason, event::DEFAULT_DROP_EVENTS_PER_SEC};
use podnet_tests::{
    bins, counters,
    node::{Node, Pod},
    privileged, spoof,
};
use serde_json::Value;

const PORT: u16 = 7011;
const FLOOD: usize = 5000;
/// Time after the sender returned in which its frames may still be handled
/// (and their events sent): part of the rate bound.
const FLOOD_MARGIN_MS: u64 = 200;

/// `podnetctl [--json] monitor --drops`, its stdout lines collected by a
/// thread; killed when dropped.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(node: &Node, json: bool) -> Self {
        let mut child = std::process::Command::new(bins::binary("podnetctl"))
            .arg("--socket")
            .arg(node.socket())
            .args(json.then_some("--json"))
            .args(["monitor", "--drops"])
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
                sink.lock().expect("lines").push(line);
            }
        });
        Self { child, lines }
    }

    fn text(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The lines as JSON (a `--json` monitor prints nothing else).
    fn lines(&self) -> Vec<Value> {
        self.text()
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("monitor printed no JSON ({e}): {line}"))
            })
            .collect()
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

/// Node with two pods; the attacker forges frames to the target.
struct Scene {
    node: Node,
    attacker: Pod,
    target: Pod,
    pod_mac: [u8; 6],
    gw_mac: [u8; 6],
}

impl Scene {
    fn new() -> Self {
        let node = Node::start("mon", "10.244.7.0/24").expect("node");
        let attacker = node.add_pod("monitor-attacker").expect("ADD attacker");
        let target = node.add_pod("monitor-target").expect("ADD target");
        let pod_mac = spoof::mac_of(attacker.netns.name(), "eth0").expect("pod MAC");
        let gw_mac =
            spoof::host_veth_mac(attacker.netns.name(), node.netns.name()).expect("gateway MAC");
        Self {
            node,
            attacker,
            target,
            pod_mac,
            gw_mac,
        }
    }

    /// A UDP frame from the attacker's MAC with source `src` to the target.
    fn forged(&self, src: Ipv4Addr, tag: &str) -> Vec<u8> {
        spoof::udp_frame(
            (self.gw_mac, self.pod_mac),
            (src, self.target.ip),
            PORT,
            format!("forged-{tag}").as_bytes(),
        )
    }

    fn send(&self, frames: &[Vec<u8>]) {
        spoof::send_raw(self.attacker.netns.name(), "eth0", frames).expect("send forged frames");
    }

    fn attacker_host_ifindex(&self) -> u64 {
        let endpoints = self.node.podnetctl(&["endpoints"]).expect("endpoints");
        endpoints
            .as_array()
            .expect("endpoint list")
            .iter()
            .find(|e| e["endpoint"]["owner"]["container_id"] == self.attacker.container_id.as_str())
            .and_then(|e| e["endpoint"]["host_ifindex"].as_u64())
            .expect("the attacker's host veth ifindex")
    }

    fn spoofed_drops(&self) -> u64 {
        counters::read(&self.node.socket(), DropReason::SpoofedSourceIp)
    }
}

/// The stream starts once the agent has the subscription: forged frames
/// from `src`, one at a time, until one's event shows.
fn first_event(scene: &Scene, monitor: &Monitor, src: Ipv4Addr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        scene.send(&[scene.forged(src, "probe")]);
        let wait = Instant::now() + Duration::from_secs(1);
        while Instant::now() < wait {
            if let Some(event) = monitor.drop_from(0, src) {
                return event;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "no drop event for a forged source within 15 s; monitor printed {:?}; agent log:\n{}",
        monitor.lines(),
        scene.node.agent_log()
    )
}

#[test]
fn monitor_shows_spoofed_drops_with_their_pod_and_rate_limits_a_flood() {
    if !privileged("monitor_shows_spoofed_drops_with_their_pod_and_rate_limits_a_flood") {
        return;
    }
    let scene = Scene::new();
    let monitor = Monitor::start(&scene.node, true);
    let text = Monitor::start(&scene.node, false);
    let probe_src = Ipv4Addr::new(10, 244, 7, 250);
    let event = first_event(&scene, &monitor, probe_src);
    let attacker = &scene.attacker;
    assert_eq!(
        event["reason"],
        DropReason::SpoofedSourceIp.name(),
        "{event}"
    );
    assert_eq!(event["program"], "from_pod", "{event}");
    assert_eq!(
        event["pod"]["container_id"],
        attacker.container_id.as_str(),
        "{event}"
    );
    assert_eq!(event["pod"]["ip"], attacker.ip.to_string(), "{event}");
    assert_eq!(event["pod"]["ifname"], "eth0", "{event}");
    assert_eq!(event["pod"]["matched"], "veth", "{event}");
    assert_eq!(
        event["ifindex"].as_u64(),
        Some(scene.attacker_host_ifindex()),
        "{event}"
    );
    assert_eq!(
        event["src"],
        probe_src.to_string(),
        "the forged source: {event}"
    );
    assert_eq!(event["dst"], scene.target.ip.to_string(), "{event}");
    assert_eq!(event["proto"], "udp", "{event}");
    assert_eq!(event["dst_port"].as_u64(), Some(u64::from(PORT)), "{event}");
    assert_eq!(event["src_port"].as_u64(), Some(40_000), "{event}");
    // The same event in text: one line with reason, pod, ifindex, tuple.
    let cid: String = attacker.container_id.chars().take(12).collect();
    let want = [
        format!("drop {}", DropReason::SpoofedSourceIp.name()),
        format!("pod={cid}/eth0 ({}, ", attacker.ip),
        format!("ifindex={} from_pod", scene.attacker_host_ifindex()),
        format!("udp {probe_src}:40000 -> {}:{PORT}", scene.target.ip),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text
        .text()
        .iter()
        .any(|l| want.iter().all(|w| l.contains(w)))
    {
        assert!(
            Instant::now() < deadline,
            "text monitor shows {want:?}: {:?}",
            text.text()
        );
        scene.send(&[scene.forged(probe_src, "probe-text")]);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("text: {:?}", text.text());
    drop(text);

    flood_is_rate_limited_and_accounted(&scene, &monitor);
    a_flooding_pod_silences_only_itself(&scene, &monitor);
}

/// A flood: far more forged frames than the rate lets through. Every one
/// is counted; each CPU's events stay within that CPU's bucket (one
/// second's worth of burst, then the rate for as long as the flood ran);
/// the rest are reported as suppressed, to the frame.
fn flood_is_rate_limited_and_accounted(scene: &Scene, monitor: &Monitor) {
    let flood_src = Ipv4Addr::new(10, 244, 7, 251);
    let seen_before = monitor.lines().len();
    let drops_before = scene.spoofed_drops();
    let frames: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| scene.forged(flood_src, &i.to_string()))
        .collect();
    let started = Instant::now();
    scene.send(&frames);
    let flood_ms = u64::try_from(started.elapsed().as_millis()).expect("ms");
    // The drops are counted as the frames are handled; the agent publishes
    // events as they come and suppressed counts once a second: wait for
    // every drop to be accounted for, no fixed sleep.
    let mut dropped = 0;
    podnet_tests::wait_up_to(
        Duration::from_secs(10),
        "every forged frame counted",
        || {
            dropped = scene.spoofed_drops() - drops_before;
            dropped >= FLOOD as u64
        },
    );
    let accounted = |lines: &[Value]| -> (Vec<Value>, u64) {
        let events: Vec<Value> = lines
            .iter()
            .filter(|l| l["type"] == "drop" && l["src"] == flood_src.to_string())
            .cloned()
            .collect();
        let suppressed = lines
            .iter()
            .filter(|l| {
                l["type"] == "suppressed" && l["reason"] == DropReason::SpoofedSourceIp.name()
            })
            .map(|l| l["count"].as_u64().expect("a count"))
            .sum();
        (events, suppressed)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (after, events, suppressed) = loop {
        let after: Vec<Value> = monitor.lines().into_iter().skip(seen_before).collect();
        let (events, suppressed) = accounted(&after);
        if events.len() as u64 + suppressed >= dropped || Instant::now() >= deadline {
            break (after, events, suppressed);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !after.iter().any(|l| l["type"] == "lost"),
        "the monitor kept up: {after:?}"
    );
    let mut per_cpu: BTreeMap<u64, u64> = BTreeMap::new();
    for l in &events {
        assert_eq!(l["reason"], DropReason::SpoofedSourceIp.name(), "{l}");
        assert_eq!(
            l["pod"]["container_id"],
            scene.attacker.container_id.as_str(),
            "{l}"
        );
        *per_cpu
            .entry(
                l["cpu"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("an event without its CPU: {l}")),
            )
            .or_default() += 1;
    }
    let events = events.len() as u64;
    eprintln!(
        "flood: {FLOOD} frames in {flood_ms} ms: {dropped} dropped, {events} events \
         (by CPU: {per_cpu:?}), {suppressed} suppressed"
    );
    assert_eq!(
        dropped, FLOOD as u64,
        "every forged frame dropped and counted"
    );
    // Every CPU has its own bucket: at most one second's worth of events at
    // once, plus the rate for as long as the flood ran (and a margin for
    // frames handled just after the sender returned).
    let rate = u64::from(DEFAULT_DROP_EVENTS_PER_SEC);
    let per_cpu_limit = (rate * (1000 + flood_ms + FLOOD_MARGIN_MS)).div_ceil(1000);
    assert!(events >= 1, "the flood's drops were reported at all");
    for (cpu, &n) in &per_cpu {
        assert!(
            n <= per_cpu_limit,
            "CPU {cpu}: {n} events for {FLOOD} drops in {flood_ms} ms, over the per-CPU limit \
             {per_cpu_limit} ({rate}/s, 1 s burst); by CPU: {per_cpu:?}"
        );
    }
    assert_eq!(
        events + suppressed,
        dropped,
        "every drop is either reported or summed as suppressed ({events} events, \
         {suppressed} suppressed)"
    );
}

/// While the attacker floods (its bucket long empty), the other pod's one
/// forged frame, sent in the middle of the flood on the same CPU, is
/// reported: each pod spends a bucket of its own.
fn a_flooding_pod_silences_only_itself(scene: &Scene, monitor: &Monitor) {
    let flood_src = Ipv4Addr::new(10, 244, 7, 252);
    let other_src = Ipv4Addr::new(10, 244, 7, 253);
    let flood: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| scene.forged(flood_src, &format!("again-{i}")))
        .collect();
    let target_mac = spoof::mac_of(scene.target.netns.name(), "eth0").expect("target MAC");
    let target_gw =
        spoof::host_veth_mac(scene.target.netns.name(), scene.node.netns.name()).expect("MAC");
    let from_target = spoof::udp_frame(
        (target_gw, target_mac),
        (other_src, scene.attacker.ip),
        PORT,
        b"forged-by-the-other-pod",
    );
    let attacker = spoof::RawSocket::open(scene.attacker.netns.name(), "eth0").expect("socket");
    let target = spoof::RawSocket::open(scene.target.netns.name(), "eth0").expect("socket");
    let seen_before = monitor.lines().len();
    // One thread on one CPU: each CPU has buckets of its own, and a frame
    // is handled on its sender's CPU. The attacker's burst (one second's
    // worth of events) is long spent when the other pod's frame comes,
    // microseconds after the attacker's last.
    let all_cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0).expect("CPU 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0).expect("pin to CPU 0");
    let (first, second) = flood.split_at(FLOOD / 2);
    attacker.send(first).expect("flood");
    target.send(&[from_target]).expect("send from the target");
    attacker.send(second).expect("flood");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all_cpus)
        .expect("restore affinity");
    let mut event = None;
    podnet_tests::wait_up_to(
        Duration::from_secs(3),
        "the other pod's drop event during the flood",
        || {
            event = monitor.drop_from(seen_before, other_src);
            event.is_some()
        },
    );
    let event = event.expect("waited for");
    assert_eq!(
        event["pod"]["container_id"],
        scene.target.container_id.as_str(),
        "{event}"
    );
}
