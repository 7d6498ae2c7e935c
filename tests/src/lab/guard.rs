//! A lab for a test: built on creation, removed (`down`) on drop.

use std::path::{Path, PathBuf};

use super::{
    model::{LabDatastore, LabLayout, LabSpec, ServiceKind},
    up::{down, up_with_bins},
};

/// A lab for tests: `down` on drop, even when the test fails.
pub struct LabGuard {
    pub layout: LabLayout,
}

/// What a test lab has besides nodes and pods.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The demo Service, installed as this.
    pub service: Option<ServiceKind>,
    /// Agents and plugin from this directory (see [`up_with_bins`]).
    pub bin_dir: Option<PathBuf>,
    /// Members of the etcd cluster (etcd datastore).
    pub etcd_members: usize,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    /// etcd over TLS with client certificates.
    pub etcd_tls: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            service: None,
            bin_dir: None,
            etcd_members: 1,
            agent_args: Vec::new(),
            etcd_tls: false,
        }
    }
}

impl LabGuard {
    /// A lab without the demo Service.
    pub fn up(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
    ) -> anyhow::Result<Self> {
        Self::up_with(
            tag,
            nodes,
            pods_per_node,
            mode,
            datastore,
            LabOptions::default(),
        )
    }

    /// [`LabGuard::up`] with the demo Service installed as `kind`.
    pub fn up_with_service(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        kind: ServiceKind,
    ) -> anyhow::Result<Self> {
        let options = LabOptions {
            service: Some(kind),
            ..LabOptions::default()
        };
        Self::up_with(tag, nodes, pods_per_node, mode, datastore, options)
    }

    /// [`LabGuard::up`] running the agents and the CNI plugin from
    /// `bin_dir` when given (see [`up_with_bins`]).
    pub fn up_with_bins(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        bin_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let options = LabOptions {
            bin_dir: bin_dir.map(Path::to_path_buf),
            ..LabOptions::default()
        };
        Self::up_with(tag, nodes, pods_per_node, mode, datastore, options)
    }

    /// A lab with everything [`LabOptions`] says.
    pub fn up_with(
        tag: &str,
        nodes: usize,
        pods_per_node: usize,
        mode: &str,
        datastore: LabDatastore,
        options: LabOptions,
    ) -> anyhow::Result<Self> {
        let prefix = format!("pnt{tag}{}", std::process::id() % 10_000);
        let spec = LabSpec {
            nodes,
            pods_per_node,
            mode: mode.into(),
            datastore,
            run_dir: std::env::temp_dir().join(format!("podnet-lab-{prefix}")),
            prefix,
            verbose: false,
            service: options.service,
            etcd_members: options.etcd_members,
            agent_args: options.agent_args,
            etcd_tls: options.etcd_tls,
        };
        Ok(Self {
            layout: up_with_bins(&spec, options.bin_dir.as_deref())?,
        })
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = down(&self.layout.run_dir, &self.layout.prefix);
    }
}
