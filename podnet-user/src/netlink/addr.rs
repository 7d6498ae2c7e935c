//! IPv4 addresses of links.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{Handle, packet_route::address::AddressAttribute};

use super::{LinkInfo, NetlinkError, link::link_by_index, request};

/// Adds (or keeps) `ip/prefix` on link `index`.
pub async fn add_address(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    handle
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .replace()
        .execute()
        .await
        .map_err(request(format!("adding {ip}/{prefix} to link #{index}")))
}

/// IPv4 addresses on link `index`.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
    let mut found = Vec::new();
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(request(format!("listing addresses of #{index}")))?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                found.push((*ip, msg.header.prefix_len));
            }
        }
    }
    Ok(found)
}

/// The first IPv4 address on link `index`.
pub async fn first_address(handle: &Handle, index: u32) -> Result<Option<Ipv4Addr>, NetlinkError> {
    Ok(addresses(handle, index).await?.first().map(|(ip, _)| *ip))
}

/// The link that holds `ip`, if any.
pub async fn link_with_address(
    handle: &Handle,
    ip: Ipv4Addr,
) -> Result<Option<LinkInfo>, NetlinkError> {
    let mut stream = handle
        .address()
        .get()
        .set_address_filter(IpAddr::V4(ip))
        .execute();
    let index = match stream
        .try_next()
        .await
        .map_err(request(format!("finding the link of {ip}")))?
    {
        Some(msg) => msg.header.index,
        None => return Ok(None),
    };
    link_by_index(handle, index).await
}
