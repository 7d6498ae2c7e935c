//! The physical limit on one node: two pods joined by a veth pair.

use std::{net::Ipv4Addr, process::Command};

use anyhow::Context as _;

use super::super::Pair;
use crate::netns::{NetNs, run};

/// The physical limit on one node: a veth pair straight between two pods.
pub struct VethPair {
    pub a: NetNs,
    pub b: NetNs,
}

impl VethPair {
    pub fn new() -> anyhow::Result<Self> {
        let (a, b) = (NetNs::new("bveth")?, NetNs::new("bveth")?);
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ]))?;
        a.ip(&["addr", "add", "10.250.0.1/24", "dev", "eth0"])?;
        b.ip(&["addr", "add", "10.250.0.2/24", "dev", "eth0"])?;
        a.ip(&["link", "set", "eth0", "up"])?;
        b.ip(&["link", "set", "eth0", "up"])?;
        Ok(Self { a, b })
    }

    /// The pair with IPv4 BIG TCP on both ends ([`set_ipv4_big_tcp`]).
    pub fn with_big_tcp() -> anyhow::Result<Self> {
        let me = Self::new()?;
        set_ipv4_big_tcp(&me.a)?;
        set_ipv4_big_tcp(&me.b)?;
        Ok(me)
    }

    #[must_use]
    pub fn pair(&self) -> Pair {
        Pair {
            client_ns: self.a.name().into(),
            server_ns: self.b.name().into(),
            server_ip: Ipv4Addr::new(10, 250, 0, 2),
            dial: None,
        }
    }
}

/// IPv4 BIG TCP on every link of `netns` but `lo` (a reference setup's
/// veths and bridge), with the sizes podnet's `ipv4BigTcp` sets, so that
/// `podnet-bigtcp` is compared with the same configuration elsewhere.
/// Over netlink: iproute2 before 6.3 (6.1 here) has no `gso_ipv4_max_size`.
pub fn set_ipv4_big_tcp(netns: &NetNs) -> anyhow::Result<()> {
    let size = podnet::cni::config::IPV4_BIG_TCP_MAX_SIZE;
    podnet::netlink::with_netlink(Some(&netns.path()), move |h| async move {
        for name in podnet::netlink::links_named(&h, "").await? {
            if name == "lo" {
                continue;
            }
            if let Some(link) = podnet::netlink::link_by_name(&h, &name).await? {
                podnet::netlink::set_ipv4_big_tcp(&h, link.index, size).await?;
            }
        }
        Ok(())
    })
    .with_context(|| format!("IPv4 BIG TCP in {}", netns.name()))
}
