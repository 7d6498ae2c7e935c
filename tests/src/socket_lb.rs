//! The socket LB in the lab (`podnetd --socket-lb-cgroup`): a cgroup v2
//! directory per node that stands for the node's pods' cgroup (the lab's
//! pods are namespaces, not processes), agents attached to it, clients
//! started inside it, and what they saw.
//!
//! Nothing here touches the hierarchy's root cgroup: the directories are
//! children of it, made and removed by [`NodeCgroup`]; processes are moved
//! into them and, for this process, back where it was.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    lab::{LabLayout, LabNode},
    services::{dns_query, parse_udp_reply, read_greeting},
};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let target = fields.nth(1)?;
            (fields.next()? == "cgroup2").then(|| PathBuf::from(target))
        })
        .context("no cgroup2 mount: the socket LB needs cgroup v2")
}

/// This process's cgroup v2 directory (`0::<path>` of /proc/self/cgroup).
fn own_cgroup(mount: &Path) -> anyhow::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// A cgroup v2 directory made for a test (`podnet-lab-<tag>-<node>` under
/// the hierarchy's root), removed on drop with whatever processes the test
/// left in it.
pub struct NodeCgroup {
    path: PathBuf,
}

impl NodeCgroup {
    /// Makes the directory (one a failed run left behind is emptied and
    /// made again).
    pub fn new(tag: &str, node: &str) -> anyhow::Result<Self> {
        let path = cgroup2_mount()?.join(format!("podnet-lab-{tag}-{node}"));
        if path.exists() {
            remove_cgroup(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program args` in the netns `netns`, as a process of this cgroup
    /// from its first instruction: the shell writes its own pid into
    /// `cgroup.procs`, then becomes `ip netns exec`.
    #[must_use]
    pub fn command_in(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec ip netns exec "$@""#)
            .arg("sh")
            .arg(&self.path)
            .arg(netns)
            .arg(program);
        cmd
    }

    /// Moves this whole process (every thread) into the cgroup until the
    /// guard is dropped: the sockets it opens meanwhile, and the processes
    /// it starts, are the cgroup's (a socket belongs to the cgroup of the
    /// process that created it).
    pub fn enter(&self) -> anyhow::Result<InCgroup> {
        let back = own_cgroup(&cgroup2_mount()?)?;
        move_self(&self.path)?;
        Ok(InCgroup { back })
    }

    /// Removes the cgroup now (what drop does, with its error).
    pub fn remove(self) -> anyhow::Result<()> {
        let path = self.path.clone();
        std::mem::forget(self);
        remove_cgroup(&path)
    }
}

impl Drop for NodeCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("removing cgroup {}: {e:#}", self.path.display());
        }
    }
}

/// This process inside a [`NodeCgroup`]; moved back on drop.
pub struct InCgroup {
    back: PathBuf,
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.back) {
            eprintln!("moving this process back to {}: {e:#}", self.back.display());
        }
    }
}

fn move_self(cgroup: &Path) -> anyhow::Result<()> {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving this process into {}", cgroup.display()))
}

/// The pids in `cgroup` (none when it is gone).
fn procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills the processes the test left in `cgroup` (each by its pid: only
/// this test's clients live there) and removes the directory.
fn remove_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<i32> = procs(cgroup).into_iter().filter(|&p| p != own).collect();
        if procs(cgroup).contains(&own) {
            move_self(&cgroup2_mount()?)?;
        }
        for pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while a killed process is still exiting.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e).with_context(|| format!("removing {}", cgroup.display())),
        }
    }
}

/// Restarts the agent of each node in `cgroups` with `--socket-lb-cgroup`
/// its cgroup (the lab gives every agent the same arguments; this one
/// differs per node).
pub fn attach_agents(layout: &mut LabLayout, cgroups: &[(&str, &Path)]) -> anyhow::Result<()> {
    let base = layout.agent_args.clone();
    let mut result = Ok(());
    for (node, cgroup) in cgroups {
        layout.agent_args = base.clone();
        layout.agent_args.push("--socket-lb-cgroup".into());
        layout.agent_args.push(cgroup.display().to_string());
        result = layout
            .stop_agent(node)
            .and_then(|()| layout.start_agent(node))
            .with_context(|| format!("restarting {node}'s agent with the socket LB"));
        if result.is_err() {
            break;
        }
    }
    layout.agent_args = base;
    result
}

/// The socket programs' counters of `node` (its pinned map), read as the
/// agent's metrics read them.
pub fn counters(node: &LabNode) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    podnet::datapath::PinnedMapReader::open(&node.bpffs_dir)
        .and_then(|reader| reader.socket_lb_counters())
        .with_context(|| format!("{}'s socket LB counters", node.name))
}

/// One query of a client (`podnet-sockprobe`), as it printed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// The backend that answered.
    pub backend: Option<String>,
    /// The client's address as the backend saw it.
    pub seen_as: Option<SocketAddrV4>,
    /// The peer as the client's socket names it: `getpeername` (TCP), the
    /// datagram's source from `recvfrom` (UDP).
    pub peer: Option<SocketAddrV4>,
    /// Why the query failed, and its errno.
    pub error: Option<String>,
    pub errno: Option<i32>,
}

impl ProbeAnswer {
    fn failed(e: &std::io::Error, context: &str) -> Self {
        Self {
            backend: None,
            seen_as: None,
            peer: None,
            error: Some(format!("{context}: {e}")),
            errno: e.raw_os_error(),
        }
    }

    fn from_anyhow(e: &anyhow::Error) -> Self {
        Self {
            backend: None,
            seen_as: None,
            peer: None,
            error: Some(format!("{e:#}")),
            errno: e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error),
        }
    }
}

fn v4(addr: std::net::SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        std::net::SocketAddr::V4(a) => Some(a),
        std::net::SocketAddr::V6(_) => None,
    }
}

/// A TCP connection to `addr` from this process: who answered, as whom it
/// saw the client, and the peer `getpeername` names.
#[must_use]
pub fn tcp_probe(addr: SocketAddrV4, timeout: Duration) -> ProbeAnswer {
    let mut stream = match TcpStream::connect_timeout(&addr.into(), timeout) {
        Ok(s) => s,
        Err(e) => return ProbeAnswer::failed(&e, &format!("connecting to {addr}")),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let peer = stream.peer_addr().ok().and_then(v4);
    match read_greeting(&mut stream) {
        Ok((backend, seen_as)) => ProbeAnswer {
            backend: Some(backend),
            seen_as: Some(seen_as),
            peer,
            error: None,
            errno: None,
        },
        Err(e) => ProbeAnswer::from_anyhow(&e),
    }
}

/// A DNS-shaped datagram to `addr` from an unconnected socket (`sendto`,
/// `recvfrom`, as a resolver that does not connect): who answered, as whom
/// it saw the client, and the source address the answer came from. A few
/// tries within `timeout`: the first datagram may be lost while
/// neighbours are resolved.
#[must_use]
pub fn udp_probe(addr: SocketAddrV4, timeout: Duration) -> ProbeAnswer {
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => return ProbeAnswer::failed(&e, "binding a UDP socket"),
    };
    let query = dns_query(0x5150);
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    let mut last = ProbeAnswer::failed(
        &std::io::Error::from(std::io::ErrorKind::TimedOut),
        &format!("no answer from {addr}"),
    );
    while Instant::now() < deadline {
        if let Err(e) = socket.send_to(&query, addr) {
            return ProbeAnswer::failed(&e, &format!("sendto {addr}"));
        }
        let _ = socket.set_read_timeout(Some(timeout / 3));
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                return match parse_udp_reply(&buf[..len], &query) {
                    Ok((backend, seen_as)) => ProbeAnswer {
                        backend: Some(backend),
                        seen_as: Some(seen_as),
                        peer: v4(from),
                        error: None,
                        errno: None,
                    },
                    Err(e) => ProbeAnswer::from_anyhow(&e),
                };
            }
            Err(e) => last = ProbeAnswer::failed(&e, &format!("recvfrom (asked {addr})")),
        }
    }
    last
}

/// Runs `podnet-sockprobe <proto> <addr> --count <count>` in `netns` as a
/// process of `cgroup` and returns its answers.
pub fn probe_in(
    cgroup: &NodeCgroup,
    netns: &str,
    proto: &str,
    addr: SocketAddrV4,
    count: usize,
) -> anyhow::Result<Vec<ProbeAnswer>> {
    let mut cmd = cgroup.command_in(netns, crate::bins::binary("podnet-sockprobe"));
    cmd.args([proto, &addr.to_string(), "--count", &count.to_string()]);
    let out = cmd
        .output()
        .with_context(|| format!("podnet-sockprobe {proto} {addr}"))?;
    anyhow::ensure!(
        out.status.success(),
        "podnet-sockprobe {proto} {addr} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("probe answer {l:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_answer_round_trips_as_one_json_line() {
        let answer = ProbeAnswer {
            backend: Some("node1-pod1".into()),
            seen_as: Some("10.244.0.3:40000".parse().expect("addr")),
            peer: Some("10.96.0.10:80".parse().expect("addr")),
            error: None,
            errno: None,
        };
        let line = serde_json::to_string(&answer).expect("serializes");
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<ProbeAnswer>(&line).expect("parses"),
            answer
        );
        let refused = ProbeAnswer::failed(
            &std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
            "connecting",
        );
        assert_eq!(refused.errno, Some(libc::ECONNREFUSED));
    }
}
