//! The Services sync's order and its handling of a full map, on fake maps
//! that check after every write what the datapath relies on: an entry
//! never counts a slot that is not there, and every counted backend's
//! port bit is set.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use podnet_common::ServiceEntry;

use super::{
    ServicesState, empty_maps,
    sync::{Applied, PortLinger, ServiceMaps, apply_plan},
};
use crate::{
    datapath::DatapathError,
    services::{BackendAddress, Frontend, FrontendIds, FrontendPlan, ServiceName, ServicePlan},
};

/// What a sync did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Port word index set.
    Port(u32),
    /// Slot written / removed: (id, slot).
    Slot(u32, u32),
    Unslot(u32, u32),
    /// Entry written with this count / removed.
    Entry(u32),
    Unentry,
    /// Connections of this many departed backends forgotten.
    Forget(usize),
}

struct FakeMaps {
    held: Applied,
    ops: Vec<Op>,
    frontend_capacity: usize,
    backend_capacity: usize,
    /// The bitmap refuses every write (it never does in a kernel).
    ports_broken: bool,
    /// (frontend id, backend) whose connections were forgotten.
    forgotten: Vec<(u32, BackendAddress)>,
}

impl Default for FakeMaps {
    fn default() -> Self {
        Self {
            held: Applied::default(),
            ops: Vec::new(),
            frontend_capacity: 64,
            backend_capacity: 64,
            ports_broken: false,
            forgotten: Vec::new(),
        }
    }
}

fn full(name: &'static str) -> DatapathError {
    DatapathError::Map {
        name,
        action: "inserting".to_owned(),
        source: Box::new(aya::maps::MapError::OutOfBounds {
            index: 0,
            max_entries: 0,
        }),
    }
}

impl FakeMaps {
    /// What the datapath relies on, at every moment.
    fn check(&self) {
        for (frontend, entry) in &self.held.frontends {
            for slot in 1..=entry.backends {
                let backend = self
                    .held
                    .backends
                    .get(&(entry.id, slot))
                    .unwrap_or_else(|| {
                        panic!(
                            "{frontend} counts {} slots, slot {slot} is missing (after {:?})",
                            entry.backends, self.ops
                        )
                    });
                assert!(
                    crate::services::port_set(&self.held.ports, backend.port),
                    "{frontend} slot {slot} ({backend}) without its port bit (after {:?})",
                    self.ops
                );
            }
        }
    }

    fn did(&mut self, op: Op) {
        self.ops.push(op);
        self.check();
    }
}

impl ServiceMaps for FakeMaps {
    fn frontends(&mut self) -> Result<BTreeMap<Frontend, ServiceEntry>, DatapathError> {
        Ok(self.held.frontends.clone())
    }
    fn backends(&mut self) -> Result<BTreeMap<(u32, u32), BackendAddress>, DatapathError> {
        Ok(self.held.backends.clone())
    }
    fn port_words(&mut self) -> Result<Vec<u64>, DatapathError> {
        Ok(self.held.ports.clone())
    }
    fn upsert_frontend(
        &mut self,
        frontend: Frontend,
        entry: ServiceEntry,
    ) -> Result<(), DatapathError> {
        if !self.held.frontends.contains_key(&frontend)
            && self.held.frontends.len() >= self.frontend_capacity
        {
            return Err(full("podnet_svc"));
        }
        self.held.frontends.insert(frontend, entry);
        self.did(Op::Entry(entry.backends));
        Ok(())
    }
    fn remove_frontend(&mut self, frontend: Frontend) -> Result<(), DatapathError> {
        self.held.frontends.remove(&frontend);
        self.did(Op::Unentry);
        Ok(())
    }
    fn upsert_backend(
        &mut self,
        id: u32,
        slot: u32,
        backend: BackendAddress,
    ) -> Result<(), DatapathError> {
        if !self.held.backends.contains_key(&(id, slot))
            && self.held.backends.len() >= self.backend_capacity
        {
            return Err(full("podnet_svcbe"));
        }
        self.held.backends.insert((id, slot), backend);
        self.did(Op::Slot(id, slot));
        Ok(())
    }
    fn remove_backend(&mut self, id: u32, slot: u32) -> Result<(), DatapathError> {
        self.held.backends.remove(&(id, slot));
        self.did(Op::Unslot(id, slot));
        Ok(())
    }
    fn set_port_word(&mut self, index: u32, word: u64) -> Result<(), DatapathError> {
        if self.ports_broken {
            return Err(full("podnet_svcport"));
        }
        self.held.ports[index as usize] = word;
        self.did(Op::Port(index));
        Ok(())
    }
    fn forget_connections(
        &mut self,
        departed: &BTreeSet<(u32, BackendAddress)>,
    ) -> Result<usize, DatapathError> {
        self.forgotten.extend(departed.iter().copied());
        self.did(Op::Forget(departed.len()));
        Ok(departed.len())
    }
}

const WEB: Frontend = Frontend {
    address: Ipv4Addr::new(10, 96, 0, 10),
    port: 80,
    protocol: 6,
};
const DNS: Frontend = Frontend {
    address: Ipv4Addr::new(10, 96, 0, 53),
    port: 53,
    protocol: 17,
};

fn backend(last: u8, port: u16) -> BackendAddress {
    BackendAddress {
        address: Ipv4Addr::new(10, 244, 0, last),
        port,
    }
}

fn plan(frontends: &[(Frontend, Vec<BackendAddress>)]) -> ServicePlan {
    ServicePlan {
        frontends: frontends
            .iter()
            .map(|(f, backends)| {
                (
                    *f,
                    FrontendPlan {
                        service: ServiceName {
                            namespace: "x".into(),
                            name: f.port.to_string(),
                        },
                        port_name: String::new(),
                        backends: backends.clone(),
                        affinity_timeout_s: 0,
                        node_port: false,
                    },
                )
            })
            .collect(),
        conflicts: Vec::new(),
    }
}

/// One sync as the agent's loop does it: ids assigned, the plan applied,
/// the ids of what is gone released.
fn sync(
    maps: &mut FakeMaps,
    ids: &mut FrontendIds,
    current: Applied,
    plan: &ServicePlan,
) -> (Applied, super::sync::SyncReport) {
    for &f in plan.frontends.keys() {
        ids.assign(f);
    }
    let (applied, report) = apply_plan(maps, current, plan, ids.all(), &BTreeSet::new());
    ids.retain(|f| plan.frontends.contains_key(f) || applied.frontends.contains_key(f));
    (applied, report)
}

/// The word index of `port`.
fn word(port: u16) -> u32 {
    podnet_common::service::service_port_bit(port).0
}

#[test]
fn a_new_frontend_gets_port_bits_then_slots_then_its_entry() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let current = Applied::read(&mut maps).expect("read");
    let wanted = plan(&[(WEB, vec![backend(1, 8080), backend(2, 8080)])]);
    let (applied, report) = sync(&mut maps, &mut ids, current, &wanted);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [
            Op::Port(word(8080)),
            Op::Slot(1, 1),
            Op::Slot(1, 2),
            Op::Entry(2)
        ]
    );
    assert_eq!(
        applied, maps.held,
        "the sync's account is what the maps hold"
    );
    maps.ops.clear();
    let (_, report) = sync(&mut maps, &mut ids, applied, &wanted);
    assert!(maps.ops.is_empty(), "nothing changed: {:?}", maps.ops);
    assert_eq!((report.written, report.removed), (0, 0));
}

#[test]
fn growing_writes_the_slots_before_the_count() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let (applied, _) = sync(
        &mut maps,
        &mut ids,
        Applied::default(),
        &plan(&[(WEB, vec![backend(1, 8080)])]),
    );
    maps.ops.clear();
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        applied,
        &plan(&[(
            WEB,
            vec![backend(1, 8080), backend(2, 8080), backend(3, 9090)],
        )]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [
            Op::Port(word(9090)),
            Op::Slot(1, 2),
            Op::Slot(1, 3),
            Op::Entry(3)
        ]
    );
    assert_eq!(applied.frontends[&WEB].backends, 3);
}

#[test]
fn shrinking_lowers_the_count_before_the_slots_go_and_clears_ports_last() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let (applied, _) = sync(
        &mut maps,
        &mut ids,
        Applied::default(),
        &plan(&[(
            WEB,
            vec![backend(1, 8080), backend(2, 8080), backend(3, 9090)],
        )]),
    );
    maps.ops.clear();
    // Backend 1 went: 2 moves into slot 1, 3 into slot 2; slot 3 goes.
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        applied,
        &plan(&[(WEB, vec![backend(2, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [
            Op::Slot(1, 1),
            Op::Entry(1),
            Op::Unslot(1, 2),
            Op::Unslot(1, 3),
            Op::Port(word(9090)),
        ]
    );
    assert_eq!(applied, maps.held);
    assert!(!crate::services::port_set(&applied.ports, 9090));
    assert!(crate::services::port_set(&applied.ports, 8080));
}

#[test]
fn a_removed_frontend_loses_its_entry_before_its_slots() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let both = plan(&[
        (WEB, vec![backend(1, 8080)]),
        (DNS, vec![backend(2, 5353), backend(3, 5353)]),
    ]);
    let (applied, _) = sync(&mut maps, &mut ids, Applied::default(), &both);
    let dns_id = ids.get(&DNS).expect("an id");
    maps.ops.clear();
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        applied,
        &plan(&[(WEB, vec![backend(1, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [
            Op::Unentry,
            Op::Unslot(dns_id, 1),
            Op::Unslot(dns_id, 2),
            Op::Port(word(5353)),
            // A UDP frontend's backends left with it: their connections
            // go last.
            Op::Forget(2),
        ]
    );
    assert_eq!(ids.get(&DNS), None, "its id is released");
    assert_eq!(applied.backends.len(), 1);
}

#[test]
fn a_frontend_without_backends_has_an_entry_with_none() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let (applied, _) = sync(
        &mut maps,
        &mut ids,
        Applied::default(),
        &plan(&[(WEB, vec![backend(1, 8080)])]),
    );
    maps.ops.clear();
    let (applied, _) = sync(&mut maps, &mut ids, applied, &plan(&[(WEB, vec![])]));
    assert_eq!(
        maps.ops,
        [Op::Entry(0), Op::Unslot(1, 1), Op::Port(word(8080))]
    );
    assert_eq!(applied.frontends[&WEB].backends, 0);
}

#[test]
fn a_restarted_agent_takes_over_the_pins_and_writes_only_the_difference() {
    // The previous agent's maps: WEB (id 5) with two slots, a slot of a
    // frontend whose entry it removed before it stopped (id 9).
    let mut maps = FakeMaps::default();
    maps.held.frontends.insert(
        WEB,
        ServiceEntry {
            id: 5,
            backends: 2,
            ..ServiceEntry::default()
        },
    );
    maps.held.backends.insert((5, 1), backend(1, 8080));
    maps.held.backends.insert((5, 2), backend(2, 8080));
    maps.held.backends.insert((9, 1), backend(7, 7070));
    maps.held.ports = crate::services::port_words(&[8080, 7070].into());
    maps.check();
    // What the agent's loop does on its first sync.
    let current = Applied::read(&mut maps).expect("read");
    let mut ids = FrontendIds::default();
    ids.seed(current.frontends.iter().map(|(&f, e)| (f, e.id)));
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        current,
        &plan(&[(WEB, vec![backend(1, 8080), backend(3, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(ids.get(&WEB), Some(5), "the id the pins give");
    assert_eq!(
        maps.ops,
        [Op::Slot(5, 2), Op::Unslot(9, 1), Op::Port(word(7070))],
        "one slot changed, the orphan slot and its port gone; the entry as it was"
    );
    assert_eq!(applied, maps.held);
}

#[test]
fn a_full_slot_map_is_counted_and_the_count_stays_within_the_slots() {
    let mut maps = FakeMaps {
        backend_capacity: 2,
        ..FakeMaps::default()
    };
    let mut ids = FrontendIds::default();
    let wanted = plan(&[(
        WEB,
        vec![backend(1, 8080), backend(2, 8080), backend(3, 8080)],
    )]);
    let (applied, report) = sync(&mut maps, &mut ids, Applied::default(), &wanted);
    assert_eq!(report.refused, 1);
    assert!(report.incomplete.contains(&WEB));
    assert!(
        report.errors.iter().any(|e| e.contains("podnet_svcbe")),
        "{report:?}"
    );
    assert_eq!(
        maps.held.frontends[&WEB].backends, 2,
        "two backends of three, never a slot that is not there"
    );
    // Room again: the next sync completes it.
    maps.backend_capacity = 64;
    let (_, report) = sync(&mut maps, &mut ids, applied, &wanted);
    assert_eq!(report.refused, 0);
    assert!(report.incomplete.is_empty());
    assert_eq!(maps.held.frontends[&WEB].backends, 3);
}

#[test]
fn a_full_frontend_map_is_counted_and_tried_again() {
    let mut maps = FakeMaps {
        frontend_capacity: 1,
        ..FakeMaps::default()
    };
    let mut ids = FrontendIds::default();
    let wanted = plan(&[(WEB, vec![backend(1, 8080)]), (DNS, vec![backend(2, 5353)])]);
    let (applied, report) = sync(&mut maps, &mut ids, Applied::default(), &wanted);
    assert_eq!(report.refused, 1);
    assert_eq!(report.incomplete.len(), 1);
    assert_eq!(maps.held.frontends.len(), 1);
    assert_eq!(
        maps.held.backends.len(),
        2,
        "the refused frontend's slots stay for the next try"
    );
    maps.frontend_capacity = 64;
    let (_, report) = sync(&mut maps, &mut ids, applied, &wanted);
    assert_eq!(report.refused, 0);
    assert_eq!(maps.held.frontends.len(), 2);
}

#[test]
fn a_frontend_given_another_id_moves_its_slots() {
    // A pinned entry with an id the allocator gives elsewhere (a damaged
    // map): the frontend is rewritten under its new id and the old slots go.
    let mut maps = FakeMaps::default();
    maps.held.frontends.insert(
        WEB,
        ServiceEntry {
            id: 3,
            backends: 1,
            ..ServiceEntry::default()
        },
    );
    maps.held.backends.insert((3, 1), backend(1, 8080));
    maps.held.ports = crate::services::port_words(&[8080].into());
    let current = Applied::read(&mut maps).expect("read");
    let mut ids = FrontendIds::default();
    ids.seed([(DNS, 3)]);
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        current,
        &plan(&[(WEB, vec![backend(1, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    let id = ids.get(&WEB).expect("an id");
    assert_ne!(id, 3);
    assert_eq!(maps.ops, [Op::Slot(id, 1), Op::Entry(1), Op::Unslot(3, 1)]);
    assert_eq!(applied, maps.held);
}

#[test]
fn kube_proxy_mode_empties_what_a_bpf_agent_left() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let (_, _) = sync(
        &mut maps,
        &mut ids,
        Applied::default(),
        &plan(&[(WEB, vec![backend(1, 8080)])]),
    );
    maps.ops.clear();
    let report = empty_maps(&mut maps)
        .expect("read")
        .expect("something to empty");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [Op::Unentry, Op::Unslot(1, 1), Op::Port(word(8080))]
    );
    assert_eq!(maps.held, Applied::default());
    maps.ops.clear();
    assert!(empty_maps(&mut maps).expect("read").is_none());
    assert!(maps.ops.is_empty());
}

#[test]
fn the_answer_lists_each_service_with_its_frontends() {
    let wanted = plan(&[
        (WEB, vec![backend(1, 8080), backend(2, 8080)]),
        (DNS, vec![]),
    ]);
    let state = ServicesState {
        ids: BTreeMap::from([(WEB, 4)]),
        incomplete: [WEB].into(),
        plan: Some(std::sync::Arc::new(wanted)),
        ..ServicesState::default()
    };
    let answer = state.answer();
    // plan() names each Service after its port: x/53, then x/80.
    let names: Vec<String> = answer
        .services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    assert_eq!(names, ["x/53", "x/80"]);
    let web = &answer.services[1].frontends[0];
    assert_eq!(
        (web.id, web.protocol.as_str(), web.in_datapath),
        (Some(4), "tcp", false)
    );
    assert_eq!(web.backends, ["10.244.0.1:8080", "10.244.0.2:8080"]);
    let dns = &answer.services[0].frontends[0];
    assert_eq!((dns.id, dns.in_datapath), (None, false));
}

#[test]
fn no_backend_is_written_before_its_port_bit() {
    let mut maps = FakeMaps {
        ports_broken: true,
        ..FakeMaps::default()
    };
    let mut ids = FrontendIds::default();
    let wanted = plan(&[(WEB, vec![backend(1, 8080)])]);
    let (applied, report) = sync(&mut maps, &mut ids, Applied::default(), &wanted);
    assert!(!report.errors.is_empty());
    assert!(maps.ops.is_empty(), "{:?}", maps.ops);
    maps.ports_broken = false;
    let (_, report) = sync(&mut maps, &mut ids, applied, &wanted);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(maps.held.frontends[&WEB].backends, 1);
}

#[test]
fn a_gone_backends_port_bit_lingers_for_its_connections() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let (applied, _) = sync(
        &mut maps,
        &mut ids,
        Applied::default(),
        &plan(&[(WEB, vec![backend(1, 8080), backend(2, 9090)])]),
    );
    let linger = Duration::from_mins(1);
    let mut lingering = PortLinger::default();
    let t0 = Instant::now();
    // 9090's only backend goes: its bit stays while it lingers.
    let wanted = plan(&[(WEB, vec![backend(1, 8080)])]);
    let keep = lingering.update(&applied.ports, &wanted.backend_ports(), t0, linger);
    assert_eq!(keep, BTreeSet::from([9090]));
    maps.ops.clear();
    let (applied, _) = apply_plan(&mut maps, applied, &wanted, ids.all(), &keep);
    assert_eq!(
        maps.ops,
        [Op::Entry(1), Op::Unslot(1, 2)],
        "no port cleared"
    );
    assert!(crate::services::port_set(&applied.ports, 9090));
    assert!(!lingering.due(t0 + Duration::from_secs(59), linger));
    // Its time is up: the next sync clears it.
    let later = t0 + linger;
    assert!(lingering.due(later, linger));
    let keep = lingering.update(&applied.ports, &wanted.backend_ports(), later, linger);
    assert!(keep.is_empty());
    maps.ops.clear();
    let (applied, _) = apply_plan(&mut maps, applied, &wanted, ids.all(), &keep);
    assert_eq!(maps.ops, [Op::Port(word(9090))]);
    assert!(!crate::services::port_set(&applied.ports, 9090));
    assert!(!lingering.due(later, linger));
    // A port served again stops lingering.
    let mut lingering = PortLinger::default();
    let both = plan(&[(WEB, vec![backend(1, 8080), backend(2, 9090)])]);
    let words = crate::services::port_words(&BTreeSet::from([8080, 9090]));
    assert_eq!(
        lingering.update(&words, &BTreeSet::from([8080]), t0, linger),
        BTreeSet::from([9090])
    );
    assert!(
        lingering
            .update(&words, &both.backend_ports(), t0, linger)
            .is_empty()
    );
    assert!(!lingering.due(t0 + linger, linger));
}

#[test]
fn a_udp_backend_that_leaves_loses_its_connections_after_its_slots() {
    let mut maps = FakeMaps::default();
    let mut ids = FrontendIds::default();
    let both = plan(&[
        (DNS, vec![backend(1, 5353), backend(2, 5353)]),
        (WEB, vec![backend(1, 8080), backend(2, 8080)]),
    ]);
    let (applied, _) = sync(&mut maps, &mut ids, Applied::default(), &both);
    maps.ops.clear();
    // Backend 1 leaves both frontends: its UDP connections are dropped,
    // once no slot names it; its TCP ones stay (a terminating backend
    // still serves them).
    let (applied, report) = sync(
        &mut maps,
        &mut ids,
        applied,
        &plan(&[(DNS, vec![backend(2, 5353)]), (WEB, vec![backend(2, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    let dns_id = applied.frontends[&DNS].id;
    assert_eq!(maps.forgotten, [(dns_id, backend(1, 5353))]);
    assert_eq!(report.forgotten, 1);
    let forget = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::Forget(_)))
        .expect("forgotten");
    assert!(
        maps.ops[..forget]
            .iter()
            .any(|op| matches!(op, Op::Unslot(id, _) if *id == dns_id)),
        "the slots change before the connections go: {:?}",
        maps.ops
    );
    // The whole UDP frontend goes: its last backend's connections too.
    maps.forgotten.clear();
    let (_, report) = sync(
        &mut maps,
        &mut ids,
        applied,
        &plan(&[(WEB, vec![backend(2, 8080)])]),
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(maps.forgotten, [(dns_id, backend(2, 5353))]);
    // Nothing leaves: nothing is forgotten.
    maps.forgotten.clear();
    let current = maps.held.clone();
    let _ = sync(
        &mut maps,
        &mut ids,
        current,
        &plan(&[(WEB, vec![backend(2, 8080)])]),
    );
    assert!(maps.forgotten.is_empty());
}
