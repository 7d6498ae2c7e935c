//! Local endpoint (a pod's interface on this node) as the datapath sees it.

/// Value of the local-endpoints map, keyed by the pod's IPv4 address in
/// network byte order (`u32::from_ne_bytes(ip.octets())`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EndpointInfo {
    /// Ifindex of the host-side veth; `bpf_redirect_peer` to it delivers into
    /// the pod's netns.
    pub host_ifindex: u32,
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
    /// MAC of the pod's interface (destination MAC of frames to the pod and
    /// the only source MAC the pod may send with).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC of frames delivered to the pod,
    /// as if the host had routed them).
    pub host_mac: [u8; 6],
}

/// No flags.
pub const ENDPOINT_F_NONE: u32 = 0;
/// The endpoint has an ingress bandwidth limit: a tbf on its host veth's
/// egress. The fast path hands its packets to that egress
/// (`bpf_redirect`) instead of straight into the pod (`bpf_redirect_peer`
/// skips every qdisc), so the tbf shapes them whichever way they came.
pub const ENDPOINT_F_SHAPED_INGRESS: u32 = 1;
/// A NetworkPolicy selects the endpoint for ingress: what reaches it must be
/// a tracked connection or allowed by its rules (see [`crate::policy`]).
pub const ENDPOINT_F_POLICY_INGRESS: u32 = 1 << 1;
/// A NetworkPolicy selects the endpoint for egress: what it sends must be a
/// tracked connection or allowed by its rules. Also in
/// [`VethEndpoint::policy_flags`], which from_pod reads anyway.
pub const ENDPOINT_F_POLICY_EGRESS: u32 = 1 << 2;
/// Both policy bits.
pub const ENDPOINT_F_POLICY: u32 = ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS;

const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 20);
const _: () = assert!(core::mem::align_of::<EndpointInfo>() == 4);

/// Per-endpoint traffic counters: what the endpoint sent into the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EndpointStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<EndpointStats>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, only integer/byte-array fields, no implicit padding
    // (checked by the size asserts and by bytemuck's derive), so every bit
    // pattern is valid and the bytes can be copied to and from the kernel.
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above: two u64s, no padding.
    unsafe impl aya::Pod for super::EndpointStats {}
    // SAFETY: as above: u32 + 2 x 6 bytes fill the 16 bytes before the
    // 8-aligned counters exactly, two u32s the 8 after them (size and
    // offset asserted below).
    unsafe impl aya::Pod for super::VethEndpoint {}
}

/// Value of the per-CPU per-veth map, keyed by the host veth's ifindex: who
/// may send on that veth, and what it sent. `from_pod` needs both for every
/// packet, so they share one lookup (the identity is the same on every CPU,
/// the counters are this CPU's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VethEndpoint {
    /// The only source IPv4 the pod may send with (network byte order).
    pub pod_ip: u32,
    /// The only source MAC the pod may send with.
    pub pod_mac: [u8; 6],
    /// MAC of the host veth itself (what the ARP responder answers).
    pub host_mac: [u8; 6],
    pub stats: EndpointStats,
    /// Ifindex of the ifb device that shapes what the pod sends (its egress
    /// bandwidth limit); 0: none, the pod's packets take the fast path.
    pub egress_shaper_ifindex: u32,
    /// The endpoint's `ENDPOINT_F_POLICY_*` bits, as in its
    /// [`EndpointInfo::flags`] (was padding, always 0: no policy).
    pub policy_flags: u32,
    /// This veth's drop-event rate limit on this CPU (appended: an entry
    /// migrated from the 40-byte layout starts with an empty bucket, full
    /// at its first use). A pod's drops spend its own bucket, so one
    /// flooding pod cannot silence the events of every other pod.
    pub events: crate::EventLimiter,
}

const _: () = assert!(core::mem::size_of::<VethEndpoint>() == 72);
const _: () = assert!(core::mem::offset_of!(VethEndpoint, events) == 40);
const _: () = assert!(core::mem::offset_of!(VethEndpoint, stats) == 16);
