//! A podnet node for tests: a network namespace with its own agent (own
//! bpffs, state dir and socket), and pods added by running the real `podnet`
//! binary exactly as a runtime does. Everything is removed on drop.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{PrivateBpffs, bins, netns::NetNs};

/// The agent process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    pub fn stop(mut self) {
        self.terminate();
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
        let log = std::fs::File::create(self.state.path().join("podnetd.log"))?;
        let child = self
            .netns
            .command(bins::binary_in(self.bin_dir.as_deref(), "podnetd"))?
            .arg("--node-name")
            .arg(self.netns.name())
            .arg("--pod-cidr")
            .arg(&self.pod_cidr)
            .arg("--bpffs-dir")
            .arg(self.bpffs.path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.agent = Some(AgentProcess { child });
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        anyhow::bail!("podnetd did not come up; its log:\n{}", self.agent_log())
    }

    /// The agent's process ID, while it runs.
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
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
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// CNI ADD of a new pod netns with the default conf (1.1.0).
    pub fn add_pod(&self, container_id: &str) -> anyhow::Result<Pod> {
        self.add_pod_with(container_id, &self.conf("1.1.0", &Value::Null))
    }

    pub fn add_pod_with(&self, container_id: &str, conf: &Value) -> anyhow::Result<Pod> {
        let netns = NetNs::new("pod")?;
        let path = netns.path();
        let out = self.cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", container_id),
                ("CNI_NETNS", path.to_str().unwrap_or_default()),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.to_string().as_bytes(),
        )?;
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

    /// Counter totals (verdict or drop reason name -> packets).
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let c = self.podnetctl(&["counters"])?;
        Ok(c["verdicts"][name]
            .as_u64()
            .or_else(|| c["drops"][name].as_u64())
            .unwrap_or(0))
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
