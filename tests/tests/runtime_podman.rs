//! A real container runtime calls podnet: podman 4 with its CNI backend
//! (libcni), reading a conflist from a network config dir, run inside a test
//! node's netns. The image is a busybox rootfs imported offline.

use std::{path::Path, process::Command};

use podnet_tests::{
    bins,
    node::{Node, TempDir},
    privileged,
};

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// podman with its storage and config under `dir`.
fn podman(node: &Node, dir: &Path) -> Command {
    let mut cmd = node
        .netns
        .command("podman")
        .expect("podman in the node netns");
    cmd.env("CONTAINERS_CONF", dir.join("containers.conf"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .args(["--storage-driver", "vfs"]);
    cmd
}

/// Removes every container of the test's podman store, even after a failure.
struct PodmanCleanup<'a>(&'a Node, &'a Path);

impl Drop for PodmanCleanup<'_> {
    fn drop(&mut self) {
        let _ = podman(self.0, self.1)
            .args(["rm", "--all", "--force"])
            .output();
    }
}

#[test]
fn podman_runs_a_container_on_the_podnet_network() {
    if !privileged("podman_runs_a_container_on_the_podnet_network") {
        return;
    }
    assert!(
        have("podman") && have("runc"),
        "podman and runc are installed by `cargo xtask setup`"
    );
    let node = Node::start("podman", "10.244.17.0/24").expect("node");
    let peer = node.add_pod("podman-peer").expect("ADD peer");
    let dir = TempDir::new("podman").expect("dir");
    let d = dir.path();

    // Image: busybox-static as the only file.
    std::fs::create_dir_all(d.join("rootfs/bin")).expect("rootfs");
    std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox"))
        .expect("busybox-static is installed");
    podnet_tests::netns::run(
        Command::new("tar")
            .arg("-C")
            .arg(d.join("rootfs"))
            .arg("-cf")
            .arg(d.join("rootfs.tar"))
            .arg("."),
    )
    .expect("tar");

    // CNI backend with podnet's binary dir first, the conflist in our dir.
    let bin_dir = bins::binary("podnet")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    std::fs::create_dir_all(d.join("net.d")).expect("net.d");
    std::fs::write(
        d.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
            bin_dir.display(),
            d.join("net.d").display()
        ),
    )
    .expect("containers.conf");
    std::fs::write(
        d.join("net.d/podnet.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [{"type": "podnet", "agentSocket": node.socket()}]
        })
        .to_string(),
    )
    .expect("conflist");
    let _cleanup = PodmanCleanup(&node, d);
    podnet_tests::netns::run(
        podman(&node, d)
            .arg("import")
            .arg(d.join("rootfs.tar"))
            .arg("localhost/podnet-test-busybox"),
    )
    .expect("podman import");

    let script = format!(
        "/bin/busybox ip -4 -o addr show eth0 && /bin/busybox ping -c 2 -W 2 {}",
        peer.ip
    );
    let out = podman(&node, d)
        .args([
            "run",
            "--rm",
            "--network",
            "podnet",
            // The sandbox refuses podman's default rlimits.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            "localhost/podnet-test-busybox",
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ])
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
