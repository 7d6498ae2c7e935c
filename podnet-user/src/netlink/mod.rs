//! Netlink (rtnetlink) operations the CNI plugin and the agent need, and the
//! way to run them inside another network namespace, by concern: links
//! (veth, VXLAN, ifb) in [`link`], addresses in [`addr`], routes and
//! neighbours in [`route`], qdiscs and filters in [`tc`], the namespace
//! thread in [`netns`]. What the agent's node reconcile changes goes
//! through [`HostNetwork`] ([`Kernel`]; [`RecordingHost`] in tests).
//!
//! Namespace work runs on a dedicated OS thread that `setns`es first and
//! owns its own netlink socket and single-threaded runtime: a netns switch
//! must never happen on a shared (tokio worker, blocking-pool) thread, where
//! it would leak into unrelated work.

pub mod addr;
pub mod fake;
pub mod host;
pub mod link;
pub mod netns;
pub mod route;
pub mod tc;

pub use addr::{add_address, addresses, first_address, link_with_address};
pub use fake::{HostCall, RecordingHost};
pub use host::{HostNetwork, Kernel};
pub use link::{
    LinkInfo, create_veth, delete_link, disable_ipv6, ensure_ifb, ensure_vxlan,
    ipv4_gso_gro_max_size, link_by_index, link_by_name, links_named, set_ipv4_big_tcp, set_up,
};
pub use netns::with_netlink;
pub use route::{
    Route, add_permanent_neighbour, add_route, delete_neighbour, delete_route,
    keep_neighbour_resolved, replace_gateway_route, replace_tunnel_route, routes_via,
};
pub use tc::{has_bpf_filter, replace_root_tbf, root_tbf};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}")]
    EnterNetns { path: PathBuf, source: nix::Error },
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("starting the netlink runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the netlink worker thread panicked")]
    WorkerPanicked,
    #[error("{action}")]
    Request {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

impl NetlinkError {
    /// The kernel's errno for a failed request (positive), if it was one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => msg.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn request(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let action = action.into();
    move |source| NetlinkError::Request { action, source }
}
