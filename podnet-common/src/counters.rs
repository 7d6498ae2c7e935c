//! Counter indices. The numeric values are part of the pinned maps' format:
//! append new variants, never renumber (a restarted agent reads counters that
//! an older datapath wrote).

/// What a program did with a packet; index into the verdicts map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Handed to a local pod with `bpf_redirect_peer`.
    RedirectPeer = 0,
    /// Left to the host stack (not IPv4, not for a local endpoint, ...).
    PassToStack = 1,
    /// Dropped; the reason is counted in the drops map.
    Drop = 2,
    /// An ARP request from a pod answered in place with the host veth's MAC.
    ArpReply = 3,
}

impl Verdict {
    pub const COUNT: u32 = 4;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Self::RedirectPeer,
        Self::PassToStack,
        Self::Drop,
        Self::ArpReply,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::RedirectPeer => "redirect_peer",
            Self::PassToStack => "pass_to_stack",
            Self::Drop => "drop",
            Self::ArpReply => "arp_reply",
        }
    }
}

/// Why a packet was dropped; index into the drops map. Stable numbering.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// `EtherType` says IPv4 but the frame is too short for an IPv4 header, or
    /// the header's version/IHL is invalid.
    MalformedIpv4 = 0,
    /// Source IPv4 is not the sending endpoint's own address.
    SpoofedSourceIp = 1,
    /// Source MAC is not the sending endpoint's own address.
    SpoofedSourceMac = 2,
    /// Rewriting the headers (MACs, TTL) for delivery failed.
    HeaderRewriteFailed = 3,
}

impl DropReason {
    pub const COUNT: u32 = 4;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::MalformedIpv4,
        Self::SpoofedSourceIp,
        Self::SpoofedSourceMac,
        Self::HeaderRewriteFailed,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::MalformedIpv4 => "malformed_ipv4",
            Self::SpoofedSourceIp => "spoofed_source_ip",
            Self::SpoofedSourceMac => "spoofed_source_mac",
            Self::HeaderRewriteFailed => "header_rewrite_failed",
        }
    }
}

// ALL lists the variants in index order (userspace reads counter i as
// ALL[i]); a misordered or renumbered list fails to compile here.
const _: () = {
    let mut i = 0;
    while i < Verdict::ALL.len() {
        assert!(Verdict::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as usize == i);
        i += 1;
    }
};
