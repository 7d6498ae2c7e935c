//! [`PodPlumbing`] over rtnetlink.
//!
//! Pod side: the address as a /32, a link-scope route to the gateway, the
//! default route via it, and a permanent neighbour entry for the gateway
//! with the host veth's MAC — the pod never ARPs for its gateway, and every
//! packet it sends reaches from_pod on the host veth. Host side: a /32 route
//! to the pod over its veth, for host <-> pod traffic through the kernel.

use std::{fs::File, path::Path};

use super::{
    error::{CniError, code},
    plugin::{PodIfCreated, PodIfSpec, PodIfState, PodPlumbing},
};
use crate::{
    failpoint::{self, FailPoint},
    netlink::{self, NetlinkError, Route},
};

fn plumbing_error(what: &str) -> impl FnOnce(NetlinkError) -> CniError + '_ {
    move |e| CniError::from_error(code::PLUMBING_FAILED, what, &e)
}

/// Real plumbing, in the caller's netns (the node) and the pod's.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetlinkPlumbing;

impl PodPlumbing for NetlinkPlumbing {
    fn create(&self, spec: &PodIfSpec) -> Result<PodIfCreated, CniError> {
        let netns_file = File::open(&spec.netns).map_err(|e| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!("cannot open network namespace {}", spec.netns.display()),
            )
            .with_details(e.to_string())
        })?;
        let host = {
            let spec = spec.clone();
            netlink::with_netlink(None, move |h| async move {
                // A leftover of an earlier, interrupted ADD of the same attachment.
                netlink::delete_link(&h, &spec.host_ifname).await?;
                netlink::create_veth(
                    &h,
                    &spec.host_ifname,
                    &spec.ifname,
                    &netns_file,
                    spec.mtu,
                    spec.ipv4_big_tcp_max_size,
                )
                .await?;
                let host = netlink::link_by_name(&h, &spec.host_ifname)
                    .await?
                    .ok_or_else(|| {
                        NetlinkError::Unexpected(format!(
                            "{} vanished after creation",
                            spec.host_ifname
                        ))
                    })?;
                // Before the host end comes up: no link-local address, no
                // router advertisements or SLAAC from the pod, nothing of the
                // node's answering the pod over IPv6 (from_pod also drops
                // IPv6, but only once its filter is on).
                netlink::disable_ipv6(&spec.host_ifname)?;
                Ok(host)
            })
            .map_err(plumbing_error(
                "creating the host side of the pod interface",
            ))?
        };
        let pod = {
            let spec = spec.clone();
            netlink::with_netlink(Some(&spec.netns.clone()), move |h| async move {
                netlink::link_by_name(&h, &spec.ifname)
                    .await?
                    .ok_or_else(|| {
                        NetlinkError::Unexpected(format!("{} missing in the pod", spec.ifname))
                    })
            })
            .map_err(plumbing_error("finding the pod interface"))?
        };
        Ok(PodIfCreated {
            host_ifindex: host.index,
            host_mac: host.mac,
            pod_mac: pod.mac,
        })
    }

    fn activate(&self, spec: &PodIfSpec, created: &PodIfCreated) -> Result<(), CniError> {
        {
            let (ip, index) = (spec.ip, created.host_ifindex);
            netlink::with_netlink(None, move |h| async move {
                netlink::set_up(&h, index).await?;
                netlink::add_route(
                    &h,
                    Route {
                        dst: ip,
                        prefix: 32,
                        gateway: None,
                        oif: index,
                    },
                )
                .await
            })
            .map_err(plumbing_error(
                "bringing up the host side of the pod interface",
            ))?;
        }
        failpoint::hit(FailPoint::AddAfterHostUp);
        let spec = spec.clone();
        let host_mac = created.host_mac;
        netlink::with_netlink(Some(&spec.netns.clone()), move |h| async move {
            let pod = netlink::link_by_name(&h, &spec.ifname)
                .await?
                .ok_or_else(|| {
                    NetlinkError::Unexpected(format!("{} missing in the pod", spec.ifname))
                })?;
            netlink::add_address(&h, pod.index, spec.ip, 32).await?;
            netlink::set_up(&h, pod.index).await?;
            netlink::add_permanent_neighbour(&h, pod.index, spec.gateway, host_mac).await?;
            netlink::add_route(
                &h,
                Route {
                    dst: spec.gateway,
                    prefix: 32,
                    gateway: None,
                    oif: pod.index,
                },
            )
            .await?;
            netlink::add_route(
                &h,
                Route {
                    dst: std::net::Ipv4Addr::UNSPECIFIED,
                    prefix: 0,
                    gateway: Some(spec.gateway),
                    oif: pod.index,
                },
            )
            .await
        })
        .map_err(plumbing_error("configuring the pod interface"))?;
        failpoint::hit(FailPoint::AddAfterPodUp);
        Ok(())
    }

    fn delete_host(&self, host_ifname: &str) -> Result<bool, CniError> {
        let name = host_ifname.to_owned();
        netlink::with_netlink(None, move |h| async move {
            netlink::delete_link(&h, &name).await
        })
        .map_err(plumbing_error("deleting the host interface"))
    }

    fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, CniError> {
        let name = host_ifname.to_owned();
        netlink::with_netlink(None, move |h| async move {
            Ok(netlink::link_by_name(&h, &name).await?.map(|l| l.index))
        })
        .map_err(plumbing_error("looking up the host interface"))
    }

    fn root_tbf(&self, host_ifname: &str) -> Result<Option<crate::shaping::Tbf>, CniError> {
        let name = host_ifname.to_owned();
        netlink::with_netlink(None, move |h| async move {
            match netlink::link_by_name(&h, &name).await? {
                Some(link) => netlink::root_tbf(&h, link.index).await,
                None => Ok(None),
            }
        })
        .map_err(plumbing_error("reading a host interface's qdisc"))
    }

    fn pod_interface(&self, netns: &Path, ifname: &str) -> Result<Option<PodIfState>, CniError> {
        if !netns.exists() {
            return Ok(None);
        }
        let name = ifname.to_owned();
        netlink::with_netlink(Some(netns), move |h| async move {
            let Some(link) = netlink::link_by_name(&h, &name).await? else {
                return Ok(None);
            };
            Ok(Some(PodIfState {
                mac: link.mac,
                mtu: link.mtu,
                addresses: netlink::addresses(&h, link.index).await?,
                routes: netlink::routes_via(&h, link.index).await?,
            }))
        })
        .map_err(plumbing_error("inspecting the pod interface"))
    }
}
