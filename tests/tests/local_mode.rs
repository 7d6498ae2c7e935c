//! A node alone (`--datastore none`, local mode) in a fresh network
//! namespace, whose IPv4 forwarding starts off (`ip_forward` 0, a new
//! netns's default): what the node's stack translates for a pod and
//! forwards on to another pod works, because the agent turns forwarding on
//! as its pods' gateway (as the reference bridge plugin does for its
//! gateway). Without it the DNATed packet is dropped at the input route
//! (counted only in the node's `InAddrErrors`) and the connection times out.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread::JoinHandle,
};

use podnet_common::Verdict;
use podnet_tests::{
    netns::NetNs,
    node::{Node, Pod},
    privileged, services, traffic,
};
use serde_json::{Value, json};

/// The ClusterIP of the kube-proxy-style DNAT (an address no interface has).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn read_sysctl(netns: &NetNs, path: &str) -> String {
    let out = netns.exec("cat", &[path]).expect("read sysctl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The node's `Ip: InAddrErrors` (where the input route's drop of a packet
/// it may not forward is counted), for the failure message.
fn in_addr_errors(node: &Node) -> String {
    let out = node
        .netns
        .exec("cat", &["/proc/net/snmp"])
        .expect("read snmp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        return "?".to_owned();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InAddrErrors")
        .map_or_else(|| "?".to_owned(), |(_, v)| v.to_owned())
}

/// Chains the reference portmap plugin after podnet for `pod`, as a
/// runtime does with podnet's conflist: podnet's result as prevResult, the
/// port mappings (host port, container port) as runtimeConfig.
fn portmap_add(node: &Node, pod: &Pod, mappings: &[(u16, u16)]) {
    let mappings: Vec<Value> = mappings
        .iter()
        .map(|&(host, container)| {
            json!({"hostPort": host, "containerPort": container, "protocol": "tcp"})
        })
        .collect();
    let conf = json!({
        "cniVersion": pod.result["cniVersion"],
        "name": "podnet",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": mappings},
        "prevResult": pod.result,
    });
    let netns = pod.netns.path().display().to_string();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", pod.container_id.as_str()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", pod.ifname.as_str()),
    ];
    let (ok, _, log) = node
        .reference_plugin("portmap", &env, &conf)
        .expect("run portmap");
    assert!(ok, "portmap ADD after podnet: {log}");
}

#[test]
fn local_mode_forwards_what_the_node_translates_for_pods() {
    if !privileged("local_mode_forwards_what_the_node_translates_for_pods") {
        return;
    }
    // The premise: a fresh namespace does not forward.
    let fresh = NetNs::new("fresh").expect("netns");
    assert_eq!(read_sysctl(&fresh, "/proc/sys/net/ipv4/ip_forward"), "0");
    drop(fresh);

    let node = Node::start("local", "10.244.18.0/24").expect("node");
    let conf = node.conf("1.0.0", &Value::Null);
    let a = node.add_pod_with("local-a", &conf).expect("ADD a");
    let b = node.add_pod_with("local-b", &conf).expect("ADD b");

    // A receiver in pod b per case (each takes one connection).
    let listen_in_b = || traffic::receiver(b.netns.name(), b.ip).expect("receiver in b");
    let (from_pod, from_pod_rx) = listen_in_b();
    let (from_node, from_node_rx) = listen_in_b();
    let (loopback, loopback_rx) = listen_in_b();
    let (service, service_rx) = listen_in_b();
    let (host_port, node_host_port, loopback_host_port) = (18_080, 18_081, 18_082);
    portmap_add(
        &node,
        &b,
        &[
            (host_port, from_pod.port()),
            (node_host_port, from_node.port()),
            (loopback_host_port, loopback.port()),
        ],
    );
    // A ClusterIP as kube-proxy's nftables mode (or any `dnat to` rule)
    // writes it, with pod b as its backend.
    let rule = format!(
        "table ip svclocal {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             ip daddr {CLUSTER_IP} tcp dport 80 dnat to {}:{}\n\
           }}\n\
         }}\n",
        b.ip,
        service.port()
    );
    let mut nft = node.netns.command("nft").expect("nft");
    nft.args(["-f", "-"]);
    services::feed(nft, &rule).expect("the Service's DNAT rule");

    let stack_flows_before = node.counter(Verdict::StackFlow).expect("counters");
    let cases: [(&str, &str, SocketAddrV4, JoinHandle<anyhow::Result<u64>>); 4] = [
        (
            "pod a -> the node's address:hostPort (portmap DNAT, forwarded)",
            a.netns.name(),
            SocketAddrV4::new(node.node_ip, host_port),
            from_pod_rx,
        ),
        (
            "the node -> its own address:hostPort",
            node.netns.name(),
            SocketAddrV4::new(node.node_ip, node_host_port),
            from_node_rx,
        ),
        (
            "the node -> 127.0.0.1:hostPort",
            node.netns.name(),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, loopback_host_port),
            loopback_rx,
        ),
        (
            "pod a -> ClusterIP (a DNAT rule, forwarded)",
            a.netns.name(),
            SocketAddrV4::new(CLUSTER_IP, 80),
            service_rx,
        ),
    ];
    let bytes = 1 << 20;
    let mut failed = Vec::new();
    for (case, from, to, rx) in cases {
        match traffic::send(from, to, bytes) {
            Ok(sent) => {
                let received = rx.join().expect("receiver panicked");
                match received {
                    Ok(received) if sent == bytes && received == bytes => {}
                    other => failed.push(format!("{case}: sent {sent}, received {other:?}")),
                }
            }
            // The receiver still waits for its connection; the test ends
            // without it.
            Err(e) => failed.push(format!("{case}: {e:#}")),
        }
    }
    assert!(
        failed.is_empty(),
        "on a local-mode node (ip_forward now {}, its Ip InAddrErrors {}):\n{}",
        read_sysctl(&node.netns, "/proc/sys/net/ipv4/ip_forward"),
        in_addr_errors(&node),
        failed.join("\n")
    );
    // Pod b's replies to what the stack delivered went back through it
    // (conntrack undid the DNAT), not past it on the fast path.
    assert!(
        node.counter(Verdict::StackFlow).expect("counters") > stack_flows_before,
        "replies went to the stack"
    );
    assert_eq!(
        read_sysctl(&node.netns, "/proc/sys/net/ipv4/ip_forward"),
        "1",
        "the agent turned forwarding on"
    );
}
