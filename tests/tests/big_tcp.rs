//! IPv4 BIG TCP (`ipv4BigTcp` in the CNI conf): both ends of a pod's veth
//! get the larger GSO/GRO sizes, bulk TCP between such pods works on one
//! node and across nodes (vxlan, direct), and without the option the kernel's
//! defaults stay.

use std::path::PathBuf;

use podnet::{
    cni::{config::IPV4_BIG_TCP_MAX_SIZE, plugin::host_ifname},
    ipam::Owner,
    netlink,
};
use podnet_tests::{
    lab::{LabDatastore, LabGuard, LabLayout, LabPod},
    privileged, traffic,
};

/// The kernel's default: 64 KiB (`GSO_LEGACY_MAX_SIZE`).
const DEFAULT_SIZE: u32 = 65_536;

/// `(gso_ipv4_max_size, gro_ipv4_max_size)` of the pod's eth0 and of its
/// host veth, read back over netlink.
fn sizes(layout: &LabLayout, pod: &LabPod) -> ((u32, u32), (u32, u32)) {
    let node = layout.node(&pod.node).expect("node");
    let host = host_ifname(&Owner {
        container_id: pod.container_id.clone(),
        ifname: pod.ifname.clone(),
    });
    let read = |netns: &str, name: String| {
        netlink::with_netlink(
            Some(&PathBuf::from("/var/run/netns").join(netns)),
            move |h| async move { netlink::ipv4_gso_gro_max_size(&h, &name).await },
        )
        .expect("netlink")
        .expect("the link, with its IPv4 GSO/GRO sizes (Linux 6.3+)")
    };
    (
        read(&pod.netns, pod.ifname.clone()),
        read(&node.netns, host),
    )
}

fn iperf3(client: &LabPod, server: &LabPod) {
    let mut srv = podnet_tests::lab::in_netns(&server.netns, "iperf3")
        .expect("command")
        .args(["-s", "-1", "-B", &server.ip.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = podnet_tests::lab::in_netns(&client.netns, "iperf3")
        .expect("command")
        .args(["-c", &server.ip.to_string(), "-t", "2", "-J"])
        .output()
        .expect("iperf3 client");
    let _ = srv.wait();
    assert!(
        out.status.success(),
        "iperf3 {} -> {}: {}",
        client.name,
        server.name,
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("bytes received");
    assert!(
        received > 10 << 20,
        "iperf3 {} -> {} moved only {received} bytes",
        client.name,
        server.name
    );
}

#[test]
fn big_tcp_pods_get_the_sizes_on_both_ends_and_move_bulk_tcp() {
    if !privileged("big_tcp_pods_get_the_sizes_on_both_ends_and_move_bulk_tcp") {
        return;
    }
    big_tcp_pods("bigtcp", "vxlan");
}

#[test]
fn big_tcp_pods_move_bulk_tcp_in_direct_mode() {
    if !privileged("big_tcp_pods_move_bulk_tcp_in_direct_mode") {
        return;
    }
    big_tcp_pods("bigdir", "direct");
}

/// Pods with and without `ipv4BigTcp` on a two-node lab in `mode`.
fn big_tcp_pods(tag: &str, mode: &str) {
    let mut lab = LabGuard::up(tag, 2, 0, mode, LabDatastore::File).expect("lab up");
    let layout = &mut lab.layout;
    let on = serde_json::json!({"ipv4BigTcp": true});
    let a = layout.add_pod_with("node1", "a", &on).expect("pod a");
    let b = layout.add_pod_with("node1", "b", &on).expect("pod b");
    let c = layout.add_pod_with("node2", "c", &on).expect("pod c");
    let plain = layout.add_pod("node1", "plain").expect("pod without");

    let big = (IPV4_BIG_TCP_MAX_SIZE, IPV4_BIG_TCP_MAX_SIZE);
    for pod in [&a, &b, &c] {
        assert_eq!(
            sizes(layout, pod),
            (big, big),
            "{}: pod end and host end have the BIG TCP sizes",
            pod.name
        );
    }
    let default = (DEFAULT_SIZE, DEFAULT_SIZE);
    assert_eq!(
        sizes(layout, &plain),
        (default, default),
        "without ipv4BigTcp the kernel's defaults stay"
    );

    // Same node (redirect_peer), both ways, every byte checked, and iperf3.
    traffic::transfer(&a.netns, &b.netns, b.ip, 64 << 20).expect("TCP a -> b");
    traffic::transfer(&b.netns, &a.netns, a.ip, 64 << 20).expect("TCP b -> a");
    iperf3(&a, &b);
    // Across nodes (through the tunnel, or routed on the underlay).
    traffic::transfer(&a.netns, &c.netns, c.ip, 64 << 20).expect("TCP a -> c");
    traffic::transfer(&c.netns, &a.netns, a.ip, 64 << 20).expect("TCP c -> a");
    iperf3(&a, &c);
    // And with a pod of default sizes.
    traffic::transfer(&plain.netns, &a.netns, a.ip, 16 << 20).expect("TCP plain -> a");
    traffic::transfer(&a.netns, &plain.netns, plain.ip, 16 << 20).expect("TCP a -> plain");
}
