//! Bringing the node back in line after an agent (re)start: the records
//! against the live veths, the datapath's entries, link pins, shapers and
//! IPAM reservations nobody holds.

use std::{collections::HashSet, fs};

use tracing::{info, warn};

use super::{ORPHAN_GRACE, host_ifindex};
use crate::agent::Agent;
use crate::{
    endpoint::{HOST_IFNAME_PREFIX, Owner, SHAPER_IFNAME_PREFIX, host_ifname, shaper_ifname},
    ipam::Holder,
    netlink,
};

impl Agent {
    /// Brings the datapath in line with the records after a (re)start:
    /// endpoints whose host veth is gone are removed (with their address);
    /// live ones get their map entry rewritten and their from_pod filter
    /// pointed at the freshly loaded program (atomically; traffic never
    /// stops); map entries and link pins nobody owns are removed.
    pub fn reconcile(&mut self) -> anyhow::Result<()> {
        let owners: Vec<Owner> = self.endpoints.keys().cloned().collect();
        for owner in owners {
            let ep = self.endpoints[&owner].clone();
            if host_ifindex(&ep.host_ifname) == Some(ep.host_ifindex) {
                // One endpoint that fails must not keep the others (and the
                // node's devices) from their new programs: the old ones go
                // on forwarding for it meanwhile, and it is retried.
                if let Err(e) = self.install(&ep, true) {
                    warn!(error = %format!("{e:#}"), container = %owner.container_id, host = %ep.host_ifname,
                          "re-installing an endpoint failed; retrying");
                    self.unattached.insert(owner);
                }
            } else {
                info!(container = %owner.container_id, ifname = %owner.ifname, host = %ep.host_ifname,
                      "endpoint's veth is gone; removing it and releasing its address");
                self.remove(&owner)?;
                self.release_address(&ep);
            }
        }
        let known: HashSet<_> = self.endpoints.values().map(|e| e.ip).collect();
        for (ip, _) in self.datapath.endpoints()? {
            if !known.contains(&ip) {
                info!(%ip, "removing stale datapath entry");
                self.datapath.remove_endpoint(ip)?;
            }
        }
        // Per-veth entries of veths no endpoint has (an agent killed
        // between the two removals, or an older agent that left the
        // previous veth's entry behind on a repeated ADD): from_pod never
        // meets those ifindexes again, so nothing else would remove them.
        let veths: HashSet<_> = self.endpoints.values().map(|e| e.host_ifindex).collect();
        for ifindex in self.datapath.veth_ifindexes()? {
            if !veths.contains(&ifindex) {
                info!(ifindex, "removing stale per-veth entry");
                self.datapath.remove_veth(ifindex)?;
            }
        }
        let pinned: HashSet<_> = self
            .endpoints
            .values()
            .map(|e| e.host_ifname.clone())
            .collect();
        // Only pod veths' pins: the node devices' links (overlay, underlay)
        // stay attached while the agent restarts, and setup_node_network
        // re-points them.
        for entry in fs::read_dir(self.config.links_dir())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(HOST_IFNAME_PREFIX) && !pinned.contains(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
        self.remove_orphaned_shapers();
        self.release_orphaned_addresses()?;
        info!(endpoints = self.endpoints.len(), "reconciled");
        Ok(())
    }

    /// Removes shaper (ifb) devices no endpoint has: what an agent killed
    /// between creating one and recording its endpoint, or a DEL while the
    /// agent was down, leaves.
    fn remove_orphaned_shapers(&self) {
        let wanted: HashSet<String> = self
            .endpoints
            .values()
            .filter(|ep| ep.bandwidth.and_then(|b| b.egress()).is_some())
            .map(|ep| shaper_ifname(&ep.host_ifname))
            .collect();
        let removed = netlink::with_netlink(None, move |handle| async move {
            let mut removed = Vec::new();
            for name in netlink::links_named(&handle, SHAPER_IFNAME_PREFIX).await? {
                if !wanted.contains(&name) && netlink::delete_link(&handle, &name).await? {
                    removed.push(name);
                }
            }
            Ok(removed)
        });
        match removed {
            Ok(names) => {
                for name in names {
                    info!(%name, "removed a shaper no endpoint has");
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "removing orphaned shapers"),
        }
    }

    /// Releases built-in IPAM reservations (of every network, in the node
    /// store and in old-layout per-network stores) that no endpoint holds
    /// and whose host veth does not exist: what an ADD killed between
    /// allocating and handing over leaves. Only records older than
    /// [`ORPHAN_GRACE`], so an ADD in flight right now keeps its address.
    /// Old-layout directories left empty are removed.
    fn release_orphaned_addresses(&self) -> anyhow::Result<()> {
        let held: HashSet<Holder> = self
            .endpoints
            .values()
            .map(|ep| Holder::new(ep.network.clone(), ep.owner.clone()))
            .collect();
        let (released, removed) = self.addresses().release_orphans(
            &held,
            |owner| host_ifindex(&host_ifname(owner)).is_some(),
            ORPHAN_GRACE,
        )?;
        for r in released {
            info!(ip = %r.ip, container = %r.holder.owner.container_id, network = %r.holder.network,
                  "released an orphaned address");
        }
        for network in removed {
            info!(%network, "removed an empty IPAM store of the old per-network layout");
        }
        Ok(())
    }
}
