//! A podnet node for tests: a network namespace with its own agent (own
//! bpffs, state dir and socket), and pods added by running the real `podnet`
//! binary exactly as a runtime does. Everything is removed on drop.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    PrivateBpffs, bins,
    netns::NetNs,
    podnetd::{self, Lifetime, Podnetd},
};

/// The agent process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    pub fn stop(mut self) {
        self.terminate();
    }

    /// Waits up to `limit` for the agent to exit by itself (a fail point);
    /// its exit status, or `None` while it still runs.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Removes a directory tree on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "podnet-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a CNI invocation returned.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    /// The signal that ended the plugin, if one did (a fail point's SIGKILL).
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// The stdout JSON (result or error).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("CNI output is not JSON ({e}): {self:?}"))
    }

    /// The CNI error code, when it failed.
    pub fn error_code(&self) -> Option<u64> {
        (!self.success)
            .then(|| self.json()["code"].as_u64())
            .flatten()
    }
}

/// A pod: its own netns, attached by CNI ADD.
pub struct Pod {
    pub netns: NetNs,
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub result: Value,
}

/// A node: netns + agent + its paths.
pub struct Node {
    // Field order is drop order: agent first, then the namespace (and its
    // veths), then pins and state.
    agent: Option<AgentProcess>,
    pub netns: NetNs,
    pub bpffs: PrivateBpffs,
    pub state: TempDir,
    pub pod_cidr: String,
    pub node_ip: Ipv4Addr,
    /// Where this node's `podnetd` and `podnet` come from; `None`: the
    /// binaries of this build (`bins::binary`).
    bin_dir: Option<PathBuf>,
    /// More arguments for every start of the agent (e.g. `--metrics-addr`).
    agent_args: Vec<String>,
    /// The agent's descriptor limit (`RLIMIT_NOFILE`), when not inherited.
    agent_nofile: Option<u64>,
}

impl Node {
    /// A node with `pod_cidr`, its agent running, and `node_ip` on its lo.
    pub fn start(tag: &str, pod_cidr: &str) -> anyhow::Result<Self> {
        Self::start_with_bins(tag, pod_cidr, None)
    }

    /// [`Node::start`] with the agent (`podnetd`) and the CNI plugin
    /// (`podnet`) taken from `bin_dir` when given (e.g. an older commit's
    /// release build, for a same-run comparison), for the agent's restarts
    /// and every ADD/DEL too.
    pub fn start_with_bins(
        tag: &str,
        pod_cidr: &str,
        bin_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_with(tag, pod_cidr, bin_dir, &[])
    }

    /// [`Node::start`] with `agent_args` added to podnetd's arguments (on
    /// every start of the agent).
    pub fn start_with_agent_args(
        tag: &str,
        pod_cidr: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(tag, pod_cidr, None, agent_args)
    }

    /// [`Node::start_with_agent_args`] with the agent limited to `nofile`
    /// open descriptors (on every start).
    pub fn start_with_agent_args_and_nofile(
        tag: &str,
        pod_cidr: &str,
        agent_args: &[&str],
        nofile: u64,
    ) -> anyhow::Result<Self> {
        Self::start_configured(tag, pod_cidr, None, agent_args, Some(nofile))
    }

    fn start_with(
        tag: &str,
        pod_cidr: &str,
        bin_dir: Option<&Path>,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_configured(tag, pod_cidr, bin_dir, agent_args, None)
    }

    fn start_configured(
        tag: &str,
        pod_cidr: &str,
        bin_dir: Option<&Path>,
        agent_args: &[&str],
        agent_nofile: Option<u64>,
    ) -> anyhow::Result<Self> {
        let netns = NetNs::new(tag)?;
        let node_ip = Ipv4Addr::new(10, 99, 0, 1);
        netns.ip(&["addr", "add", &format!("{node_ip}/32"), "dev", "lo"])?;
        let mut node = Self {
            agent: None,
            netns,
            bpffs: PrivateBpffs::new(tag)?,
            state: TempDir::new(tag)?,
            pod_cidr: pod_cidr.to_owned(),
            node_ip,
            bin_dir: bin_dir.map(Path::to_path_buf),
            agent_args: agent_args.iter().map(|&a| a.to_owned()).collect(),
            agent_nofile,
        };
        node.start_agent()?;
        Ok(node)
    }

    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.state.path().join("podnetd.sock")
    }

    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// Starts podnetd in the node's netns and waits until it answers.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with_env(&[])
    }

    /// [`Node::start_agent`] with `env` added to the agent's environment
    /// (e.g. a fail point). Its log is appended to the earlier runs'.
    pub fn start_agent_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("podnetd.log"))?;
        let (state_dir, socket) = (self.state_dir(), self.socket());
        let mut cmd = Podnetd {
            bin_dir: self.bin_dir.as_deref(),
            netns: self.netns.name(),
            node_name: self.netns.name(),
            bpffs_dir: self.bpffs.path(),
            state_dir: &state_dir,
            socket: &socket,
        }
        .command(Lifetime::Test, log)?;
        if let Some(nofile) = self.agent_nofile {
            podnetd::limit_descriptors(&mut cmd, nofile);
        }
        let child = cmd
            .envs(env.iter().copied())
            .arg("--pod-cidr")
            .arg(&self.pod_cidr)
            .args(&self.agent_args)
            .spawn()?;
        self.agent = Some(AgentProcess { child });
        if podnetd::wait_for_socket(&socket, Duration::from_secs(15)) {
            return Ok(());
        }
        anyhow::bail!("podnetd did not come up; its log:\n{}", self.agent_log())
    }

    /// The agent's process ID, while it runs.
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// Waits up to `limit` for the agent to die by itself (a fail point):
    /// its exit status, after which the node has no agent until
    /// [`Node::start_agent`]; `None` while it still runs.
    pub fn wait_agent_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = self.agent.as_mut()?.wait_exit(limit)?;
        self.agent = None;
        Some(status)
    }

    /// Stops the agent (SIGTERM), leaving its pins.
    pub fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
    }

    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("podnetd.log")).unwrap_or_default()
    }

    /// Runs the reference CNI plugin `plugin` (from /usr/lib/cni) in the
    /// node's netns with `conf` on stdin: whether it succeeded, its JSON
    /// answer, and stdout + stderr for messages.
    pub fn reference_plugin(
        &self,
        plugin: &str,
        env: &[(&str, &str)],
        conf: &Value,
    ) -> anyhow::Result<(bool, Value, String)> {
        let out = crate::run_cni_plugin(
            self.netns.command(format!("/usr/lib/cni/{plugin}"))?,
            "/usr/lib/cni",
            env,
            conf.to_string().as_bytes(),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((
            out.status.success(),
            serde_json::from_str(&stdout).unwrap_or(Value::Null),
            format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        ))
    }

    /// The CNI conf for this node in `version`, with `extra` keys merged in.
    #[must_use]
    pub fn conf(&self, version: &str, extra: &Value) -> Value {
        let mut conf = serde_json::json!({
            "cniVersion": version,
            "name": "podnet",
            "type": "podnet",
            "agentSocket": self.socket(),
        });
        if let (Some(obj), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        conf
    }

    /// Runs the podnet binary in the node's netns with `env` and `stdin`,
    /// exactly as a runtime does.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> anyhow::Result<CniOutput> {
        let Output {
            status,
            stdout,
            stderr,
        } = crate::run_cni_plugin(
            self.netns
                .command(bins::binary_in(self.bin_dir.as_deref(), "podnet"))?,
            "/usr/lib/cni",
            env,
            stdin,
        )?;
        Ok(CniOutput {
            success: status.success(),
            signal: std::os::unix::process::ExitStatusExt::signal(&status),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// CNI ADD of a new pod netns with the default conf (1.1.0).
    pub fn add_pod(&self, container_id: &str) -> anyhow::Result<Pod> {
        self.add_pod_with(container_id, &self.conf("1.1.0", &Value::Null))
    }

    pub fn add_pod_with(&self, container_id: &str, conf: &Value) -> anyhow::Result<Pod> {
        self.add_pod_in(NetNs::new("pod")?, container_id, conf)
    }

    /// CNI ADD of `container_id` into an existing `netns` (e.g. the
    /// runtime's retry after a failed or crashed ADD).
    pub fn add_pod_in(
        &self,
        netns: NetNs,
        container_id: &str,
        conf: &Value,
    ) -> anyhow::Result<Pod> {
        let out = self.cni_verb("ADD", container_id, &netns.path(), &[], conf)?;
        anyhow::ensure!(
            out.success,
            "ADD {container_id} failed: {out:?}\nagent log:\n{}",
            self.agent_log()
        );
        let result = out.json();
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no IP in {result}"))?;
        Ok(Pod {
            netns,
            container_id: container_id.to_owned(),
            ifname: "eth0".to_owned(),
            ip,
            result,
        })
    }

    /// Runs `verb` for attachment (`container_id`, eth0) in `netns` with
    /// `conf`, and `extra` in the plugin's environment (e.g. a fail point).
    pub fn cni_verb(
        &self,
        verb: &str,
        container_id: &str,
        netns: &Path,
        extra: &[(&str, &str)],
        conf: &Value,
    ) -> anyhow::Result<CniOutput> {
        let netns = netns.to_str().unwrap_or_default();
        let mut env = vec![
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ];
        env.extend_from_slice(extra);
        self.cni(&env, conf.to_string().as_bytes())
    }

    /// CNI GC (conf 1.1.0) with `valid` as the valid attachments: what a
    /// runtime sends for the containers it still has.
    pub fn gc(&self, valid: &[&Pod]) -> anyhow::Result<CniOutput> {
        let mut conf = self.conf("1.1.0", &Value::Null);
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|p| serde_json::json!({"containerID": p.container_id, "ifname": p.ifname}))
            .collect();
        self.cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())
    }

    /// What the node holds for pods: addresses, veths, agent endpoints,
    /// records, map entries (see [`crate::inventory`]).
    pub fn inventory(&self) -> anyhow::Result<crate::inventory::Inventory> {
        crate::inventory::Inventory::read(&crate::inventory::NodePaths {
            netns: self.netns.name(),
            socket: &self.socket(),
            bpffs: self.bpffs.path(),
            state_dir: &self.state_dir(),
        })
    }

    /// CNI DEL of `pod` (conf 1.1.0).
    pub fn del_pod(&self, pod: &Pod) -> anyhow::Result<CniOutput> {
        let path = pod.netns.path();
        self.cni(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", &pod.container_id),
                ("CNI_NETNS", path.to_str().unwrap_or_default()),
                ("CNI_IFNAME", &pod.ifname),
            ],
            self.conf("1.1.0", &Value::Null).to_string().as_bytes(),
        )
    }

    /// `podnetctl --json <args>` against this node. Always this build's
    /// podnetctl (also on a node with other binaries): its JSON is what the
    /// tests parse.
    pub fn podnetctl(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = crate::netns::run(
            self.netns
                .command(bins::binary("podnetctl"))?
                .arg("--socket")
                .arg(self.socket())
                .arg("--bpffs-dir")
                .arg(self.bpffs.path())
                .arg("--json")
                .args(args),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// One counter (a verdict or a drop reason), read with podnetctl, so also from the pins while the agent is
    /// down. Panics on a counter podnetctl does not report
    /// ([`crate::counters::get`]).
    pub fn counter(&self, counter: impl Into<crate::counters::Counter>) -> anyhow::Result<u64> {
        let totals: podnet::api::CounterTotals =
            serde_json::from_value(self.podnetctl(&["counters"])?)?;
        Ok(crate::counters::get(&totals, counter))
    }

    /// The addresses the built-in IPAM holds for network `podnet`.
    pub fn ipam_records(&self) -> Vec<String> {
        self.ipam_records_of("podnet")
    }

    /// The addresses the built-in IPAM holds for `network`: its records in
    /// the node store (`ipam/_node/<ip>`: container, ifname, network) and
    /// in an old-layout store of the network (`ipam/<network>/<ip>`).
    pub fn ipam_records_of(&self, network: &str) -> Vec<String> {
        let root = self.state_dir().join("ipam");
        let records = |dir: PathBuf| -> Vec<(String, String)> {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
                        .map(|e| {
                            (
                                e.file_name().to_string_lossy().into_owned(),
                                std::fs::read_to_string(e.path()).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut ips: Vec<String> = records(root.join("_node"))
            .into_iter()
            .filter(|(_, content)| content.lines().nth(2).map(str::trim) == Some(network))
            .map(|(ip, _)| ip)
            .chain(records(root.join(network)).into_iter().map(|(ip, _)| ip))
            .collect();
        ips.sort();
        ips
    }

    /// Host-side pod veths (`pn...`) in the node's netns.
    pub fn host_veths(&self) -> anyhow::Result<Vec<String>> {
        let out = self.netns.ip(&["-o", "link", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("pn"))
            .collect())
    }
}

impl Pod {
    /// `ping -c N -W 1 <ip>` from this pod; true when all answered.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        self.netns
            .exec(
                "ping",
                &[
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    &ip.to_string(),
                ],
            )
            .is_ok_and(|o| o.status.success())
    }
}
