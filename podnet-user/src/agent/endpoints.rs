//! The node's endpoints: records on disk (the agent's memory across
//! restarts), entries in the datapath, pinned from_pod links on host veths.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use tracing::{info, warn};

use super::AgentConfig;
use crate::{
    api::{AgentStatus, CounterTotals, Endpoint, EndpointStatus, IpamStatus, NodeInfo},
    datapath::{Datapath, PodProgram},
    failpoint::{self, FailPoint},
    ipam::{FileStore, Holder, Owner, PodRange},
    shaping,
};

/// How old an unowned IPAM record must be before the agent releases it.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_mins(2);

/// The agent's state; one lock around it (operations are short).
pub struct EndpointRegistry {
    config: AgentConfig,
    datapath: Datapath,
    pub(super) endpoints: BTreeMap<Owner, Endpoint>,
    /// Endpoints whose filters failed to attach at start: retried.
    unattached: BTreeSet<Owner>,
    /// Whether the node's devices are set up (overlay/underlay programs
    /// attached, node config written).
    node_network_ready: bool,
    pub(super) cluster: super::cluster::ClusterState,
}

fn record_name(owner: &Owner) -> String {
    // Container IDs and ifnames are validated by the plugin: no '/', no ':'.
    format!("{}:{}.json", owner.container_id, owner.ifname)
}

fn host_ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl EndpointRegistry {
    /// Loads the endpoint records and reconciles them with the live
    /// interfaces, the datapath and the attached programs (see [`Self::reconcile`]).
    pub fn open(config: AgentConfig, datapath: Datapath) -> anyhow::Result<Self> {
        for dir in [
            config.endpoints_dir(),
            config.links_dir(),
            config.ipam_dir(),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut registry = Self {
            config,
            datapath,
            endpoints: BTreeMap::new(),
            unattached: BTreeSet::new(),
            node_network_ready: false,
            cluster: super::cluster::ClusterState::default(),
        };
        registry.load_records()?;
        registry.reconcile()?;
        Ok(registry)
    }

    fn load_records(&mut self) -> anyhow::Result<()> {
        let dir = self.config.endpoints_dir();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path).map(|b| serde_json::from_slice::<Endpoint>(&b)) {
                Ok(Ok(ep)) => {
                    self.endpoints.insert(ep.owner.clone(), ep);
                }
                Ok(Err(e)) => {
                    warn!(path = %path.display(), error = %e, "removing unreadable endpoint record");
                    let _ = fs::remove_file(&path);
                }
                Err(e) => warn!(path = %path.display(), error = %e, "cannot read endpoint record"),
            }
        }
        Ok(())
    }

    fn write_record(&self, ep: &Endpoint) -> anyhow::Result<()> {
        let path = self.config.endpoints_dir().join(record_name(&ep.owner));
        let temp = path.with_extension("tmp");
        fs::write(&temp, serde_json::to_vec_pretty(ep)?)
            .with_context(|| format!("writing {}", temp.display()))?;
        fs::rename(&temp, &path).with_context(|| format!("publishing {}", path.display()))?;
        Ok(())
    }

    fn link_pin(&self, host_ifname: &str) -> PathBuf {
        self.config.links_dir().join(host_ifname)
    }

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
        let known: std::collections::HashSet<_> = self.endpoints.values().map(|e| e.ip).collect();
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
        let veths: std::collections::HashSet<_> =
            self.endpoints.values().map(|e| e.host_ifindex).collect();
        for ifindex in self.datapath.veth_ifindexes()? {
            if !veths.contains(&ifindex) {
                info!(ifindex, "removing stale per-veth entry");
                self.datapath.remove_veth(ifindex)?;
            }
        }
        let pinned: std::collections::HashSet<_> = self
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
            if name.starts_with(crate::cni::plugin::HOST_IFNAME_PREFIX) && !pinned.contains(&name) {
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
        let wanted: std::collections::HashSet<String> = self
            .endpoints
            .values()
            .filter(|ep| ep.bandwidth.and_then(|b| b.egress()).is_some())
            .map(|ep| shaping::shaper_ifname(&ep.host_ifname))
            .collect();
        let removed = crate::netlink::with_netlink(None, move |handle| async move {
            let mut removed = Vec::new();
            for name in crate::netlink::links_named(&handle, shaping::SHAPER_IFNAME_PREFIX).await? {
                if !wanted.contains(&name) && crate::netlink::delete_link(&handle, &name).await? {
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
        let held: std::collections::HashSet<Holder> = self
            .endpoints
            .values()
            .map(|ep| Holder::new(ep.network.clone(), ep.owner.clone()))
            .collect();
        let store = FileStore::open(&self.config.ipam_dir())?;
        let released = crate::ipam::release_unless(&store, |r| {
            held.contains(&r.holder)
                || host_ifindex(&crate::cni::plugin::host_ifname(&r.holder.owner)).is_some()
                || store.record_age(r).is_none_or(|age| age < ORPHAN_GRACE)
        })?;
        for r in released {
            info!(ip = %r.ip, container = %r.holder.owner.container_id, network = %r.holder.network,
                  "released an orphaned address");
        }
        for network in store.remove_empty_old_layout_dirs()? {
            info!(%network, "removed an empty IPAM store of the old per-network layout");
        }
        Ok(())
    }

    /// Writes the map entry, then attaches (or re-points) from_pod and
    /// to_pod. The entry first: a restarted agent whose maps were migrated
    /// to a new layout (`crate::pinned_maps`) starts with fresh maps, and a
    /// veth whose new from_pod ran before its entry existed would drop the
    /// pod's traffic as an unknown sender's.
    fn install(&mut self, ep: &Endpoint, restarting: bool) -> anyhow::Result<()> {
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
            failpoint::hit(FailPoint::AgentAddAfterEntry);
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

    /// Retries what is not in place yet: the node's network and endpoints
    /// whose filters failed to attach at start. Once everything is, the old
    /// build's programs are gone and a migration of pinned maps is
    /// finished. Returns whether everything is in place.
    pub fn retry_pending(&mut self, net: &super::cluster::NodeNetwork) -> bool {
        self.cluster.network = Some(net.clone());
        if !self.node_network_ready {
            match self.setup_node_network(net) {
                Ok(()) => self.node_network_ready = true,
                Err(e) => warn!(error = %format!("{e:#}"),
                                "setting up the node's network failed; what runs is left as it is, retrying"),
            }
        }
        for owner in self.unattached.clone() {
            let Some(ep) = self.endpoints.get(&owner).cloned() else {
                self.unattached.remove(&owner);
                continue;
            };
            match self.install(&ep, true) {
                Ok(()) => {
                    info!(container = %owner.container_id, host = %ep.host_ifname, "endpoint re-installed");
                    self.unattached.remove(&owner);
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), host = %ep.host_ifname, "re-installing an endpoint");
                }
            }
        }
        let routes_done = self.retry_failed_routes(net);
        let done = self.node_network_ready && self.unattached.is_empty() && routes_done;
        if done && let Err(e) = self.datapath.finish_migration() {
            warn!(error = %format!("{e:#}"), "finishing the migration of pinned maps");
        }
        done
    }

    /// What [`Self::retry_pending`] still has to do, for `podnetctl status`.
    #[must_use]
    pub fn pending(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self.node_network_ready {
            pending.push("node network (overlay/underlay programs, node config)".to_owned());
        }
        pending.extend(self.unattached.iter().map(|o| {
            format!(
                "endpoint {}:{} (filters not attached)",
                o.container_id, o.ifname
            )
        }));
        pending.extend(self.failed_routes());
        pending
    }

    fn release_address(&self, ep: &Endpoint) {
        let holder = Holder::new(ep.network.clone(), ep.owner.clone());
        let released = FileStore::open(&self.config.ipam_dir())
            .and_then(|store| crate::ipam::release_holder(&store, &holder));
        if let Err(e) = released {
            warn!(error = %e, ip = %ep.ip, "could not release the address of a removed endpoint");
        }
    }

    /// Registers an endpoint the plugin created: record, link, map entry.
    /// A request that fails [`validate_endpoint`] changes nothing.
    pub fn add(&mut self, ep: Endpoint) -> anyhow::Result<()> {
        validate_endpoint(&ep, self.config.pod_cidr)?;
        let live = host_ifindex(&ep.host_ifname);
        anyhow::ensure!(
            live == Some(ep.host_ifindex),
            "host interface {} (ifindex {}) does not exist on this node (found {live:?})",
            ep.host_ifname,
            ep.host_ifindex
        );
        // Another owner holding this IP (a leftover: its address was
        // released, its DEL did not reach us) loses it. Said out loud: if it
        // is not a leftover, two IPAMs hand out the same range.
        let clash: Vec<Endpoint> = self
            .endpoints
            .values()
            .filter(|e| e.ip == ep.ip && e.owner != ep.owner)
            .cloned()
            .collect();
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
        self.write_record(&ep)?;
        failpoint::hit(FailPoint::AgentAddAfterRecord);
        if let Err(e) = self.install(&ep, false) {
            remove_shaper(&ep);
            return Err(e);
        }
        info!(container = %ep.owner.container_id, ifname = %ep.owner.ifname, ip = %ep.ip,
              host = %ep.host_ifname, "endpoint added");
        self.endpoints.insert(ep.owner.clone(), ep);
        Ok(())
    }

    /// Removes an endpoint; `Ok(None)` when there was none.
    pub fn remove(&mut self, owner: &Owner) -> anyhow::Result<Option<Endpoint>> {
        let Some(ep) = self.endpoints.remove(owner) else {
            return Ok(None);
        };
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
        let _ = fs::remove_file(self.config.endpoints_dir().join(record_name(owner)));
        failpoint::hit(FailPoint::AgentDelAfterRecord);
        info!(container = %owner.container_id, ifname = %owner.ifname, ip = %ep.ip, "endpoint removed");
        Ok(Some(ep))
    }

    #[must_use]
    pub fn get(&self, owner: &Owner) -> Option<&Endpoint> {
        self.endpoints.get(owner)
    }

    /// Removes every endpoint of `network` (every network's with `None`)
    /// whose owner is not in `valid`; returns the removed owners.
    pub fn gc(&mut self, network: Option<&str>, valid: &[Owner]) -> anyhow::Result<Vec<Owner>> {
        let valid: std::collections::HashSet<&Owner> = valid.iter().collect();
        let stale: Vec<Owner> = self
            .endpoints
            .values()
            .filter(|ep| network.is_none_or(|n| ep.network == n) && !valid.contains(&ep.owner))
            .map(|ep| ep.owner.clone())
            .collect();
        for owner in &stale {
            self.remove(owner)?;
        }
        Ok(stale)
    }

    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_name: self.config.node_name.clone(),
            pod_cidr: self.config.pod_cidr,
            cluster_cidr: self.config.cluster_cidr,
            gateway: PodRange::new(self.config.pod_cidr)
                .map_or(self.config.pod_cidr.network(), |r| r.gateway()),
            mtu: self.config.mtu,
            ipam_dir: self.config.ipam_dir(),
        }
    }

    pub fn status(&self) -> anyhow::Result<AgentStatus> {
        Ok(AgentStatus {
            node: self.node_info(),
            endpoints: self.endpoints.len(),
            attach_mode: attach_mode().to_owned(),
            bpffs_dir: self.config.bpffs_dir.clone(),
            programs: self
                .datapath
                .programs()?
                .into_iter()
                .map(|p| p.name.to_owned())
                .collect(),
            pending: self.pending(),
        })
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

    pub fn counters(&self) -> anyhow::Result<CounterTotals> {
        Ok(self.datapath.counters()?.into())
    }

    /// The node store's reservations by network (the store a network's
    /// `ipam.dataDir` moved the node to, if one did).
    pub fn ipam(&self) -> anyhow::Result<IpamStatus> {
        let range = PodRange::new(self.config.pod_cidr)?;
        let store = FileStore::open(&self.config.ipam_dir())?.serving_store()?;
        let mut networks: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for r in crate::ipam::Allocator::new(range, store.clone()).reservations()? {
            networks
                .entry(r.holder.network.clone())
                .or_default()
                .push(r);
        }
        Ok(IpamStatus {
            pod_cidr: self.config.pod_cidr,
            capacity: range.capacity(),
            store: Some(store.dir().to_path_buf()),
            networks,
        })
    }

    pub(crate) fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    #[must_use]
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    #[must_use]
    pub fn bpffs_dir(&self) -> &Path {
        &self.config.bpffs_dir
    }
}

/// Checks an endpoint request before anything is touched: the socket is
/// root's, but whatever sends on it (a buggy or compromised plugin, a
/// runtime passing a pod's strings through) must not be able to route
/// another node's or the gateway's address into a pod, write a record
/// outside the state directory (the owner names the record file) or set a
/// multicast MAC as a pod's identity.
pub fn validate_endpoint(ep: &Endpoint, pod_cidr: ipnet::Ipv4Net) -> anyhow::Result<()> {
    use crate::cni::validate;
    let refuse = |e: crate::cni::error::CniError| anyhow::anyhow!("invalid endpoint: {}", e.msg);
    validate::container_id(&ep.owner.container_id).map_err(refuse)?;
    validate::ifname(&ep.owner.ifname).map_err(refuse)?;
    validate::network_name(&ep.network).map_err(refuse)?;
    let range = PodRange::new(pod_cidr)?;
    anyhow::ensure!(
        range.contains(ep.ip),
        "invalid endpoint: {} is not a pod address of this node's pod CIDR {pod_cidr}",
        ep.ip
    );
    for (what, mac) in [("pod", ep.pod_mac), ("host veth", ep.host_mac)] {
        // Bit 0 of the first octet: group (multicast/broadcast) address.
        anyhow::ensure!(
            mac[0] & 1 == 0 && mac != [0; 6],
            "invalid endpoint: {what} MAC {} is not a unicast address",
            crate::cni::result::format_mac(&mac)
        );
    }
    let expected = crate::cni::plugin::host_ifname(&ep.owner);
    anyhow::ensure!(
        ep.host_ifname == expected,
        "invalid endpoint: host interface {:?} is not this owner's ({expected})",
        ep.host_ifname
    );
    if let Some(bandwidth) = ep.bandwidth {
        bandwidth
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid endpoint: bandwidth: {e}"))?;
    }
    Ok(())
}

/// Puts the endpoint's bandwidth limits in place (see [`crate::shaping`]):
/// a tbf on the host veth for an ingress limit, an ifb with a tbf for an
/// egress limit. Idempotent (a restart re-applies it). Returns the
/// endpoint flags and the shaper's ifindex (0: none) for the datapath.
fn apply_shaping(ep: &Endpoint) -> anyhow::Result<(u32, u32)> {
    use podnet_common::endpoint::{ENDPOINT_F_NONE, ENDPOINT_F_SHAPED_INGRESS};
    let Some(bandwidth) = ep.bandwidth.filter(|b| !b.is_zero()) else {
        return Ok((ENDPOINT_F_NONE, 0));
    };
    if bandwidth.egress().is_some() {
        // A shaped pod's sends leave its shaper into the host stack, which
        // routes them (also to pods of this node): the node must forward,
        // in every mode.
        super::cluster::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    let host_ifindex = ep.host_ifindex;
    let shaper = shaping::shaper_ifname(&ep.host_ifname);
    let (flags, shaper_ifindex) = crate::netlink::with_netlink(None, move |handle| async move {
        let mut flags = ENDPOINT_F_NONE;
        if let Some(tbf) = bandwidth.ingress() {
            crate::netlink::replace_root_tbf(&handle, host_ifindex, &tbf).await?;
            flags |= ENDPOINT_F_SHAPED_INGRESS;
        }
        let mut shaper_ifindex = 0;
        if let Some(tbf) = bandwidth.egress() {
            let mtu = crate::netlink::link_by_index(&handle, host_ifindex)
                .await?
                .map_or(1500, |link| link.mtu);
            shaper_ifindex = crate::netlink::ensure_ifb(&handle, &shaper, mtu).await?;
            crate::netlink::replace_root_tbf(&handle, shaper_ifindex, &tbf).await?;
        }
        Ok((flags, shaper_ifindex))
    })
    .with_context(|| {
        format!(
            "putting the bandwidth limits ({bandwidth}) in place on {}",
            ep.host_ifname
        )
    })?;
    Ok((flags, shaper_ifindex))
}

/// Deletes the endpoint's shaper (ifb), if it has one; the tbf on its host
/// veth goes with the veth.
fn remove_shaper(ep: &Endpoint) {
    if ep.bandwidth.and_then(|b| b.egress()).is_none() {
        return;
    }
    let name = shaping::shaper_ifname(&ep.host_ifname);
    let deleted = crate::netlink::with_netlink(None, {
        let name = name.clone();
        move |handle| async move { crate::netlink::delete_link(&handle, &name).await }
    });
    if let Err(e) = deleted {
        warn!(error = %format!("{e:#}"), %name, "removing an endpoint's shaper; the next start removes it");
    }
}

/// Which of `ifindexes` (in the agent's netns) carry both of podnet's
/// filters (from_pod on ingress, to_pod on egress): what the kernel says,
/// not what the agent believes it did.
pub(super) fn veths_with_pod_filters(
    ifindexes: Vec<u32>,
) -> anyhow::Result<std::collections::HashSet<u32>> {
    use crate::{datapath::POD_TC_PRIORITY, netlink::has_bpf_filter};
    let attached = crate::netlink::with_netlink(None, move |handle| async move {
        let mut attached = std::collections::HashSet::new();
        for index in ifindexes {
            if has_bpf_filter(&handle, index, POD_TC_PRIORITY, false).await?
                && has_bpf_filter(&handle, index, POD_TC_PRIORITY, true).await?
            {
                attached.insert(index);
            }
        }
        Ok(attached)
    })?;
    Ok(attached)
}

/// How the programs are attached, for status output: pod veths always by a
/// `cls_bpf` filter (see `Datapath::attach_pod_program` for why), the node's
/// own devices by TCX where the kernel has it (Linux >= 6.6).
#[must_use]
pub fn attach_mode() -> &'static str {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        "pods: clsact (cls_bpf); node devices: tcx"
    } else {
        "pods: clsact (cls_bpf); node devices: clsact"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        let owner = Owner {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        Endpoint {
            host_ifname: crate::cni::plugin::host_ifname(&owner),
            owner,
            network: "podnet".into(),
            netns: "/var/run/netns/c1".into(),
            ip: "10.244.0.5".parse().expect("ip"),
            host_ifindex: 7,
            pod_mac: [0x02, 0, 0, 0, 0, 5],
            host_mac: [0x02, 0, 0, 0, 0xff, 5],
            bandwidth: None,
        }
    }

    fn check(ep: &Endpoint) -> anyhow::Result<()> {
        validate_endpoint(ep, "10.244.0.0/24".parse().expect("cidr"))
    }

    #[test]
    fn a_plugin_made_endpoint_is_valid() {
        check(&endpoint()).expect("valid");
    }

    #[test]
    fn bad_endpoint_requests_are_refused() {
        type Spoil = Box<dyn Fn(&mut Endpoint)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "another node's address",
                Box::new(|e| e.ip = "10.244.1.5".parse().expect("ip")),
            ),
            (
                "the gateway",
                Box::new(|e| e.ip = "10.244.0.1".parse().expect("ip")),
            ),
            (
                "the network address",
                Box::new(|e| e.ip = "10.244.0.0".parse().expect("ip")),
            ),
            (
                "the broadcast address",
                Box::new(|e| e.ip = "10.244.0.255".parse().expect("ip")),
            ),
            (
                "a multicast pod MAC",
                Box::new(|e| e.pod_mac = [0x01, 0, 0x5e, 0, 0, 1]),
            ),
            ("a broadcast host MAC", Box::new(|e| e.host_mac = [0xff; 6])),
            ("a zero pod MAC", Box::new(|e| e.pod_mac = [0; 6])),
            (
                "a path in the container ID",
                Box::new(|e| e.owner.container_id = "../../etc/x".into()),
            ),
            (
                "a path in the ifname",
                Box::new(|e| e.owner.ifname = "a/b".into()),
            ),
            (
                "a colon in the ifname",
                Box::new(|e| e.owner.ifname = "a:b".into()),
            ),
            ("a bad network name", Box::new(|e| e.network = "-x".into())),
            (
                "someone else's host veth",
                Box::new(|e| e.host_ifname = "eth0".into()),
            ),
        ];
        for (what, spoil) in cases {
            let mut ep = endpoint();
            spoil(&mut ep);
            let err = check(&ep).expect_err(what);
            assert!(
                err.to_string().starts_with("invalid endpoint"),
                "{what}: {err}"
            );
        }
    }
}
