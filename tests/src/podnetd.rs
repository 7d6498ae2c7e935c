//! The one way the tests and the lab start podnetd: its binary, the namespace
//! it runs in, the arguments every agent gets (its name, pins, state and
//! socket), and how to tell it is up. `node::Node` (one agent per test) and
//! `lab::LabLayout` (agents that outlive `lab up`) both build on it and add
//! their own arguments (pod CIDR, or node address, mode and datastore).

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    bins,
    netns::{self, Inherit},
};

/// How long an agent may run before the caller stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Stopped by the test that started it (its child process): inherits the
    /// test's descriptors and process group, so it dies with the test run.
    Test,
    /// Outlives the process that started it (the lab): no stdin, no
    /// inherited descriptors, its own process group.
    Detached,
}

/// One agent to start.
#[derive(Debug, Clone, Copy)]
pub struct Podnetd<'a> {
    /// Where `podnetd` comes from; `None`: this build's (`bins::binary`).
    pub bin_dir: Option<&'a Path>,
    /// The named netns (`ip netns`) it runs in.
    pub netns: &'a str,
    pub node_name: &'a str,
    pub bpffs_dir: &'a Path,
    pub state_dir: &'a Path,
    pub socket: &'a Path,
}

impl Podnetd<'_> {
    /// The agent's command: podnetd inside its namespace, with the arguments
    /// every agent gets, its stdout discarded and its stderr going to `log`.
    /// The caller adds the rest (arguments, environment) and spawns it.
    pub fn command(&self, lifetime: Lifetime, log: File) -> anyhow::Result<Command> {
        let program = bins::binary_in(self.bin_dir, "podnetd");
        let inherit = match lifetime {
            Lifetime::Test => Inherit::Descriptors,
            Lifetime::Detached => Inherit::StdioOnly,
        };
        let mut cmd = netns::command_at(&netns::path_of(self.netns), program, inherit)?;
        cmd.arg("--node-name")
            .arg(self.node_name)
            .arg("--bpffs-dir")
            .arg(self.bpffs_dir)
            .arg("--state-dir")
            .arg(self.state_dir)
            .arg("--socket")
            .arg(self.socket)
            .stdout(Stdio::null())
            .stderr(log);
        if lifetime == Lifetime::Detached {
            cmd.stdin(Stdio::null()).process_group(0);
        }
        Ok(cmd)
    }
}

/// Starts the agent with at most `limit` open file descriptors (soft and
/// hard `RLIMIT_NOFILE`): a node whose descriptors run out is reproduced
/// with a limit rather than with the host's whole table.
pub fn limit_descriptors(cmd: &mut Command, limit: u64) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit(2), which is async-signal-safe; it captures a
    // plain integer.
    unsafe {
        cmd.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: `rlimit` is a valid, initialised struct for the call.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How many descriptors the process `pid` has open (its `/proc/<pid>/fd`).
pub fn open_descriptors(pid: u32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Waits up to `limit` until the agent's socket accepts a connection.
#[must_use]
pub fn wait_for_socket(socket: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Waits up to `limit` until the agent answers a node request: what it says
/// about its node (its pod CIDR, once it has one).
#[must_use]
pub fn wait_for_node_info(socket: &Path, limit: Duration) -> Option<podnet::api::NodeInfo> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(info) = podnet::api::Client::new(socket)
            .call::<podnet::api::NodeInfo>(&podnet::api::Request::Node)
        {
            return Some(info);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
