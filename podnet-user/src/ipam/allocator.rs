//! Address allocation over an [`IpamStore`].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{IpamError, IpamStore, Owner, Reservation};

/// The node's pod CIDR: the network address is never used, the first host
/// address is the pods' gateway, the broadcast address is never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRange {
    cidr: Ipv4Net,
}

impl PodRange {
    pub fn new(cidr: Ipv4Net) -> Result<Self, IpamError> {
        if cidr.prefix_len() > 30 {
            return Err(IpamError::RangeTooSmall {
                cidr: cidr.to_string(),
            });
        }
        Ok(Self { cidr: cidr.trunc() })
    }

    #[must_use]
    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The pods' default gateway: the first host address.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    fn first(self) -> u32 {
        u32::from(self.cidr.network()) + 2
    }

    fn last(self) -> u32 {
        u32::from(self.cidr.broadcast()) - 1
    }

    /// How many addresses pods can get.
    #[must_use]
    pub fn capacity(&self) -> usize {
        (self.last() - self.first() + 1) as usize
    }

    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first()..=self.last()).contains(&u32::from(ip))
    }

    /// Candidates in round-robin order: after `cursor`, wrapping around.
    fn candidates(self, cursor: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (first, last) = (self.first(), self.last());
        let start = cursor
            .map(u32::from)
            .filter(|c| (first..=last).contains(c))
            .map_or(first, |c| if c == last { first } else { c + 1 });
        (start..=last).chain(first..start).map(Ipv4Addr::from)
    }
}

/// An address handed to an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// The owner already had this address (a repeated ADD).
    pub existing: bool,
}

/// Allocates from a [`PodRange`] over a store.
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

    /// The owner's address: the one it already has, or the next free one
    /// after the cursor.
    pub fn allocate(&self, owner: &Owner) -> Result<Allocation, IpamError> {
        let _lock = self.store.lock()?;
        let reservations = self.store.reservations()?;
        let make = |ip, existing| Allocation {
            ip,
            prefix: 32,
            gateway: self.range.gateway(),
            existing,
        };
        if let Some(r) = reservations.iter().find(|r| &r.owner == owner) {
            return Ok(make(r.ip, true));
        }
        let taken: std::collections::HashSet<Ipv4Addr> =
            reservations.iter().map(|r| r.ip).collect();
        for ip in self.range.candidates(self.store.last_reserved()?) {
            if taken.contains(&ip) {
                continue;
            }
            if self.store.reserve(ip, owner)? {
                self.store.set_last_reserved(ip)?;
                return Ok(make(ip, false));
            }
        }
        Err(IpamError::Exhausted {
            range: self.range.cidr().to_string(),
            used: taken.len(),
            capacity: self.range.capacity(),
        })
    }

    /// Releases whatever `owner` holds; returns the released addresses.
    pub fn release_owner(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>, IpamError> {
        release_owner(&self.store, owner)
    }

    /// Releases every reservation whose owner `keep` rejects.
    pub fn release_unless(
        &self,
        keep: impl Fn(&Owner) -> bool,
    ) -> Result<Vec<Reservation>, IpamError> {
        release_unless(&self.store, keep)
    }

    /// All reservations (for status and reconcile).
    pub fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let _lock = self.store.lock()?;
        self.store.reservations()
    }
}

/// Releases whatever `owner` holds in `store` (no range needed: DEL works
/// without the agent); returns the released addresses.
pub fn release_owner(store: &impl IpamStore, owner: &Owner) -> Result<Vec<Ipv4Addr>, IpamError> {
    Ok(release_unless(store, |o| o != owner)?
        .into_iter()
        .map(|r| r.ip)
        .collect())
}

/// Releases every reservation whose owner `keep` rejects (CNI GC and the
/// agent's reconcile); returns what was released.
pub fn release_unless(
    store: &impl IpamStore,
    keep: impl Fn(&Owner) -> bool,
) -> Result<Vec<Reservation>, IpamError> {
    let _lock = store.lock()?;
    let mut released = Vec::new();
    for r in store.reservations()? {
        if !keep(&r.owner) {
            store.release(r.ip)?;
            released.push(r);
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    #[derive(Default)]
    struct MemStore {
        records: RefCell<BTreeMap<Ipv4Addr, Owner>>,
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
                .map(|(ip, owner)| Reservation {
                    ip: *ip,
                    owner: owner.clone(),
                })
                .collect())
        }
        fn reserve(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
            Ok(self
                .records
                .borrow_mut()
                .insert(ip, owner.clone())
                .is_none())
        }
        fn release(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
            self.records.borrow_mut().remove(&ip);
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

    fn owner(n: usize) -> Owner {
        Owner {
            container_id: format!("c{n}"),
            ifname: "eth0".into(),
        }
    }

    fn range(cidr: &str) -> PodRange {
        PodRange::new(cidr.parse().unwrap()).unwrap()
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
        assert_eq!(alloc.release_owner(&owner(1)).unwrap(), vec![a]);
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
        alloc.release_owner(&owner(1)).unwrap();
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
            .release_unless(|o| o == &owner(1) || o == &owner(3))
            .unwrap();
        assert_eq!(released.len(), 2);
        let left: Vec<_> = alloc
            .reservations()
            .unwrap()
            .into_iter()
            .map(|r| r.owner)
            .collect();
        assert_eq!(left, vec![owner(1), owner(3)]);
    }

    #[test]
    fn tiny_ranges_are_refused() {
        assert!(PodRange::new("10.0.0.0/31".parse().unwrap()).is_err());
        assert_eq!(range("10.0.0.0/30").capacity(), 1);
        assert_eq!(range("10.244.0.0/27").capacity(), 29);
    }
}
