//! The life of a pod's address in the built-in IPAM, in one place: where
//! the store lives, allocation (ADD), lookup (CHECK), release (DEL, an
//! ADD's rollback, GC, and the agent's clean-up of endpoints whose veth is
//! gone and of addresses nobody holds) and the node's view (`podnetctl
//! ipam`). The plugin and the agent both go through [`PodAddresses`];
//! neither opens a store itself, so a leaked address is traced in this
//! file.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;

use super::{
    Allocation, Allocator, FileStore, Holder, IpamError, Owner, PodRange, Reservation,
    release_unless,
};

/// The built-in IPAM's root when neither the conf nor the agent says: the
/// agent's default state dir + `/ipam`.
pub const DEFAULT_ROOT: &str = "/var/lib/podnet/ipam";

/// The agent's IPAM root under its state directory.
#[must_use]
pub fn root_in(state_dir: &Path) -> PathBuf {
    state_dir.join("ipam")
}

/// The root a network's addresses live under: the conf's `ipam.dataDir`,
/// else the agent's (`agent_root`, from the agent or its cached node info),
/// else [`DEFAULT_ROOT`]. One store per root serves every network.
#[must_use]
pub fn root_for(data_dir: Option<&Path>, agent_root: Option<&Path>) -> PathBuf {
    data_dir
        .or(agent_root)
        .map_or_else(|| PathBuf::from(DEFAULT_ROOT), Path::to_path_buf)
}

/// What the node's serving store holds, for `podnetctl ipam`.
#[derive(Debug, Clone)]
pub struct NodeAddresses {
    /// The serving store's directory.
    pub store: PathBuf,
    pub capacity: usize,
    pub reservations: Vec<Reservation>,
}

/// The addresses under one IPAM root.
#[derive(Debug, Clone)]
pub struct PodAddresses {
    root: PathBuf,
}

impl PodAddresses {
    #[must_use]
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store(&self) -> Result<FileStore, IpamError> {
        FileStore::open(&self.root)
    }

    /// A root that was never written holds nothing: DEL and GC need not
    /// create it.
    fn existing_store(&self) -> Result<Option<FileStore>, IpamError> {
        if self.root.exists() {
            self.store().map(Some)
        } else {
            Ok(None)
        }
    }

    /// ADD: the holder's address in the node's `pod_cidr` (the one it has
    /// already on a repeated ADD). The node's address space has one store:
    /// this root takes over from the agent's (`agent_root`) only while the
    /// serving one holds no address ([`FileStore::claim_node`]).
    pub fn allocate(
        &self,
        agent_root: &Path,
        pod_cidr: Ipv4Net,
        holder: &Holder,
    ) -> Result<Allocation, IpamError> {
        let range = PodRange::new(pod_cidr)?;
        let home = FileStore::open(agent_root)?;
        let node_store = self.store()?.claim_node(&home, range)?;
        Allocator::new(range, node_store).allocate(holder)
    }

    /// CHECK: the holder's reservation, if it has one.
    pub fn find(&self, holder: &Holder) -> Result<Option<Reservation>, IpamError> {
        super::reservation_of(&self.store()?, holder)
    }

    /// DEL and an ADD's rollback: releases whatever `holder` holds (no
    /// range needed: DEL works without the agent).
    pub fn release(&self, holder: &Holder) -> Result<Vec<Ipv4Addr>, IpamError> {
        match self.existing_store()? {
            Some(store) => super::release_holder(&store, holder),
            None => Ok(Vec::new()),
        }
    }

    /// CNI GC of `network`: releases that network's reservations whose
    /// attachment is not in `valid`; other networks' stay.
    pub fn release_stale(
        &self,
        network: &str,
        valid: &[Owner],
    ) -> Result<Vec<Reservation>, IpamError> {
        match self.existing_store()? {
            Some(store) => super::release_stale(&store, network, valid),
            None => Ok(Vec::new()),
        }
    }

    /// The agent's start-up clean-up: releases reservations (of every
    /// network, in the node store and in old-layout per-network stores)
    /// that no endpoint `held` and for which `in_use` says no (the agent
    /// asks whether the attachment's host veth exists), and that are older
    /// than `grace`, so an ADD in flight right now keeps its address.
    /// Old-layout directories left empty are removed. Returns the released
    /// reservations and the removed directories' networks.
    pub fn release_orphans(
        &self,
        held: &HashSet<Holder>,
        in_use: impl Fn(&Owner) -> bool,
        grace: Duration,
    ) -> Result<(Vec<Reservation>, Vec<String>), IpamError> {
        let store = self.store()?;
        let released = release_unless(&store, |r| {
            held.contains(&r.holder)
                || in_use(&r.holder.owner)
                || store.record_age(r).is_none_or(|age| age < grace)
        })?;
        let removed = store.remove_empty_old_layout_dirs()?;
        Ok((released, removed))
    }

    /// What the store that serves the node holds (the store a network's
    /// `ipam.dataDir` moved the node to, if one did).
    pub fn node_view(&self, pod_cidr: Ipv4Net) -> Result<NodeAddresses, IpamError> {
        let range = PodRange::new(pod_cidr)?;
        let store = self.store()?.serving_store()?;
        Ok(NodeAddresses {
            store: store.dir().to_path_buf(),
            capacity: range.capacity(),
            reservations: Allocator::new(range, store).reservations()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(container_id: &str, network: &str) -> Holder {
        Holder::new(
            network,
            Owner {
                container_id: container_id.into(),
                ifname: "eth0".into(),
            },
        )
    }

    fn cidr() -> Ipv4Net {
        "10.244.7.0/29".parse().expect("cidr")
    }

    #[test]
    fn where_the_store_lives() {
        let agent = Path::new("/var/lib/podnet-x/ipam");
        let conf = Path::new("/data/ipam");
        assert_eq!(root_in(Path::new("/var/lib/podnet-x")), agent);
        assert_eq!(root_for(Some(conf), Some(agent)), conf);
        assert_eq!(root_for(None, Some(agent)), agent);
        assert_eq!(root_for(None, None), Path::new(DEFAULT_ROOT));
        assert_eq!(
            root_in(Path::new("/var/lib/podnet")),
            Path::new(DEFAULT_ROOT)
        );
    }

    #[test]
    fn an_address_lives_from_allocation_to_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = PodAddresses::new(dir.path().to_path_buf());
        let a = holder("a", "net1");
        let first = addresses
            .allocate(dir.path(), cidr(), &a)
            .expect("allocate");
        assert_eq!(first.ip, Ipv4Addr::new(10, 244, 7, 2));
        assert_eq!(first.gateway, Ipv4Addr::new(10, 244, 7, 1));
        let again = addresses.allocate(dir.path(), cidr(), &a).expect("again");
        assert!(
            again.existing && again.ip == first.ip,
            "a repeated ADD keeps it"
        );
        assert_eq!(
            addresses.find(&a).expect("find").map(|r| r.ip),
            Some(first.ip)
        );
        // Another network's DEL of the same container releases nothing.
        assert!(
            addresses
                .release(&holder("a", "net2"))
                .expect("release")
                .is_empty()
        );
        assert_eq!(addresses.release(&a).expect("release"), [first.ip]);
        assert_eq!(addresses.find(&a).expect("find"), None);
        let view = addresses.node_view(cidr()).expect("view");
        assert_eq!(view.capacity, 5);
        assert!(view.reservations.is_empty());
    }

    #[test]
    fn del_and_gc_of_a_root_never_written_do_not_create_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("never");
        let addresses = PodAddresses::new(root.clone());
        assert!(
            addresses
                .release(&holder("a", "n"))
                .expect("release")
                .is_empty()
        );
        assert!(addresses.release_stale("n", &[]).expect("gc").is_empty());
        assert!(!root.exists());
    }

    #[test]
    fn gc_releases_only_its_networks_stale_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = PodAddresses::new(dir.path().to_path_buf());
        for h in [holder("a", "n1"), holder("b", "n1"), holder("c", "n2")] {
            addresses
                .allocate(dir.path(), cidr(), &h)
                .expect("allocate");
        }
        let valid = [holder("a", "n1").owner];
        let released = addresses.release_stale("n1", &valid).expect("gc");
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].holder, holder("b", "n1"));
        assert!(addresses.find(&holder("c", "n2")).expect("find").is_some());
    }

    #[test]
    fn orphans_are_released_only_when_unheld_unused_and_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = PodAddresses::new(dir.path().to_path_buf());
        let (held, in_use, orphan) = (
            holder("held", "n"),
            holder("veth", "n"),
            holder("gone", "n"),
        );
        for h in [&held, &in_use, &orphan] {
            addresses.allocate(dir.path(), cidr(), h).expect("allocate");
        }
        let held_set: HashSet<Holder> = [held.clone()].into();
        let veth_exists = |o: &Owner| o.container_id == "veth";
        // Younger than the grace period: an ADD in flight keeps it.
        let (released, _) = addresses
            .release_orphans(&held_set, veth_exists, Duration::from_hours(1))
            .expect("young");
        assert!(released.is_empty());
        let (released, _) = addresses
            .release_orphans(&held_set, veth_exists, Duration::ZERO)
            .expect("old");
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].holder, orphan);
        assert!(addresses.find(&held).expect("find").is_some());
        assert!(addresses.find(&in_use).expect("find").is_some());
    }
}
