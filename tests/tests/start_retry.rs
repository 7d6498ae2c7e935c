//! A step of the agent's start that fails leaves what runs untouched and is
//! retried: node1's agent restarts while `nft` fails (the masquerade table
//! cannot be written, so the node's network setup fails half-way, after
//! re-pointing the node devices' programs). Traffic between pods flows all
//! along (every ping sent and answered), `podnetctl status` lists the node
//! network under `pending`, and once `nft` works again the agent's retry
//! finishes the setup by itself: podnet's nft table (`ip podnet`, deleted
//! before the restart so that only the new agent can have written it) is
//! back, with the masquerade rule and the other node among the VXLAN peers.
//!
//! Its own test binary: it changes the process's PATH, which the agents it
//! starts inherit.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use podnet::api::{AgentStatus, Client, NodeInfo, Request};
use podnet_tests::{
    lab::{self, LabDatastore, LabGuard, LabNode},
    node::TempDir,
    privileged,
    traffic::LabFloods,
};

const PINGS: u32 = 3_000;
/// The real nft: the test's PATH leads to the failing one.
const NFT: &str = "/usr/sbin/nft";

/// What the agent says is still pending; panics when it does not answer (an
/// agent that is gone has not finished anything).
fn pending(node: &LabNode) -> Vec<String> {
    Client::new(&node.agent_socket)
        .call::<AgentStatus>(&Request::Status)
        .unwrap_or_else(|e| panic!("{}: podnetctl status: {e}", node.name))
        .pending
}

/// `nft list table ip podnet` in `node`'s netns: the table, or `None` when
/// there is none (any other failure of nft fails the test).
fn podnet_table(node: &LabNode) -> Option<String> {
    let out = lab::in_netns(&node.netns, NFT)
        .expect("netns")
        .args(["list", "table", "ip", "podnet"])
        .output()
        .expect("run nft");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        assert!(
            stderr.contains("No such file or directory"),
            "{}: nft list table ip podnet: {stderr}",
            node.name
        );
        None
    }
}

/// The lines of set `name` in an `nft list` output.
fn set_lines<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .skip_while(|l| l.trim() != format!("set {name} {{"))
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .collect()
}

/// What the agent writes in vxlan mode (`agent/cluster.rs`, `nft_script`):
/// pods' traffic leaving the cluster masqueraded, and NOTRACK for the VXLAN
/// UDP between this node and its peers (with `peer` among them, if given).
fn what_is_missing(
    table: &str,
    cluster: &str,
    node_ip: Ipv4Addr,
    peer: Option<Ipv4Addr>,
) -> Vec<String> {
    let mut missing = Vec::new();
    for want in [
        "chain postrouting {".to_owned(),
        "type nat hook postrouting priority srcnat; policy accept;".to_owned(),
        format!("ip saddr {cluster} ip daddr != {cluster} ip daddr != @nodes masquerade"),
        "set nodes {".to_owned(),
        "chain prerouting_notrack {".to_owned(),
        format!("ip saddr @vxlan_peers ip daddr {node_ip} udp dport"),
        "chain output_notrack {".to_owned(),
        format!("ip saddr {node_ip} ip daddr @vxlan_peers udp dport"),
    ] {
        if !table.contains(&want) {
            missing.push(want);
        }
    }
    let peers = set_lines(table, "vxlan_peers");
    if peers.is_empty() {
        missing.push("set vxlan_peers".to_owned());
    }
    if let Some(peer) = peer
        && !peers
            .iter()
            .any(|l| l.contains("elements") && l.contains(&peer.to_string()))
    {
        missing.push(format!("{peer} in set vxlan_peers ({peers:?})"));
    }
    missing
}

/// An `nft` that fails while `flag` exists and runs the real one otherwise.
fn failing_nft(dir: &Path, flag: &Path) {
    let script = format!(
        "#!/bin/sh\nif [ -e {} ]; then echo 'nft: failing on purpose' >&2; exit 1; fi\nexec /usr/sbin/nft \"$@\"\n",
        flag.display()
    );
    let path = dir.join("nft");
    std::fs::write(&path, script).expect("write the fake nft");
    let mut perms = std::fs::metadata(&path).expect("fake nft").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).expect("chmod the fake nft");
}

#[test]
fn a_failed_start_step_leaves_traffic_alone_and_is_retried() {
    if !privileged("a_failed_start_step_leaves_traffic_alone_and_is_retried") {
        return;
    }
    let mut lab = LabGuard::up("sretry", 2, 2, "vxlan", LabDatastore::File).expect("lab up");
    let dir = TempDir::new("fake-nft").expect("temp dir");
    let flag = dir.path().join("fail");
    failing_nft(dir.path(), &flag);
    std::fs::write(&flag, b"").expect("arm the failure");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // SAFETY: this test binary holds this one test; no other thread reads
    // or writes the environment while it is changed (the lab and the
    // floods run their children through Command, which reads it on spawn,
    // from this thread).
    unsafe { std::env::set_var("PATH", &path) };

    let node1 = lab.layout.node("node1").expect("node1").clone();
    let node2 = lab.layout.node("node2").expect("node2").clone();
    let cluster = Client::new(&node1.agent_socket)
        .call::<NodeInfo>(&Request::Node)
        .expect("node info")
        .cluster_cidr
        .to_string();
    let missing =
        |table: &str, peer: Option<Ipv4Addr>| what_is_missing(table, &cluster, node1.node_ip, peer);
    // What the agent wrote before: the expectations hold for it.
    let table = podnet_table(&node1).expect("podnet's table, written by the first agent");
    assert_eq!(
        missing(&table, Some(node2.node_ip)),
        Vec::<String>::new(),
        "{table}"
    );

    let mut floods = LabFloods::start(&lab.layout, PINGS).expect("floods");
    std::thread::sleep(Duration::from_millis(500));
    lab.layout.stop_agent("node1").expect("stop");
    // Only the new agent can bring the table back.
    let deleted = lab::in_netns(&node1.netns, NFT)
        .expect("netns")
        .args(["delete", "table", "ip", "podnet"])
        .status()
        .expect("nft delete table");
    assert!(deleted.success(), "deleting podnet's table");
    lab.layout
        .start_agent("node1")
        .expect("start with a failing nft");
    let listed = pending(&node1);
    assert!(
        listed.iter().any(|p| p.starts_with("node network")),
        "the failed step is listed: {listed:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let listed = pending(&node1);
    assert!(
        listed.iter().any(|p| p.starts_with("node network")),
        "still failing while nft fails: {listed:?}"
    );
    assert_eq!(
        podnet_table(&node1),
        None,
        "no table while nft fails (the failure is real)"
    );
    std::fs::remove_file(&flag).expect("disarm");
    podnet_tests::wait_up_to(
        Duration::from_secs(20),
        "the retry finishing the setup",
        || pending(&node1).is_empty(),
    );
    let done = Instant::now();
    assert_eq!(floods.ended(), None, "the floods covered the whole episode");
    // Done means the node network's setup went through, nft table included,
    // with the nodes the agent had already applied (node2 is a VXLAN peer
    // at once: its tunnel traffic is never tracked in between).
    let table = podnet_table(&node1).expect("podnet's table once the retry is done");
    assert_eq!(
        missing(&table, Some(node2.node_ip)),
        Vec::<String>::new(),
        "once the retry is done, {:?} after: {table}",
        done.elapsed()
    );
    for (path, result) in floods.finish().expect("ping results") {
        eprintln!(
            "{path}: {} sent, {} lost across a start that failed half-way",
            result.sent,
            result.sent - result.received
        );
        assert_eq!(result.sent, u64::from(PINGS), "{path}: ping sent all");
        assert_eq!(result.received, result.sent, "{path}: every ping answered");
    }
}
