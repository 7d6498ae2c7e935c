//! Links: lookups, veth pairs, the VXLAN and ifb devices, BIG TCP sizes.

use std::{fs::File, os::fd::AsRawFd};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth,
    packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
};

use super::{NetlinkError, request};

/// A link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name.clone_from(name),
            LinkAttribute::Address(mac) if mac.len() == 6 => info.mac.copy_from_slice(mac),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            _ => {}
        }
    }
    info
}

/// The first link a get request answers, or `None` when there is none (ENODEV).
async fn first_link(
    mut links: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>> + Unpin,
    what: String,
) -> Result<Option<LinkInfo>, NetlinkError> {
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(link_info(&msg))),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(source) => Err(request(format!("looking up link {what}"))(source)),
    }
}

/// The link called `name`, or `None`.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
    first_link(
        handle.link().get().match_name(name.to_owned()).execute(),
        name.to_owned(),
    )
    .await
}

/// The link with `index`, or `None`.
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
    first_link(
        handle.link().get().match_index(index).execute(),
        format!("#{index}"),
    )
    .await
}

/// Creates a veth pair whose `peer_name` end is created directly inside the
/// netns behind `peer_netns` (no name clash in the host netns, no move).
///
/// `ipv4_big_tcp` sets `gso_ipv4_max_size` and `gro_ipv4_max_size` of both
/// ends at creation (Linux 6.3+ reads IFLA_GSO_IPV4_MAX_SIZE and
/// IFLA_GRO_IPV4_MAX_SIZE in `rtnl_create_link`, for a veth's peer too; an
/// older kernel ignores unknown attributes, so the pair gets the defaults).
pub async fn create_veth(
    handle: &Handle,
    host_name: &str,
    peer_name: &str,
    peer_netns: &File,
    mtu: u32,
    ipv4_big_tcp: Option<u32>,
) -> Result<(), NetlinkError> {
    let big_tcp = |attrs: &mut Vec<LinkAttribute>| {
        if let Some(size) = ipv4_big_tcp {
            attrs.push(LinkAttribute::GsoIpv4MaxSize(size));
            attrs.push(LinkAttribute::GroIpv4MaxSize(size));
        }
    };
    let mut peer = LinkUnspec::new_with_name(peer_name)
        .setns_by_fd(peer_netns.as_raw_fd())
        .mtu(mtu)
        .build();
    big_tcp(&mut peer.attributes);
    let mut message = LinkVeth::new(host_name, peer_name)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    big_tcp(&mut message.attributes);
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(request(format!(
            "creating veth {host_name} <-> {peer_name}"
        )))
}

/// Sets `gso_ipv4_max_size` and `gro_ipv4_max_size` of link `index` to
/// `size` (IPv4 BIG TCP, Linux 6.3+). iproute2 before 6.3 cannot, hence
/// this for the benchmark's reference setups. The kernel refuses a GSO size
/// above the device's `tso_max_size` (a veth's and a bridge's is 512 KiB).
pub async fn set_ipv4_big_tcp(handle: &Handle, index: u32, size: u32) -> Result<(), NetlinkError> {
    let mut message = LinkUnspec::new_with_index(index).build();
    message.attributes.extend([
        LinkAttribute::GsoIpv4MaxSize(size),
        LinkAttribute::GroIpv4MaxSize(size),
    ]);
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(request(format!(
            "setting IPv4 BIG TCP ({size}) on link #{index}"
        )))
}

/// `(gso_ipv4_max_size, gro_ipv4_max_size)` of link `name`, `None` when
/// there is no such link or the kernel does not report them (before 6.3).
pub async fn ipv4_gso_gro_max_size(
    handle: &Handle,
    name: &str,
) -> Result<Option<(u32, u32)>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    let message = match links.try_next().await {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::ENODEV) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(request(format!("looking up link {name}"))(source)),
    };
    let (mut gso, mut gro) = (None, None);
    for attr in &message.attributes {
        match attr {
            LinkAttribute::GsoIpv4MaxSize(size) => gso = Some(*size),
            LinkAttribute::GroIpv4MaxSize(size) => gro = Some(*size),
            _ => {}
        }
    }
    Ok(gso.zip(gro))
}

/// Brings link `index` up.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(request(format!("bringing link #{index} up")))
}

/// Deletes link `name`; `false` when it did not exist.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetlinkError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::ENODEV) =>
        {
            Ok(false)
        }
        Err(source) => Err(request(format!("deleting link {name}"))(source)),
    }
}

/// Creates the collect-metadata ("external") VXLAN device `name` on UDP
/// `port`, learning off and NOARP (the datapath sets every packet's tunnel
/// key; nothing ARPs across the overlay), and brings it up. An existing
/// device of that name is reused. Returns its ifindex.
pub async fn ensure_vxlan(
    handle: &Handle,
    name: &str,
    port: u16,
    mtu: u32,
) -> Result<u32, NetlinkError> {
    if link_by_name(handle, name).await?.is_none() {
        let message = rtnetlink::LinkMessageBuilder::<rtnetlink::LinkVxlan>::new(name)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .arp(false)
            .mtu(mtu)
            .build();
        handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(request(format!("creating VXLAN device {name}")))?;
    }
    let link = link_by_name(handle, name)
        .await?
        .ok_or_else(|| NetlinkError::Unexpected(format!("{name} vanished after creation")))?;
    // IPv4 only, as on the pods' veths: decapsulated IPv6 from a node
    // (a router advertisement) would otherwise configure the device.
    // Before it comes up, and on every start (a device an older agent made
    // keeps IPv6; turning it off removes its addresses).
    disable_ipv6(name)?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(link.index)
                .mtu(mtu)
                .arp(false)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(request(format!("bringing {name} up")))?;
    Ok(link.index)
}

/// Creates the ifb device `name` (or keeps the existing one) with `mtu`
/// and brings it up; returns its ifindex.
pub async fn ensure_ifb(handle: &Handle, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
    use rtnetlink::packet_route::link::InfoKind;
    if let Some(link) = link_by_name(handle, name).await? {
        set_up(handle, link.index).await?;
        return Ok(link.index);
    }
    let message = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Ifb)
        .name(name.to_owned())
        .mtu(mtu)
        .up()
        .build();
    match handle.link().add(message).execute().await {
        Ok(()) => {}
        // Created meanwhile by another request for the same endpoint.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.is_some_and(|c| c.get() == -libc::EEXIST) => {}
        Err(source) => return Err(request(format!("creating ifb {name}"))(source)),
    }
    link_by_name(handle, name)
        .await?
        .map(|link| link.index)
        .ok_or_else(|| NetlinkError::Unexpected(format!("ifb {name} vanished after creation")))
}

/// Names of the links whose name starts with `prefix`.
pub async fn links_named(handle: &Handle, prefix: &str) -> Result<Vec<String>, NetlinkError> {
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(msg) = links.try_next().await.map_err(request("listing links"))? {
        let info = link_info(&msg);
        if info.name.starts_with(prefix) {
            names.push(info.name);
        }
    }
    Ok(names)
}

/// Turns IPv6 off on the device `ifname` of the caller's netns: no
/// link-local address, router advertisements and SLAAC ignored, nothing of
/// the node reachable over IPv6 through it. podnet carries IPv4 only. A
/// kernel without IPv6 has no such sysctl, which is fine. (`/proc/sys/net`
/// is the netns of the thread that opens it.)
pub fn disable_ipv6(ifname: &str) -> Result<(), NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetlinkError::Unexpected(
            format!("writing 1 to {path}: {e}"),
        )),
        _ => Ok(()),
    }
}
