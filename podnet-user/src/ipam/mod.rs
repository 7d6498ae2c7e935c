//! Built-in IPAM, host-local style: one record per allocated address naming
//! its holder (network, container ID, interface), a lock, a round-robin
//! cursor.
//!
//! The pod CIDR is the node's, so the address space is too: every network
//! that uses the built-in IPAM on a node allocates from one store, and a
//! record says which network's attachment holds the address. DEL, GC and
//! CHECK of one network only ever see that network's records.
//!
//! Storage sits behind [`IpamStore`] so the allocation logic is tested
//! without a filesystem; [`FileStore`] is the on-disk implementation (its
//! layout, and how stores of older podnet versions are honoured, are
//! described there).

mod addresses;
mod allocator;
pub mod delegate;
mod file_store;

pub use addresses::{DEFAULT_ROOT, NodeAddresses, PodAddresses, root_for, root_in};
pub use allocator::{
    Allocation, Allocator, release_holder, release_stale, release_unless, reservation_of,
};
pub use file_store::{FileStore, NODE_STORE_DIR, NodeStore};

use std::net::Ipv4Addr;

pub use crate::endpoint::{Owner, PodRange};

/// Who holds an address: an attachment of one network. The network is part
/// of the key: a DEL or GC of network A must not release what network B
/// holds, even for the same container.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Holder {
    /// CNI network name (empty in what an older agent reports).
    #[serde(default)]
    pub network: String,
    pub owner: Owner,
}

impl Holder {
    pub fn new(network: impl Into<String>, owner: Owner) -> Self {
        Self {
            network: network.into(),
            owner,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} in network {}",
            self.owner.container_id, self.owner.ifname, self.network
        )
    }
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    /// Serialized flat: `{"ip", "network", "owner"}`.
    #[serde(flatten)]
    pub holder: Holder,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {range} ({used} of {capacity} in use)")]
    Exhausted {
        range: String,
        used: usize,
        capacity: usize,
    },
    #[error("IPAM store {path}: {action}")]
    Store {
        path: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RangeTooSmall(#[from] crate::endpoint::PodRangeError),
    /// Another store already hands out this node's addresses (a network
    /// with a different `ipam.dataDir`): allocating here would hand out the
    /// same addresses twice.
    #[error(
        "the node's pod CIDR {cidr} is allocated from the IPAM store under {serving}{in_use}; \
         allocating from {store} too would hand out the same addresses: \
         give every network on this node the same ipam.dataDir (or none)"
    )]
    StoreConflict {
        /// The store this network's configuration names.
        store: String,
        /// The store that serves the node.
        serving: String,
        cidr: String,
        /// What the serving store holds, e.g. ` (3 addresses in use by network a)`.
        in_use: String,
    },
}

/// Storage of reservations. Every method but [`IpamStore::lock`] is called
/// with the store's lock held, so implementations need not be atomic across
/// calls, only each write must be all-or-nothing.
pub trait IpamStore {
    /// Held for one allocation/release; released on drop (and by the kernel
    /// when a process dies holding it).
    type Lock;

    fn lock(&self) -> Result<Self::Lock, IpamError>;
    /// All reservations of every network; removes leftovers of interrupted
    /// writes. The same address may appear twice only in stores written by
    /// an older podnet (one store per network): it is taken while either
    /// record exists.
    fn reservations(&self) -> Result<Vec<Reservation>, IpamError>;
    /// Records `ip` for `holder`; `Ok(false)` when `ip` is already taken.
    fn reserve(&self, ip: Ipv4Addr, holder: &Holder) -> Result<bool, IpamError>;
    /// Removes the record of `reservation` (that holder's record of that
    /// address, no other; no error when there is none).
    fn release(&self, reservation: &Reservation) -> Result<(), IpamError>;
    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError>;
    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError>;
}
