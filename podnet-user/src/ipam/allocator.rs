//! Address allocation over an [`IpamStore`].

use std::{collections::HashSet, net::Ipv4Addr};

use super::{Holder, IpamError, IpamStore, Owner, PodRange, Reservation};

/// An address handed to a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// The holder already had this address (a repeated ADD).
    pub existing: bool,
}

/// Allocates from a [`PodRange`] over a store: the node's one address
/// space, shared by every network that uses it.
pub struct Allocator<S> {
    range: PodRange,
    store: S,
}

impl<S: IpamStore> Allocator<S> {
    pub fn new(range: PodRange, store: S) -> Self {
        Self { range, store }
    }

    #[must_use]
    pub fn range(&self) -> PodRange {
        self.range
    }

    /// The holder's address: the one it already has, or the next address
    /// after the cursor that no network holds.
    pub fn allocate(&self, holder: &Holder) -> Result<Allocation, IpamError> {
        let _lock = self.store.lock()?;
        let reservations = self.store.reservations()?;
        let make = |ip, existing| Allocation {
            ip,
            prefix: 32,
            gateway: self.range.gateway(),
            existing,
        };
        if let Some(r) = reservations.iter().find(|r| &r.holder == holder) {
            return Ok(make(r.ip, true));
        }
        let taken: HashSet<Ipv4Addr> = reservations.iter().map(|r| r.ip).collect();
        for ip in self.range.candidates(self.store.last_reserved()?) {
            if taken.contains(&ip) {
                continue;
            }
            if self.store.reserve(ip, holder)? {
                self.store.set_last_reserved(ip)?;
                return Ok(make(ip, false));
            }
        }
        Err(IpamError::Exhausted {
            range: self.range.cidr().to_string(),
            used: taken.iter().filter(|ip| self.range.contains(**ip)).count(),
            capacity: self.range.capacity(),
        })
    }

    /// Releases whatever `holder` holds; returns the released addresses.
    pub fn release(&self, holder: &Holder) -> Result<Vec<Ipv4Addr>, IpamError> {
        release_holder(&self.store, holder)
    }

    /// Releases every reservation `keep` rejects.
    pub fn release_unless(
        &self,
        keep: impl Fn(&Reservation) -> bool,
    ) -> Result<Vec<Reservation>, IpamError> {
        release_unless(&self.store, keep)
    }

    /// All reservations of every network (for status and reconcile).
    pub fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let _lock = self.store.lock()?;
        self.store.reservations()
    }
}

/// Releases whatever `holder` holds in `store` (no range needed: DEL works
/// without the agent); returns the released addresses.
pub fn release_holder(store: &impl IpamStore, holder: &Holder) -> Result<Vec<Ipv4Addr>, IpamError> {
    Ok(release_unless(store, |r| &r.holder != holder)?
        .into_iter()
        .map(|r| r.ip)
        .collect())
}

/// CNI GC of `network`: releases that network's reservations whose
/// attachment is not in `valid`. Other networks' reservations are not its
/// to judge and stay.
pub fn release_stale(
    store: &impl IpamStore,
    network: &str,
    valid: &[Owner],
) -> Result<Vec<Reservation>, IpamError> {
    let valid: HashSet<&Owner> = valid.iter().collect();
    release_unless(store, |r| {
        r.holder.network != network || valid.contains(&r.holder.owner)
    })
}

/// Releases every reservation `keep` rejects (GC and the agent's
/// reconcile); returns what was released.
pub fn release_unless(
    store: &impl IpamStore,
    keep: impl Fn(&Reservation) -> bool,
) -> Result<Vec<Reservation>, IpamError> {
    let _lock = store.lock()?;
    let mut released = Vec::new();
    for r in store.reservations()? {
        if !keep(&r) {
            store.release(&r)?;
            released.push(r);
        }
    }
    Ok(released)
}

/// The reservation `holder` has, if any (CNI CHECK).
pub fn reservation_of(
    store: &impl IpamStore,
    holder: &Holder,
) -> Result<Option<Reservation>, IpamError> {
    let _lock = store.lock()?;
    Ok(store
        .reservations()?
        .into_iter()
        .find(|r| &r.holder == holder))
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    #[derive(Default)]
    struct MemStore {
        records: RefCell<BTreeMap<Ipv4Addr, Holder>>,
        cursor: RefCell<Option<Ipv4Addr>>,
    }

    impl IpamStore for &MemStore {
        type Lock = ();
        fn lock(&self) -> Result<(), IpamError> {
            Ok(())
        }
        fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
            Ok(self
                .records
                .borrow()
                .iter()
                .map(|(ip, holder)| Reservation {
                    ip: *ip,
                    holder: holder.clone(),
                })
                .collect())
        }
        fn reserve(&self, ip: Ipv4Addr, holder: &Holder) -> Result<bool, IpamError> {
            let mut records = self.records.borrow_mut();
            if records.contains_key(&ip) {
                return Ok(false);
            }
            records.insert(ip, holder.clone());
            Ok(true)
        }
        fn release(&self, r: &Reservation) -> Result<(), IpamError> {
            let mut records = self.records.borrow_mut();
            if records.get(&r.ip) == Some(&r.holder) {
                records.remove(&r.ip);
            }
            Ok(())
        }
        fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
            Ok(*self.cursor.borrow())
        }
        fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
            *self.cursor.borrow_mut() = Some(ip);
            Ok(())
        }
    }

    fn attachment(id: &str, ifname: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: ifname.into(),
        }
    }

    fn in_net(network: &str, n: usize) -> Holder {
        Holder::new(network, attachment(&format!("c{n}"), "eth0"))
    }

    fn owner(n: usize) -> Holder {
        in_net("podnet", n)
    }

    fn range(cidr: &str) -> PodRange {
        PodRange::new(cidr.parse().unwrap()).unwrap()
    }

    fn held_by(store: &MemStore, network: &str) -> Vec<Ipv4Addr> {
        store
            .records
            .borrow()
            .iter()
            .filter(|(_, h)| h.network == network)
            .map(|(ip, _)| *ip)
            .collect()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.1.0/29"), &store);
        let ips: Vec<_> = (0..5)
            .map(|n| alloc.allocate(&owner(n)).unwrap().ip)
            .collect();
        let expected: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 244, 1, h)).collect();
        assert_eq!(ips, expected);
        assert_eq!(
            alloc.allocate(&owner(0)).unwrap().gateway,
            Ipv4Addr::new(10, 244, 1, 1)
        );
        let err = alloc.allocate(&owner(99)).unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    used: 5,
                    capacity: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn same_owner_gets_its_address_back() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        let first = alloc.allocate(&owner(1)).unwrap();
        let again = alloc.allocate(&owner(1)).unwrap();
        assert_eq!(first.ip, again.ip);
        assert!(!first.existing && again.existing);
        assert_eq!(store.records.borrow().len(), 1);
    }

    #[test]
    fn round_robin_does_not_reuse_a_just_released_address() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        let a = alloc.allocate(&owner(1)).unwrap().ip;
        assert_eq!(alloc.release(&owner(1)).unwrap(), vec![a]);
        let b = alloc.allocate(&owner(2)).unwrap().ip;
        assert_ne!(a, b, "the cursor moves on, like host-local");
    }

    #[test]
    fn cursor_wraps_around_to_free_addresses() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/29"), &store);
        for n in 0..5 {
            alloc.allocate(&owner(n)).unwrap();
        }
        alloc.release(&owner(1)).unwrap();
        assert_eq!(
            alloc.allocate(&owner(9)).unwrap().ip,
            Ipv4Addr::new(10, 244, 0, 3)
        );
    }

    #[test]
    fn release_unless_keeps_only_valid_owners() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        for n in 0..4 {
            alloc.allocate(&owner(n)).unwrap();
        }
        let released = alloc
            .release_unless(|r| r.holder == owner(1) || r.holder == owner(3))
            .unwrap();
        assert_eq!(released.len(), 2);
        let left: Vec<_> = alloc
            .reservations()
            .unwrap()
            .into_iter()
            .map(|r| r.holder)
            .collect();
        assert_eq!(left, vec![owner(1), owner(3)]);
    }

    #[test]
    fn tiny_ranges_are_refused() {
        assert!(PodRange::new("10.0.0.0/31".parse().unwrap()).is_err());
        assert_eq!(range("10.0.0.0/30").capacity(), 1);
        assert_eq!(range("10.244.0.0/27").capacity(), 29);
    }

    // Issue 10: two networks on one node share the node's address space.

    #[test]
    fn two_networks_alternating_adds_never_share_an_address() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        let mut seen = HashSet::new();
        for n in 0..50 {
            let network = if n % 2 == 0 { "net-a" } else { "net-b" };
            let a = alloc.allocate(&in_net(network, n)).unwrap();
            assert!(!a.existing);
            assert!(
                seen.insert(a.ip),
                "ADD {n} in {network}: {} handed out twice",
                a.ip
            );
        }
        assert_eq!(held_by(&store, "net-a").len(), 25);
        assert_eq!(held_by(&store, "net-b").len(), 25);
    }

    #[test]
    fn del_in_one_network_releases_nothing_of_the_other() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        for n in 0..6 {
            alloc.allocate(&in_net("net-a", n)).unwrap();
            alloc.allocate(&in_net("net-b", n)).unwrap();
        }
        let b_before = held_by(&store, "net-b");
        for n in 0..6 {
            assert_eq!(alloc.release(&in_net("net-a", n)).unwrap().len(), 1);
            // A DEL repeated, or for an attachment net-a never had.
            assert!(alloc.release(&in_net("net-a", n)).unwrap().is_empty());
        }
        assert!(alloc.release(&in_net("net-a", 42)).unwrap().is_empty());
        assert!(held_by(&store, "net-a").is_empty());
        assert_eq!(held_by(&store, "net-b"), b_before);
    }

    #[test]
    fn gc_of_one_network_keeps_the_other() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        for n in 0..4 {
            alloc.allocate(&in_net("net-a", n)).unwrap();
            alloc.allocate(&in_net("net-b", n)).unwrap();
        }
        let b_before = held_by(&store, "net-b");
        // net-a's GC lists only its own valid attachment, c1/eth0 (which
        // net-b has too: that is no reason to keep net-b's either way).
        let released = release_stale(&&store, "net-a", &[attachment("c1", "eth0")]).unwrap();
        let mut released: Vec<_> = released.into_iter().map(|r| r.holder).collect();
        released.sort();
        assert_eq!(
            released,
            vec![in_net("net-a", 0), in_net("net-a", 2), in_net("net-a", 3)]
        );
        assert_eq!(held_by(&store, "net-a").len(), 1);
        assert_eq!(
            held_by(&store, "net-b"),
            b_before,
            "GC of net-a keeps net-b"
        );
    }

    #[test]
    fn same_container_in_two_networks_gets_two_addresses() {
        let store = MemStore::default();
        let alloc = Allocator::new(range("10.244.0.0/24"), &store);
        // The same container and even the same ifname (two runtimes, or a
        // conf renamed): still two attachments, two addresses.
        let a = alloc
            .allocate(&Holder::new("net-a", attachment("pod1", "eth0")))
            .unwrap();
        let b = alloc
            .allocate(&Holder::new("net-b", attachment("pod1", "eth0")))
            .unwrap();
        let b1 = alloc
            .allocate(&Holder::new("net-b", attachment("pod1", "net1")))
            .unwrap();
        assert!(!a.existing && !b.existing && !b1.existing);
        assert_eq!(HashSet::from([a.ip, b.ip, b1.ip]).len(), 3);
        // A repeated ADD finds each network's own address.
        let again = alloc
            .allocate(&Holder::new("net-b", attachment("pod1", "eth0")))
            .unwrap();
        assert!(again.existing);
        assert_eq!(again.ip, b.ip);
        assert_eq!(
            reservation_of(&&store, &Holder::new("net-a", attachment("pod1", "eth0")))
                .unwrap()
                .map(|r| r.ip),
            Some(a.ip)
        );
        // DEL in net-a releases net-a's, not net-b's.
        assert_eq!(
            alloc
                .release(&Holder::new("net-a", attachment("pod1", "eth0")))
                .unwrap(),
            vec![a.ip]
        );
        assert_eq!(held_by(&store, "net-b"), {
            let mut v = vec![b.ip, b1.ip];
            v.sort();
            v
        });
    }
}
