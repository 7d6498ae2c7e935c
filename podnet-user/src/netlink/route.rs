//! Routes (gateway, link-scope, lightweight-tunnel) and neighbour entries.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteScope},
    },
};

use super::{NetlinkError, request};

/// A route to `dst/prefix` out of link `oif`, via `gateway` or link-scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
}

/// Adds or replaces `route` in the main table.
pub async fn add_route(handle: &Handle, route: Route) -> Result<(), NetlinkError> {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst, route.prefix)
        .output_interface(route.oif);
    builder = match route.gateway {
        Some(gw) => builder.gateway(gw),
        None => builder.scope(RouteScope::Link),
    };
    handle
        .route()
        .add(builder.build())
        .replace()
        .execute()
        .await
        .map_err(request(format!(
            "adding route {}/{} via {:?} dev #{}",
            route.dst, route.prefix, route.gateway, route.oif
        )))
}

/// IPv4 routes of the main table that leave through link `oif`.
pub async fn routes_via(handle: &Handle, oif: u32) -> Result<Vec<Route>, NetlinkError> {
    let mut found = Vec::new();
    let mut stream = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = stream.try_next().await.map_err(request("listing routes"))? {
        if msg.header.table != 254 {
            continue;
        }
        let mut route = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: msg.header.destination_prefix_length,
            gateway: None,
            oif: 0,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                RouteAttribute::Oif(index) => route.oif = *index,
                _ => {}
            }
        }
        if route.oif == oif {
            found.push(route);
        }
    }
    Ok(found)
}

/// Adds or replaces a permanent neighbour entry `ip -> mac` on link `index`.
pub async fn add_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), NetlinkError> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(request(format!("adding neighbour {ip} on link #{index}")))
}

/// Asks the kernel to keep `ip`'s neighbour entry on link `index` resolved
/// (a "managed" entry, NTF_EXT_MANAGED, Linux 5.16): it resolves it at once
/// and probes it again whenever it goes stale, without traffic asking. On an
/// existing entry only the flag changes (`__neigh_update` keeps the state
/// for a managed update), so reapplying it never interrupts traffic.
pub async fn keep_neighbour_resolved(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let mut add = handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .state(NeighbourState::None)
        .replace();
    add.message_mut()
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    add.execute().await.map_err(request(format!(
        "adding managed neighbour {ip} on link #{index}"
    )))
}

/// Removes `ip`'s neighbour entry on link `index` (no error when absent).
pub async fn delete_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let mut message = rtnetlink::packet_route::neighbour::NeighbourMessage::default();
    message.header.family = rtnetlink::packet_route::AddressFamily::Inet;
    message.header.ifindex = index;
    message
        .attributes
        .push(NeighbourAttribute::Destination(IpAddr::V4(ip).into()));
    match handle.neighbours().del(message).execute().await {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.map_err(request(format!("deleting neighbour {ip} on link #{index}"))),
    }
}

/// Routes `cidr` into the collect-metadata VXLAN device `oif` with a
/// lightweight-tunnel key (VNI `vni`, remote `dst`), so the node's own
/// traffic to remote pods is encapsulated like the pods' (`ip route ...
/// encap ip id VNI dst NODE`).
pub async fn replace_tunnel_route(
    handle: &Handle,
    cidr: ipnet::Ipv4Net,
    oif: u32,
    vni: u32,
    dst: Ipv4Addr,
    src: Ipv4Addr,
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_route::route::RouteIpTunnel;
    let message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(cidr.network(), cidr.prefix_len())
        .output_interface(oif)
        .pref_source(src)
        .scope(RouteScope::Link)
        .encap_ip(vec![
            RouteIpTunnel::Id(u64::from(vni)),
            RouteIpTunnel::Destination(dst),
            RouteIpTunnel::Ttl(64),
        ])
        .build();
    handle
        .route()
        .add(message)
        .replace()
        .execute()
        .await
        .map_err(request(format!("adding tunnel route {cidr} -> {dst}")))
}

/// Routes `cidr` via `gateway` out of `oif` (direct mode).
pub async fn replace_gateway_route(
    handle: &Handle,
    cidr: ipnet::Ipv4Net,
    gateway: Ipv4Addr,
    oif: u32,
) -> Result<(), NetlinkError> {
    add_route(
        handle,
        Route {
            dst: cidr.network(),
            prefix: cidr.prefix_len(),
            gateway: Some(gateway),
            oif,
        },
    )
    .await
}

/// Deletes the main-table route to `cidr` (no error when absent).
pub async fn delete_route(handle: &Handle, cidr: ipnet::Ipv4Net) -> Result<(), NetlinkError> {
    // Scope "nowhere" is the kernel's wildcard when matching the route to
    // delete (fib_table_delete); any scope we added it with matches.
    let message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(cidr.network(), cidr.prefix_len())
        .scope(RouteScope::NoWhere)
        .build();
    match handle.route().del(message).execute().await {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::ESRCH) =>
        {
            Ok(())
        }
        other => other.map_err(request(format!("deleting route {cidr}"))),
    }
}
