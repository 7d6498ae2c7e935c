//! Writing a compiled plan into the Service maps, make-before-break (see
//! the module doc of [`super`]), behind a small interface so the order and
//! the handling of a full map are tested without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use podnet_common::{ServiceEntry, policy::CONN_TIMEOUT_TCP_S, service::SERVICE_PORT_WORDS};

use crate::{
    datapath::{Datapath, DatapathError},
    services::{BackendAddress, Frontend, FrontendPlan, ServicePlan, port_words},
};

/// The Service maps as the sync writes them.
pub trait ServiceMaps {
    fn frontends(&mut self) -> Result<BTreeMap<Frontend, ServiceEntry>, DatapathError>;
    /// (frontend id, slot) -> backend.
    fn backends(&mut self) -> Result<BTreeMap<(u32, u32), BackendAddress>, DatapathError>;
    /// The backend-ports bitmap ([`SERVICE_PORT_WORDS`] words).
    fn port_words(&mut self) -> Result<Vec<u64>, DatapathError>;
    fn upsert_frontend(
        &mut self,
        frontend: Frontend,
        entry: ServiceEntry,
    ) -> Result<(), DatapathError>;
    fn remove_frontend(&mut self, frontend: Frontend) -> Result<(), DatapathError>;
    fn upsert_backend(
        &mut self,
        id: u32,
        slot: u32,
        backend: BackendAddress,
    ) -> Result<(), DatapathError>;
    fn remove_backend(&mut self, id: u32, slot: u32) -> Result<(), DatapathError>;
    fn set_port_word(&mut self, index: u32, word: u64) -> Result<(), DatapathError>;
    /// Drops the tracked connections translated to `departed` backends
    /// ((frontend id, backend)), both entries of each; returns how many
    /// connections.
    fn forget_connections(
        &mut self,
        departed: &BTreeSet<(u32, BackendAddress)>,
    ) -> Result<usize, DatapathError>;
}

impl ServiceMaps for Datapath {
    fn frontends(&mut self) -> Result<BTreeMap<Frontend, ServiceEntry>, DatapathError> {
        self.service_frontends()
    }
    fn backends(&mut self) -> Result<BTreeMap<(u32, u32), BackendAddress>, DatapathError> {
        self.service_backends()
    }
    fn port_words(&mut self) -> Result<Vec<u64>, DatapathError> {
        self.service_port_words()
    }
    fn upsert_frontend(
        &mut self,
        frontend: Frontend,
        entry: ServiceEntry,
    ) -> Result<(), DatapathError> {
        self.upsert_service_frontend(frontend, entry)
    }
    fn remove_frontend(&mut self, frontend: Frontend) -> Result<(), DatapathError> {
        self.remove_service_frontend(frontend)
    }
    fn upsert_backend(
        &mut self,
        id: u32,
        slot: u32,
        backend: BackendAddress,
    ) -> Result<(), DatapathError> {
        self.upsert_service_backend(id, slot, backend)
    }
    fn remove_backend(&mut self, id: u32, slot: u32) -> Result<(), DatapathError> {
        self.remove_service_backend(id, slot)
    }
    fn set_port_word(&mut self, index: u32, word: u64) -> Result<(), DatapathError> {
        self.set_service_port_word(index, word)
    }
    fn forget_connections(
        &mut self,
        departed: &BTreeSet<(u32, BackendAddress)>,
    ) -> Result<usize, DatapathError> {
        self.forget_translated_connections(departed)
    }
}

/// What the maps hold (as last read or written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub frontends: BTreeMap<Frontend, ServiceEntry>,
    pub backends: BTreeMap<(u32, u32), BackendAddress>,
    /// [`SERVICE_PORT_WORDS`] words.
    pub ports: Vec<u64>,
}

impl Default for Applied {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            ports: vec![0; SERVICE_PORT_WORDS as usize],
        }
    }
}

impl Applied {
    /// What the pinned maps hold now (an agent's first sync after a
    /// restart starts from there).
    pub fn read(maps: &mut impl ServiceMaps) -> Result<Self, DatapathError> {
        let mut ports = maps.port_words()?;
        ports.resize(SERVICE_PORT_WORDS as usize, 0);
        Ok(Self {
            frontends: maps.frontends()?,
            backends: maps.backends()?,
            ports,
        })
    }

    /// Backend slots held over all frontends.
    #[must_use]
    pub fn slot_count(&self) -> usize {
        self.backends.len()
    }

    /// Slots 1..=k of frontend `id` held, the largest such k.
    fn contiguous_slots(&self, id: u32) -> u32 {
        let mut k = 0;
        while self.backends.contains_key(&(id, k + 1)) {
            k += 1;
        }
        k
    }
}

/// How a sync went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries (and bitmap words) written and removed.
    pub written: usize,
    pub removed: usize,
    /// Entries a map refused to take (a full map).
    pub refused: u64,
    /// Frontends whose slots or entry could not all be written: they
    /// translate to fewer backends than they have, or not at all yet.
    pub incomplete: BTreeSet<Frontend>,
    /// What failed, in order.
    pub errors: Vec<String>,
    /// UDP connections dropped from the connection table because their
    /// backend left its frontend (see [`apply_plan`], step 6).
    pub forgotten: usize,
}

/// Brings the maps from `current` to `plan`, the frontends numbered by
/// `ids` (a frontend of the plan without an id is left out and said in
/// the report):
///
/// 1. the bits of new backend ports (a reply from a backend is recognised
///    before any connection can go to it);
/// 2. per new or changed frontend: its slots 1..=n, then its entry (count
///    n), then its slots beyond n; so the datapath never reads a count
///    larger than the slots written;
/// 3. removed frontends: the entry, then its slots;
/// 4. slots no entry names (a restart after a removal half done);
/// 5. the bits of ports no backend serves on any more, but those of
///    `keep` (see [`PortLinger`]);
/// 6. the tracked UDP connections of backends that left a UDP frontend
///    (removed from its slots, or the frontend gone): a client that keeps
///    sending on one 5-tuple would otherwise keep going to a backend that
///    is gone (kubernetes/kubernetes#59368, which kube-proxy fixed by
///    deleting those conntrack entries); its next datagram picks a live
///    backend. TCP connections stay: a terminating backend still serves
///    the ones it has.
///
/// Returns what the maps hold afterwards (what failed to be written is not
/// in it, so the next sync tries again) and the report. A refused slot
/// leaves the frontend at the slots it has; a refused entry leaves the
/// frontend as it was (absent: the stack handles it, as before).
pub fn apply_plan(
    maps: &mut impl ServiceMaps,
    mut current: Applied,
    plan: &ServicePlan,
    ids: &BTreeMap<Frontend, u32>,
    keep: &BTreeSet<u16>,
) -> (Applied, SyncReport) {
    let mut report = SyncReport::default();
    let departed = departed_udp_backends(&current, plan, ids);
    let wanted_ports = port_words(&plan.watched_ports());
    // 1. New port bits, the old ones kept for now.
    let union: Vec<u64> = current
        .ports
        .iter()
        .zip(&wanted_ports)
        .map(|(held, wanted)| held | wanted)
        .collect();
    write_port_words(maps, &mut current, &union, &mut report);
    if !report.errors.is_empty() {
        // A backend whose port bit is not set would get connections whose
        // replies go back untranslated: nothing more until the bits are in.
        return (current, report);
    }
    // 2. New and changed frontends.
    for (&frontend, wanted) in &plan.frontends {
        if let Some(&id) = ids.get(&frontend) {
            write_frontend(maps, &mut current, frontend, wanted, id, &mut report);
        } else {
            report.incomplete.insert(frontend);
            report
                .errors
                .push(format!("{frontend}: no frontend id left"));
        }
    }
    // 3. Removed frontends: the entry first, so no packet picks a slot
    // being removed.
    let gone: Vec<Frontend> = current
        .frontends
        .keys()
        .filter(|f| !plan.frontends.contains_key(f))
        .copied()
        .collect();
    for frontend in gone {
        match maps.remove_frontend(frontend) {
            Ok(()) => {
                current.frontends.remove(&frontend);
                report.removed += 1;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    // 4. Slots whose id no entry has (those of the frontends just removed
    // among them), unless the plan wants them (a frontend whose entry
    // was refused keeps its slots for the next try).
    let named: BTreeSet<u32> = current
        .frontends
        .values()
        .map(|e| e.id)
        .chain(plan.frontends.keys().filter_map(|f| ids.get(f).copied()))
        .collect();
    let orphans: Vec<(u32, u32)> = current
        .backends
        .keys()
        .filter(|(id, _)| !named.contains(id))
        .copied()
        .collect();
    for (id, slot) in orphans {
        remove_slot(maps, &mut current, id, slot, &mut report);
    }
    // 5. Ports no backend serves on any more: the plan's, and those of
    // slots still held (an old backend of a frontend whose update was
    // refused is still picked, and its replies still translated).
    let mut ports = plan.watched_ports();
    ports.extend(current.backends.values().map(|b| b.port));
    ports.extend(keep);
    write_port_words(maps, &mut current, &port_words(&ports), &mut report);
    // 6. Only once no slot names them: no new connection goes there.
    let still_slotted: BTreeSet<(u32, BackendAddress)> = current
        .backends
        .iter()
        .map(|(&(id, _), &backend)| (id, backend))
        .collect();
    let departed: BTreeSet<(u32, BackendAddress)> =
        departed.difference(&still_slotted).copied().collect();
    if !departed.is_empty() {
        match maps.forget_connections(&departed) {
            Ok(n) => report.forgotten += n,
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    (current, report)
}

/// The (frontend id, backend) pairs of UDP frontends in `current` whose
/// backend the plan no longer has there.
fn departed_udp_backends(
    current: &Applied,
    plan: &ServicePlan,
    ids: &BTreeMap<Frontend, u32>,
) -> BTreeSet<(u32, BackendAddress)> {
    const UDP: u8 = 17;
    let mut departed = BTreeSet::new();
    for (frontend, entry) in &current.frontends {
        if frontend.protocol != UDP {
            continue;
        }
        let kept: BTreeSet<BackendAddress> = plan
            .frontends
            .get(frontend)
            .filter(|_| ids.get(frontend) == Some(&entry.id))
            .map(|wanted| wanted.backends.iter().copied().collect())
            .unwrap_or_default();
        departed.extend(
            current
                .backends
                .range((entry.id, 0)..=(entry.id, u32::MAX))
                .map(|(_, backend)| *backend)
                .filter(|backend| !kept.contains(backend))
                .map(|backend| (entry.id, backend)),
        );
    }
    departed
}

/// Step 2 of [`apply_plan`] for one frontend: its slots 1..=n, its entry,
/// its slots beyond.
fn write_frontend(
    maps: &mut impl ServiceMaps,
    current: &mut Applied,
    frontend: Frontend,
    wanted: &FrontendPlan,
    id: u32,
    report: &mut SyncReport,
) {
    let mut written_all = true;
    for (slot, &backend) in (1u32..).zip(&wanted.backends) {
        if current.backends.get(&(id, slot)) == Some(&backend) {
            continue;
        }
        match maps.upsert_backend(id, slot, backend) {
            Ok(()) => {
                current.backends.insert((id, slot), backend);
                report.written += 1;
            }
            Err(e) => {
                refused(report, &e);
                written_all = false;
                // The later slots would not be counted anyway.
                break;
            }
        }
    }
    let full = wanted.entry(id);
    // A count never beyond the slots held: fewer backends than the plan
    // says is better than a slot the datapath finds empty.
    let entry = ServiceEntry {
        backends: full.backends.min(current.contiguous_slots(id)),
        ..full
    };
    if !written_all {
        report.incomplete.insert(frontend);
    }
    if current.frontends.get(&frontend) != Some(&entry) {
        match maps.upsert_frontend(frontend, entry) {
            Ok(()) => {
                current.frontends.insert(frontend, entry);
                report.written += 1;
            }
            Err(e) => {
                refused(report, &e);
                report.incomplete.insert(frontend);
            }
        }
    }
    // Slots beyond what the plan wants and what the map's entry (if its
    // write failed, the old one) counts.
    let counted = current
        .frontends
        .get(&frontend)
        .filter(|e| e.id == id)
        .map_or(0, |e| e.backends);
    let keep = full.backends.max(counted);
    let beyond: Vec<u32> = current
        .backends
        .range((id, keep.saturating_add(1))..=(id, u32::MAX))
        .map(|(&(_, slot), _)| slot)
        .collect();
    for slot in beyond {
        remove_slot(maps, current, id, slot, report);
    }
}

/// How long a port's bit stays after the last backend on it went: the
/// connections a removed backend keeps (the datapath does not cut them)
/// still need their replies translated. The connection table's idle
/// timeout for TCP: a connection quiet for longer is gone from it anyway.
pub const PORT_LINGER: Duration = Duration::from_secs(CONN_TIMEOUT_TCP_S);

/// The ports whose bits stay after their last backend went, and since
/// when. A restarted agent counts the bits it finds without a backend from
/// its start (their connections may be the previous agent's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortLinger {
    since: BTreeMap<u16, Instant>,
}

impl PortLinger {
    /// Ports set in `held` but not `wanted` start lingering at `now`;
    /// wanted ones stop; those lingering longer than `linger` are let go.
    /// Returns the ports whose bits are kept.
    pub fn update(
        &mut self,
        held: &[u64],
        wanted: &BTreeSet<u16>,
        now: Instant,
        linger: Duration,
    ) -> BTreeSet<u16> {
        for port in ports_of(held) {
            if !wanted.contains(&port) {
                self.since.entry(port).or_insert(now);
            }
        }
        self.since.retain(|port, since| {
            !wanted.contains(port) && now.saturating_duration_since(*since) < linger
        });
        self.since.keys().copied().collect()
    }

    /// Whether a port's time is up (a sync lets it go).
    #[must_use]
    pub fn due(&self, now: Instant, linger: Duration) -> bool {
        self.since
            .values()
            .any(|since| now.saturating_duration_since(*since) >= linger)
    }
}

/// The ports whose bits are set in `words`.
fn ports_of(words: &[u64]) -> impl Iterator<Item = u16> + '_ {
    (0u32..).zip(words).flat_map(|(index, &word)| {
        (0u32..64)
            .filter(move |bit| word & (1 << bit) != 0)
            .filter_map(move |bit| u16::try_from(index * 64 + bit).ok())
    })
}

fn remove_slot(
    maps: &mut impl ServiceMaps,
    current: &mut Applied,
    id: u32,
    slot: u32,
    report: &mut SyncReport,
) {
    match maps.remove_backend(id, slot) {
        Ok(()) => {
            current.backends.remove(&(id, slot));
            report.removed += 1;
        }
        Err(e) => report.errors.push(e.to_string()),
    }
}

/// Writes the words of `words` the maps hold otherwise.
fn write_port_words(
    maps: &mut impl ServiceMaps,
    current: &mut Applied,
    words: &[u64],
    report: &mut SyncReport,
) {
    for (index, (&word, held)) in (0u32..).zip(words.iter().zip(current.ports.iter_mut())) {
        if *held == word {
            continue;
        }
        match maps.set_port_word(index, word) {
            Ok(()) => {
                *held = word;
                report.written += 1;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
}

fn refused(report: &mut SyncReport, error: &DatapathError) {
    report.refused += 1;
    // A few messages name the map; the count says how many.
    if report.errors.len() < 8 {
        report.errors.push(error.with_sources());
    }
}
