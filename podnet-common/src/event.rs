//! Drop events: what the datapath reports about a drop, besides counting it,
//! through the events ring buffer ([`crate::names::MAP_EVENTS`]).
//!
//! Events are rate-limited per CPU (a token bucket in
//! [`crate::names::MAP_EVENT_LIMIT`]): at most
//! [`crate::NodeConfig::drop_events_per_sec`] per second and CPU (0: the
//! default, [`DEFAULT_DROP_EVENTS_PER_SEC`]), with a burst of one second's
//! worth. A drop over the limit, or one the ring buffer has no room for, is
//! counted by reason in [`crate::names::MAP_EVENTS_SUPPRESSED`] instead: so
//! for every reason, events delivered + events suppressed = drops counted.

use crate::{DropReason, names};

/// Drop events per second and CPU when the node config says 0.
pub const DEFAULT_DROP_EVENTS_PER_SEC: u32 = 100;

/// Size of the events ring buffer (a power of two, a multiple of the page
/// size): 256 KiB, about 5,400 events of 48 bytes (with the kernel's 8-byte
/// record header), more than 2 CPUs x the default rate over a 10 s stall of
/// the reader.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// The program that reported an event (`DropEvent::program`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    FromPod = 0,
    ToPod = 1,
    FromOverlay = 2,
    ToOverlay = 3,
    FromUnderlay = 4,
    ToUnderlay = 5,
}

impl Program {
    pub const ALL: [Program; 6] = [
        Self::FromPod,
        Self::ToPod,
        Self::FromOverlay,
        Self::ToOverlay,
        Self::FromUnderlay,
        Self::ToUnderlay,
    ];

    /// The program's name, as in the object file.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => names::PROG_FROM_POD,
            Self::ToPod => names::PROG_TO_POD,
            Self::FromOverlay => names::PROG_FROM_OVERLAY,
            Self::ToOverlay => names::PROG_TO_OVERLAY,
            Self::FromUnderlay => names::PROG_FROM_UNDERLAY,
            Self::ToUnderlay => names::PROG_TO_UNDERLAY,
        }
    }

    #[must_use]
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }
}

/// One drop, as the ring buffer carries it. Addresses and ports are in
/// network byte order, as in the packet; the 5-tuple is all zeros when the
/// frame is no IPv4 packet with a valid header, the ports when it is no
/// TCP/UDP/SCTP packet or not its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()`: `CLOCK_MONOTONIC`, nanoseconds.
    pub timestamp_ns: u64,
    /// [`DropReason`] as its index.
    pub reason: u32,
    /// The device the packet arrived on (the program's device: a pod's host
    /// veth for from_pod, the VXLAN or underlay device otherwise).
    pub ifindex: u32,
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number (0: not IPv4).
    pub proto: u8,
    /// [`Program`] as its index.
    pub program: u8,
    /// Explicit padding, always zero.
    pub reserved: u16,
    /// Length of the packet (`skb->len`).
    pub len: u32,
    /// The CPU that dropped it (the rate limit is per CPU).
    pub cpu: u32,
}

const _: () = assert!(core::mem::size_of::<DropEvent>() == 40);
const _: () = assert!(core::mem::align_of::<DropEvent>() == 8);
const _: () = assert!(core::mem::offset_of!(DropEvent, src_port) == 24);
const _: () = assert!(core::mem::offset_of!(DropEvent, len) == 32);

impl DropEvent {
    /// The drop reason, if this build knows it.
    #[must_use]
    pub fn drop_reason(&self) -> Option<DropReason> {
        DropReason::ALL.get(self.reason as usize).copied()
    }
}

/// The per-CPU token bucket of the event rate limit (single entry of
/// [`crate::names::MAP_EVENT_LIMIT`]). Tokens are counted in nanoseconds of
/// rate: an event costs `1e9 / rate` of them, time adds them back one per
/// nanosecond up to one second's worth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EventLimiter {
    pub credit_ns: u64,
    /// When the credit was last brought up to date
    /// (`bpf_ktime_get_coarse_ns`).
    pub last_ns: u64,
    /// What one event costs at `rate`: `1e9 / rate` (0 for a rate above
    /// 1e9/s, i.e. no limit).
    pub cost_ns: u64,
    /// The `NodeConfig::drop_events_per_sec` that `cost_ns` is for.
    pub rate: u32,
    /// Explicit padding, always zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<EventLimiter>() == 32);

/// Credit cap of [`EventLimiter`]: one second.
pub const EVENT_CREDIT_CAP_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, integer fields only, the padding spelled out
    // (`reserved`; size and offsets asserted above), so every bit pattern is
    // valid.
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: as above: three u64s and two u32s, no implicit padding.
    unsafe impl aya::Pod for super::EventLimiter {}
}
