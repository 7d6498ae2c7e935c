//! Lookups in the state maps that every forwarding decision reads: the
//! node's endpoints and the remote trie. A module of their own so that the
//! decisions (`forward`), the stack-flow bookkeeping (`flows`) and the entry
//! files read them without importing one another.

use aya_ebpf::maps::lpm_trie::Key;
use podnet_common::{EndpointInfo, RemoteNode, node::REMOTE_NODE_ADDRESS};

use crate::maps::{ENDPOINTS, REMOTE};

/// The local endpoint that has `ip` (network order).
#[inline(always)]
pub fn endpoint(ip: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole (map update), so a concurrent update yields the old or the new
    // endpoint, both of which are valid at that moment.
    unsafe { ENDPOINTS.get(ip) }.copied()
}

/// The remote node whose pod CIDR (or own address) holds `ip` (network
/// order): the longest prefix wins.
#[inline(always)]
pub fn remote_node(ip: u32) -> Option<RemoteNode> {
    REMOTE.get(Key::new(32, ip)).copied()
}

/// [`remote_node`] by reference into the map (no copy).
#[inline(always)]
pub fn remote_node_entry(ip: u32) -> Option<&'static RemoteNode> {
    REMOTE.get(Key::new(32, ip))
}

/// Whether `ip` (network order) is in another node's pod CIDR (not a
/// node's own address). Read through the map's reference, not an
/// `Option` copy: the verifier rejects the read of a `None` payload that
/// LLVM hoists out of a short-circuited condition.
#[inline(always)]
pub fn in_remote_pod_cidr(ip: u32) -> bool {
    REMOTE
        .get(Key::new(32, ip))
        .is_some_and(|node| node.flags & REMOTE_NODE_ADDRESS == 0)
}
