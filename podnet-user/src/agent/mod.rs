//! The node agent: owns the datapath (programs, pinned maps and links), the
//! node's endpoints, and serves the CNI plugin and podnetctl on a unix socket.

mod accept;
mod check;
pub mod cluster;
pub mod cluster_objects;
mod endpoints;
pub mod explain;
pub mod follow;
pub mod http;
pub mod join;
pub mod metrics;
pub mod monitor;
pub mod policy;
mod report;
mod server;
pub mod services;
mod socket_lb;
mod state;

pub use endpoints::{attach_mode, record};
pub use report::{counter_totals, flow_shares, stack_flows, table_fill};
pub use server::{MAX_REQUEST_BYTES, REQUEST_READ_TIMEOUT, decode_request, serve};
pub use state::Agent;

use std::path::PathBuf;

use ipnet::Ipv4Net;

/// The agent's state directory unless told otherwise: endpoint records
/// and the built-in IPAM (whose default root, [`crate::ipam::DEFAULT_ROOT`],
/// lies in it).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podnet";

/// How the agent is configured (flags, or a config file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentConfig {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    /// The Services' ClusterIP range (see `NodeConfig::service_cidr_*`).
    #[serde(default = "default_service_cidr")]
    pub service_cidr: Ipv4Net,
    /// Who translates Services: the datapath (`bpf`) or the node's
    /// kube-proxy (the default, as before the datapath could).
    #[serde(default)]
    pub services: crate::api::services::ServicesMode,
    /// The cgroup v2 directory of the node's pods whose sockets have their
    /// ClusterIP connections translated at `connect` / `sendmsg` (see
    /// `podnet_common::socket_lb`); none: per packet only. Only with
    /// `services` bpf.
    #[serde(default)]
    pub socket_lb_cgroup: Option<PathBuf>,
    pub mtu: u32,
    /// Stack-flows entries one endpoint may hold (0: the datapath's
    /// default, see `podnet_common::FlowOwner`).
    pub stack_flows_per_endpoint: u32,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

/// Kubernetes' default Service CIDR.
#[must_use]
pub fn default_service_cidr() -> Ipv4Net {
    Ipv4Net::new(std::net::Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_default()
}

impl AgentConfig {
    /// The built-in IPAM's root (the node store is `<root>/_node`).
    #[must_use]
    pub fn ipam_dir(&self) -> PathBuf {
        crate::ipam::root_in(&self.state_dir)
    }

    /// Where endpoint records live.
    #[must_use]
    pub fn endpoints_dir(&self) -> PathBuf {
        self.state_dir.join("endpoints")
    }

    /// Where TCX links are pinned (the node devices'; pod veths' from older
    /// podnet versions).
    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.bpffs_dir.join("links")
    }

    /// Where the socket LB's cgroup links are pinned.
    #[must_use]
    pub fn socket_lb_links_dir(&self) -> PathBuf {
        self.links_dir().join("socket_lb")
    }
}
