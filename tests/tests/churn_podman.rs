//! Churn with a real runtime (issue 11): podman creates and removes 200
//! containers, 8 at a time, on node1 of a two-node lab (VXLAN, nodes file),
//! while TCP streams run between two lab pods on node1 and from a pod on
//! node2 to a pod on node1. Every create succeeds, every container is
//! reached from the pod on the other node, after each wave the node holds
//! exactly what the live containers need (IPAM records = host veths =
//! agent endpoints = records = map entries = live containers, the lab pods
//! aside), nothing after the removals, the streams lose no byte, and the
//! agent's memory ends where it started after the warm-up (±10 %).
//!
//! Why a lab and podman on one node: podman's CNI backend runs the plugin
//! in its own netns, so one podman per node namespace is what a node with a
//! runtime looks like; the cross-node traffic (node2 -> node1 through the
//! VXLAN tunnel) and the reachability of every new container from node2
//! are what the second node is for.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use podnet::api::EndpointStatus;
use podnet_tests::{
    inventory::{Attachment, Inventory, NodePaths},
    lab::{self, LabDatastore, LabGuard, LabNode},
    podman::{self, Podman},
    privileged,
    traffic::Stream,
};

const CONTAINERS: usize = 200;
const AT_ONCE: usize = 8;
/// Waves before the agent's memory is measured the first time: its
/// allocator, maps and tokio runtime have reached their working size.
const WARM_UP_WAVES: usize = 2;
/// How long the node may take to settle after podman returns.
const SETTLE: Duration = Duration::from_secs(10);

fn inventory(node: &LabNode) -> Inventory {
    Inventory::read(&NodePaths {
        netns: &node.netns,
        socket: &node.agent_socket,
        bpffs: &node.bpffs_dir,
        state_dir: &node.state_dir,
    })
    .expect("inventory of node1")
}

/// The agent's resident memory (VmRSS), KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// What node1 should hold: the lab's own pods there, and each running
/// container with the address the agent gave it (the other places —
/// IPAM, veths, records, maps — must agree with it).
fn expected(
    lab_pods: &[Attachment],
    running: &BTreeSet<String>,
    endpoints: &[EndpointStatus],
) -> Vec<Attachment> {
    let mut live = lab_pods.to_vec();
    for id in running {
        // A running container without an endpoint shows as missing.
        let ip = endpoints
            .iter()
            .find(|e| &e.endpoint.owner.container_id == id)
            .map_or(Ipv4Addr::UNSPECIFIED, |e| e.endpoint.ip);
        live.push(Attachment {
            container_id: id.clone(),
            ifname: "eth0".into(),
            ip,
        });
    }
    live
}

/// Waits (up to [`SETTLE`]) until node1 holds exactly what `running`
/// needs; the differences left, if it never does.
fn settled(node: &LabNode, lab_pods: &[Attachment], running: &BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let inv = inventory(node);
        let differences = inv.differences(&expected(lab_pods, running, &inv.endpoints));
        if differences.is_empty() || Instant::now() >= deadline {
            return differences;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `f(i)` for `0..AT_ONCE` on as many threads at once.
fn at_once<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..AT_ONCE).map(|i| s.spawn(move || f(i))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("podman thread"))
            .collect()
    })
}

fn reachable(netns: &str, ip: Ipv4Addr) -> bool {
    lab::in_netns(netns, "ping")
        .and_then(|mut c| {
            c.args(["-c", "1", "-W", "2", &ip.to_string()])
                .output()
                .map_err(Into::into)
        })
        .is_ok_and(|o| o.status.success())
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn podman_churn_leaks_nothing_and_keeps_traffic_and_memory_steady() {
    if !privileged("podman_churn_leaks_nothing_and_keeps_traffic_and_memory_steady") {
        return;
    }
    assert!(
        podman::have("podman") && podman::have("runc"),
        "podman and runc are installed by `cargo xtask setup`"
    );
    let started = Instant::now();
    let lab = LabGuard::up("churn", 2, 2, "vxlan", LabDatastore::File).expect("lab up");
    let layout = &lab.layout;
    let node1 = layout.node("node1").expect("node1").clone();
    let pod = |name: &str| layout.pod(name).expect("lab pod").clone();
    let (n1p1, n1p2, n2p1) = (pod("node1-pod1"), pod("node1-pod2"), pod("node2-pod1"));
    let lab_pods: Vec<Attachment> = [&n1p1, &n1p2]
        .iter()
        .map(|p| Attachment {
            container_id: p.container_id.clone(),
            ifname: p.ifname.clone(),
            ip: p.ip,
        })
        .collect();
    let podman = Podman::new(
        "churn",
        &node1.netns,
        &serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [{"type": "podnet", "agentSocket": node1.agent_socket}]
        }),
    )
    .expect("podman on node1");

    let same_node = Stream::start(&n1p2.netns, &n1p1.netns, n1p1.ip).expect("same-node stream");
    let cross_node = Stream::start(&n2p1.netns, &n1p1.netns, n1p1.ip).expect("cross-node stream");

    let (mut created, mut failures, mut unreachable) = (0usize, Vec::new(), Vec::new());
    let mut leaks: Vec<String> = Vec::new();
    let mut rss_warm = None;
    // The most containers running at once (what the node held at its fullest).
    let mut peak = 0;
    let churn_started = Instant::now();
    for wave in 0..CONTAINERS / AT_ONCE {
        let results = at_once(|i| {
            let name = format!("churn-{}", wave * AT_ONCE + i);
            podman
                .command()
                .and_then(|mut c| {
                    c.args(["run", "--detach", "--name", &name, "--network", "podnet"])
                        .args(podman::RLIMITS)
                        .args([podman::IMAGE, "/bin/busybox", "sleep", "600"])
                        .output()
                        .map_err(Into::into)
                })
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|o| {
                    if o.status.success() {
                        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    } else {
                        Err(format!("{name}: {}", String::from_utf8_lossy(&o.stderr)))
                    }
                })
        });
        let mut ids = Vec::new();
        for r in results {
            match r {
                Ok(id) => ids.push(id),
                Err(e) => failures.push(e),
            }
        }
        created += ids.len();
        let running: BTreeSet<String> = podman.running().expect("podman ps").into_iter().collect();
        // Every container podman created is up: none died for want of a
        // network, and the check below sees them all.
        for id in &ids {
            if !running.contains(id) {
                failures.push(format!("{id} is not running after its create"));
            }
        }
        peak = peak.max(running.len());
        leaks.extend(
            settled(&node1, &lab_pods, &running)
                .into_iter()
                .map(|d| format!("wave {wave}, {} running: {d}", running.len())),
        );
        // Every new container is reached from the other node.
        for e in &inventory(&node1).endpoints {
            if running.contains(&e.endpoint.owner.container_id)
                && !reachable(&n2p1.netns, e.endpoint.ip)
            {
                unreachable.push(e.endpoint.ip);
            }
        }

        let removed = at_once(|i| {
            ids.get(i).map(|id| {
                podman
                    .run(&["rm", "--force", "--time", "0", id])
                    .map(|_| ())
                    .map_err(|e| format!("rm {id}: {e}"))
            })
        });
        failures.extend(removed.into_iter().flatten().filter_map(Result::err));
        let running: BTreeSet<String> = podman.running().expect("podman ps").into_iter().collect();
        leaks.extend(
            settled(&node1, &lab_pods, &running)
                .into_iter()
                .map(|d| format!("after wave {wave}'s removals: {d}")),
        );
        if wave + 1 == WARM_UP_WAVES {
            rss_warm = Some(rss_kib(node1.pid));
        }
    }
    let churn_time = churn_started.elapsed();
    let rss_end = rss_kib(node1.pid);
    let rss_warm = rss_warm.expect("measured after the warm-up");
    let (same_sent, same_received) = same_node.finish().expect("same-node stream");
    let (cross_sent, cross_received) = cross_node.finish().expect("cross-node stream");
    let end = inventory(&node1);
    #[allow(clippy::cast_precision_loss, reason = "KiB figures far below 2^52")]
    let rss_change = (rss_end as f64 - rss_warm as f64) / rss_warm as f64 * 100.0;

    eprintln!(
        "churn: {created}/{CONTAINERS} containers created, {AT_ONCE} at a time (at most {peak} \
         running), in {:.1} s ({:.1} s with the lab)\n\
         churn: failures {}, leaks {}, unreachable from node2 {}\n\
         churn: at the end, node1 holds [ipam, veths, endpoints, records, endpoint entries, \
         veth entries] = {:?} for the 2 lab pods\n\
         churn: agent RSS {rss_warm} KiB after {} warm-up containers, {rss_end} KiB at the end \
         ({rss_change:+.1} %)\n\
         churn: streams same-node {} MiB, cross-node {} MiB, every byte in order: {}",
        churn_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        failures.len(),
        leaks.len(),
        unreachable.len(),
        end.counts(),
        WARM_UP_WAVES * AT_ONCE,
        same_received >> 20,
        cross_received >> 20,
        same_sent == same_received && cross_sent == cross_received,
    );
    assert!(failures.is_empty(), "podman failed: {failures:#?}");
    assert_eq!(created, CONTAINERS);
    assert_eq!(peak, AT_ONCE, "each wave's containers ran side by side");
    assert!(
        leaks.is_empty(),
        "node1 did not hold exactly the live containers:\n{}",
        leaks.join("\n")
    );
    assert!(
        unreachable.is_empty(),
        "containers node2 could not reach: {unreachable:?}"
    );
    end.assert_exactly(&lab_pods, "after every container is removed");
    assert!(
        same_sent == same_received && same_sent > 0,
        "same-node stream: sent {same_sent}, received {same_received}"
    );
    assert!(
        cross_sent == cross_received && cross_sent > 0,
        "cross-node stream: sent {cross_sent}, received {cross_received}"
    );
    assert!(
        rss_change.abs() <= 10.0,
        "agent RSS {rss_warm} KiB after the warm-up, {rss_end} KiB at the end ({rss_change:+.1} %)"
    );
}
