//! The membership planner (`datastore::membership::plan`) over arbitrary
//! snapshots of the datastore: live records, durable records, claims,
//! tombstones and claim order drawn from a few names and CIDRs, so that
//! names, CIDRs and claims clash often.
//!
//! Invariants: the plan is the same for the same snapshot; no two routed
//! records overlap; the incumbent holds (every live or away-but-holding
//! record that is not routed overlaps a routed one that claimed earlier);
//! a routed record is live or unreachable, never gone; this node never
//! marks itself gone or releases itself; a live node is never marked gone or
//! released; tombstones written by nodes that are not a node's witnesses
//! change nothing about where it stands; and what the agent then routes
//! (`routable_nodes`) is a subset of the plan's routed records.
#![no_main]

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use podnet::datastore::{
    NodeRecord,
    membership::{NodeState, Policy, Snapshot, Tombstone, plan},
    routable_nodes,
};

const NAMES: [&str; 6] = ["me", "node1", "node2", "0evil", "node10", "zz"];
const NOW: u64 = 1_800_000_000;

fn name(b: u8) -> String {
    NAMES[usize::from(b) % NAMES.len()].to_owned()
}

/// A pod CIDR of a few sizes around 10.244.0.0/16, and once in a while
/// outside it.
fn cidr(b: u8, c: u8) -> Ipv4Net {
    let prefix = [24, 24, 24, 25, 23, 16, 0, 32][usize::from(c) % 8];
    Ipv4Net::new(Ipv4Addr::new(10, 244, b % 4, c), prefix)
        .expect("prefix <= 32")
        .trunc()
}

fn record(bytes: &[u8]) -> NodeRecord {
    NodeRecord {
        name: name(bytes[0]),
        node_ip: Ipv4Addr::new(192, 168, 100, bytes[1] % 5),
        pod_cidr: cidr(bytes[2], bytes[3]),
    }
}

fn snapshot(data: &[u8]) -> Snapshot {
    let mut s = Snapshot {
        revision: 1000,
        ..Snapshot::default()
    };
    for chunk in data.chunks_exact(5) {
        let r = record(&chunk[1..]);
        match chunk[0] % 7 {
            0 => {
                s.live.insert(r.name.clone(), r);
            }
            1 => {
                s.members.insert(r.name.clone(), r);
            }
            2 => {
                s.live.insert(r.name.clone(), r.clone());
                s.members.insert(r.name.clone(), r);
            }
            3 => {
                s.claims.insert(r.pod_cidr, r.name);
            }
            4 => {
                s.tombstones.entry(r.name).or_default().insert(
                    name(chunk[3]),
                    Tombstone {
                        since: NOW - u64::from(chunk[4]) * 60,
                        mod_revision: i64::from(chunk[3]),
                    },
                );
            }
            5 => {
                s.published.insert(r.name, i64::from(chunk[4]));
            }
            _ => {
                s.order.insert(r.name, i64::from(chunk[4]));
            }
        }
    }
    s
}

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fuzz_target!(|data: &[u8]| {
    let s = snapshot(data);
    let policy = Policy::new(Duration::from_mins(10), Duration::from_hours(1)).expect("policy");
    let p = plan(&s, policy, Some("me"), NOW);
    assert_eq!(p, plan(&s, policy, Some("me"), NOW), "deterministic");
    let order = |n: &str| s.order.get(n).copied().unwrap_or(i64::MAX);

    for (i, a) in p.routed.iter().enumerate() {
        for b in &p.routed[i + 1..] {
            assert!(!overlap(a.pod_cidr, b.pod_cidr), "{a:?} {b:?}");
            assert_ne!(a.name, b.name);
        }
    }
    for status in &p.nodes {
        let routed = p.routed.contains(&status.record);
        assert_eq!(routed, status.routed, "{status:?}");
        if routed {
            assert_ne!(status.state, NodeState::Gone, "{status:?}");
        }
    }
    // The incumbent holds: a live record left out overlaps a routed one
    // that claimed no later.
    for (name, record) in &s.live {
        if p.routed.contains(record) {
            continue;
        }
        assert!(
            p.routed.iter().any(|r| overlap(r.pod_cidr, record.pod_cidr)
                && (order(&r.name), r.name.as_str()) < (order(name), name.as_str())),
            "{record:?} not routed, routed: {:?}",
            p.routed
        );
    }
    for name in p.mark_gone.iter().chain(p.releases.iter().map(|r| &r.name)) {
        assert_ne!(name, "me");
        assert!(!s.live.contains_key(name), "{name} is live");
    }
    // Only witnesses' tombstones count: without the others', every node
    // stands where it stood.
    let mut witnessed = s.clone();
    for (node, theirs) in &mut witnessed.tombstones {
        let witnesses = s.witnesses(node);
        theirs.retain(|observer, _| witnesses.contains(&observer.as_str()));
    }
    let without = plan(&witnessed, policy, Some("me"), NOW);
    assert_eq!(p.routed, without.routed);
    assert_eq!(p.nodes, without.nodes);
    let own = s
        .live
        .get("me")
        .map_or_else(|| "10.244.200.0/24".parse().expect("cidr"), |r| r.pod_cidr);
    let (accepted, _) = routable_nodes(
        &p.routed,
        ("me", Ipv4Addr::new(192, 168, 100, 0)),
        own,
        "10.244.0.0/16".parse().expect("cidr"),
    );
    for a in &accepted {
        assert!(p.routed.contains(a));
    }
});
