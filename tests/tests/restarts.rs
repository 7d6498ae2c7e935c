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
    traffic::LabFloods,
};

/// Pings per flood: 200/s for long enough to cover every restart.
const PINGS: u32 = 3_000;
const ROUNDS: usize = 3;

fn restarts_lose_nothing(mode: &str) {
    let mut lab =
        LabGuard::up(&format!("rs{}", &mode[..1]), 2, 2, mode, LabDatastore::File).expect("lab up");
    let mut floods = LabFloods::start(&lab.layout, PINGS).expect("floods");
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
    assert_eq!(
        floods.ended(),
        None,
        "{mode}: a flood ended before the restarts did ({took:?}): raise PINGS"
    );
    for (path, result) in floods.finish().expect("ping results") {
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

/// A host route that cannot be installed (a node whose address is not on
/// the underlay's link yet) is shown by `podnetctl status` under `pending`
/// and installed by the agent's retries once it can be, without a restart.
#[test]
fn a_failed_host_route_is_retried_and_shown() {
    if !privileged("a_failed_host_route_is_retried_and_shown") {
        return;
    }
    let lab = LabGuard::up("rtry", 2, 1, "direct", LabDatastore::File).expect("lab up");
    let node1 = lab.layout.node("node1").expect("node1").clone();
    // A third node, off the underlay's subnet: "via 192.168.200.5" is no
    // valid gateway on node1's eth0 yet.
    let nodes_file = lab.layout.run_dir.join("nodes.json");
    let mut records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&nodes_file).expect("nodes file")).expect("JSON");
    records["nodes"].as_array_mut().expect("nodes").push(
        serde_json::json!({"name": "far", "nodeIP": "192.168.200.5", "podCIDR": "10.244.50.0/24"}),
    );
    let tmp = nodes_file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&records).expect("JSON")).expect("write");
    std::fs::rename(&tmp, &nodes_file).expect("rename");
    let pending = || -> Vec<String> {
        podnet::api::Client::new(&node1.agent_socket)
            .call::<podnet::api::AgentStatus>(&podnet::api::Request::Status)
            .map(|s| s.pending)
            .expect("the agent answers podnetctl status")
    };
    podnet_tests::wait_up_to(
        Duration::from_secs(20),
        "the failed route in status",
        || pending().iter().any(|p| p.contains("10.244.50.0/24")),
    );
    // The underlay learns the subnet: the retry installs the route.
    podnet_tests::lab::in_netns(&node1.netns, "ip")
        .expect("netns")
        .args(["addr", "add", "192.168.200.1/24", "dev", "eth0"])
        .status()
        .expect("ip addr add");
    podnet_tests::wait_up_to(
        Duration::from_secs(45),
        "the route installed by a retry",
        || pending().is_empty(),
    );
    let routes = podnet_tests::lab::in_netns(&node1.netns, "ip")
        .expect("netns")
        .args(["route", "show", "10.244.50.0/24"])
        .output()
        .expect("ip route");
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("via 192.168.200.5"),
        "{}",
        String::from_utf8_lossy(&routes.stdout)
    );
}

/// `podnetctl nodes --check` (and `lab check`) report what changed behind
/// the agent's back (a host route deleted, a pod's from_pod filter
/// removed), and nothing on a healthy node.
#[test]
fn drift_behind_the_agents_back_is_reported() {
    if !privileged("drift_behind_the_agents_back_is_reported") {
        return;
    }
    let lab = LabGuard::up("drift", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let node1 = lab.layout.node("node1").expect("node1").clone();
    let node2 = lab.layout.node("node2").expect("node2").clone();
    let check = || -> Vec<String> {
        podnet::api::Client::new(&node1.agent_socket)
            .call::<Vec<podnet::api::Drift>>(&podnet::api::Request::Check)
            .expect("check")
            .into_iter()
            .map(|d| format!("{}: {}", d.kind, d.detail))
            .collect()
    };
    assert!(check().is_empty(), "healthy: {:?}", check());
    let probes = podnet_tests::lab::check(&lab.layout).expect("lab check");
    assert!(
        probes
            .iter()
            .filter(|p| p.kind == "consistency")
            .all(|p| p.ok),
        "{}",
        podnet_tests::lab::render(&probes)
    );

    let ip = |args: &[&str]| {
        podnet_tests::lab::in_netns(&node1.netns, "ip")
            .expect("netns")
            .args(args)
            .status()
            .expect("ip")
    };
    assert!(ip(&["route", "del", &node2.pod_cidr]).success());
    let pod = lab.layout.pod("node1-pod1").expect("pod");
    let veth = podnet::cni::plugin::host_ifname(&podnet::ipam::Owner {
        container_id: pod.container_id.clone(),
        ifname: pod.ifname.clone(),
    });
    let tc = podnet_tests::lab::in_netns(&node1.netns, "tc")
        .expect("netns")
        .args(["filter", "del", "dev", &veth, "ingress"])
        .status()
        .expect("tc");
    assert!(tc.success(), "removing the pod's from_pod filter");
    let drift = check();
    assert!(
        drift
            .iter()
            .any(|d| d.starts_with("host route") && d.contains(&node2.pod_cidr)),
        "{drift:?}"
    );
    assert!(
        drift
            .iter()
            .any(|d| d.starts_with("filters") && d.contains(&veth)),
        "{drift:?}"
    );
}
