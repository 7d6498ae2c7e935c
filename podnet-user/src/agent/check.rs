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

use podnet_common::ServiceEntry;

use super::Agent;
use crate::{
    api::Drift,
    endpoint::shaper_ifname,
    netlink,
    services::{BackendAddress, Frontend, ServicePlan},
};

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
        self.check_services(&mut out)?;
        Ok(out)
    }

    /// The node config's services flag against `--services`, and the
    /// Service maps against the plan in force (bpf) or nothing
    /// (kube-proxy, once the node network is set up).
    fn check_services(&mut self, out: &mut Vec<Drift>) -> anyhow::Result<()> {
        use crate::api::services::ServicesMode;
        if !self.node_network_ready {
            return Ok(());
        }
        let bpf = self.config.services == ServicesMode::Bpf;
        let flags = self.datapath.config()?.flags;
        if (flags & podnet_common::node::NODE_F_SERVICES_BPF != 0) != bpf {
            out.push(drift(
                "node config",
                format!(
                    "services flag {}, want it {} (--services {})",
                    if bpf { "clear" } else { "set" },
                    if bpf { "set" } else { "clear" },
                    self.config.services
                ),
            ));
        }
        let (plan, ids) = if bpf {
            let Some(state) = self
                .cluster_objects
                .as_ref()
                .map(super::cluster_objects::ClusterObjects::services)
            else {
                return Ok(());
            };
            let state = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Before the first sync the pins hold the last agent's.
            let Some(plan) = state.plan.clone() else {
                return Ok(());
            };
            (plan, state.ids.clone())
        } else {
            (std::sync::Arc::default(), BTreeMap::new())
        };
        let (have_frontends, have_slots) = match (
            self.datapath.service_frontends(),
            self.datapath.service_backends(),
        ) {
            (Ok(f), Ok(s)) => (f, s),
            // An eBPF object without Service maps: nothing to compare.
            (Err(crate::datapath::DatapathError::MissingMap { .. }), _)
            | (_, Err(crate::datapath::DatapathError::MissingMap { .. })) => return Ok(()),
            (Err(e), _) | (_, Err(e)) => return Err(e.into()),
        };
        services_drift(&plan, &ids, &have_frontends, &have_slots, out);
        Ok(())
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

/// The Service maps (`have_*`) against `plan` numbered by `ids`: each
/// frontend's (id, backends, affinity) and each slot (`id/slot`).
fn services_drift(
    plan: &ServicePlan,
    ids: &BTreeMap<Frontend, u32>,
    have_frontends: &BTreeMap<Frontend, ServiceEntry>,
    have_slots: &BTreeMap<(u32, u32), BackendAddress>,
    out: &mut Vec<Drift>,
) {
    let mut want_frontends = BTreeMap::new();
    let mut want_slots = BTreeMap::new();
    for (frontend, planned) in &plan.frontends {
        let Some(&id) = ids.get(frontend) else {
            continue;
        };
        want_frontends.insert(
            frontend.to_string(),
            (id, planned.backends.len(), planned.affinity_timeout_s),
        );
        for (slot, backend) in (1u32..).zip(&planned.backends) {
            want_slots.insert(format!("{id}/{slot}"), backend.to_string());
        }
    }
    let have_frontends: BTreeMap<String, (u32, usize, u32)> = have_frontends
        .iter()
        .map(|(f, e)| {
            (
                f.to_string(),
                (
                    e.id,
                    usize::try_from(e.backends).unwrap_or(usize::MAX),
                    e.affinity_timeout_s,
                ),
            )
        })
        .collect();
    let have_slots: BTreeMap<String, String> = have_slots
        .iter()
        .map(|((id, slot), b)| (format!("{id}/{slot}"), b.to_string()))
        .collect();
    compare("service frontend", &want_frontends, &have_frontends, out);
    compare("service slot", &want_slots, &have_slots, out);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::services::{FrontendPlan, ServiceName};

    #[test]
    fn service_maps_are_compared_with_the_plan_in_force() {
        let web = Frontend {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: 6,
        };
        let backend = |last| BackendAddress {
            address: Ipv4Addr::new(10, 244, 0, last),
            port: 8080,
        };
        let plan = ServicePlan {
            frontends: [(
                web,
                FrontendPlan {
                    service: ServiceName {
                        namespace: "x".into(),
                        name: "web".into(),
                    },
                    port_name: String::new(),
                    backends: vec![backend(1), backend(2)],
                    affinity_timeout_s: 0,
                    node_port: false,
                },
            )]
            .into(),
            conflicts: Vec::new(),
        };
        let ids = BTreeMap::from([(web, 3)]);
        let entry = ServiceEntry {
            id: 3,
            backends: 2,
            ..ServiceEntry::default()
        };
        let mut frontends = BTreeMap::from([(web, entry)]);
        let mut slots = BTreeMap::from([((3, 1), backend(1)), ((3, 2), backend(2))]);
        let mut out = Vec::new();
        services_drift(&plan, &ids, &frontends, &slots, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // A slot rewritten behind the agent's back, a stray one, a count off.
        slots.insert((3, 2), backend(9));
        slots.insert((4, 1), backend(1));
        frontends.insert(
            web,
            ServiceEntry {
                backends: 1,
                ..entry
            },
        );
        services_drift(&plan, &ids, &frontends, &slots, &mut out);
        let details: Vec<String> = out
            .iter()
            .map(|d| format!("{}: {}", d.kind, d.detail))
            .collect();
        assert_eq!(
            details,
            [
                "service frontend: 10.96.0.10:80/tcp is (3, 1, 0), want (3, 2, 0)",
                "service slot: 3/2 is \"10.244.0.9:8080\", want \"10.244.0.2:8080\"",
                "service slot: 4/1 (\"10.244.0.1:8080\") should not be there",
            ]
        );
        // Nothing planned (kube-proxy): every entry is drift.
        out.clear();
        services_drift(
            &ServicePlan::default(),
            &BTreeMap::new(),
            &frontends,
            &slots,
            &mut out,
        );
        assert_eq!(out.len(), 4, "{out:?}");
    }
}
