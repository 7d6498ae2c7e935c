//! Restarts and crashes of the agents lose nothing: ping floods between
//! pods (same node, and cross node both ways) run while every agent is
//! stopped and started three times and then killed with SIGKILL and
//! started, in vxlan and direct mode. Every ping is answered.
//!
//! Why it can hold: the maps are pinned and the programs stay attached while
//! no agent runs; a starting agent re-points every attachment atomically
//! (cls_bpf replace on pod veths, `bpf_link_update` on the node devices),
//! rewrites map entries in place and replaces the masquerade table in one
//! nft transaction.

use std::time::{Duration, Instant};

use podnet_tests::{
    lab::{LabDatastore, LabGuard},
    privileged,
    traffic::PingFlood,
};

/// Pings per flood: 200/s for long enough to cover every restart.
const PINGS: u32 = 3_000;
const ROUNDS: usize = 3;

fn restarts_lose_nothing(mode: &str) {
    let mut lab =
        LabGuard::up(&format!("rs{}", &mode[..1]), 2, 2, mode, LabDatastore::File).expect("lab up");
    let pod = |name: &str| lab.layout.pod(name).expect("pod").clone();
    let (a, b, c) = (pod("node1-pod1"), pod("node1-pod2"), pod("node2-pod1"));
    let mut floods = [
        (
            "same node",
            PingFlood::start(&a.netns, b.ip, PINGS).expect("flood"),
        ),
        (
            "node1 -> node2",
            PingFlood::start(&a.netns, c.ip, PINGS).expect("flood"),
        ),
        (
            "node2 -> node1",
            PingFlood::start(&c.netns, b.ip, PINGS).expect("flood"),
        ),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut restarts = 0;
    for _ in 0..ROUNDS {
        for node in ["node1", "node2"] {
            lab.layout.stop_agent(node).expect("stop agent");
            std::thread::sleep(Duration::from_millis(200));
            lab.layout.start_agent(node).expect("start agent");
            restarts += 1;
        }
    }
    for node in ["node1", "node2"] {
        lab.layout.kill_agent(node).expect("kill -9 agent");
        std::thread::sleep(Duration::from_millis(200));
        lab.layout.start_agent(node).expect("start agent");
        restarts += 1;
    }
    let took = started.elapsed();
    for (path, flood) in &mut floods {
        assert!(
            flood.running(),
            "{mode} {path}: the flood ended before the restarts did ({took:?}): raise PINGS"
        );
    }
    for (path, flood) in floods {
        let result = flood.finish().expect("ping result");
        eprintln!(
            "{mode} {path}: {} restarts (3 stop/start + 1 kill -9 per agent) in {took:?}: {} sent, {} lost",
            restarts,
            result.sent,
            result.sent - result.received
        );
        assert_eq!(
            result.sent,
            u64::from(PINGS),
            "{mode} {path}: ping sent all"
        );
        assert_eq!(
            result.received, result.sent,
            "{mode} {path}: every ping answered across agent restarts"
        );
    }
}

#[test]
fn agent_restarts_and_kills_lose_no_packet_vxlan() {
    if !privileged("agent_restarts_and_kills_lose_no_packet_vxlan") {
        return;
    }
    restarts_lose_nothing("vxlan");
}

#[test]
fn agent_restarts_and_kills_lose_no_packet_direct() {
    if !privileged("agent_restarts_and_kills_lose_no_packet_direct") {
        return;
    }
    restarts_lose_nothing("direct");
}
