//! Pods on one node, attached by the real `podnet` binary and served by a
//! real `podnetd`: they reach each other through from_pod's
//! bpf_redirect_peer, and the host reaches them through the kernel.

use podnet_common::{DropReason, Verdict};
use podnet_tests::{node::Node, privileged, traffic};

#[test]
fn pods_on_one_node_talk_through_the_ebpf_fast_path() {
    if !privileged("pods_on_one_node_talk_through_the_ebpf_fast_path") {
        return;
    }
    let node = Node::start("same", "10.244.0.0/24").expect("node");
    let pods: Vec<_> = (0..3)
        .map(|i| node.add_pod(&format!("same-node-{i}")).expect("ADD"))
        .collect();
    let mut ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    ips.dedup();
    assert_eq!(ips.len(), 3, "every pod has its own IP");

    // The agent turned forwarding on (a fresh netns has ip_forward=0; the
    // node is its pods' gateway, see tests/tests/local_mode.rs). Turned
    // off again here, the node's stack cannot carry a packet from one pod
    // to another: pod to pod can only work through the eBPF redirect,
    // which the counters below show carried it.
    let forward = || {
        let out = node
            .netns
            .exec("cat", &["/proc/sys/net/ipv4/ip_forward"])
            .expect("read sysctl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(forward(), "1", "the agent turned IPv4 forwarding on");
    let off = node
        .netns
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])
        .expect("sysctl");
    assert!(off.status.success(), "turning forwarding off: {off:?}");
    assert_eq!(forward(), "0");

    let redirected_before = node.counter(Verdict::RedirectPeer).expect("counters");
    for a in &pods {
        for b in &pods {
            if a.ip != b.ip {
                assert!(a.ping(b.ip, 2), "{} -> {}", a.ip, b.ip);
            }
        }
    }
    let redirected = node.counter(Verdict::RedirectPeer).expect("counters") - redirected_before;
    // 6 ordered pairs x 2 echoes x (request + reply).
    assert!(
        redirected >= 24,
        "pings went through redirect_peer: {redirected}"
    );

    // TCP both ways, every byte checked.
    let before = node.counter(Verdict::RedirectPeer).expect("counters");
    traffic::transfer(
        pods[0].netns.name(),
        pods[1].netns.name(),
        pods[1].ip,
        32 << 20,
    )
    .expect("TCP 0 -> 1");
    traffic::transfer(
        pods[1].netns.name(),
        pods[0].netns.name(),
        pods[0].ip,
        32 << 20,
    )
    .expect("TCP 1 -> 0");
    let segments = node.counter(Verdict::RedirectPeer).expect("counters") - before;
    // 64 MiB need at least 64 MiB / 64 KiB (GSO) segments plus their ACKs.
    assert!(
        segments >= 1024,
        "TCP went through redirect_peer: {segments} packets"
    );

    // Per-endpoint counters see what each pod sent.
    let endpoints = node.podnetctl(&["endpoints"]).expect("podnetctl endpoints");
    let list = endpoints.as_array().expect("list");
    assert_eq!(list.len(), 3);
    for e in list {
        assert_eq!(e["in_datapath"], true);
        assert_eq!(e["attached"], true);
        assert!(e["tx_packets"].as_u64().unwrap_or(0) > 0, "{e}");
    }

    // Host <-> pod goes through the kernel (host route per pod).
    let host_ping = node
        .netns
        .exec(
            "ping",
            &["-c", "2", "-i", "0.2", "-W", "1", &pods[2].ip.to_string()],
        )
        .expect("ping");
    assert!(host_ping.status.success(), "node -> pod");
    assert!(pods[2].ping(node.node_ip, 2), "pod -> node");
}

#[test]
fn spoofed_sources_from_a_pod_are_dropped_and_counted() {
    if !privileged("spoofed_sources_from_a_pod_are_dropped_and_counted") {
        return;
    }
    let node = Node::start("spoof", "10.244.0.0/24").expect("node");
    let a = node.add_pod("spoof-a").expect("ADD a");
    let b = node.add_pod("spoof-b").expect("ADD b");
    assert!(a.ping(b.ip, 1), "baseline");

    // Another address inside pod a.
    a.netns
        .ip(&["addr", "add", "10.244.0.250/32", "dev", "eth0"])
        .expect("add address");
    let spoofed_ip = a
        .netns
        .exec(
            "ping",
            &[
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.244.0.250",
                &b.ip.to_string(),
            ],
        )
        .expect("ping");
    assert!(
        !spoofed_ip.status.success(),
        "a forged source IP does not get through"
    );
    assert!(node.counter(DropReason::SpoofedSourceIp).expect("counters") >= 2);

    // A forged MAC on pod a's interface. Changing the MAC flushes the pod's
    // neighbours; the attacker puts the gateway's entry back by hand (the
    // datapath does not answer ARP from a forged MAC).
    let pod_mac = a.result["interfaces"][1]["mac"]
        .as_str()
        .expect("pod mac")
        .to_owned();
    let host_mac = a.result["interfaces"][0]["mac"]
        .as_str()
        .expect("host mac")
        .to_owned();
    a.netns
        .ip(&["link", "set", "eth0", "address", "02:de:ad:be:ef:01"])
        .expect("set mac");
    a.netns
        .ip(&[
            "neigh",
            "replace",
            "10.244.0.1",
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .expect("neighbour");
    assert!(!a.ping(b.ip, 2), "a forged source MAC does not get through");
    assert!(
        node.counter(DropReason::SpoofedSourceMac)
            .expect("counters")
            >= 2,
        "{}",
        node.podnetctl(&["counters"]).expect("counters")
    );

    // Back to its own MAC, with no neighbour entry at all: the datapath
    // answers the pod's ARP for its gateway and traffic flows again.
    a.netns
        .ip(&["link", "set", "eth0", "address", &pod_mac])
        .expect("restore mac");
    a.netns
        .ip(&["neigh", "flush", "dev", "eth0"])
        .expect("flush");
    assert!(a.ping(b.ip, 2), "pod recovers through the ARP responder");
    assert!(node.counter(Verdict::ArpReply).expect("counters") >= 1);
}

/// IPv6 from a pod reaches nothing of the node: the host veth has IPv6
/// turned off (no link-local address, no router advertisements or SLAAC
/// taken from the pod), and from_pod drops and counts what the pod's kernel
/// sends on its own (router solicitations, MLD reports) and an explicit
/// all-nodes ping.
#[test]
fn ipv6_from_pods_reaches_nothing_of_the_node() {
    if !privileged("ipv6_from_pods_reaches_nothing_of_the_node") {
        return;
    }
    let node = Node::start("ipv6", "10.244.21.0/24").expect("node");
    let pod = node.add_pod("ipv6-a").expect("ADD");
    for veth in node.host_veths().expect("host veths") {
        let off = node
            .netns
            .exec(
                "cat",
                &[&format!("/proc/sys/net/ipv6/conf/{veth}/disable_ipv6")],
            )
            .expect("read sysctl");
        assert_eq!(String::from_utf8_lossy(&off.stdout).trim(), "1", "{veth}");
        let addrs = node
            .netns
            .ip(&["-6", "-o", "addr", "show", "dev", &veth])
            .expect("ip addr");
        assert!(addrs.stdout.is_empty(), "{veth} has no IPv6 address");
    }
    // The pod's own copy of an all-nodes ping comes back through its
    // loopback; nothing else may answer.
    let _ = pod
        .netns
        .exec(
            "ping",
            &["-6", "-c", "3", "-i", "0.5", "-w", "4", "ff02::1%eth0"],
        )
        .expect("ping6");
    podnet_tests::wait_up_to(
        std::time::Duration::from_secs(10),
        "from_pod counted the pod's IPv6",
        || node.counter(DropReason::Ipv6FromPod).expect("counters") >= 3,
    );
    let routes = node.netns.ip(&["-6", "route", "show"]).expect("routes");
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("pn"),
        "no IPv6 route of the node points at a pod veth"
    );
}
