//! A [`HostNetwork`] that records what it is asked to change and keeps the
//! resulting routes and neighbours, for tests of the agent's reconcile (as
//! youki's network fakes beside its traits). Not test-only: integration
//! tests may use it too.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::{HostNetwork, LinkInfo, NetlinkError};

/// One change asked of the host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCall {
    TunnelRoute {
        cidr: Ipv4Net,
        oif: u32,
        vni: u32,
        dst: Ipv4Addr,
        src: Ipv4Addr,
    },
    GatewayRoute {
        cidr: Ipv4Net,
        gateway: Ipv4Addr,
        oif: u32,
    },
    DeleteRoute(Ipv4Net),
    KeepNeighbour {
        ifindex: u32,
        ip: Ipv4Addr,
    },
    DeleteNeighbour {
        ifindex: u32,
        ip: Ipv4Addr,
    },
}

/// The host network in memory; see the module doc.
#[derive(Debug, Clone, Default)]
pub struct RecordingHost {
    /// Every change asked, in order (lookups are not recorded).
    pub calls: Vec<HostCall>,
    /// The routes as they stand: the call that installed each.
    pub routes: BTreeMap<Ipv4Net, HostCall>,
    /// Managed neighbour entries as they stand: (ifindex, address).
    pub neighbours: BTreeSet<(u32, Ipv4Addr)>,
    /// Links and their IPv4 addresses, for lookups.
    pub links: Vec<(LinkInfo, Vec<Ipv4Addr>)>,
    /// Route changes to these CIDRs fail (a kernel refusing them).
    pub failing_routes: BTreeSet<Ipv4Net>,
}

impl RecordingHost {
    /// Forgets the recorded calls (the state stays).
    pub fn clear_calls(&mut self) {
        self.calls.clear();
    }

    fn route(&mut self, cidr: Ipv4Net, call: HostCall) -> Result<(), NetlinkError> {
        self.calls.push(call);
        if self.failing_routes.contains(&cidr) {
            return Err(NetlinkError::Unexpected(format!(
                "route to {cidr} refused (by the test)"
            )));
        }
        self.routes.insert(cidr, call);
        Ok(())
    }
}

impl HostNetwork for RecordingHost {
    fn replace_tunnel_route(
        &mut self,
        cidr: Ipv4Net,
        oif: u32,
        vni: u32,
        dst: Ipv4Addr,
        src: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.route(
            cidr,
            HostCall::TunnelRoute {
                cidr,
                oif,
                vni,
                dst,
                src,
            },
        )
    }

    fn replace_gateway_route(
        &mut self,
        cidr: Ipv4Net,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        self.route(cidr, HostCall::GatewayRoute { cidr, gateway, oif })
    }

    fn delete_route(&mut self, cidr: Ipv4Net) -> Result<(), NetlinkError> {
        self.calls.push(HostCall::DeleteRoute(cidr));
        self.routes.remove(&cidr);
        Ok(())
    }

    fn keep_neighbour_resolved(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        self.calls.push(HostCall::KeepNeighbour { ifindex, ip });
        self.neighbours.insert((ifindex, ip));
        Ok(())
    }

    fn delete_neighbour(&mut self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        self.calls.push(HostCall::DeleteNeighbour { ifindex, ip });
        self.neighbours.remove(&(ifindex, ip));
        Ok(())
    }

    fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        Ok(self
            .links
            .iter()
            .find(|(l, _)| l.name == name)
            .map(|(l, _)| l.clone()))
    }

    fn first_address(&mut self, ifindex: u32) -> Result<Option<Ipv4Addr>, NetlinkError> {
        Ok(self
            .links
            .iter()
            .find(|(l, _)| l.index == ifindex)
            .and_then(|(_, a)| a.first().copied()))
    }

    fn link_with_address(&mut self, ip: Ipv4Addr) -> Result<Option<LinkInfo>, NetlinkError> {
        Ok(self
            .links
            .iter()
            .find(|(_, a)| a.contains(&ip))
            .map(|(l, _)| l.clone()))
    }
}
