//! Built-in IPAM, host-local style: one record per allocated address naming
//! its owner (container ID + interface), a lock, a round-robin cursor.
//!
//! Storage sits behind [`IpamStore`] so the allocation logic is tested
//! without a filesystem; [`FileStore`] is the on-disk implementation.

mod allocator;
pub mod delegate;
mod file_store;

pub use allocator::{Allocation, Allocator, PodRange, release_owner, release_unless};
pub use file_store::FileStore;

use std::net::Ipv4Addr;

/// Who holds an address: the CNI attachment (container ID, interface name).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    pub owner: Owner,
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
    #[error("pod CIDR {cidr} is too small (a node needs at least a /30)")]
    RangeTooSmall { cidr: String },
}

/// Storage of reservations. Every method is called with the store's lock
/// held (see [`IpamStore::lock`]), so implementations need not be atomic
/// across calls, only each write must be all-or-nothing.
pub trait IpamStore {
    /// Held for one allocation/release; released on drop (and by the kernel
    /// when a process dies holding it).
    type Lock;

    fn lock(&self) -> Result<Self::Lock, IpamError>;
    /// All reservations; removes leftovers of interrupted writes.
    fn reservations(&self) -> Result<Vec<Reservation>, IpamError>;
    /// Records `ip` for `owner`; `Ok(false)` when `ip` is already taken.
    fn reserve(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError>;
    /// Removes the record of `ip` (no error when there is none).
    fn release(&self, ip: Ipv4Addr) -> Result<(), IpamError>;
    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError>;
    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError>;
}
