//! Flows that crossed the host stack. The fast path skips the node's
//! conntrack, so a flow whose packets went through the stack in one
//! direction (a DNAT to a Service backend, a NodePort, a hostPort, any
//! `dnat to`) must go through the stack in the other direction too, or its
//! replies reach the client without the NAT undone. The programs on the
//! egress of pod veths and of the node's overlay/underlay device see what
//! the stack sends and record the reply direction here; the programs that
//! would redirect a packet look it up first and hand a hit to the stack.

/// Key of the stack-flows map: a packet's tuple as it travels in the
/// direction that must go to the stack. Addresses and ports in network
/// byte order, as read from the packet. ICMP echo uses the identifier as
/// `src_port` (in both directions) and 0 as `dst_port`; other protocols
/// without ports use 0 for both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding, always zero (it is part of the hashed key).
    pub pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    /// A key with zeroed padding; addresses and ports as on the wire.
    #[must_use]
    pub const fn new(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            src_port,
            dst_port,
            proto,
            pad: [0; 3],
        }
    }
}

/// Value of the stack-flows map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct StackFlow {
    /// `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC`) of the last packet
    /// seen in either direction.
    pub last_seen_ns: u64,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// The local endpoint the entry is charged to (its pod IP, network
    /// byte order; see [`FlowOwner`]); 0 for none (entries written before
    /// flows were charged, when this was padding).
    pub owner: u32,
}

const _: () = assert!(core::mem::size_of::<StackFlow>() == 16);

/// Value of the flow-owners map, keyed by a local endpoint's pod IP
/// (network byte order): how many stack-flows entries it holds, so that
/// one pod's traffic cannot turn the shared LRU over and evict other pods'
/// flows (their replies would then skip the NAT). The datapath adds to
/// `flows` for each entry it inserts and refuses (counting `refused`) once
/// the endpoint holds its limit ([`crate::NodeConfig::stack_flows_limit`]);
/// the agent recounts `flows` from the map every few seconds (entries that
/// expired or were evicted). An entry is charged to the local pod that
/// sent the flow, else to the local pod it was delivered to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowOwner {
    /// Live entries charged to the endpoint (as of the last recount, plus
    /// the inserts since).
    pub flows: u32,
    /// Flows not tracked because the endpoint held its limit (monotonic).
    pub refused: u32,
}

const _: () = assert!(core::mem::size_of::<FlowOwner>() == 8);

/// Stack-flows entries one endpoint may hold unless the node config says
/// otherwise: an eighth of the map, so that it takes eight pods at their
/// limit to fill it (a busy DNS client at 90 queries a second holds about
/// 16,000 with the 180 s timeout).
pub const DEFAULT_STACK_FLOWS_PER_ENDPOINT: u32 = crate::names::MAX_STACK_FLOWS / 8;

/// TCP FIN seen in the direction the stack delivered (the request side).
pub const FLOW_F_FIN_FORWARD: u32 = 1;
/// TCP FIN seen in the reply direction (the one looked up).
pub const FLOW_F_FIN_REPLY: u32 = 1 << 1;
/// TCP RST seen in either direction.
pub const FLOW_F_RST: u32 = 1 << 2;
/// A flow with these bits has ended: it expires after
/// [`FLOW_TIMEOUT_CLOSED_S`].
pub const FLOW_F_CLOSED: u32 = FLOW_F_RST;
/// Both FINs: ended too.
pub const FLOW_F_BOTH_FINS: u32 = FLOW_F_FIN_FORWARD | FLOW_F_FIN_REPLY;

/// Idle lifetime of an open TCP flow: conntrack's own
/// (`nf_conntrack_tcp_timeout_established`, 5 days). An entry that expired
/// while conntrack still holds the flow would send its replies past the
/// NAT; one that outlives it only costs speed.
pub const FLOW_TIMEOUT_TCP_S: u64 = 432_000;
/// Lifetime after RST or both FINs (conntrack's CLOSE state is 10 s; the
/// few packets after that are the last ACKs of a connection already gone).
pub const FLOW_TIMEOUT_CLOSED_S: u64 = 10;
/// Idle lifetime of everything else (UDP, ICMP, SCTP, ...): longer than
/// conntrack's UDP stream timeout (120 s) and its ICMP timeout (30 s).
pub const FLOW_TIMEOUT_OTHER_S: u64 = 180;

impl StackFlow {
    /// Ended: an RST, or a FIN each way.
    #[must_use]
    pub const fn closed(&self) -> bool {
        self.flags & FLOW_F_CLOSED != 0 || self.flags & FLOW_F_BOTH_FINS == FLOW_F_BOTH_FINS
    }

    /// How long the entry lives after its last packet, for IP protocol
    /// `proto`.
    #[must_use]
    pub const fn timeout_s(&self, proto: u8) -> u64 {
        /// `IPPROTO_TCP`.
        const TCP: u8 = 6;
        if self.closed() {
            FLOW_TIMEOUT_CLOSED_S
        } else if proto == TCP {
            FLOW_TIMEOUT_TCP_S
        } else {
            FLOW_TIMEOUT_OTHER_S
        }
    }

    /// No longer followed at monotonic time `now_ns` (the datapath's
    /// clock, `CLOCK_MONOTONIC_COARSE`).
    #[must_use]
    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_s(proto) * 1_000_000_000
    }
}

/// Value `from_pod` puts in `skb->tc_index` of a packet it redirects into
/// the overlay or out of the underlay, so the egress programs there can
/// tell the fast path (which never saw the stack) from what the stack
/// sends. Nothing else in Linux 6.x sets `tc_index` (the dsmark qdisc and
/// the tcindex classifier that did were removed in 6.3).
pub const FAST_PATH_TC_INDEX: u32 = 0x706e;

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], integer and byte-array fields only, padding
    // spelled out (size asserts above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above: u64 + two u32, no implicit padding.
    unsafe impl aya::Pod for super::StackFlow {}
    // SAFETY: as above: two u32.
    unsafe impl aya::Pod for super::FlowOwner {}
}
