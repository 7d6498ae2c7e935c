//! Who really sent what arrives from another node: the tunnel's remote
//! address of a decapsulated packet (from_overlay), the neighbour behind the
//! source MAC of a routed one (from_underlay). from_pod checks a pod against
//! its veth; these are the same check for packets coming from other nodes.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup, bpf_tunnel_key},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_skb_get_tunnel_key},
    programs::TcContext,
};

use crate::packet::ETH_ALEN;

/// `AF_INET` for `bpf_fib_lookup.family`.
const AF_INET: u8 = 2;
const FIB_LOOKUP_WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 4;
const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);

/// The underlay address (network byte order) the VXLAN packet came from,
/// from the metadata the collect-metadata device attached when it
/// decapsulated it. `None` when the skb carries no tunnel metadata: a packet
/// that did not come through the tunnel (and every `BPF_PROG_TEST_RUN`).
#[inline(always)]
pub fn tunnel_source(ctx: &TcContext) -> Option<u32> {
    let mut key = MaybeUninit::<bpf_tunnel_key>::uninit();
    // SAFETY: the helper writes the whole key (the kernel zeroes it on
    // failure) into this stack frame's storage; the size is the UAPI
    // struct's.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            key.as_mut_ptr(),
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got != 0 {
        return None;
    }
    // SAFETY: written by the successful call above; an IPv4 tunnel's remote
    // address is the first word of the union, in host byte order.
    let remote = unsafe { key.assume_init_ref().__bindgen_anon_1.remote_ipv4 };
    Some(remote.to_be())
}

/// Whether the frame with source MAC `src_mac`, arriving on `ifindex`, came
/// from the host `node_ip` (network byte order): the kernel's route to
/// `node_ip` leaves through `ifindex` to a neighbour whose MAC is `src_mac`.
///
/// An unresolved neighbour counts as "no": the agent keeps a managed
/// neighbour entry for every other node in direct mode (the kernel resolves
/// and refreshes those itself, NTF_EXT_MANAGED, Linux 5.16), so the entry is
/// there for the nodes the cluster knows.
#[inline(always)]
pub fn sent_by_node(ctx: &TcContext, ifindex: u32, src_mac: &[u8; ETH_ALEN], node_ip: u32) -> bool {
    let mut params = MaybeUninit::<bpf_fib_lookup>::uninit();
    let p = params.as_mut_ptr();
    // SAFETY: raw-pointer writes into `params`' own storage, aligned for
    // the struct; every word is zeroed first (one volatile store each, see
    // forward.rs on memset), then the input fields are set.
    unsafe {
        let words = p.cast::<u32>();
        let mut i = 0;
        while i < FIB_LOOKUP_WORDS {
            write_volatile(words.add(i), 0);
            i += 1;
        }
        write_volatile(&raw mut (*p).family, AF_INET);
        write_volatile(&raw mut (*p).ifindex, ifindex);
        write_volatile(&raw mut (*p).__bindgen_anon_4.ipv4_dst, node_ip);
    }
    // SAFETY: `params` is fully initialised and lives for the call.
    // BPF_FIB_LOOKUP_OUTPUT: a lookup as this host sending to `node_ip` out
    // of `ifindex` (no forwarding check on the device); the kernel fills in
    // the neighbour's MAC (`dmac`) only when it has a valid entry.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return false;
    }
    // SAFETY: initialised above and filled in by the successful lookup.
    let result = unsafe { params.assume_init_ref() };
    result.ifindex == ifindex && result.dmac == *src_mac
}
