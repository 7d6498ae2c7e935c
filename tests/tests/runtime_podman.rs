//! A real container runtime calls podnet: podman 4 with its CNI backend
//! (libcni), reading a conflist from a network config dir, run inside a test
//! node's netns. The image is a busybox rootfs imported offline.

use podnet_tests::{
    node::Node,
    podman::{self, Podman},
    privileged,
};

#[test]
fn podman_runs_a_container_on_the_podnet_network() {
    if !privileged("podman_runs_a_container_on_the_podnet_network") {
        return;
    }
    assert!(
        podman::have("podman") && podman::have("runc"),
        "podman and runc are installed by `cargo xtask setup`"
    );
    let node = Node::start("podman", "10.244.17.0/24").expect("node");
    let peer = node.add_pod("podman-peer").expect("ADD peer");
    let podman = Podman::new(
        "podman",
        node.netns.name(),
        &serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [{"type": "podnet", "agentSocket": node.socket()}]
        }),
    )
    .expect("podman with the podnet network");

    let script = format!(
        "/bin/busybox ip -4 -o addr show eth0 && /bin/busybox ping -c 2 -W 2 {}",
        peer.ip
    );
    let out = podman
        .command()
        .expect("podman")
        .args(["run", "--rm", "--network", "podnet"])
        .args(podman::RLIMITS)
        .args([podman::IMAGE, "/bin/busybox", "sh", "-c", &script])
        .output()
        .expect("podman run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman run failed: {stdout}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    assert!(
        stdout.contains("inet 10.244.17."),
        "the container got a podnet address: {stdout}"
    );
    assert!(
        stdout.contains("2 packets received"),
        "and reached a pod: {stdout}"
    );

    // `--rm` made podman call DEL: only the peer is left.
    assert_eq!(node.ipam_records(), vec![peer.ip.to_string()]);
    assert_eq!(node.host_veths().expect("links").len(), 1);
}
