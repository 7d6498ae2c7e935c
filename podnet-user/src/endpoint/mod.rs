//! What an endpoint is (one pod attachment on this node) and every rule
//! about it that more than one part of podnet follows: the plugin that
//! builds it, the agent that installs it, shaping and IPAM. One home, so
//! that a rule changes in one place and the agent never reads the plugin
//! to do its job.
//!
//! | file | decides |
//! | --- | --- |
//! | `naming.rs` | the host veth's and the shaper (ifb) device's names |
//! | `rules.rs` | which container IDs, interface names, network names and pod namespaces/names are accepted |
//! | `address.rs` | which addresses of a node's pod CIDR a pod may have, and the gateway |
//! | `mac.rs` | how a MAC address is written and read |
//! | `request.rs` | the endpoint itself (what the plugin hands the agent) and its validation |
//!
//! Nothing here touches the kernel, the disk or the socket: it is plain
//! data and pure functions, below every other module of the crate.

mod address;
mod mac;
mod naming;
mod request;
mod rules;

pub use address::{PodRange, PodRangeError};
pub use mac::{format_mac, parse_mac};
pub use naming::{HOST_IFNAME_PREFIX, SHAPER_IFNAME_PREFIX, host_ifname, shaper_ifname};
pub use request::{Endpoint, InvalidEndpoint, PodRef};
pub use rules::{NameError, container_id, ifname, network_name, pod_ref};

/// A CNI attachment on the node: (container ID, interface name). Unique on
/// a node at any time (an interface name is unique in a container's netns),
/// so the agent keys endpoints by it.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}
