//! `podnetctl explain` on a lab, for every path (same node, vxlan, direct,
//! to the host stack, a forged source), against what real traffic of the
//! same kind does to the node's counters; and explaining moves no live
//! counter.

use std::{net::Ipv4Addr, time::Duration};

use podnet::api::{Client, CounterTotals, EndpointStatus, Request};
use podnet_tests::{
    bins,
    lab::{LabDatastore, LabGuard, LabLayout, LabNode, LabPod},
    privileged, spoof,
};
use serde_json::Value;

fn node_of<'a>(layout: &'a LabLayout, pod: &LabPod) -> &'a LabNode {
    layout.node(&pod.node).expect("node")
}

/// `podnetctl explain --json` on `pod`'s node.
fn explain(layout: &LabLayout, pod: &LabPod, to: &str, src: Option<Ipv4Addr>) -> Value {
    let node = node_of(layout, pod);
    let mut cmd = std::process::Command::new(bins::binary("podnetctl"));
    cmd.arg("--socket").arg(&node.agent_socket).args([
        "--json",
        "explain",
        "--from",
        &pod.container_id,
        "--to",
        to,
    ]);
    if let Some(src) = src {
        cmd.args(["--src", &src.to_string()]);
    }
    let out = cmd.output().expect("podnetctl explain");
    assert!(
        out.status.success(),
        "podnetctl explain {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn counters(node: &LabNode) -> CounterTotals {
    Client::new(&node.agent_socket)
        .call(&Request::Counters)
        .expect("counters")
}

fn endpoints(node: &LabNode) -> Vec<EndpointStatus> {
    Client::new(&node.agent_socket)
        .call(&Request::ListEndpoints)
        .expect("endpoints")
}

/// How much each verdict and drop counter moved between two snapshots.
fn moved(before: &CounterTotals, after: &CounterTotals) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (kind, b, a) in [
        ("", &before.verdicts, &after.verdicts),
        ("drop:", &before.drops, &after.drops),
    ] {
        for (name, value) in a {
            let delta = value - b.get(name).copied().unwrap_or(0);
            if delta > 0 {
                out.push((format!("{kind}{name}"), delta));
            }
        }
    }
    out
}

/// How often each target is explained in [`assert_no_side_effects`].
const REPEAT: u64 = 15;

/// Asserts that explaining moves no live counter of `pod`'s node:
/// verdicts, drops and every endpoint's packet counters. The pods' own
/// background traffic (IPv6 router solicitations, ARP) moves some while
/// this runs, so each target is explained [`REPEAT`] times: one move per
/// explanation would show as at least that many.
fn assert_no_side_effects(layout: &LabLayout, pod: &LabPod, targets: &[(&str, Option<Ipv4Addr>)]) {
    let node = node_of(layout, pod);
    let counters_before = counters(node);
    let endpoints_before = endpoints(node);
    for (to, src) in targets {
        for _ in 0..REPEAT {
            explain(layout, pod, to, *src);
        }
    }
    let counters_after = counters(node);
    for (name, delta) in moved(&counters_before, &counters_after) {
        assert!(
            delta < REPEAT,
            "{name} moved by {delta} while each target was explained {REPEAT} times"
        );
    }
    for after in endpoints(node) {
        let before = endpoints_before
            .iter()
            .find(|e| e.endpoint.ip == after.endpoint.ip)
            .map_or(0, |e| e.tx_packets);
        assert!(
            after.tx_packets - before < REPEAT,
            "{}'s packet counter moved by {} while explaining",
            after.endpoint.ip,
            after.tx_packets - before
        );
    }
}

/// Pings `to` once from `pod` and returns what moved on `pod`'s node.
fn real_ping(layout: &LabLayout, pod: &LabPod, to: Ipv4Addr) -> Vec<(String, u64)> {
    let node = node_of(layout, pod);
    let before = counters(node);
    assert!(
        podnet_tests::lab::ping(&pod.netns, to),
        "{} cannot ping {to}",
        pod.name
    );
    std::thread::sleep(Duration::from_millis(100));
    moved(&before, &counters(node))
}

fn has(moved: &[(String, u64)], name: &str) -> bool {
    moved.iter().any(|(n, _)| n == name)
}

#[test]
fn explain_matches_real_traffic_in_vxlan_mode() {
    if !privileged("explain_matches_real_traffic_in_vxlan_mode") {
        return;
    }
    // The VXLAN device's datapath; the default (bpf) is below.
    let mut lab = LabGuard::up_with(
        "xpv",
        2,
        0,
        "vxlan",
        LabDatastore::File,
        podnet_tests::lab::LabOptions {
            agent_args: vec!["--vxlan-datapath".into(), "kernel".into()],
            ..podnet_tests::lab::LabOptions::default()
        },
    )
    .expect("lab");
    let layout = &mut lab.layout;
    let a = layout.add_pod("node1", "a").expect("a");
    let b = layout.add_pod("node1", "b").expect("b");
    let c = layout.add_pod("node2", "c").expect("c");
    let fabric = layout.fabric_host;

    // Same node: into b's netns through its host veth.
    let same = explain(layout, &a, &b.ip.to_string(), None);
    assert_eq!(same["verdict"], "redirect_peer");
    assert_eq!(same["action"], "TC_ACT_REDIRECT");
    assert_eq!(same["destination"]["kind"], "local_pod");
    assert_eq!(same["destination"]["container_id"], b.container_id.as_str());
    assert_eq!(same["ttl_out"], 63);
    assert!(has(&real_ping(layout, &a, b.ip), "redirect_peer"));

    // Cross node: encapsulated to node2.
    let node2 = layout.node("node2").expect("node2").clone();
    let cross = explain(layout, &a, &format!("{}:8080/tcp", c.ip), None);
    assert_eq!(cross["verdict"], "vxlan_encap");
    assert_eq!(cross["destination"]["kind"], "tunnel");
    assert_eq!(cross["destination"]["node_ip"], node2.node_ip.to_string());
    assert_eq!(cross["destination"]["node_name"], "node2");
    assert!(has(&real_ping(layout, &a, c.ip), "vxlan_encap"));

    // Outside the pod network: the node's stack.
    let out = explain(layout, &a, &fabric.to_string(), None);
    assert_eq!(out["verdict"], "pass_to_stack");
    assert_eq!(out["destination"]["kind"], "host_stack");
    assert!(has(&real_ping(layout, &a, fabric), "pass_to_stack"));

    // A forged source: dropped, as a real forged frame is.
    let forged_src = Ipv4Addr::new(10, 244, 0, 250);
    let forged = explain(layout, &a, &format!("{}:9/udp", b.ip), Some(forged_src));
    assert_eq!(forged["verdict"], "drop");
    assert_eq!(forged["drop_reason"], "spoofed_source_ip");
    assert_eq!(forged["destination"]["kind"], "dropped");
    let node1 = layout.node("node1").expect("node1").clone();
    let before = counters(&node1);
    let host_mac = spoof::host_veth_mac(&a.netns, &node1.netns).expect("host veth MAC");
    let pod_mac = spoof::mac_of(&a.netns, "eth0").expect("pod MAC");
    let frame = spoof::udp_frame((host_mac, pod_mac), (forged_src, b.ip), 9, b"forged");
    spoof::send_raw(&a.netns, "eth0", &[frame]).expect("send the forged frame");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        has(&moved(&before, &counters(&node1)), "drop:spoofed_source_ip"),
        "the real forged frame was dropped for the same reason"
    );

    // None of it moved a live counter.
    assert_no_side_effects(
        layout,
        &a,
        &[
            (&b.ip.to_string(), None),
            (&format!("{}:443", c.ip), None),
            (&fabric.to_string(), None),
            (&b.ip.to_string(), Some(forged_src)),
        ],
    );
    let unknown = std::process::Command::new(bins::binary("podnetctl"))
        .arg("--socket")
        .arg(&node1.agent_socket)
        .args(["explain", "--from", "nobody", "--to", "10.244.0.9"])
        .output()
        .expect("podnetctl");
    assert!(!unknown.status.success(), "a pod that is not there");
}

#[test]
fn explain_matches_real_traffic_in_direct_mode() {
    if !privileged("explain_matches_real_traffic_in_direct_mode") {
        return;
    }
    let mut lab = LabGuard::up("xpd", 2, 0, "direct", LabDatastore::File).expect("lab");
    let layout = &mut lab.layout;
    let a = layout.add_pod("node1", "a").expect("a");
    let c = layout.add_pod("node2", "c").expect("c");
    let node2 = layout.node("node2").expect("node2").clone();
    let cross = explain(layout, &a, &c.ip.to_string(), None);
    assert_eq!(cross["verdict"], "redirect_neigh");
    assert_eq!(cross["destination"]["kind"], "underlay");
    assert_eq!(cross["destination"]["next_hop"], node2.node_ip.to_string());
    assert_eq!(cross["destination"]["node_name"], "node2");
    assert!(has(&real_ping(layout, &a, c.ip), "redirect_neigh"));
    assert_no_side_effects(layout, &a, &[(&c.ip.to_string(), None)]);
}

/// `--vxlan-datapath bpf`: explain names what from_pod does (it
/// encapsulates itself, out of the underlay device), and a real ping
/// counts the same verdict.
#[test]
fn explain_names_the_bpf_vxlan_encapsulation() {
    if !privileged("explain_names_the_bpf_vxlan_encapsulation") {
        return;
    }
    let mut lab = LabGuard::up_with(
        "xpb",
        2,
        0,
        "vxlan",
        LabDatastore::File,
        podnet_tests::lab::LabOptions {
            agent_args: vec!["--vxlan-datapath".into(), "bpf".into()],
            ..podnet_tests::lab::LabOptions::default()
        },
    )
    .expect("lab");
    let layout = &mut lab.layout;
    let a = layout.add_pod("node1", "a").expect("a");
    let c = layout.add_pod("node2", "c").expect("c");
    let node2 = layout.node("node2").expect("node2").clone();
    let cross = explain(layout, &a, &format!("{}:8080/tcp", c.ip), None);
    assert_eq!(cross["verdict"], "vxlan_encap_bpf");
    assert_eq!(cross["destination"]["kind"], "tunnel");
    assert_eq!(cross["destination"]["node_ip"], node2.node_ip.to_string());
    assert_eq!(
        cross["destination"]["device"], "eth0",
        "out of the underlay"
    );
    let moved = real_ping(layout, &a, c.ip);
    assert!(has(&moved, "vxlan_encap_bpf"), "{moved:?}");
    assert!(!has(&moved, "vxlan_encap"), "{moved:?}");
}
