//! The policy sync's order and its handling of a full map, on fake maps.

use std::{collections::BTreeMap, net::Ipv4Addr};

use podnet_common::{
    PolicyCidrKey, PolicyKey, PolicyRule,
    endpoint::{ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS},
    policy::{DIRECTION_INGRESS, IDENTITY_FIRST_POD, POLICY_KEY_BITS},
};

use super::{
    published_by_owner,
    sync::{Applied, PolicyMaps, apply_plan},
};
use crate::{datapath::DatapathError, policy::PolicyPlan};

/// What a sync did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Rule(bool),
    Cidr(bool),
    Identity(bool),
    Flags(Ipv4Addr, u32),
}

#[derive(Default)]
struct FakeMaps {
    held: Applied,
    ops: Vec<Op>,
    /// The rules trie takes no more than this many entries.
    rule_capacity: usize,
}

fn full() -> DatapathError {
    DatapathError::Map {
        name: "podnet_policy",
        action: "inserting".to_owned(),
        source: Box::new(aya::maps::MapError::OutOfBounds {
            index: 0,
            max_entries: 0,
        }),
    }
}

impl PolicyMaps for FakeMaps {
    fn identities(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        Ok(self.held.identities.clone())
    }
    fn rules(&mut self) -> Result<BTreeMap<(u32, PolicyKey), PolicyRule>, DatapathError> {
        Ok(self.held.rules.clone())
    }
    fn cidrs(&mut self) -> Result<BTreeMap<(u32, PolicyCidrKey), u32>, DatapathError> {
        Ok(self.held.cidrs.clone())
    }
    fn endpoint_flags(&mut self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        Ok(self.held.endpoints.clone())
    }
    fn upsert_identity(&mut self, ip: Ipv4Addr, identity: u32) -> Result<(), DatapathError> {
        self.ops.push(Op::Identity(true));
        self.held.identities.insert(ip, identity);
        Ok(())
    }
    fn remove_identity(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.ops.push(Op::Identity(false));
        self.held.identities.remove(&ip);
        Ok(())
    }
    fn upsert_rule(
        &mut self,
        prefix: u32,
        key: PolicyKey,
        rule: PolicyRule,
    ) -> Result<(), DatapathError> {
        if self.held.rules.len() >= self.rule_capacity {
            return Err(full());
        }
        self.ops.push(Op::Rule(true));
        self.held.rules.insert((prefix, key), rule);
        Ok(())
    }
    fn remove_rule(&mut self, prefix: u32, key: PolicyKey) -> Result<(), DatapathError> {
        self.ops.push(Op::Rule(false));
        self.held.rules.remove(&(prefix, key));
        Ok(())
    }
    fn upsert_cidr(
        &mut self,
        prefix: u32,
        key: PolicyCidrKey,
        set: u32,
    ) -> Result<(), DatapathError> {
        self.ops.push(Op::Cidr(true));
        self.held.cidrs.insert((prefix, key), set);
        Ok(())
    }
    fn remove_cidr(&mut self, prefix: u32, key: PolicyCidrKey) -> Result<(), DatapathError> {
        self.ops.push(Op::Cidr(false));
        self.held.cidrs.remove(&(prefix, key));
        Ok(())
    }
    fn set_flags(&mut self, ip: Ipv4Addr, flags: u32) -> Result<bool, DatapathError> {
        if !self.held.endpoints.contains_key(&ip) {
            return Ok(false);
        }
        self.ops.push(Op::Flags(ip, flags));
        self.held.endpoints.insert(ip, flags);
        Ok(true)
    }
}

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);

fn rule_key(identity: u32, port: u16) -> (u32, PolicyKey) {
    (
        POLICY_KEY_BITS,
        PolicyKey {
            endpoint: u32::from_ne_bytes(POD.octets()),
            identity,
            direction: DIRECTION_INGRESS,
            protocol: 6,
            port: port.to_be(),
        },
    )
}

/// A plan that isolates POD for ingress and allows PEER's identity on
/// `port`.
fn plan(identity: u32, port: u16) -> PolicyPlan {
    PolicyPlan {
        identities: BTreeMap::from([(PEER, identity)]),
        endpoints: BTreeMap::from([(POD, ENDPOINT_F_POLICY_INGRESS)]),
        rules: BTreeMap::from([(
            rule_key(identity, port),
            PolicyRule {
                rule: 1,
                reserved: 0,
            },
        )]),
        ..PolicyPlan::default()
    }
}

fn maps_with_pod() -> FakeMaps {
    FakeMaps {
        held: Applied {
            endpoints: BTreeMap::from([(POD, 0)]),
            ..Applied::default()
        },
        rule_capacity: 16,
        ..FakeMaps::default()
    }
}

#[test]
fn a_pod_is_isolated_only_after_its_rules_and_peers_are_in() {
    let mut maps = maps_with_pod();
    let current = Applied::read(&mut maps).expect("read");
    let (applied, report) = apply_plan(&mut maps, current, &plan(IDENTITY_FIRST_POD, 80));
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [
            Op::Rule(true),
            Op::Identity(true),
            Op::Flags(POD, ENDPOINT_F_POLICY_INGRESS)
        ]
    );
    assert_eq!(
        applied, maps.held,
        "the sync's account is what the maps hold"
    );
}

#[test]
fn a_change_adds_before_it_removes_and_a_repeat_writes_nothing() {
    let mut maps = maps_with_pod();
    let current = Applied::read(&mut maps).expect("read");
    let (applied, _) = apply_plan(&mut maps, current, &plan(IDENTITY_FIRST_POD, 80));
    maps.ops.clear();
    // The peer moves to another identity (a label change) allowed on 81.
    let (applied, report) = apply_plan(&mut maps, applied, &plan(IDENTITY_FIRST_POD + 1, 81));
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [Op::Rule(true), Op::Identity(true), Op::Rule(false)],
        "the new rule and the peer's new identity before the old rule goes"
    );
    maps.ops.clear();
    let (_, report) = apply_plan(&mut maps, applied, &plan(IDENTITY_FIRST_POD + 1, 81));
    assert!(maps.ops.is_empty(), "nothing changed: {:?}", maps.ops);
    assert_eq!((report.written, report.removed), (0, 0));
}

#[test]
fn unselecting_a_pod_opens_it_before_its_rules_go() {
    let mut maps = maps_with_pod();
    let current = Applied::read(&mut maps).expect("read");
    let (applied, _) = apply_plan(&mut maps, current, &plan(IDENTITY_FIRST_POD, 80));
    maps.ops.clear();
    let open = PolicyPlan {
        endpoints: BTreeMap::from([(POD, 0)]),
        ..PolicyPlan::default()
    };
    let (applied, report) = apply_plan(&mut maps, applied, &open);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        maps.ops,
        [Op::Flags(POD, 0), Op::Identity(false), Op::Rule(false)]
    );
    assert!(applied.rules.is_empty() && applied.identities.is_empty());
}

#[test]
fn a_full_map_is_an_error_and_the_pod_stays_isolated() {
    let mut maps = maps_with_pod();
    maps.rule_capacity = 0;
    let current = Applied::read(&mut maps).expect("read");
    let (applied, report) = apply_plan(&mut maps, current, &plan(IDENTITY_FIRST_POD, 80));
    assert_eq!(report.refused, 1);
    assert!(!report.errors.is_empty());
    assert_eq!(
        maps.held.endpoints[&POD], ENDPOINT_F_POLICY_INGRESS,
        "the pod denies what the refused rule would allow: never a silent allow"
    );
    assert!(
        applied.rules.is_empty(),
        "the refused rule is tried again next time"
    );
    // Room again: the next sync writes it.
    maps.rule_capacity = 16;
    let (_, report) = apply_plan(&mut maps, applied, &plan(IDENTITY_FIRST_POD, 80));
    assert_eq!(report.refused, 0);
    assert_eq!(maps.held.rules.len(), 1);
}

#[test]
fn an_endpoint_added_again_gets_its_bits_back() {
    let mut maps = maps_with_pod();
    let current = Applied::read(&mut maps).expect("read");
    let (applied, _) = apply_plan(&mut maps, current, &plan(IDENTITY_FIRST_POD, 80));
    // A CNI ADD rewrote the entry for a new pod on the address: no bits.
    maps.held.endpoints.insert(POD, 0);
    maps.ops.clear();
    let (_, _) = apply_plan(&mut maps, applied, &plan(IDENTITY_FIRST_POD, 80));
    assert_eq!(maps.ops, [Op::Flags(POD, ENDPOINT_F_POLICY_INGRESS)]);
}

#[test]
fn egress_bits_are_written_like_ingress_bits() {
    let mut maps = maps_with_pod();
    let current = Applied::read(&mut maps).expect("read");
    let both = PolicyPlan {
        endpoints: BTreeMap::from([(POD, ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)]),
        ..PolicyPlan::default()
    };
    let _ = apply_plan(&mut maps, current, &both);
    assert_eq!(
        maps.held.endpoints[&POD],
        ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS
    );
}

#[test]
fn a_node_speaks_only_for_addresses_of_its_own_pod_cidr() {
    use crate::model::cluster::PodEndpointRecord;
    let cidrs = BTreeMap::from([
        ("node1".to_owned(), "10.244.0.0/24".parse().expect("CIDR")),
        ("node2".to_owned(), "10.244.1.0/24".parse().expect("CIDR")),
    ]);
    let record = |node: &str, ip: [u8; 4]| PodEndpointRecord {
        node: node.into(),
        namespace: "x".into(),
        name: "a".into(),
        ip: ip.into(),
    };
    assert!(published_by_owner(
        &cidrs,
        &record("node1", [10, 244, 0, 7])
    ));
    assert!(
        !published_by_owner(&cidrs, &record("node1", [10, 244, 1, 7])),
        "node1 naming one of node2's addresses"
    );
    assert!(
        !published_by_owner(&cidrs, &record("node3", [10, 244, 0, 7])),
        "a node that is not routed (gone, or never joined)"
    );
}
