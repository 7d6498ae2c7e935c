//! A step of the agent's start that fails leaves what runs untouched and is
//! retried: node1's agent restarts while `nft` fails (the masquerade table
//! cannot be written, so the node's network setup fails half-way, after
//! re-pointing the node devices' programs). Traffic between pods flows all
//! along, `podnetctl status` lists the node network under `pending`, and
//! once `nft` works again the agent's retry finishes the setup by itself.
//!
//! Its own test binary: it changes the process's PATH, which the agents it
//! starts inherit.

use std::{path::Path, time::Duration};

use podnet::api::{AgentStatus, Client, Request};
use podnet_tests::{
    lab::{LabDatastore, LabGuard},
    node::TempDir,
    privileged,
    traffic::LabFloods,
};

const PINGS: u32 = 3_000;

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

    let mut floods = LabFloods::start(&lab.layout, PINGS).expect("floods");
    std::thread::sleep(Duration::from_millis(500));
    lab.layout.stop_agent("node1").expect("stop");
    lab.layout
        .start_agent("node1")
        .expect("start with a failing nft");
    let node1 = lab.layout.node("node1").expect("node1").clone();
    let pending = || -> Vec<String> {
        Client::new(&node1.agent_socket)
            .call::<AgentStatus>(&Request::Status)
            .map(|s| s.pending)
            .unwrap_or_default()
    };
    let listed = pending();
    assert!(
        listed.iter().any(|p| p.starts_with("node network")),
        "the failed step is listed: {listed:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        pending().iter().any(|p| p.starts_with("node network")),
        "still failing while nft fails"
    );
    std::fs::remove_file(&flag).expect("disarm");
    podnet_tests::wait_up_to(
        Duration::from_secs(20),
        "the retry finishing the setup",
        || pending().is_empty(),
    );
    assert_eq!(floods.ended(), None, "the floods covered the whole episode");
    for (path, result) in floods.finish().expect("ping results") {
        eprintln!(
            "{path}: {} sent, {} lost across a start that failed half-way",
            result.sent,
            result.sent - result.received
        );
        assert_eq!(result.received, result.sent, "{path}: every ping answered");
    }
}
