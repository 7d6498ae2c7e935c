//! The node's endpoints: records on disk (the agent's memory across
//! restarts), entries in the datapath, pinned from_pod links on host veths.

use std::{
    collections::BTreeMap,
    fs, io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::agent::Agent;
use crate::{
    api::{Endpoint, EndpointStatus, IpamStatus},
    datapath::PodProgram,
    datastore::objects::EndpointKey,
    failpoint::{self, FailPoint, Fault},
    ipam::{Holder, Owner, PodAddresses},
};

mod kernel;
mod reconcile;
pub mod record;

pub use kernel::attach_mode;
pub(in crate::agent) use kernel::veths_with_pod_filters;
use kernel::{apply_shaping, remove_shaper};

/// How old an unowned IPAM record must be before the agent releases it.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_mins(2);

pub(super) fn host_ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl Agent {
    pub(super) fn load_records(&mut self) -> anyhow::Result<()> {
        let dir = self.config.endpoints_dir();
        let loaded = record::load(&dir)
            .with_context(|| format!("reading the records in {}", dir.display()))?;
        self.endpoints = loaded.endpoints;
        self.unreadable_records = loaded.set_aside;
        Ok(())
    }

    fn link_pin(&self, host_ifname: &str) -> PathBuf {
        self.config.links_dir().join(host_ifname)
    }

    /// Writes the map entry, then attaches (or re-points) from_pod and
    /// to_pod. The entry first: a restarted agent whose maps were migrated
    /// to a new layout (`crate::pinned_maps`) starts with fresh maps, and a
    /// veth whose new from_pod ran before its entry existed would drop the
    /// pod's traffic as an unknown sender's.
    pub(super) fn install(&mut self, ep: &Endpoint, restarting: bool) -> anyhow::Result<()> {
        // Shapers before entries: an entry that sends a pod's packets to a
        // shaper must never name one that is not there yet.
        let (flags, egress_shaper) = apply_shaping(ep)?;
        self.datapath.upsert_shaped_endpoint(
            ep.ip,
            podnet_common::EndpointInfo {
                host_ifindex: ep.host_ifindex,
                flags,
                pod_mac: ep.pod_mac,
                host_mac: ep.host_mac,
            },
            egress_shaper,
        )?;
        if !restarting {
            // A new pod that a policy selects starts isolated: its rules
            // follow within the policy sync's next round (see
            // `agent::policy`), and until then it denies rather than
            // allows. A restart keeps the bits the entry has.
            let flags = self.initial_policy_flags(ep);
            if flags != 0 {
                self.datapath.set_policy_flags(ep.ip, flags)?;
            }
            failpoint::hit(FailPoint::AgentAddAfterEntry);
            anyhow::ensure!(
                !failpoint::faulty(Fault::EndpointInstall),
                "test fault {}: installing the endpoint fails",
                Fault::EndpointInstall.name()
            );
        }
        // A pinned TCX link is how podnet attached before it used cls_bpf
        // for pod veths: re-point it, so an upgrade never leaves the veth
        // without a program (the pin goes with the endpoint).
        let legacy_pin = self.link_pin(&ep.host_ifname);
        let reattached = restarting
            && legacy_pin.exists()
            && self.datapath.reattach_from_pod(&legacy_pin).is_ok();
        if reattached {
            // The TCX link carries from_pod; to_pod is a filter either way.
            self.datapath
                .attach_pod_program(PodProgram::ToPod, &ep.host_ifname, restarting)
                .with_context(|| format!("attaching to_pod to {}", ep.host_ifname))?;
        } else {
            self.datapath
                .attach_pod(&ep.host_ifname, restarting)
                .with_context(|| format!("attaching podnet's filters to {}", ep.host_ifname))?;
        }
        if !restarting {
            failpoint::hit(FailPoint::AgentAddAfterAttach);
        }
        Ok(())
    }

    /// The policy bits a new endpoint starts with (see
    /// [`crate::policy::selection_flags`]): none without a pod name or a
    /// view of the cluster.
    fn initial_policy_flags(&self, ep: &Endpoint) -> u32 {
        let (Some(pod), Some(objects)) = (&ep.pod, &self.cluster_objects) else {
            return 0;
        };
        let view = objects.view();
        let view = view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::policy::selection_flags(view.model(), &pod.namespace, &pod.name)
    }

    /// The built-in IPAM's addresses of this node (see
    /// [`crate::ipam::PodAddresses`]).
    fn addresses(&self) -> PodAddresses {
        PodAddresses::new(self.config.ipam_dir())
    }

    fn release_address(&self, ep: &Endpoint) {
        let holder = Holder::new(ep.network.clone(), ep.owner.clone());
        let released = self.addresses().release(&holder);
        if let Err(e) = released {
            warn!(error = %e, ip = %ep.ip, "could not release the address of a removed endpoint");
        }
    }

    /// Registers an endpoint the plugin created: record, link, map entry.
    /// A request that fails [`Endpoint::validate`] changes nothing.
    pub fn add(&mut self, ep: Endpoint) -> anyhow::Result<()> {
        ep.validate(self.config.pod_cidr)?;
        if let Some(pod) = &ep.pod {
            // The key its record is published under: the store's rules
            // are a little tighter than the API server's (a name of 251 to
            // 253 bytes), and a pod that cannot be published is refused
            // rather than left out of every node's view.
            EndpointKey::new(&self.config.node_name, &pod.namespace, &pod.name).map_err(|e| {
                anyhow::anyhow!(
                    "invalid endpoint: pod {}/{} cannot be published: {e}",
                    pod.namespace,
                    pod.name
                )
            })?;
        }
        let live = host_ifindex(&ep.host_ifname);
        anyhow::ensure!(
            live == Some(ep.host_ifindex),
            "host interface {} (ifindex {}) does not exist on this node (found {live:?})",
            ep.host_ifname,
            ep.host_ifindex
        );
        // Another owner holding this IP: a leftover (its veth is gone, its
        // DEL did not reach us) loses it; a live endpoint keeps it and the
        // request is refused, changing nothing. Two IPAMs handing out the
        // same range (a delegated host-local, a runtime's static IP) must
        // not take a running pod's address.
        let clash: Vec<Endpoint> = self
            .endpoints
            .values()
            .filter(|e| e.ip == ep.ip && e.owner != ep.owner)
            .cloned()
            .collect();
        if let Some(live) = clash
            .iter()
            .find(|old| host_ifindex(&old.host_ifname) == Some(old.host_ifindex))
        {
            anyhow::bail!(
                "address {} is in use by container {} ({} of network {}, host veth {}): \
                 refused; is another IPAM handing out the same range?",
                ep.ip,
                live.owner.container_id,
                live.owner.ifname,
                live.network,
                live.host_ifname
            );
        }
        for old in clash {
            warn!(ip = %ep.ip, old_container = %old.owner.container_id, old_ifname = %old.owner.ifname,
                  old_network = %old.network, container = %ep.owner.container_id,
                  network = %ep.network, "address handed to a new endpoint: removing the older endpoint that had it");
            self.remove(&old.owner)?;
        }
        // The same attachment again on another veth: the runtime retrying
        // an ADD that failed or was killed after we had it. The plugin made
        // a new veth, so the old one's datapath state goes first; writing
        // the new entries over it would leave the old veth's entry behind.
        if let Some(old) = self.endpoints.get(&ep.owner).cloned()
            && (old.host_ifindex != ep.host_ifindex || old.ip != ep.ip)
        {
            info!(container = %ep.owner.container_id, ifname = %ep.owner.ifname,
                  old_host_ifindex = old.host_ifindex, host_ifindex = ep.host_ifindex,
                  "endpoint added again on a new veth: removing the previous one");
            self.remove(&old.owner)?;
        }
        record::write(&self.config.endpoints_dir(), &ep)?;
        failpoint::hit(FailPoint::AgentAddAfterRecord);
        if let Err(e) = self.install(&ep, false) {
            // All or nothing: what the failed install wrote goes, and the
            // record with it (the plugin rolls back its half and the
            // runtime retries the ADD).
            self.undo_install(&ep);
            record::remove(&self.config.endpoints_dir(), &ep.owner);
            return Err(e);
        }
        info!(container = %ep.owner.container_id, ifname = %ep.owner.ifname, ip = %ep.ip,
              host = %ep.host_ifname, "endpoint added");
        self.endpoints.insert(ep.owner.clone(), ep);
        self.generation.fetch_add(1, Ordering::Release);
        self.endpoints_changed();
        Ok(())
    }

    /// Removes what [`Self::install`] may have written for `ep`, which is
    /// not (or no longer) a registered endpoint: its map entries where they
    /// are still its own, and its shaper. Its filters stay on its veth,
    /// which the plugin deletes; until then they drop its traffic as an
    /// unknown sender's.
    fn undo_install(&mut self, ep: &Endpoint) {
        let entry_is_ours = self
            .datapath
            .endpoint(ep.ip)
            .is_ok_and(|info| info.is_some_and(|i| i.host_ifindex == ep.host_ifindex));
        if entry_is_ours && let Err(e) = self.datapath.remove_endpoint(ep.ip) {
            warn!(error = %e, ip = %ep.ip, "removing the entry of an endpoint that failed to install");
        }
        if !self
            .endpoints
            .values()
            .any(|e| e.host_ifindex == ep.host_ifindex)
            && let Err(e) = self.datapath.remove_veth(ep.host_ifindex)
        {
            warn!(error = %e, host = %ep.host_ifname, "removing the veth entry of an endpoint that failed to install");
        }
        remove_shaper(ep);
    }

    /// A counter that changes whenever an endpoint is added or removed.
    pub(super) fn endpoints_generation(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.generation)
    }

    /// Removes an endpoint; `Ok(None)` when there was none.
    pub fn remove(&mut self, owner: &Owner) -> anyhow::Result<Option<Endpoint>> {
        let Some(ep) = self.endpoints.remove(owner) else {
            return Ok(None);
        };
        self.generation.fetch_add(1, Ordering::Release);
        self.endpoints_changed();
        // Only the entry that is still this endpoint's (the IP may have been
        // handed to a newer endpoint since).
        if self
            .datapath
            .endpoint(ep.ip)?
            .is_some_and(|info| info.host_ifindex == ep.host_ifindex)
        {
            self.datapath.remove_endpoint(ep.ip)?;
        }
        // The per-veth entry is this endpoint's also when the IP's entry is
        // not (any more): unless another endpoint is on the same veth, it
        // goes too.
        if !self
            .endpoints
            .values()
            .any(|e| e.host_ifindex == ep.host_ifindex)
        {
            self.datapath.remove_veth(ep.host_ifindex)?;
        }
        failpoint::hit(FailPoint::AgentDelAfterEntry);
        match fs::remove_file(self.link_pin(&ep.host_ifname)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => warn!(error = %e, "removing link pin"),
            _ => {}
        }
        remove_shaper(&ep);
        record::remove(&self.config.endpoints_dir(), owner);
        failpoint::hit(FailPoint::AgentDelAfterRecord);
        info!(container = %owner.container_id, ifname = %owner.ifname, ip = %ep.ip, "endpoint removed");
        Ok(Some(ep))
    }

    #[must_use]
    pub fn get(&self, owner: &Owner) -> Option<&Endpoint> {
        self.endpoints.get(owner)
    }

    /// Removes every endpoint of `network` whose owner is not in `valid`;
    /// returns the removed owners. A GC speaks for one network only: a
    /// request that names none (an older plugin's) is refused rather than
    /// taken for every network's, which would remove the pods of every
    /// other network on the node.
    pub fn gc(&mut self, network: Option<&str>, valid: &[Owner]) -> anyhow::Result<Vec<Owner>> {
        let Some(network) = network else {
            anyhow::bail!(
                "GC without a network name (a plugin older than the agent) is refused: \
                 it would remove every network's endpoints; update the plugin \
                 (`podnetd install-cni`)"
            );
        };
        let valid: std::collections::HashSet<&Owner> = valid.iter().collect();
        let stale: Vec<Owner> = self
            .endpoints
            .values()
            .filter(|ep| ep.network == network && !valid.contains(&ep.owner))
            .map(|ep| ep.owner.clone())
            .collect();
        for owner in &stale {
            self.remove(owner)?;
        }
        Ok(stale)
    }

    pub fn list(&mut self) -> anyhow::Result<Vec<EndpointStatus>> {
        let eps: Vec<Endpoint> = self.endpoints.values().cloned().collect();
        let with_filter = veths_with_pod_filters(eps.iter().map(|ep| ep.host_ifindex).collect())?;
        eps.into_iter()
            .map(|ep| {
                let in_datapath = self
                    .datapath
                    .endpoint(ep.ip)?
                    .is_some_and(|i| i.host_ifindex == ep.host_ifindex);
                let stats = self
                    .datapath
                    .endpoint_stats(ep.host_ifindex)?
                    .unwrap_or_default();
                Ok(EndpointStatus {
                    attached: with_filter.contains(&ep.host_ifindex)
                        || self.link_pin(&ep.host_ifname).exists(),
                    in_datapath,
                    tx_packets: stats.packets,
                    tx_bytes: stats.bytes,
                    endpoint: ep,
                })
            })
            .collect()
    }

    /// The node store's reservations by network (the store a network's
    /// `ipam.dataDir` moved the node to, if one did).
    pub fn ipam(&self) -> anyhow::Result<IpamStatus> {
        let view = self.addresses().node_view(self.config.pod_cidr)?;
        let mut networks: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for r in view.reservations {
            networks
                .entry(r.holder.network.clone())
                .or_default()
                .push(r);
        }
        Ok(IpamStatus {
            pod_cidr: self.config.pod_cidr,
            capacity: view.capacity,
            store: Some(view.store),
            networks,
        })
    }
}
