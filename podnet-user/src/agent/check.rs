//! The agent's consistency check (`podnetctl check`, `lab check`): what the
//! agent believes (its endpoint records, the nodes it applied from the
//! datastore) against what the kernel holds (the pinned maps, the host
//! routes, the veths and their filters). Anything that differs is drift:
//! a bug, or something changed behind the agent's back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::Agent;
use crate::{api::Drift, endpoint::shaper_ifname, netlink};

/// An endpoint map entry as the check compares it: host ifindex, flags,
/// pod MAC, host MAC.
type Entry = (u32, u32, [u8; 6], [u8; 6]);

fn drift(kind: &str, detail: String) -> Drift {
    Drift {
        kind: kind.to_owned(),
        detail,
    }
}

/// Differences between `want` and `have` (keyed maps), as drift of `kind`.
fn compare<K: Ord + std::fmt::Display, V: PartialEq + std::fmt::Debug>(
    kind: &str,
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    out: &mut Vec<Drift>,
) {
    for (key, value) in want {
        match have.get(key) {
            None => out.push(drift(kind, format!("{key} missing (want {value:?})"))),
            Some(got) if got != value => {
                out.push(drift(kind, format!("{key} is {got:?}, want {value:?}")));
            }
            Some(_) => {}
        }
    }
    for (key, value) in have {
        if !want.contains_key(key) {
            out.push(drift(
                kind,
                format!("{key} ({value:?}) should not be there"),
            ));
        }
    }
}

impl Agent {
    /// Everything that differs between the agent's state and the kernel's.
    pub fn check(&mut self) -> anyhow::Result<Vec<Drift>> {
        let mut out = Vec::new();
        if let Some(net) = self.cluster.network.clone() {
            self.check_remotes(&net, &mut out)?;
        }
        self.check_endpoints(&mut out)?;
        Ok(out)
    }

    fn check_remotes(
        &mut self,
        net: &super::cluster::NodeNetwork,
        out: &mut Vec<Drift>,
    ) -> anyhow::Result<()> {
        let mut want: BTreeMap<Ipv4Net, Ipv4Addr> = self
            .cluster
            .remotes
            .iter()
            .map(|(cidr, node)| (*cidr, node.node_ip))
            .collect();
        want.extend(
            self.cluster
                .node_addresses
                .iter()
                .map(|ip| (Ipv4Net::from(*ip), *ip)),
        );
        let have: BTreeMap<Ipv4Net, Ipv4Addr> = self
            .datapath_mut()
            .remotes()?
            .into_iter()
            .map(|e| (e.cidr, e.node_ip))
            .collect();
        compare("remote map", &want, &have, out);

        // Host routes to the remote pod CIDRs (failed ones are already
        // reported as pending, not as drift).
        let oif = match net.mode {
            super::cluster::Mode::Vxlan => self.cluster.tunnel_ifindex,
            super::cluster::Mode::Direct => net.underlay_ifindex,
            super::cluster::Mode::Local => return Ok(()),
        };
        let routed: BTreeSet<Ipv4Net> =
            netlink::with_netlink(
                None,
                move |h| async move { netlink::routes_via(&h, oif).await },
            )?
            .into_iter()
            .filter_map(|r| Ipv4Net::new(r.dst, r.prefix).ok())
            .collect();
        for cidr in self.cluster.remotes.keys() {
            if !routed.contains(cidr) && !self.cluster.route_failures.contains_key(cidr) {
                out.push(drift("host route", format!("{cidr} missing")));
            }
        }
        Ok(())
    }

    fn check_endpoints(&mut self, out: &mut Vec<Drift>) -> anyhow::Result<()> {
        let records: Vec<crate::api::Endpoint> = self.endpoints.values().cloned().collect();
        let want: BTreeMap<Ipv4Addr, Entry> = records
            .iter()
            .map(|e| {
                let flags = if e.bandwidth.and_then(|b| b.ingress()).is_some() {
                    podnet_common::endpoint::ENDPOINT_F_SHAPED_INGRESS
                } else {
                    podnet_common::endpoint::ENDPOINT_F_NONE
                };
                (e.ip, (e.host_ifindex, flags, e.pod_mac, e.host_mac))
            })
            .collect();
        let have: BTreeMap<Ipv4Addr, Entry> = self
            .datapath_mut()
            .endpoints()?
            .into_iter()
            .map(|(ip, info)| {
                (
                    ip,
                    (info.host_ifindex, info.flags, info.pod_mac, info.host_mac),
                )
            })
            .collect();
        compare("endpoint map", &want, &have, out);
        check_shaping(&records, out)?;
        let filtered = super::endpoints::veths_with_pod_filters(
            records.iter().map(|e| e.host_ifindex).collect(),
        )?;
        for ep in &records {
            if nix::net::if_::if_nametoindex(ep.host_ifname.as_str()).ok() != Some(ep.host_ifindex)
            {
                out.push(drift(
                    "veth",
                    format!("{} of {} is gone", ep.host_ifname, ep.ip),
                ));
            } else if !filtered.contains(&ep.host_ifindex) {
                out.push(drift(
                    "filters",
                    format!("{} of {} lacks from_pod or to_pod", ep.host_ifname, ep.ip),
                ));
            }
        }
        Ok(())
    }
}

/// Each limit of an endpoint is a tbf in the kernel with its parameters:
/// at the root of the host veth (ingress) and of the endpoint's ifb
/// (egress).
fn check_shaping(records: &[crate::api::Endpoint], out: &mut Vec<Drift>) -> anyhow::Result<()> {
    let wanted: Vec<(String, String, crate::shaping::Tbf)> = records
        .iter()
        .flat_map(|ep| {
            ep.bandwidth
                .unwrap_or_default()
                .placements(&ep.host_ifname, &shaper_ifname(&ep.host_ifname))
                .into_iter()
                .map(|(direction, device, tbf)| (format!("{direction} of {}", ep.ip), device, tbf))
        })
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let found = netlink::with_netlink(None, move |h| async move {
        let mut found = Vec::new();
        for (what, device, tbf) in wanted {
            let have = match netlink::link_by_name(&h, &device).await? {
                Some(link) => netlink::root_tbf(&h, link.index).await?,
                None => None,
            };
            found.push((what, device, tbf, have));
        }
        Ok(found)
    })?;
    for (what, device, tbf, have) in found {
        if have != Some(tbf) {
            out.push(drift(
                "bandwidth",
                format!("{what}: {device} should have {tbf:?} at its root, has {have:?}"),
            ));
        }
    }
    Ok(())
}
