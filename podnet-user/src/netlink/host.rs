//! The host network as the agent's node reconcile changes it: routes to
//! other nodes' pod CIDRs, neighbour entries of other nodes, and the links
//! it reads to find the underlay. A trait so that the reconcile's decisions
//! are tested against [`super::RecordingHost`] without root; [`Kernel`]
//! does it for real.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{LinkInfo, NetlinkError, addr, link, netns::with_netlink, route};

/// What the agent changes and reads in the host's network (its own netns).
pub trait HostNetwork {
    /// Routes `cidr` into the collect-metadata VXLAN device `oif` with a
    /// tunnel key (VNI `vni`, remote `dst`, source `src`): vxlan mode.
    fn replace_tunnel_route(
        &mut self,
        cidr: Ipv4Net,
        oif: u32,
        vni: u32,
        dst: Ipv4Addr,
        src: Ipv4Addr,
    ) -> Result<(), NetlinkError>;

    /// Routes `cidr` via `gateway` out of `oif`: direct mode.
    fn replace_gateway_route(
        &mut self,
        cidr: Ipv4Net,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError>;

    /// Deletes the main-table route to `cidr` (no error when absent).
    fn delete_route(&mut self, cidr: Ipv4Net) -> Result<(), NetlinkError>;

    /// Asks the kernel to keep `ip`'s neighbour entry on `ifindex` resolved.
    fn keep_neighbour_resolved(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError>;

    /// Removes `ip`'s neighbour entry on `ifindex` (no error when absent).
    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError>;

    /// The link called `name`, or `None`.
    fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError>;

    /// The first IPv4 address on link `ifindex`.
    fn first_address(&mut self, ifindex: u32) -> Result<Option<Ipv4Addr>, NetlinkError>;

    /// The link that holds `ip`, if any.
    fn link_with_address(&mut self, ip: Ipv4Addr) -> Result<Option<LinkInfo>, NetlinkError>;
}

/// The host's own network namespace, through rtnetlink (each call on its
/// own netlink thread, see [`with_netlink`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel;

impl HostNetwork for Kernel {
    fn replace_tunnel_route(
        &mut self,
        cidr: Ipv4Net,
        oif: u32,
        vni: u32,
        dst: Ipv4Addr,
        src: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        with_netlink(None, move |h| async move {
            route::replace_tunnel_route(&h, cidr, oif, vni, dst, src).await
        })
    }

    fn replace_gateway_route(
        &mut self,
        cidr: Ipv4Net,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        with_netlink(None, move |h| async move {
            route::replace_gateway_route(&h, cidr, gateway, oif).await
        })
    }

    fn delete_route(&mut self, cidr: Ipv4Net) -> Result<(), NetlinkError> {
        with_netlink(
            None,
            move |h| async move { route::delete_route(&h, cidr).await },
        )
    }

    fn keep_neighbour_resolved(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        with_netlink(None, move |h| async move {
            route::keep_neighbour_resolved(&h, ifindex, ip).await
        })
    }

    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        with_netlink(None, move |h| async move {
            route::delete_neighbour(&h, ifindex, ip).await
        })
    }

    fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let name = name.to_owned();
        with_netlink(
            None,
            move |h| async move { link::link_by_name(&h, &name).await },
        )
    }

    fn first_address(&mut self, ifindex: u32) -> Result<Option<Ipv4Addr>, NetlinkError> {
        with_netlink(None, move |h| async move {
            addr::first_address(&h, ifindex).await
        })
    }

    fn link_with_address(&mut self, ip: Ipv4Addr) -> Result<Option<LinkInfo>, NetlinkError> {
        with_netlink(None, move |h| async move {
            addr::link_with_address(&h, ip).await
        })
    }
}
