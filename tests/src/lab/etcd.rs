//! The lab's etcd cluster: its members' processes in the fabric namespace,
//! their readiness, leadership, and what the agents see of the datastore.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{model::LabLayout, processes::kill_and_wait};
use crate::netns::{command_in, run_in};

impl LabLayout {
    /// Spawns member `index` (detached; `down` kills it). Does not wait.
    fn spawn_etcd_member(&mut self, index: usize) -> anyhow::Result<()> {
        let initial_cluster: Vec<String> = self
            .etcd
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let member = self.etcd[index].clone();
        let log_path = self.run_dir.join(format!("{}.log", member.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // A restarted member finds its data dir and ignores the initial-*
        // flags: it rejoins as the member it was.
        let child = command_in(&self.fabric_netns, "etcd")?
            .args(["--name", &member.name, "--data-dir"])
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &member.client_url])
            .args(["--advertise-client-urls", &member.client_url])
            .args(["--listen-peer-urls", &member.peer_url])
            .args(["--initial-advertise-peer-urls", &member.peer_url])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-token", &self.prefix])
            .args(["--initial-cluster-state", "new"])
            .args(if self.etcd_tls {
                self.etcd_pki().etcd_server_args()
            } else {
                Vec::new()
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting etcd (etcd-server is installed by `cargo xtask setup`)")?;
        self.etcd[index].pid = child.id();
        // Not waited for: the member outlives `lab up`; `down` kills it.
        std::mem::forget(child);
        self.save()
    }

    /// Waits until every running member serves (has a leader and a quorum).
    pub fn wait_etcd_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for member in self.etcd.iter().filter(|m| m.pid != 0) {
            loop {
                let url = member.client_url.clone();
                let access = self.etcd_access()?;
                let ready = self.on_fabric_runtime(async move {
                    podnet::datastore::etcd::EtcdDatastore::connect_one(
                        &url,
                        Duration::from_secs(10),
                        &access,
                    )
                    .await
                    .is_ok()
                })?;
                if ready {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "etcd member {} did not come up:\n{}",
                    member.name,
                    fs::read_to_string(self.run_dir.join(format!("{}.log", member.name)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Starts every etcd member that is not running and waits until the
    /// cluster serves.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        for i in 0..self.etcd.len() {
            if self.etcd[i].pid == 0 {
                self.spawn_etcd_member(i)?;
            }
        }
        self.wait_etcd_ready(Duration::from_secs(30))
    }

    /// Stops every etcd member (SIGTERM).
    pub fn stop_etcd(&mut self) -> anyhow::Result<()> {
        for member in &mut self.etcd {
            kill_and_wait(member.pid);
            member.pid = 0;
        }
        self.save()
    }

    /// Starts one etcd member again (it rejoins with its data) and waits
    /// until it serves.
    pub fn start_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        if self.etcd[i].pid == 0 {
            self.spawn_etcd_member(i)?;
        }
        self.wait_etcd_ready(Duration::from_secs(30))
    }

    /// Stops one etcd member (SIGTERM: it leaves its peers cleanly).
    pub fn stop_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        kill_and_wait(self.etcd[i].pid);
        self.etcd[i].pid = 0;
        self.save()
    }

    /// Kills one etcd member (SIGKILL: a crash, nothing is said to anyone).
    pub fn kill_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.etcd_member_index(name)?;
        if let Ok(raw) = i32::try_from(self.etcd[i].pid)
            && raw != 0
        {
            let pid = nix::unistd::Pid::from_raw(raw);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        self.etcd[i].pid = 0;
        self.save()
    }

    /// Runs `fut` on a small runtime on a thread in the fabric namespace
    /// (where etcd's addresses are).
    pub fn on_fabric_runtime<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> anyhow::Result<T> {
        run_in(&self.fabric_netns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
        })?
        .context("starting a runtime")
    }

    /// The name of the current etcd leader, as the running members see it
    /// (`None` while there is none).
    pub fn etcd_leader(&self) -> anyhow::Result<Option<String>> {
        let running: Vec<(String, String)> = self
            .etcd
            .iter()
            .filter(|m| m.pid != 0)
            .map(|m| (m.name.clone(), m.client_url.clone()))
            .collect();
        let access = self.etcd_access()?;
        self.on_fabric_runtime(async move {
            use podnet::datastore::etcd::EtcdDatastore;
            // Member IDs are etcd's; map them to names by asking each
            // member who it is.
            let mut ids = Vec::new();
            let mut leader = 0;
            for (name, url) in running {
                if let Ok(mut store) =
                    EtcdDatastore::connect_one(&url, Duration::from_secs(10), &access).await
                    && let Ok(status) = store.member_status().await
                {
                    ids.push((status.member_id, name));
                    if status.leader != 0 {
                        leader = status.leader;
                    }
                }
            }
            ids.into_iter()
                .find(|(id, _)| *id == leader && leader != 0)
                .map(|(_, name)| name)
        })
    }

    /// Makes member `to` the etcd leader (etcd's move-leader, asked of the
    /// current leader) and waits until it is.
    pub fn etcd_move_leader(&self, to: &str) -> anyhow::Result<()> {
        let leader = self.etcd_leader()?.context("no etcd leader")?;
        if leader == to {
            return Ok(());
        }
        let leader_url = self
            .etcd_member(&leader)
            .context("the leader")?
            .client_url
            .clone();
        let to_url = self
            .etcd_member(to)
            .context("no such member")?
            .client_url
            .clone();
        let access = self.etcd_access()?;
        self.on_fabric_runtime(async move {
            let options = || Some(access.apply(etcd_client::ConnectOptions::new()));
            let mut target = etcd_client::Client::connect([to_url], options()).await?;
            let id = target
                .status()
                .await?
                .header()
                .map_or(0, etcd_client::ResponseHeader::member_id);
            let mut leader = etcd_client::Client::connect([leader_url], options()).await?;
            leader.move_leader(id).await?;
            Ok::<_, etcd_client::Error>(())
        })?
        .context("moving the etcd leader")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.etcd_leader()?.as_deref() != Some(to) {
            anyhow::ensure!(Instant::now() < deadline, "{to} did not become the leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// How the lab's tools reach its etcd: plain `http://` (the lab's
    /// etcd listens only inside its fabric namespace), or with
    /// `--etcd-tls` over TLS with the `root` client certificate.
    pub fn etcd_access(&self) -> anyhow::Result<podnet::datastore::etcd::EtcdAccess> {
        if self.etcd_tls {
            self.etcd_pki().access("root")
        } else {
            Ok(podnet::datastore::etcd::EtcdAccess::plain())
        }
    }

    /// Runs `op` on a connection to the lab's etcd as the lab's tools
    /// reach it ([`Self::etcd_access`]), on the fabric's runtime.
    fn with_etcd_root<T, F, Fut>(
        &self,
        op: F,
    ) -> anyhow::Result<Result<T, podnet::datastore::DatastoreError>>
    where
        T: Send + 'static,
        F: FnOnce(podnet::datastore::etcd::EtcdDatastore) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, podnet::datastore::DatastoreError>> + Send,
    {
        let (endpoints, access) = (self.etcd_endpoints(), self.etcd_access()?);
        self.on_fabric_runtime(async move {
            let store = podnet::datastore::etcd::EtcdDatastore::connect(
                &endpoints,
                Duration::from_secs(10),
                &access,
            )
            .await?;
            op(store).await
        })
    }

    /// Where `--etcd-tls` keeps the CA and the certificates.
    #[must_use]
    pub fn etcd_pki_dir(&self) -> std::path::PathBuf {
        self.run_dir.join("etcd-pki")
    }

    #[must_use]
    pub fn etcd_pki(&self) -> crate::etcd_tls::Pki {
        crate::etcd_tls::Pki::at(&self.etcd_pki_dir())
    }

    /// With `--etcd-tls`: etcd's users and roles (root, the operator),
    /// authentication on. Each node's user and role come with its agent
    /// ([`LabLayout::etcd_agent_args`]).
    pub fn setup_etcd_auth(&self) -> anyhow::Result<()> {
        if !self.etcd_tls {
            return Ok(());
        }
        self.with_etcd_root(|mut root| async move { root.setup_auth(None, &[]).await })?
            .context("turning etcd's authentication on")
    }

    /// The etcd flags of `node`'s agent: with `--etcd-tls`, the CA and the
    /// node's own client certificate (common name `podnet-node-<name>`,
    /// made on first use) whose etcd user and role (its own keys only) are
    /// made here too.
    pub fn etcd_agent_args(&self, node: &str) -> anyhow::Result<Vec<String>> {
        if !self.etcd_tls {
            return Ok(Vec::new());
        }
        let pki = self.etcd_pki();
        let user = podnet::datastore::etcd::node_user(node);
        let (cert, key) = pki.client(&user);
        if !cert.exists() {
            pki.issue(&user)?;
        }
        let name = node.to_owned();
        self.with_etcd_root(|mut root| async move { root.add_node_user(&name).await })?
            .with_context(|| format!("adding {node}'s etcd user"))?;
        Ok(vec![
            format!("--etcd-ca={}", pki.ca().display()),
            format!("--etcd-cert={}", cert.display()),
            format!("--etcd-key={}", key.display()),
        ])
    }

    /// Everything podnet keeps in etcd, read at one revision.
    pub fn etcd_snapshot(&self) -> anyhow::Result<podnet::datastore::membership::Snapshot> {
        self.with_etcd_root(|mut store| async move { store.snapshot().await })?
            .context("reading etcd")
    }

    /// How node `name`'s agent follows the datastore.
    pub fn datastore_status(&self, name: &str) -> anyhow::Result<podnet::api::DatastoreStatus> {
        let node = self.node(name).context("no such node")?;
        Ok(podnet::api::Client::new(&node.agent_socket).call(&podnet::api::Request::Datastore)?)
    }
}
