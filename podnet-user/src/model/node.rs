//! The cluster's nodes as plain data: what the datastore records for a
//! node, and where a node stands as the agent sees it. The datastore
//! backends store and read these, the agent decides with them, the socket
//! API reports them; none of those is needed to use them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    #[serde(rename = "nodeIP")]
    pub node_ip: Ipv4Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its lease is alive.
    Live,
    /// Its lease expired less than the grace period ago: still routed.
    Unreachable,
    /// Its lease expired longer ago than the grace period: not routed; its
    /// CIDR stays claimed until the release delay has passed too.
    Gone,
}

/// A node and where it stands, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub record: NodeRecord,
    pub state: NodeState,
    /// When its lease was seen gone (Unix seconds), unless live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The datapath routes to it.
    pub routed: bool,
}
