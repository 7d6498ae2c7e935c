//! Bandwidth limits (the CNI `bandwidth` capability) hold on every path a
//! pod's traffic takes, in both directions: same node, cross node through
//! the overlay (vxlan) and on the underlay (direct), and to the fabric
//! host outside the pod network. Measured with iperf3 (TCP, 5 s after a
//! 1 s warm-up) against pods limited to 100 Mbit/s and 1 Gbit/s, with an
//! unlimited pod beside them keeping its throughput; CHECK sees the
//! limits; DEL leaves nothing behind.

use std::{net::Ipv4Addr, process::Stdio, sync::Mutex, time::Duration};

use anyhow::Context as _;
use podnet::api::{Client, CounterTotals, Request};
use podnet_common::Verdict;
use podnet_tests::{
    inventory::{Attachment, Inventory, NodePaths},
    lab::{LabDatastore, LabGuard, LabLayout, LabNode, LabPod, in_netns},
    node::Node,
    privileged,
};
use serde_json::{Value, json};

/// The tests here measure throughput: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const SLOW: u64 = 100_000_000;
const FAST: u64 = 1_000_000_000;
/// How far a limited pod's TCP throughput may be from its limit.
const TOLERANCE: f64 = 0.15;
/// iperf3 seconds measured, after one second of warm-up.
const SECONDS: u32 = 5;

/// `rate` as a float, for ratios (rates here are far below 2^52).
#[allow(clippy::cast_precision_loss)]
fn float(rate: u64) -> f64 {
    rate as f64
}

/// The conf additions libcni makes for a pod limited to `rate` bit/s in
/// both directions, with a bucket of 10 ms at that rate.
fn limited(rate: u64) -> Value {
    let burst = rate / 100;
    json!({
        "capabilities": {"bandwidth": true},
        "runtimeConfig": {"bandwidth": {
            "ingressRate": rate, "ingressBurst": burst,
            "egressRate": rate, "egressBurst": burst,
        }},
    })
}

/// TCP throughput from `client_ns` to the iperf3 server at `server_ip` in
/// `server_ns` (with `reverse`, from the server to the client), bit/s.
fn iperf(
    client_ns: &str,
    server_ns: &str,
    server_ip: Ipv4Addr,
    reverse: bool,
    seconds: u32,
) -> anyhow::Result<f64> {
    let mut server = in_netns(server_ns, "iperf3")?
        .args(["-s", "-1", "-B", &server_ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let _reap = Reap(&mut server);
    std::thread::sleep(Duration::from_millis(300));
    let mut client = in_netns(client_ns, "iperf3")?;
    client.args([
        "-c",
        &server_ip.to_string(),
        "-t",
        &seconds.to_string(),
        "-O",
        "1",
        "-J",
    ]);
    if reverse {
        client.arg("-R");
    }
    let out = client.output().context("iperf3 client")?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput from iperf3: {}", report["error"]))
}

/// Kills and reaps a child when dropped.
struct Reap<'a>(&'a mut std::process::Child);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a limited pod's traffic goes and comes from on one path.
struct PathEnd<'a> {
    name: &'a str,
    netns: &'a str,
    ip: Ipv4Addr,
}

/// Measures `pod` (limited to `rate`) on the path to `peer` both ways and
/// returns one line per direction; panics when a direction is off limits.
fn assert_limited(pod: &LabPod, rate: u64, peer: &PathEnd<'_>) -> Vec<String> {
    let mut lines = Vec::new();
    for (direction, reverse) in [("egress", false), ("ingress", true)] {
        let measured = iperf(&pod.netns, peer.netns, peer.ip, reverse, SECONDS)
            .unwrap_or_else(|e| panic!("iperf3 {} {direction} via {}: {e:#}", pod.name, peer.name));
        let ratio = measured / float(rate);
        let line = format!(
            "{:<10} {:<8} {:<16} limit {:>5.0} Mbit/s measured {:>7.1} Mbit/s ({ratio:.3}x)",
            pod.name,
            direction,
            peer.name,
            float(rate) / 1e6,
            measured / 1e6
        );
        eprintln!("bandwidth: {line}");
        assert!(
            (ratio - 1.0).abs() <= TOLERANCE,
            "{line}: not within {TOLERANCE} of the limit"
        );
        lines.push(line);
    }
    lines
}

/// Paired rounds: `free`'s same-node throughput to `peer` alone and with
/// a 100 Mbit/s and a 1 Gbit/s pod on the node (added before and deleted
/// after each "beside" run), the order swapping every round so drift on
/// this shared machine hits both alike. Returns the per-round ratios
/// beside / alone, sorted, and asserts that `free`'s packets took the fast
/// path all along (none handed to a shaper or to the stack).
fn unlimited_beside_limited(layout: &mut LabLayout, free: &LabPod, peer: &LabPod) -> Vec<f64> {
    const ROUNDS: usize = 3;
    let node = layout.node(&free.node).expect("node").clone();
    let counters_before = counters(&node);
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let mut alone = 0.0;
        let mut beside = 0.0;
        for with_limited in [round % 2 == 1, round % 2 == 0] {
            if with_limited {
                let names = [format!("tmpslow{round}"), format!("tmpfast{round}")];
                for (name, rate) in names.iter().zip([SLOW, FAST]) {
                    layout
                        .add_pod_with(&free.node, name, &limited(rate))
                        .expect("ADD a limited pod");
                }
                beside = iperf(&free.netns, &peer.netns, peer.ip, false, 3).expect("iperf3");
                for name in &names {
                    del_pod(layout, name);
                }
            } else {
                alone = iperf(&free.netns, &peer.netns, peer.ip, false, 3).expect("iperf3");
            }
        }
        eprintln!(
            "bandwidth: unlimited pod same node, round {round}: {:.2} Gbit/s alone, {:.2} Gbit/s beside limited pods",
            alone / 1e9,
            beside / 1e9
        );
        ratios.push(beside / alone);
    }
    ratios.sort_by(f64::total_cmp);
    let counters_after = counters(&node);
    let moved = |v: Verdict| counter(&counters_after, v) - counter(&counters_before, v);
    assert_eq!(
        moved(Verdict::ToShaper),
        0,
        "the unlimited pod's packets met a shaper"
    );
    assert_eq!(
        moved(Verdict::StackFlow),
        0,
        "the unlimited pod's packets left the fast path"
    );
    assert!(
        moved(Verdict::RedirectPeer) > 0,
        "the unlimited pod's packets took the fast path"
    );
    ratios
}

fn node_paths(node: &LabNode) -> NodePaths<'_> {
    NodePaths {
        netns: &node.netns,
        socket: &node.agent_socket,
        bpffs: &node.bpffs_dir,
        state_dir: &node.state_dir,
    }
}

fn attachments(layout: &LabLayout, node: &str) -> Vec<Attachment> {
    layout
        .pods
        .iter()
        .filter(|p| p.node == node)
        .map(|p| Attachment {
            container_id: p.container_id.clone(),
            ifname: p.ifname.clone(),
            ip: p.ip,
        })
        .collect()
}

fn cni_env<'a>(command: &'a str, pod: &'a LabPod, netns_path: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", &pod.container_id),
        ("CNI_NETNS", netns_path),
        ("CNI_IFNAME", &pod.ifname),
    ]
}

/// CHECK of `pod` with `extra` (its runtime config) and `prev` as
/// prevResult: whether it passed, and the plugin's answer.
fn check(layout: &LabLayout, pod: &LabPod, extra: &Value, prev: &Value) -> (bool, Value) {
    let node = layout.node(&pod.node).expect("node");
    let netns_path = format!("/var/run/netns/{}", pod.netns);
    let mut extra = extra.clone();
    extra["prevResult"] = prev.clone();
    layout
        .cni_with(node, &cni_env("CHECK", pod, &netns_path), &extra)
        .expect("CHECK")
}

/// The ADD result of `pod` again (ADD is not idempotent to replay, so the
/// test rebuilds the prevResult CHECK needs from what it knows).
fn prev_result(layout: &LabLayout, pod: &LabPod) -> Value {
    let node = layout.node(&pod.node).expect("node");
    let owner = podnet::ipam::Owner {
        container_id: pod.container_id.clone(),
        ifname: pod.ifname.clone(),
    };
    let gateway = podnet::ipam::PodRange::new(node.pod_cidr.parse().expect("cidr"))
        .expect("range")
        .gateway();
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": podnet::cni::plugin::host_ifname(&owner)},
            {"name": pod.ifname, "sandbox": format!("/var/run/netns/{}", pod.netns)},
        ],
        "ips": [{"address": format!("{}/32", pod.ip), "gateway": gateway.to_string(), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway.to_string()}],
    })
}

fn del_pod(layout: &mut LabLayout, name: &str) {
    let pod = layout.pod(name).expect("pod").clone();
    let node = layout.node(&pod.node).expect("node").clone();
    let netns_path = format!("/var/run/netns/{}", pod.netns);
    let (ok, out) = layout
        .cni(&node, &cni_env("DEL", &pod, &netns_path))
        .expect("DEL");
    assert!(ok, "DEL of {name}: {out}");
    layout.pods.retain(|p| p.name != name);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &pod.netns])
        .status();
}

/// A two-node lab in `mode` with a 100 Mbit/s and a 1 Gbit/s pod on
/// node1 (added by `add_limited`, after whatever `before` adds) and a
/// pod on node2.
fn lab_with_limited_pods(
    tag: &str,
    mode: &str,
    before: impl FnOnce(&mut LabLayout),
) -> (LabGuard, LabPod, LabPod, LabPod) {
    let mut lab = LabGuard::up(tag, 2, 0, mode, LabDatastore::File).expect("lab");
    let layout = &mut lab.layout;
    let remote = layout.add_pod("node2", "remote").expect("remote");
    before(layout);
    let slow = layout
        .add_pod_with("node1", "slow", &limited(SLOW))
        .expect("ADD with both directions limited to 100 Mbit/s");
    let fast = layout
        .add_pod_with("node1", "fast", &limited(FAST))
        .expect("ADD with both directions limited to 1 Gbit/s");
    (lab, remote, slow, fast)
}

/// DEL of the pods `names`; then node1 holds exactly its other pods: no
/// shaper, no entry, no record, no address left of them.
fn del_and_assert_clean(layout: &mut LabLayout, names: &[&str]) {
    for name in names {
        del_pod(layout, name);
    }
    let node1 = layout.node("node1").expect("node1").clone();
    Inventory::read(&node_paths(&node1))
        .expect("inventory")
        .assert_exactly(
            &attachments(layout, "node1"),
            "after DEL of the limited pods",
        );
}

#[test]
fn limits_hold_on_every_path_in_vxlan_mode() {
    if !privileged("limits_hold_on_every_path_in_vxlan_mode") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // An unlimited pod keeps its throughput beside limited pods (measured
    // before the long-lived limited pods exist, see the function).
    let mut unlimited = None;
    let (mut lab, remote, slow, fast) = lab_with_limited_pods("bwv", "vxlan", |layout| {
        let peer = layout.add_pod("node1", "peer").expect("peer");
        let free = layout.add_pod("node1", "free").expect("free");
        let ratios = unlimited_beside_limited(layout, &free, &peer);
        unlimited = Some((peer, ratios));
    });
    let (peer, ratios) = unlimited.expect("set up before the limited pods");
    let median = ratios[ratios.len() / 2];
    assert!(
        median >= 0.9,
        "the unlimited pod lost throughput beside limited pods: per-round ratios {ratios:.2?}"
    );
    let layout = &mut lab.layout;

    // CHECK sees the limits in place, and sees one go missing.
    for (pod, rate) in [(&slow, SLOW), (&fast, FAST)] {
        let prev = prev_result(layout, pod);
        let (ok, out) = check(layout, pod, &limited(rate), &prev);
        assert!(ok, "CHECK of {}: {out}", pod.name);
        let (ok, _) = check(layout, pod, &Value::Null, &prev);
        assert!(!ok, "CHECK without the limits passed for {}", pod.name);
    }

    // A restarted agent puts a limit back that went missing and removes
    // a shaper no endpoint has; the measurements below run on what it
    // re-applied.
    restart_reapplies_limits(layout, &slow);

    let fabric = PathEnd {
        name: "fabric host",
        netns: &layout.fabric_netns.clone(),
        ip: layout.fabric_host,
    };
    let same_node = PathEnd {
        name: "same node",
        netns: &peer.netns,
        ip: peer.ip,
    };
    let cross_node = PathEnd {
        name: "vxlan",
        netns: &remote.netns,
        ip: remote.ip,
    };
    let mut report = Vec::new();
    for (pod, rate) in [(&slow, SLOW), (&fast, FAST)] {
        for path in [&same_node, &cross_node, &fabric] {
            report.extend(assert_limited(pod, rate, path));
        }
    }

    ingress_only_keeps_the_fast_path(layout, &peer);

    del_and_assert_clean(layout, &["slow", "fast", "inonly"]);
}

/// A pod limited only on ingress keeps its own sends on the fast path,
/// and what the fast path hands to it through its host veth's egress is
/// not taken for a flow of the stack (to_pod sees the fast path's mark):
/// nothing on node1 is tracked or diverted while it and `peer` talk.
fn ingress_only_keeps_the_fast_path(layout: &mut LabLayout, peer: &LabPod) {
    let inbound = layout
        .add_pod_with(
            "node1",
            "inonly",
            &json!({"runtimeConfig": {"bandwidth": {"ingressRate": SLOW, "ingressBurst": SLOW / 100}}}),
        )
        .expect("ADD with an ingress limit only");
    let node1 = layout.node("node1").expect("node1").clone();
    let counters_before = counters(&node1);
    let into =
        iperf(&peer.netns, &inbound.netns, inbound.ip, false, 2).expect("iperf3 into inonly");
    let out_of =
        iperf(&inbound.netns, &peer.netns, peer.ip, false, 2).expect("iperf3 out of inonly");
    let moved = |v: Verdict| counter(&counters(&node1), v) - counter(&counters_before, v);
    eprintln!(
        "bandwidth: ingress-only pod: {:.1} Mbit/s in, {:.2} Gbit/s out",
        into / 1e6,
        out_of / 1e9
    );
    assert!(
        (into / float(SLOW) - 1.0).abs() <= TOLERANCE,
        "into the ingress-limited pod: {into}"
    );
    assert!(
        out_of > 2.0 * float(SLOW),
        "its own sends are not limited: {out_of}"
    );
    for verdict in [
        Verdict::StackFlow,
        Verdict::StackFlowTracked,
        Verdict::ToShaper,
    ] {
        assert_eq!(
            moved(verdict),
            0,
            "{verdict:?} moved: the fast path's traffic left it"
        );
    }
    assert!(
        moved(Verdict::RedirectPeer) > 0,
        "the pod's sends took the fast path"
    );
}

fn drift(node: &LabNode) -> Vec<podnet::api::Drift> {
    Client::new(&node.agent_socket)
        .call(&Request::Check)
        .expect("podnetctl nodes --check")
}

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .expect(program);
    assert!(status.success(), "{program} {args:?}");
}

fn restart_reapplies_limits(layout: &mut LabLayout, pod: &LabPod) {
    let node = layout.node(&pod.node).expect("node").clone();
    assert_eq!(drift(&node), Vec::new(), "no drift with limited pods");
    let host = podnet::cni::plugin::host_ifname(&podnet::ipam::Owner {
        container_id: pod.container_id.clone(),
        ifname: pod.ifname.clone(),
    });
    run(
        "tc",
        &["-n", &node.netns, "qdisc", "del", "dev", &host, "root"],
    );
    let stray = format!("{}stray", podnet::endpoint::SHAPER_IFNAME_PREFIX);
    run(
        "ip",
        &["-n", &node.netns, "link", "add", &stray, "type", "ifb"],
    );
    let found = drift(&node);
    assert!(
        found
            .iter()
            .any(|d| d.kind == "bandwidth" && d.detail.contains(&host)),
        "nodes --check reports the missing tbf: {found:?}"
    );
    layout.stop_agent(&node.name).expect("stop the agent");
    layout.start_agent(&node.name).expect("restart the agent");
    assert_eq!(
        drift(&node),
        Vec::new(),
        "the restarted agent re-applied the limit"
    );
    let shapers =
        podnet_tests::inventory::links_named(&node.netns, podnet::endpoint::SHAPER_IFNAME_PREFIX)
            .expect("links");
    assert!(
        !shapers.contains(&stray),
        "the stray shaper is gone: {shapers:?}"
    );
}

fn counters(node: &LabNode) -> CounterTotals {
    podnet_tests::counters::totals(&node.agent_socket)
}

/// `verdict`'s counter; a counter the agent does not report fails the test.
fn counter(totals: &CounterTotals, verdict: Verdict) -> u64 {
    podnet_tests::counters::get(totals, verdict)
}

#[test]
fn limits_hold_across_nodes_in_direct_mode() {
    if !privileged("limits_hold_across_nodes_in_direct_mode") {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mut lab, remote, slow, fast) = lab_with_limited_pods("bwd", "direct", |_| {});
    let layout = &mut lab.layout;
    let cross_node = PathEnd {
        name: "direct",
        netns: &remote.netns,
        ip: remote.ip,
    };
    let fabric = PathEnd {
        name: "fabric host",
        netns: &layout.fabric_netns.clone(),
        ip: layout.fabric_host,
    };
    for (pod, rate) in [(&slow, SLOW), (&fast, FAST)] {
        for path in [&cross_node, &fabric] {
            assert_limited(pod, rate, path);
        }
    }
    del_and_assert_clean(layout, &["slow", "fast"]);
}

#[test]
fn bad_limits_get_the_reference_plugins_errors_and_change_nothing() {
    if !privileged("bad_limits_get_the_reference_plugins_errors_and_change_nothing") {
        return;
    }
    let node = Node::start("bwbad", "10.244.17.0/24").expect("node");
    // A pod for the reference plugin to work on (it needs the host veth
    // in prevResult).
    let pod = node.add_pod("bw-ref").expect("ADD");
    let netns = pod.netns.path().display().to_string();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "bw-ref"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    // The reference plugin speaks CNI 1.0.0 at most.
    let mut prev = pod.result.clone();
    prev["cniVersion"] = json!("1.0.0");
    let before = node.inventory().expect("inventory");
    let bad = [
        json!({"ingressRate": -1, "ingressBurst": 1000}),
        json!({"egressRate": 1_000_000, "egressBurst": 0}),
        json!({"ingressRate": 0, "ingressBurst": 1000}),
        json!({"egressRate": 1_000_000, "egressBurst": 40_000_000_000_u64}),
        json!({"ingressRate": 100_000_000_000_000_u64, "ingressBurst": 1_000_000}),
        // Ingress: the reference plugin's egress limit cannot be set up on
        // a podnet veth at all (README: use podnet's capability instead).
        json!({"ingressRate": 100_000_000, "ingressBurst": 10}),
        json!({"ingressRate": 1.5, "ingressBurst": 1000}),
    ];
    for (i, bandwidth) in bad.iter().enumerate() {
        let runtime = json!({"capabilities": {"bandwidth": true},
                             "runtimeConfig": {"bandwidth": bandwidth}});
        let mut conf = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bandwidth",
                              "prevResult": prev});
        conf["capabilities"] = runtime["capabilities"].clone();
        conf["runtimeConfig"] = runtime["runtimeConfig"].clone();
        let (ok, answer, _) = node
            .reference_plugin("bandwidth", &env, &conf)
            .expect("run the reference plugin");
        assert!(!ok, "the reference plugin took {bandwidth}");
        let reference_msg = answer["msg"].as_str().expect("reference msg").to_owned();

        let netns = podnet_tests::netns::NetNs::new("bwbad").expect("netns");
        let out = node
            .cni_verb(
                "ADD",
                &format!("bw-bad-{i}"),
                &netns.path(),
                &[],
                &node.conf("1.0.0", &runtime),
            )
            .expect("podnet ADD");
        assert!(!out.success, "podnet took {bandwidth}");
        let answer = out.json();
        let msg = answer["msg"].as_str().expect("podnet msg");
        eprintln!(
            "bandwidth: {bandwidth}: reference {reference_msg:?}, podnet {msg:?} (code {})",
            answer["code"]
        );
        if reference_msg.starts_with("failed to parse network configuration") {
            // Go's and serde's words for a bad number differ; the error
            // class and its prefix do not.
            assert!(
                msg.starts_with("failed to parse network configuration"),
                "{msg}"
            );
        } else {
            assert_eq!(msg, reference_msg, "for {bandwidth}");
        }
        assert_eq!(answer["code"], 7, "invalid configuration");
    }
    let after = node.inventory().expect("inventory");
    assert_eq!(
        after.counts(),
        before.counts(),
        "a refused ADD left something"
    );
    assert_eq!(after.shapers, before.shapers);
}
