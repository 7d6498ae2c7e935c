//! Node records as the datastores hand them over: a nodes file's contents
//! (`datastore::file::parse_nodes`) or an etcd value under
//! `/podnet/nodes/<name>` (`datastore::etcd::parse_record`), then the checks
//! every agent makes before routing anything (`datastore::routable_nodes`).
//!
//! Input: the first byte picks the form; for etcd, the key's node name is
//! the first line and the value the rest.
//!
//! Invariants: a parsed record encodes and parses back to itself (and an
//! etcd record names its key's node); every record is either accepted or
//! refused (this node's own aside); accepted records are inside the cluster
//! CIDR, off this node's CIDR, pairwise apart (CIDR, name, node IP), with a
//! node IP that is a unicast address outside the pod network; and each
//! refused record that passed the per-record checks clashes with a record
//! before it that passed them too (the earlier holds).
#![no_main]

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use podnet::datastore::{
    NodeRecord, etcd::parse_record, file::parse_nodes, node_ip_problem, routable_nodes,
};

const ME: &str = "me";

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let nodes = if form % 2 == 0 {
        let Ok(nodes) = parse_nodes(rest) else {
            return;
        };
        let text = serde_json::to_vec(&serde_json::json!({ "nodes": nodes })).expect("encodes");
        assert_eq!(parse_nodes(&text).expect("parses back"), nodes);
        nodes
    } else {
        let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let Ok(name) = std::str::from_utf8(&rest[..split]) else {
            return;
        };
        let value = rest.get(split + 1..).unwrap_or_default();
        let Some(record) = parse_record(name, value) else {
            return;
        };
        assert_eq!(record.name, name);
        let text = serde_json::to_vec(&record).expect("encodes");
        assert_eq!(parse_record(name, &text), Some(record.clone()));
        vec![record]
    };
    for (own, cluster) in [
        ("10.244.0.0/24", "10.244.0.0/16"),
        ("10.0.0.0/8", "0.0.0.0/0"),
        ("192.168.0.0/30", "192.168.0.0/24"),
    ] {
        let own: Ipv4Net = own.parse().expect("cidr");
        let cluster: Ipv4Net = cluster.parse().expect("cidr");
        check(&nodes, own, cluster);
    }
});

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check(nodes: &[NodeRecord], own: Ipv4Net, cluster: Ipv4Net) {
    let my_ip = Ipv4Addr::new(192, 168, 100, 11);
    let (accepted, refused) = routable_nodes(nodes, (ME, my_ip), own, cluster);
    let remotes = nodes
        .iter()
        .filter(|n| n.name != ME && n.node_ip != my_ip)
        .count();
    assert_eq!(accepted.len() + refused.len(), remotes);
    for (i, a) in accepted.iter().enumerate() {
        assert!(cluster.contains(&a.pod_cidr), "{a:?}");
        assert!(!overlap(a.pod_cidr, own), "{a:?}");
        assert_eq!(node_ip_problem(a.node_ip), None, "{a:?}");
        assert!(!cluster.contains(&a.node_ip), "{a:?}");
        assert!(a.name != ME && a.node_ip != my_ip);
        for b in &accepted[i + 1..] {
            assert!(!overlap(a.pod_cidr, b.pod_cidr), "{a:?} {b:?}");
            assert!(a.name != b.name && a.node_ip != b.node_ip, "{a:?} {b:?}");
        }
    }
    // The earlier holds: a record refused for a clash clashes with one
    // that comes before it in the datastore's order and passed the
    // per-record checks itself (accepted, or refused for a clash in turn:
    // two records of one name are both refused when the first lost its
    // CIDR to another). The last copy of the record is the one to place:
    // of two identical records the first is accepted and the second
    // refused.
    let own_checks_fail = |r: &NodeRecord| {
        !cluster.contains(&r.pod_cidr)
            || overlap(r.pod_cidr, own)
            || node_ip_problem(r.node_ip).is_some()
            || cluster.contains(&r.node_ip)
    };
    for (record, why) in &refused {
        let position = nodes
            .iter()
            .rposition(|n| n == record)
            .expect("from the input");
        let clashes_earlier = nodes[..position].iter().any(|a| {
            a.name != ME
                && a.node_ip != my_ip
                && !own_checks_fail(a)
                && (a.name == record.name
                    || a.node_ip == record.node_ip
                    || overlap(a.pod_cidr, record.pod_cidr))
        });
        let own_checks_fail = own_checks_fail(record);
        assert!(clashes_earlier || own_checks_fail, "{record:?}: {why}");
    }
}
