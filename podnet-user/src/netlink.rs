//! Netlink (rtnetlink) operations the CNI plugin and the agent need, and the
//! way to run them inside another network namespace.
//!
//! Namespace work runs on a dedicated OS thread that `setns`es first and
//! owns its own netlink socket and single-threaded runtime: a netns switch
//! must never happen on a shared (tokio worker, blocking-pool) thread, where
//! it would leak into unrelated work.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteScope},
        tc::TcAttribute,
    },
};

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

/// Runs `work` with a netlink handle inside `netns` (a path such as
/// `/var/run/netns/x` or `/proc/PID/ns/net`; `None`: the caller's netns), on a
/// dedicated thread, and waits for it.
pub fn with_netlink<T, F, Fut>(netns: Option<&Path>, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let netns_file = netns
        .map(|path| {
            File::open(path)
                .map(|f| (f, path.to_owned()))
                .map_err(|source| NetlinkError::OpenNetns {
                    path: path.to_owned(),
                    source,
                })
        })
        .transpose()?;
    let worker = std::thread::spawn(move || -> Result<T, NetlinkError> {
        if let Some((file, path)) = &netns_file {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetlinkError::EnterNetns {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Runtime)?;
        runtime.block_on(async move {
            // The socket is created after setns, so it belongs to that netns.
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            tokio::spawn(connection);
            work(handle).await
        })
    });
    worker.join().map_err(|_| NetlinkError::WorkerPanicked)?
}

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

/// Whether link `index` has a `bpf` filter at `priority` on its clsact
/// ingress (`tc filter show dev X ingress`) or, with `egress`, its clsact
/// egress; `false` without a clsact qdisc.
pub async fn has_bpf_filter(
    handle: &Handle,
    index: u32,
    priority: u16,
    egress: bool,
) -> Result<bool, NetlinkError> {
    let Ok(ifindex) = i32::try_from(index) else {
        return Ok(false);
    };
    let get = handle.traffic_filter(ifindex).get();
    let get = if egress { get.egress() } else { get.ingress() };
    let mut filters = get.execute();
    loop {
        match filters.try_next().await {
            Ok(Some(msg)) => {
                // tcm_info carries the filter's priority in its upper half.
                let at_priority = msg.header.info >> 16 == u32::from(priority);
                let is_bpf = msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "bpf"));
                if at_priority && is_bpf {
                    return Ok(true);
                }
            }
            Ok(None) => return Ok(false),
            // No clsact qdisc (EINVAL) or no such link (ENODEV): no filter.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code
                    .is_some_and(|c| [-libc::EINVAL, -libc::ENODEV].contains(&c.get())) =>
            {
                return Ok(false);
            }
            Err(source) => {
                return Err(request(format!(
                    "listing the {} filters of link #{index}",
                    if egress { "egress" } else { "ingress" }
                ))(source));
            }
        }
    }
}

/// `TCA_TBF_PARMS` / `TCA_TBF_RATE64` (linux/pkt_sched.h).
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;

/// Puts a tbf qdisc with `tbf`'s parameters at the root of link `index`
/// (handle 1:, replacing what is there: the veth's default noqueue, or an
/// earlier tbf of the same endpoint).
pub async fn replace_root_tbf(
    handle: &Handle,
    index: u32,
    tbf: &crate::shaping::Tbf,
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_core::{
        DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    };
    use rtnetlink::packet_route::{
        RouteNetlinkMessage,
        tc::{TcHandle, TcMessage, TcOption},
    };
    let action = format!("putting a tbf qdisc on link #{index}");
    let (qopt, rate64) = tbf.to_qopt();
    let mut options = vec![TcOption::Other(DefaultNla::new(
        TCA_TBF_PARMS,
        qopt.to_vec(),
    ))];
    if let Some(rate64) = rate64 {
        options.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            rate64.to_ne_bytes().to_vec(),
        )));
    }
    let mut message = TcMessage::default();
    message.header.index = i32::try_from(index)
        .map_err(|_| NetlinkError::Unexpected(format!("{action}: ifindex out of range")))?;
    message.header.handle = TcHandle { major: 1, minor: 0 };
    message.header.parent = TcHandle::ROOT;
    message.attributes.push(TcAttribute::Kind("tbf".to_owned()));
    message.attributes.push(TcAttribute::Options(options));
    let mut request_message =
        NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request_message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut responses = handle
        .clone()
        .request(request_message)
        .map_err(request(action.clone()))?;
    while let Some(response) = futures::StreamExt::next(&mut responses).await {
        if let NetlinkPayload::Error(e) = response.payload
            && e.code.is_some()
        {
            return Err(request(action)(rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

/// The tbf qdisc at the root of link `index`, if the root qdisc is one.
pub async fn root_tbf(
    handle: &Handle,
    index: u32,
) -> Result<Option<crate::shaping::Tbf>, NetlinkError> {
    use rtnetlink::packet_core::{NlaBuffer, NlasIterator};
    use rtnetlink::packet_route::tc::{TcHandle, TcOption};
    let Ok(ifindex) = i32::try_from(index) else {
        return Ok(None);
    };
    let mut qdiscs = handle.qdisc().get().index(ifindex).execute();
    while let Some(msg) = qdiscs
        .try_next()
        .await
        .map_err(request(format!("listing the qdiscs of link #{index}")))?
    {
        if msg.header.index != ifindex || msg.header.parent != TcHandle::ROOT {
            continue;
        }
        let is_tbf = msg
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "tbf"));
        if !is_tbf {
            return Ok(None);
        }
        // netlink-packet-route keeps the options of a kind it does not know
        // as one raw attribute: the nested TCA_TBF_* attributes inside.
        let mut parms = None;
        let mut rate64 = None;
        for attribute in &msg.attributes {
            let TcAttribute::Options(options) = attribute else {
                continue;
            };
            for option in options {
                let TcOption::Other(raw) = option else {
                    continue;
                };
                let mut bytes = vec![0u8; rtnetlink::packet_core::Nla::value_len(raw)];
                rtnetlink::packet_core::Nla::emit_value(raw, &mut bytes);
                for nla in NlasIterator::new(bytes.as_slice()).flatten() {
                    let nla: NlaBuffer<&[u8]> = nla;
                    match nla.kind() {
                        TCA_TBF_PARMS => parms = Some(nla.value().to_vec()),
                        TCA_TBF_RATE64 => {
                            rate64 = nla.value().try_into().ok().map(u64::from_ne_bytes);
                        }
                        _ => {}
                    }
                }
            }
        }
        return Ok(parms.and_then(|p| crate::shaping::Tbf::from_qopt(&p, rate64)));
    }
    Ok(None)
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
