//! Service translation (`--services bpf`, see `podnet_common::service`):
//! a pod's connection to a Service frontend gets its destination rewritten
//! to a backend at from_pod, and the backend's replies get their source
//! rewritten back to the frontend wherever they reach the client's node's
//! fast path (from_pod for a local backend, from_overlay / from_underlay
//! for a remote one). The state is the connection table NetworkPolicy
//! uses: the client's tuple to the frontend (`CONN_NAT_DST`) and the
//! backend's reply tuple (`CONN_NAT_SRC`), so policy judges the translated
//! tuple, the backend, in both directions.
//!
//! Callers test `NODE_F_SERVICES_BPF` first: with kube-proxy's rules in
//! charge nothing here runs.

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_get_prandom_u32, programs::TcContext};
use podnet_common::{
    Affinity, AffinityKey, BackendKey, DropReason, FlowKey, ServiceEntry, ServiceKey,
    TrackedConnection, Verdict,
    policy::{CONN_F_FIN, CONN_F_REPLY, CONN_F_RST, CONN_NAT_DST, CONN_NAT_SRC},
    service::{HAIRPIN_SOURCE, service_port_bit},
};

use crate::{
    clock::now_ns,
    counters::count,
    l4::{self, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_SYN, closing_flags, has_ports},
    maps::{CONFIG, CONNTRACK, SERVICE_AFFINITY, SERVICE_BACKENDS, SERVICE_PORTS, SERVICES},
    packet::{self, ETH_HLEN, Ipv4Fields},
};

/// How often (at most) a translated connection's timestamps are written
/// (both entries at once: either direction keeps the connection alive, as
/// one conntrack entry would).
const REFRESH_NS: u64 = 1_000_000_000;

/// `bpf_l4_csum_replace`: the changed field is part of the pseudo-header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `bpf_l4_csum_replace`: a UDP checksum of 0 (none) stays 0, and a
/// computed 0 is written as 0xffff (RFC 768).
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// The ICMP header before an error's embedded datagram.
const ICMP_HLEN: usize = 8;
/// Offsets of the IPv4 header's checksum, source and destination.
const IP_CHECK_OFFSET: usize = ETH_HLEN + 10;
const IP_SRC_OFFSET: usize = ETH_HLEN + 12;
const IP_DST_OFFSET: usize = ETH_HLEN + 16;

/// What from_pod does with a packet for the Service CIDR.
pub enum Forward {
    /// No frontend has its address, port and protocol (or it cannot be
    /// translated: a later fragment, a protocol without ports): the stack
    /// has it, as without podnet's Services.
    NotAFrontend,
    /// A packet of a translated connection, rewritten to its backend.
    Translated,
    /// A new connection's first packet, rewritten to the backend picked;
    /// [`record`] it once policy has let it through.
    New(NewConnection),
}

/// A connection translated at its first packet, not yet in the table:
/// its frontend, address | port << 32 (network byte order), one word
/// (what from_pod holds across the policy judgement must be small: its
/// stack and policy's subprogram below it share 512 bytes). The rest of
/// the connection is the rewritten packet's tuple.
pub struct NewConnection(u64);

/// The ports of a TCP/UDP packet (as on the wire) and its TCP flags.
#[inline(always)]
pub fn ports_of(ctx: &TcContext, ip: &Ipv4Fields) -> Option<(u16, u16, u8)> {
    if ip.later_fragment {
        return None;
    }
    match ip.proto {
        IPPROTO_TCP => {
            let b = packet::bytes_at::<14>(ctx, ip.l4_offset)?;
            Some((
                u16::from_ne_bytes([b[0], b[1]]),
                u16::from_ne_bytes([b[2], b[3]]),
                b[13],
            ))
        }
        IPPROTO_UDP => {
            let b = packet::bytes_at::<4>(ctx, ip.l4_offset)?;
            Some((
                u16::from_ne_bytes([b[0], b[1]]),
                u16::from_ne_bytes([b[2], b[3]]),
                0,
            ))
        }
        // SCTP's CRC32c covers its ports and no address: a port rewrite
        // would need the whole chunk summed again. Not translated.
        _ => None,
    }
}

/// [`find_backend`]'s answers (bits 56.. of its word).
const FOUND_TRACKED: u64 = 1;
pub const FOUND_NEW: u64 = 2;
pub const FOUND_NO_BACKEND: u64 = 3;
const FOUND_UNKNOWN_CONNECTION: u64 = 4;

/// Translates a pod's packet for the Service CIDR, or for its node's
/// address (`to_node`: a NodePort, whose frontends are the node
/// address's), `ip` updated to the rewritten destination. `Err`: a
/// frontend without a backend, or a rewrite the kernel refused.
#[inline(always)]
pub fn to_backend(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    to_node: bool,
) -> Result<Forward, DropReason> {
    let Some((src_port, dst_port, tcp_flags)) = ports_of(ctx, ip) else {
        return Ok(Forward::NotAFrontend);
    };
    // The node's other traffic (not to a port of the bitmap) pays one
    // array read, not the lookups.
    if to_node && !watched_port(dst_port) {
        return Ok(Forward::NotAFrontend);
    }
    let addresses = u64::from(ip.src) | u64::from(ip.dst) << 32;
    let ports = u64::from(src_port)
        | u64::from(dst_port) << 16
        | u64::from(ip.proto) << 48
        | u64::from(tcp_flags) << 56;
    let found = find_backend(addresses, ports);
    #[allow(clippy::cast_possible_truncation)] // unpacking `find_backend`'s word
    let (address, port) = (found as u32, (found >> 32) as u16);
    match found >> 56 {
        FOUND_TRACKED => {
            rewrite(ctx, ip, Side::Destination, address, port)?;
            hairpin_source(ctx, ip)?;
            count(Verdict::ServiceTracked);
            Ok(Forward::Translated)
        }
        FOUND_NEW => {
            rewrite(ctx, ip, Side::Destination, address, port)?;
            hairpin_source(ctx, ip)?;
            count(Verdict::ServiceTranslated);
            Ok(Forward::New(NewConnection(
                u64::from(ip_frontend(addresses)) | u64::from(dst_port) << 32,
            )))
        }
        FOUND_NO_BACKEND => Err(DropReason::ServiceNoBackend),
        FOUND_UNKNOWN_CONNECTION => Err(DropReason::ServiceConnectionUnknown),
        _ => Ok(Forward::NotAFrontend),
    }
}

/// The address of [`HAIRPIN_SOURCE`] as the datapath holds addresses.
#[inline(always)]
pub const fn hairpin_address() -> u32 {
    u32::from_ne_bytes(HAIRPIN_SOURCE)
}

/// A pod's packet translated to the pod itself (hairpin): its source
/// becomes [`HAIRPIN_SOURCE`] (the port stays), see there why.
#[inline(always)]
fn hairpin_source(ctx: &mut TcContext, ip: &mut Ipv4Fields) -> Result<(), DropReason> {
    if ip.dst != ip.src {
        return Ok(());
    }
    rewrite_address(ctx, ip, Side::Source, hairpin_address())?;
    count(Verdict::ServiceHairpin);
    Ok(())
}

/// [`to_backend`] out of line, for from_pod: its rewrites inline would
/// not leave from_pod's stack room for policy's subprograms below it.
/// `skb` is the program's context; the outcome comes packed in one word.
#[inline(never)]
pub fn pod_to_backend(skb: *mut __sk_buff, ip: &mut Ipv4Fields, to_node: bool) -> PodTranslation {
    let mut ctx = TcContext::new(skb);
    PodTranslation(match to_backend(&mut ctx, ip, to_node) {
        Ok(Forward::NotAFrontend) => 0,
        Ok(Forward::Translated) => PodTranslation::TRANSLATED,
        Ok(Forward::New(new)) => PodTranslation::NEW | new.0,
        Err(DropReason::ServiceNoBackend) => PodTranslation::FAILED | 1,
        Err(DropReason::ServiceConnectionUnknown) => PodTranslation::FAILED | 2,
        Err(_) => PodTranslation::FAILED,
    })
}

/// [`pod_to_backend`]'s outcome: 0 (no frontend), `TRANSLATED`, `NEW` |
/// the [`NewConnection`] word (48 bits), or `FAILED` | 1 (no backend), 2
/// (unknown connection), 0 (a rewrite failed).
#[repr(transparent)]
pub struct PodTranslation(u64);

impl PodTranslation {
    const TRANSLATED: u64 = 1 << 61;
    const NEW: u64 = 1 << 62;
    const FAILED: u64 = 1 << 63;

    /// `Ok(Some)`: a new connection to record once policy let it
    /// through; `Ok(None)`: nothing to record (translated or not a
    /// frontend); `Err`: the packet is dropped.
    #[inline(always)]
    pub fn outcome(self) -> Result<Option<NewConnection>, DropReason> {
        if self.0 & Self::FAILED != 0 {
            return Err(match self.0 & 0xff {
                1 => DropReason::ServiceNoBackend,
                2 => DropReason::ServiceConnectionUnknown,
                _ => DropReason::HeaderRewriteFailed,
            });
        }
        if self.0 & Self::NEW != 0 {
            return Ok(Some(NewConnection(self.0 & !Self::NEW)));
        }
        Ok(None)
    }
}

/// The frontend address of [`find_backend`]'s packed addresses.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // the upper half
const fn ip_frontend(addresses: u64) -> u32 {
    (addresses >> 32) as u32
}

/// Where the connection of a client's packet to the Service CIDR goes
/// (addresses and ports packed as [`NewConnection`] packs them, without
/// the backend port): its tracked backend, or for a new connection one
/// picked from the frontend's slots. Returns the backend's address | port
/// << 32 | `FOUND_*` << 56, or 0 for no frontend. A subprogram: from_pod's
/// stack has no room for its keys (see [`NewConnection`]).
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn find_backend(addresses: u64, ports: u64) -> u64 {
    let (client, frontend) = (addresses as u32, (addresses >> 32) as u32);
    let (client_port, frontend_port) = (ports as u16, (ports >> 16) as u16);
    let (proto, tcp_flags) = ((ports >> 48) as u8, (ports >> 56) as u8);
    let now = now_ns();
    let to_frontend = FlowKey::new(client, frontend, client_port, frontend_port, proto);
    if let Some(conn) = CONNTRACK.get_ptr_mut(to_frontend) {
        // SAFETY: a live map value from a successful lookup; another CPU
        // can only race on the advisory timestamp and flag bits.
        let conn = unsafe { &mut *conn };
        if conn.nat == CONN_NAT_DST && !conn.expired(proto, now) {
            let (address, port) = (conn.nat_address, conn.nat_port);
            let reply = FlowKey::new(address, client, port, client_port, proto);
            if proto == IPPROTO_TCP && l4::opens(tcp_flags) {
                // The client's kernel reused the tuple of a closed
                // connection: a new one, to the same backend, whose
                // entries must not keep the old one's closing state
                // (it would age out after 10 s idle).
                conn.flags = 0;
                conn.last_seen_ns = now;
                reopen(&reply, now);
            } else {
                touch(conn, tcp_flags, now, &reply);
            }
            return u64::from(address) | u64::from(port) << 32 | FOUND_TRACKED << 56;
        }
    }
    let key = ServiceKey {
        address: frontend,
        port: frontend_port,
        protocol: proto,
        pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries
    // whole.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return 0;
    };
    // Only a SYN opens a TCP connection: anything else of an unknown one
    // lost its entry (expired, or evicted from a full table).
    if proto == IPPROTO_TCP && tcp_flags & TCP_SYN == 0 {
        return FOUND_UNKNOWN_CONNECTION << 56;
    }
    pick_backend(service, client, now)
}

/// A new connection of `client` to the frontend `service`: its backend,
/// packed as [`find_backend`] answers (`FOUND_NEW`, or `FOUND_NO_BACKEND`
/// for a frontend without one): the client's affine backend, or a slot
/// at random (noted for affinity when the frontend has it).
#[inline(always)]
pub fn pick_backend(service: ServiceEntry, client: u32, now: u64) -> u64 {
    if service.backends == 0 {
        return FOUND_NO_BACKEND << 56;
    }
    if service.affinity_timeout_s != 0
        && let Some(found) = sticky_backend(service.id, client, service, now)
    {
        return found;
    }
    // SAFETY: plain helper call.
    let pick = unsafe { bpf_get_prandom_u32() } % service.backends + 1;
    let slot = BackendKey {
        service: service.id,
        slot: pick,
    };
    // SAFETY: as above. A slot past a shrinking frontend's new count may
    // be gone already: the frontend is then treated as empty for this
    // packet (the client retransmits).
    let Some(backend) = (unsafe { SERVICE_BACKENDS.get(slot) }).copied() else {
        return FOUND_NO_BACKEND << 56;
    };
    if service.affinity_timeout_s != 0 {
        let sticky = Affinity {
            last_used_ns: now,
            slot: pick,
            backend_address: backend.address,
            backend_port: backend.port,
            pad: [0; 6],
        };
        let _ = SERVICE_AFFINITY.insert(
            AffinityKey {
                service: service.id,
                client,
            },
            sticky,
            0,
        );
    }
    u64::from(backend.address) | u64::from(backend.port) << 32 | FOUND_NEW << 56
}

/// `sessionAffinity: ClientIP`: the backend `client`'s last new connection
/// to the frontend went to, packed as [`find_backend`] answers, while the
/// timeout has not run out since and the slot still holds that backend
/// (an endpoint change that moved it ends the affinity early; a client is
/// never sent to a backend that left).
#[inline(always)]
fn sticky_backend(service_id: u32, client: u32, service: ServiceEntry, now: u64) -> Option<u64> {
    let key = AffinityKey {
        service: service_id,
        client,
    };
    let sticky = SERVICE_AFFINITY.get_ptr_mut(key)?;
    // SAFETY: a live map value from a successful lookup; another CPU can
    // only race on the timestamp.
    let sticky = unsafe { &mut *sticky };
    let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(sticky.last_used_ns) > timeout_ns || sticky.slot > service.backends {
        return None;
    }
    let slot = BackendKey {
        service: service_id,
        slot: sticky.slot,
    };
    // SAFETY: copied out at once.
    let backend = unsafe { SERVICE_BACKENDS.get(slot) }?;
    if backend.address != sticky.backend_address || backend.port != sticky.backend_port {
        return None;
    }
    sticky.last_used_ns = now;
    Some(u64::from(backend.address) | u64::from(backend.port) << 32 | FOUND_NEW << 56)
}

/// Enters a new translated connection in the table, once policy let its
/// first packet (`ip`, rewritten to the backend) through: the client's
/// tuple to the frontend, and the backend's reply tuple (kept when policy
/// tracked the connection a moment ago: its rule stays, the translation
/// is added).
#[inline(always)]
pub fn record(ctx: &TcContext, ip: &Ipv4Fields, new: &NewConnection) {
    let Some((client_port, backend_port, tcp_flags)) = ports_of(ctx, ip) else {
        return;
    };
    #[allow(clippy::cast_possible_truncation)] // unpacking the word
    let (frontend, frontend_port) = (new.0 as u32, (new.0 >> 32) as u16);
    // A hairpin connection's client is its backend, the pod itself.
    let client = if ip.src == hairpin_address() {
        ip.dst
    } else {
        ip.src
    };
    enter(
        u64::from(client) | u64::from(frontend) << 32,
        u64::from(client_port)
            | u64::from(frontend_port) << 16
            | u64::from(backend_port) << 32
            | u64::from(ip.proto) << 48
            | u64::from(tcp_flags) << 56,
        u64::from(ip.dst),
    );
}

/// [`record`]'s body, out of line: client | frontend address << 32;
/// client | frontend << 16 | backend port << 32 | protocol << 48 | TCP
/// flags << 56; backend address.
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking what `record` packed
pub fn enter(addresses: u64, ports: u64, backend: u64) {
    let (client, frontend) = (addresses as u32, (addresses >> 32) as u32);
    let (client_port, frontend_port, backend_port) =
        (ports as u16, (ports >> 16) as u16, (ports >> 32) as u16);
    let (proto, tcp_flags) = ((ports >> 48) as u8, (ports >> 56) as u8);
    let backend_address = backend as u32;
    let service_key = ServiceKey {
        address: frontend,
        port: frontend_port,
        protocol: proto,
        pad: 0,
    };
    // SAFETY: copied out at once. Gone since the packet's lookup: the
    // connection is recorded without its frontend's id.
    let service = unsafe { SERVICES.get(service_key) }.map_or(0, |s| s.id);
    let now = now_ns();
    let forward = TrackedConnection {
        last_seen_ns: now,
        flags: closing_flags(tcp_flags, CONN_F_RST, CONN_F_FIN),
        nat_address: backend_address,
        nat_port: backend_port,
        nat: CONN_NAT_DST,
        service,
        ..TrackedConnection::default()
    };
    let key = FlowKey::new(client, frontend, client_port, frontend_port, proto);
    let _ = CONNTRACK.insert(key, forward, 0);
    // A hairpin connection's replies go to the address it came from.
    let replied_to = if backend_address == client {
        hairpin_address()
    } else {
        client
    };
    let reply_key = FlowKey::new(
        backend_address,
        replied_to,
        backend_port,
        client_port,
        proto,
    );
    if let Some(conn) = CONNTRACK.get_ptr_mut(reply_key) {
        // SAFETY: as in `find_backend`.
        let conn = unsafe { &mut *conn };
        // Policy tracked it a moment ago (its rule stays), or it is a
        // closed connection's on a tuple the client reused: fresh either
        // way, or an expired timestamp would leave the replies
        // untranslated.
        conn.last_seen_ns = now;
        conn.flags = CONN_F_REPLY;
        conn.nat_address = frontend;
        conn.nat_port = frontend_port;
        conn.nat = CONN_NAT_SRC;
        conn.service = service;
        return;
    }
    let reply = TrackedConnection {
        last_seen_ns: now,
        flags: CONN_F_REPLY,
        nat_address: frontend,
        nat_port: frontend_port,
        nat: CONN_NAT_SRC,
        service,
        ..TrackedConnection::default()
    };
    let _ = CONNTRACK.insert(reply_key, reply, 0);
}

/// A pod's TCP SYN straight to a port some backend serves on. A translated
/// connection from the same client port to the same backend (closed, its
/// entries still aging, or reused by the client's kernel for another
/// destination) has the reply tuple this connection's replies will have,
/// and would give them the frontend's source: the client would never
/// accept them. Its entries go, as conntrack would not let two
/// connections share a reply tuple either.
#[inline(always)]
pub fn clear_clashing(ctx: &TcContext, ip: &Ipv4Fields) {
    if ip.proto != IPPROTO_TCP {
        return;
    }
    let Some((src_port, dst_port, tcp_flags)) = ports_of(ctx, ip) else {
        return;
    };
    if !l4::opens(tcp_flags) {
        return;
    }
    if !watched_port(dst_port) {
        return;
    }
    forget_clash(
        u64::from(ip.dst) | u64::from(ip.src) << 32,
        u64::from(dst_port) | u64::from(src_port) << 16,
    );
}

/// [`clear_clashing`]'s lookup and removal, out of line (scalars, as
/// [`find_backend`]): backend | client << 32, backend port | client port
/// << 16 (TCP).
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn forget_clash(addresses: u64, ports: u64) {
    let (backend, client) = (addresses as u32, (addresses >> 32) as u32);
    let (backend_port, client_port) = (ports as u16, (ports >> 16) as u16);
    let reply = FlowKey::new(backend, client, backend_port, client_port, IPPROTO_TCP);
    // SAFETY: copied out at once.
    let Some(conn) = (unsafe { CONNTRACK.get(reply) }).copied() else {
        return;
    };
    if conn.nat != CONN_NAT_SRC {
        return;
    }
    let _ = CONNTRACK.remove(reply);
    let _ = CONNTRACK.remove(FlowKey::new(
        client,
        conn.nat_address,
        client_port,
        conn.nat_port,
        IPPROTO_TCP,
    ));
}

/// Whether `port` (network byte order) is in the Service ports' bitmap: a
/// port some backend serves on, or a NodePort.
#[inline(always)]
pub fn watched_port(port: u16) -> bool {
    let (word, bit) = service_port_bit(u16::from_be(port));
    SERVICE_PORTS.get(word).is_some_and(|&bits| bits & bit != 0)
}

/// The frontend a backend's reply must come from, when `ip` is one: its
/// source port is a port some backend serves on (one array read for
/// everything else) and its tuple is a translated connection's reply.
#[inline(always)]
pub fn reply_source(ctx: &TcContext, ip: &Ipv4Fields) -> Option<Frontend> {
    if ip.proto == IPPROTO_ICMP {
        return icmp_error_source(ctx, ip);
    }
    let (src_port, dst_port, tcp_flags) = ports_of(ctx, ip)?;
    if !watched_port(src_port) {
        return None;
    }
    let found = find_frontend(
        u64::from(ip.src) | u64::from(ip.dst) << 32,
        u64::from(src_port)
            | u64::from(dst_port) << 16
            | u64::from(ip.proto) << 48
            | u64::from(tcp_flags) << 56,
    );
    if found == 0 {
        return None;
    }
    count(Verdict::ServiceTracked);
    Some(Frontend(found))
}

/// An ICMP error about a client's packet to a backend (port unreachable,
/// fragmentation needed, time exceeded on the way): it must reach the
/// client about the frontend, or its socket never hears of it (the kernel
/// matches the embedded header to the socket). The embedded header's
/// tuple, reversed, is the connection's reply tuple (`l4::parse`).
#[inline(always)]
fn icmp_error_source(ctx: &TcContext, ip: &Ipv4Fields) -> Option<Frontend> {
    let l4 = l4::parse(ctx, ip)?;
    if !l4.icmp_other || !has_ports(l4.key.proto) {
        return None;
    }
    if !watched_port(l4.key.src_port) {
        return None;
    }
    let found = find_frontend(
        u64::from(l4.key.src) | u64::from(l4.key.dst) << 32,
        u64::from(l4.key.src_port)
            | u64::from(l4.key.dst_port) << 16
            | u64::from(l4.key.proto) << 48,
    );
    if found == 0 {
        return None;
    }
    count(Verdict::ServiceTracked);
    Some(Frontend(found | ICMP_ERROR))
}

/// The frontend a backend's reply comes from again: `find_frontend`'s
/// word (one word, as [`NewConnection`]), with [`ICMP_ERROR`] for an ICMP
/// error about the connection.
pub struct Frontend(u64);

/// [`Frontend`]: the reply is an ICMP error (its embedded header is
/// translated too).
const ICMP_ERROR: u64 = 1 << 63;
/// [`Frontend`]: the frontend is this node's address (a NodePort).
const NODE_ADDRESS: u64 = 1 << 62;

impl Frontend {
    /// Whether the reply now comes from this node's address (a NodePort's
    /// connection).
    #[inline(always)]
    pub fn is_node_address(&self) -> bool {
        self.0 & NODE_ADDRESS != 0
    }

    /// The frontend's address and port (as on the wire).
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // unpacking the word
    fn address_and_port(&self) -> (u32, u16) {
        (self.0 as u32, (self.0 >> 32) as u16)
    }
}

/// The frontend of a backend's reply (packed as in [`find_backend`]):
/// its address | port << 32 | 1 << 56, or 0 when the tuple is no
/// translated connection's reply. A subprogram, as [`find_backend`].
#[inline(never)]
#[allow(clippy::cast_possible_truncation)] // unpacking the packed words
fn find_frontend(addresses: u64, ports: u64) -> u64 {
    let (backend, client) = (addresses as u32, (addresses >> 32) as u32);
    let (backend_port, client_port) = (ports as u16, (ports >> 16) as u16);
    let (proto, tcp_flags) = ((ports >> 48) as u8, (ports >> 56) as u8);
    let key = FlowKey::new(backend, client, backend_port, client_port, proto);
    let Some(conn) = CONNTRACK.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: as in `find_backend`.
    let conn = unsafe { &mut *conn };
    let now = now_ns();
    if conn.nat != CONN_NAT_SRC || conn.expired(proto, now) {
        return 0;
    }
    let (frontend, frontend_port) = (conn.nat_address, conn.nat_port);
    touch(
        conn,
        tcp_flags,
        now,
        &FlowKey::new(client, frontend, client_port, frontend_port, proto),
    );
    let node_address = if CONFIG
        .get(0)
        .is_some_and(|config| config.node_ip == frontend)
    {
        NODE_ADDRESS
    } else {
        0
    };
    u64::from(frontend) | u64::from(frontend_port) << 32 | 1 << 56 | node_address
}

/// Rewrites a backend's reply to come from `frontend` (from
/// [`reply_source`]).
#[inline(always)]
pub fn from_frontend(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    frontend: &Frontend,
) -> Result<(), DropReason> {
    let (address, port) = frontend.address_and_port();
    if frontend.0 & ICMP_ERROR != 0 {
        return icmp_error_from_frontend(ctx, ip, address, port);
    }
    rewrite(ctx, ip, Side::Source, address, port)
}

/// A hairpin connection's reply (the pod's, to [`HAIRPIN_SOURCE`]): from
/// the frontend to the pod. An ICMP error about a hairpin connection is
/// not translated (dropped): the pod would not match its embedded
/// header, which names the hairpin source, to any socket.
#[inline(always)]
pub fn hairpin_reply(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    frontend: &Frontend,
) -> Result<(), DropReason> {
    let (address, port) = frontend.address_and_port();
    if frontend.0 & ICMP_ERROR == 0 && reply_to_itself(ctx.skb.skb, ip, address, port) {
        Ok(())
    } else {
        Err(DropReason::HeaderRewriteFailed)
    }
}

/// [`hairpin_reply`]'s rewrites, out of line (their stack slots would not
/// fit in from_pod's frame): the source becomes `frontend`:`port`, the
/// destination the pod that sent it. `false`: the kernel refused a
/// rewrite.
#[inline(never)]
fn reply_to_itself(skb: *mut __sk_buff, ip: &mut Ipv4Fields, frontend: u32, port: u16) -> bool {
    let mut ctx = TcContext::new(skb);
    let replier = ip.src;
    if rewrite(&mut ctx, ip, Side::Source, frontend, port).is_err()
        || rewrite_address(&mut ctx, ip, Side::Destination, replier).is_err()
    {
        return false;
    }
    count(Verdict::ServiceHairpin);
    true
}

/// An ICMP error about the client's packet to a backend becomes one about
/// its packet to the frontend: the embedded destination and, when the
/// backend itself sent the error, the outer source (a router on the way
/// keeps its own).
#[inline(always)]
fn icmp_error_from_frontend(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    address: u32,
    port: u16,
) -> Result<(), DropReason> {
    let backend = rewrite_embedded(ctx, ip, Side::Destination, address, port)?;
    if ip.src == backend {
        rewrite_outer_address(ctx, ip, Side::Source, address)?;
    }
    Ok(())
}

/// Rewrites one side's address and port of an ICMP error's embedded
/// datagram (`ip` the error), with the embedded header's checksum and the
/// ICMP checksum, which covers the embedded bytes (no pseudo-header): each
/// change is folded into it. The embedded L4 checksum is left as it is
/// (often cut off; the kernel matches an error to its socket by the tuple
/// alone). Returns the side's old address.
#[inline(always)]
pub fn rewrite_embedded(
    ctx: &mut TcContext,
    ip: &Ipv4Fields,
    side: Side,
    address: u32,
    port: u16,
) -> Result<u32, DropReason> {
    let failed = |_| DropReason::HeaderRewriteFailed;
    let icmp_check = ip.l4_offset + 2;
    let inner = ip.l4_offset + ICMP_HLEN;
    let header = packet::bytes_at::<20>(ctx, inner).ok_or(DropReason::HeaderRewriteFailed)?;
    let inner_l4 = inner + usize::from(header[0] & 0x0f) * 4;
    let (address_offset, port_offset) = match side {
        Side::Source => (inner + 12, inner_l4),
        Side::Destination => (inner + 16, inner_l4 + 2),
    };
    let a = match side {
        Side::Source => [header[12], header[13], header[14], header[15]],
        Side::Destination => [header[16], header[17], header[18], header[19]],
    };
    let old_address = u32::from_ne_bytes(a);
    let old_check = u16::from_ne_bytes([header[10], header[11]]);
    let old_port = packet::bytes_at::<2>(ctx, port_offset)
        .map(u16::from_ne_bytes)
        .ok_or(DropReason::HeaderRewriteFailed)?;
    ctx.l3_csum_replace(inner + 10, u64::from(old_address), u64::from(address), 4)
        .map_err(failed)?;
    ctx.store(address_offset, &address, 0).map_err(failed)?;
    let new_check = packet::bytes_at::<2>(ctx, inner + 10)
        .map(u16::from_ne_bytes)
        .ok_or(DropReason::HeaderRewriteFailed)?;
    ctx.store(port_offset, &port, 0).map_err(failed)?;
    ctx.l4_csum_replace(icmp_check, u64::from(old_address), u64::from(address), 4)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_check, u64::from(old_check), u64::from(new_check), 2)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_check, u64::from(old_port), u64::from(port), 2)
        .map_err(failed)?;
    Ok(old_address)
}

/// Rewrites one side's address of an ICMP message's own IP header, with
/// the IP checksum (the ICMP checksum has no pseudo-header).
#[inline(always)]
pub fn rewrite_outer_address(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    side: Side,
    address: u32,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::HeaderRewriteFailed;
    let (old, offset) = match side {
        Side::Source => (ip.src, IP_SRC_OFFSET),
        Side::Destination => (ip.dst, IP_DST_OFFSET),
    };
    ctx.l3_csum_replace(IP_CHECK_OFFSET, u64::from(old), u64::from(address), 4)
        .map_err(failed)?;
    ctx.store(offset, &address, 0).map_err(failed)?;
    match side {
        Side::Source => ip.src = address,
        Side::Destination => ip.dst = address,
    }
    Ok(())
}

/// A translated connection's entry met a packet with `tcp_flags` at `now`:
/// its timestamp (at most once per [`REFRESH_NS`], or at once for a new
/// FIN or RST) and, with it, that of its other entry `other`.
#[inline(always)]
pub fn touch(conn: &mut TrackedConnection, tcp_flags: u8, now: u64, other: &FlowKey) {
    let closing = closing_flags(tcp_flags, CONN_F_RST, CONN_F_FIN);
    if closing & !conn.flags != 0 || now.saturating_sub(conn.last_seen_ns) > REFRESH_NS {
        conn.last_seen_ns = now;
        conn.flags |= closing;
        refresh(other, now, closing);
    }
}

/// The reply entry of a connection opened again on its tuple: fresh.
#[inline(always)]
pub fn reopen(key: &FlowKey, now: u64) {
    if let Some(conn) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: as in `find_backend`.
        let conn = unsafe { &mut *conn };
        conn.last_seen_ns = now;
        conn.flags = CONN_F_REPLY;
    }
}

/// Refreshes the other entry of a translated connection (a connection
/// lives as long as either direction is active).
#[inline(always)]
fn refresh(key: &FlowKey, now: u64, closing: u32) {
    if let Some(conn) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: as in `to_backend`.
        let conn = unsafe { &mut *conn };
        conn.last_seen_ns = now;
        conn.flags |= closing;
    }
}

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one side's address and port of a TCP/UDP packet, with the IP
/// and L4 checksums. For a pod's packet the L4 checksum is often still
/// partial (`CHECKSUM_PARTIAL`, offloaded to the veth): the helper then
/// updates only the pseudo-header's share, which is what the address is.
#[inline(always)]
pub fn rewrite(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    side: Side,
    address: u32,
    port: u16,
) -> Result<(), DropReason> {
    let (check, mangled) = l4_checksum(ip);
    let port_offset = match side {
        Side::Source => ip.l4_offset,
        Side::Destination => ip.l4_offset + 2,
    };
    let old_port = packet::bytes_at::<2>(ctx, port_offset)
        .map(u16::from_ne_bytes)
        .ok_or(DropReason::HeaderRewriteFailed)?;
    rewrite_address(ctx, ip, side, address)?;
    if old_port != port {
        ctx.l4_csum_replace(check, u64::from(old_port), u64::from(port), mangled | 2)
            .map_err(|_| DropReason::HeaderRewriteFailed)?;
        ctx.store(port_offset, &port, 0)
            .map_err(|_| DropReason::HeaderRewriteFailed)?;
    }
    Ok(())
}

/// The offset of a TCP/UDP packet's checksum and the flag its rewrites
/// carry.
#[inline(always)]
fn l4_checksum(ip: &Ipv4Fields) -> (usize, u64) {
    if ip.proto == IPPROTO_TCP {
        (ip.l4_offset + 16, 0)
    } else {
        (ip.l4_offset + 6, BPF_F_MARK_MANGLED_0)
    }
}

/// Rewrites one side's address of a TCP/UDP packet, with the IP checksum
/// and the L4 checksum's pseudo-header share (see [`rewrite`]).
#[inline(always)]
pub fn rewrite_address(
    ctx: &mut TcContext,
    ip: &mut Ipv4Fields,
    side: Side,
    address: u32,
) -> Result<(), DropReason> {
    let (check, mangled) = l4_checksum(ip);
    let (old_address, address_offset) = match side {
        Side::Source => (ip.src, IP_SRC_OFFSET),
        Side::Destination => (ip.dst, IP_DST_OFFSET),
    };
    let failed = |_| DropReason::HeaderRewriteFailed;
    ctx.l4_csum_replace(
        check,
        u64::from(old_address),
        u64::from(address),
        BPF_F_PSEUDO_HDR | mangled | 4,
    )
    .map_err(failed)?;
    ctx.l3_csum_replace(
        IP_CHECK_OFFSET,
        u64::from(old_address),
        u64::from(address),
        4,
    )
    .map_err(failed)?;
    ctx.store(address_offset, &address, 0).map_err(failed)?;
    match side {
        Side::Source => ip.src = address,
        Side::Destination => ip.dst = address,
    }
    Ok(())
}
