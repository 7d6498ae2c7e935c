//! NetworkPolicy enforcement (see `podnet_common::policy`): a packet of a
//! policy-selected endpoint passes when it belongs to a tracked connection
//! (one lookup), or, as the first packet of a connection, when the rules
//! of the endpoint's selecting policies allow it; then the connection is
//! tracked both ways, so its replies and ICMP errors pass too.
//!
//! Callers test the endpoints' `ENDPOINT_F_POLICY_*` bits first: an
//! unselected pod never gets here. Where a packet is judged:
//! - from_pod: the sender's egress, and the receiver's ingress when the
//!   receiver is local; a destination in the Service CIDR is judged after
//!   the stack's DNAT instead (to_pod, or the overlay/underlay egress), as
//!   Kubernetes defines it, against the backend pod.
//! - from_overlay / from_underlay: the local receiver's ingress.
//! - to_pod: what the stack delivers (Services, NodePort, hostPort): the
//!   receiver's ingress, and the local sender's egress.
//! - the overlay/underlay egress: what the stack sends for a local pod (a
//!   Service's DNAT to another node's backend): the sender's egress.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use podnet_common::{
    DropReason, FlowKey, PolicyCidrKey, PolicyKey, TrackedConnection, Verdict,
    node::REMOTE_NODE_ADDRESS,
    policy::{
        CONN_F_FIN, CONN_F_REPLY, CONN_F_RST, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY,
        IDENTITY_ANY_POD, IDENTITY_FIRST_CIDR_SET, IDENTITY_FIRST_POD, IDENTITY_HOST,
        IDENTITY_REMOTE_NODE, IDENTITY_UNKNOWN, IDENTITY_WORLD, POLICY_CIDR_PREFIX_BASE,
        POLICY_KEY_BITS,
    },
};

use crate::{
    clock::now_ns,
    counters::count,
    l4::{self, closing_flags, has_ports, reversed},
    lookup::remote_node,
    maps::{CONNTRACK, IDENTITIES, POLICY, POLICY_CIDRS},
    packet::Ipv4Fields,
};

/// How often (at most) a tracked connection's timestamp is written: every
/// packet writing it would bounce the entry's cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;

/// Who is judged for a packet: the local sender's egress and/or the local
/// receiver's ingress (their pod IPs, network byte order).
#[derive(Clone, Copy)]
pub struct Judged {
    pub egress_of: Option<u32>,
    pub ingress_of: Option<u32>,
}

/// `Ok` when the packet may go on, else the drop reason. See the module
/// doc for where each caller stands.
#[inline(always)]
pub fn enforce(ctx: &TcContext, ip: &Ipv4Fields, judged: Judged) -> Result<(), DropReason> {
    let parsed = l4::parse(ctx, ip);
    let now = now_ns();
    if let Some(l4) = &parsed
        && let Some(conn) = CONNTRACK.get_ptr_mut(l4.key)
    {
        // SAFETY: pointer to a live map value from a successful lookup; a
        // concurrent update of the same entry from another CPU can only
        // race on the timestamp and flag bits, which are advisory.
        let conn = unsafe { &mut *conn };
        if !conn.expired(l4.key.proto, now) {
            let closing = closing_flags(l4.tcp_flags, CONN_F_RST, CONN_F_FIN);
            if closing & !conn.flags != 0 || now.saturating_sub(conn.last_seen_ns) > REFRESH_NS {
                conn.last_seen_ns = now;
                conn.flags |= closing;
            }
            count(Verdict::PolicyTracked);
            return Ok(());
        }
    }
    // A new connection (or one whose entry expired or was evicted): the
    // rules decide. Protocols without ports, later fragments and ICMP
    // (errors of no tracked connection included) are judged on port 0: a
    // rule for every port of the protocol, or for every protocol, allows
    // them.
    let port = match &parsed {
        Some(l4) if !l4.icmp_other && has_ports(ip.proto) => l4.key.dst_port,
        _ => 0,
    };
    let mut rule = 0;
    if let Some(endpoint) = judged.egress_of {
        rule = allowed(endpoint, DIRECTION_EGRESS, ip.dst, ip.proto, port);
        if rule == 0 {
            return Err(DropReason::PolicyDeniedEgress);
        }
    }
    if let Some(endpoint) = judged.ingress_of {
        rule = allowed(endpoint, DIRECTION_INGRESS, ip.src, ip.proto, port);
        if rule == 0 {
            return Err(DropReason::PolicyDeniedIngress);
        }
    }
    count(Verdict::PolicyAllowed);
    if let Some(l4) = &parsed
        && !l4.icmp_other
    {
        track(&l4.key, l4.tcp_flags, rule, now);
    }
    Ok(())
}

/// Tracks the connection whose first packet has tuple `key`, both ways.
/// An LRU map makes room by evicting its least recently used entries. An
/// entry already there (a translated Service connection's, `service`) is
/// updated, not replaced: its translation stays.
#[inline(always)]
fn track(key: &FlowKey, tcp_flags: u8, rule: u32, now: u64) {
    let closing = closing_flags(tcp_flags, CONN_F_RST, CONN_F_FIN);
    let reply = reversed(key);
    enter(
        u64::from(key.src) | u64::from(key.dst) << 32,
        u64::from(key.src_port) | u64::from(key.dst_port) << 16 | u64::from(key.proto) << 32,
        u64::from(closing) | u64::from(rule) << 32,
        now,
    );
    enter(
        u64::from(reply.src) | u64::from(reply.dst) << 32,
        u64::from(reply.src_port) | u64::from(reply.dst_port) << 16 | u64::from(reply.proto) << 32,
        u64::from(CONN_F_REPLY) | u64::from(rule) << 32,
        now,
    );
}

/// One direction of [`track`]: the key's addresses and ports|protocol,
/// and flags|rule, packed in words. A subprogram taking scalars: the
/// entry (32 bytes with the Service fields) and its key built inline
/// left no room on from_pod's stack for policy's other subprogram.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking what `track` packed
fn enter(addresses: u64, ports: u64, flags_rule: u64, now: u64) {
    let key = FlowKey::new(
        addresses as u32,
        (addresses >> 32) as u32,
        ports as u16,
        (ports >> 16) as u16,
        (ports >> 32) as u8,
    );
    let (flags, rule) = (flags_rule as u32, (flags_rule >> 32) as u32);
    if let Some(conn) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a live map value from a successful lookup (see
        // `enforce`).
        let conn = unsafe { &mut *conn };
        conn.last_seen_ns = now;
        conn.flags = flags;
        conn.rule = rule;
        return;
    }
    let conn = TrackedConnection {
        last_seen_ns: now,
        flags,
        rule,
        ..TrackedConnection::default()
    };
    let _ = CONNTRACK.insert(key, conn, 0);
}

/// A packet a policy-selected pod sends to a Service (judged after the
/// DNAT): its connection is tracked as the pod's own, so that the replies
/// the stack delivers (from the ClusterIP, the DNAT undone) pass the pod's
/// ingress.
#[inline(always)]
pub fn track_own(ctx: &TcContext, ip: &Ipv4Fields) {
    if let Some(l4) = l4::parse(ctx, ip)
        && !l4.icmp_other
        && CONNTRACK.get_ptr_mut(l4.key).is_none()
    {
        track(&l4.key, l4.tcp_flags, 0, now_ns());
    }
}

/// The rule that allows a new connection of local `endpoint` in
/// `direction` with `peer` (network byte order) on `protocol` / `port`
/// (network byte order), or 0. Traffic from this node to its pods is
/// always allowed (the Kubernetes rule: kubelet's probes come from it),
/// under rule 0's neighbour `u32::MAX`. At most four lookups whatever the
/// number of rules. A subprogram: called from several places per program,
/// scalars only.
#[inline(never)]
fn allowed(endpoint: u32, direction: u8, peer: u32, protocol: u8, port: u16) -> u32 {
    let identity = peer_identity(peer);
    if identity == IDENTITY_HOST && direction == DIRECTION_INGRESS {
        return u32::MAX;
    }
    let rule = rule_for(endpoint, identity, direction, protocol, port);
    if rule != 0 {
        return rule;
    }
    if (IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR_SET).contains(&identity) {
        let rule = rule_for(endpoint, IDENTITY_ANY_POD, direction, protocol, port);
        if rule != 0 {
            return rule;
        }
    }
    let rule = rule_for(endpoint, IDENTITY_ANY, direction, protocol, port);
    if rule != 0 {
        return rule;
    }
    let cidr_key = PolicyCidrKey {
        endpoint,
        direction: u32::from(direction),
        address: peer,
    };
    match POLICY_CIDRS.get(Key::new(POLICY_CIDR_PREFIX_BASE + 32, cidr_key)) {
        Some(&set) if set != IDENTITY_UNKNOWN => rule_for(endpoint, set, direction, protocol, port),
        _ => 0,
    }
}

#[inline(always)]
fn rule_for(endpoint: u32, identity: u32, direction: u8, protocol: u8, port: u16) -> u32 {
    let key = PolicyKey {
        endpoint,
        identity,
        direction,
        protocol,
        port,
    };
    POLICY
        .get(Key::new(POLICY_KEY_BITS, key))
        .map_or(0, |rule| rule.rule)
}

/// The identity of `peer` (network byte order): a pod's or this node's
/// from the identities map, another node's address, or the world.
#[inline(always)]
fn peer_identity(peer: u32) -> u32 {
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole.
    if let Some(&identity) = unsafe { IDENTITIES.get(peer) } {
        return identity;
    }
    match remote_node(peer) {
        Some(node) if node.flags & REMOTE_NODE_ADDRESS != 0 && node.node_ip == peer => {
            IDENTITY_REMOTE_NODE
        }
        _ => IDENTITY_WORLD,
    }
}
