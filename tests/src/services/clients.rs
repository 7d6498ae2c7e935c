//! What clients of the demo Service see, whoever translates it (kube-proxy's
//! rules, nftables, podnet's datapath): every query answered, by every
//! backend, which sees the client's own address.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use super::{ServiceSpec, tcp_query, udp_query};
use crate::lab::LabLayout;

/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries to see every backend: the Service picks one at random per
/// connection (`statistic mode random` / `numgen random`, podnet's
/// `bpf_get_prandom_u32`), so with two backends 24 tries miss one with
/// probability 2^-23.
pub const TRIES: usize = 24;

fn service(layout: &LabLayout) -> ServiceSpec {
    layout.service.clone().expect("the lab has its Service")
}

/// The name of the backend at `ip`.
pub fn backend_name(layout: &LabLayout, ip: Ipv4Addr) -> String {
    layout
        .pods
        .iter()
        .find(|p| p.ip == ip)
        .map_or_else(|| panic!("no pod has {ip}"), |p| p.name.clone())
}

/// The names of the Service's backend pods.
pub fn backend_names(layout: &LabLayout, svc: &ServiceSpec) -> BTreeSet<String> {
    svc.backends
        .iter()
        .map(|ip| backend_name(layout, *ip))
        .collect()
}

/// Queries `addr` from `netns` `TRIES` times (TCP or UDP); every query must
/// be answered. Returns which backends answered and the source address each
/// saw.
pub fn query_all(
    netns: &str,
    addr: SocketAddrV4,
    udp: bool,
) -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
    let mut seen: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for i in 0..TRIES {
        let answer = if udp {
            udp_query(netns, addr, QUERY_TIMEOUT)
        } else {
            tcp_query(netns, addr, QUERY_TIMEOUT)
        };
        let (backend, seen_as) = answer.unwrap_or_else(|e| {
            panic!(
                "{} query {i} from {netns} to {addr}: {e:#}",
                if udp { "UDP" } else { "TCP" }
            )
        });
        seen.entry(backend).or_default().insert(*seen_as.ip());
    }
    seen
}

/// Every pod that is not a backend reaches the Service over TCP and UDP,
/// is answered by both backends (one on its node, one on the other), and
/// the backends see the pod's own address (pod traffic to a ClusterIP is
/// DNATed, never masqueraded).
pub fn clients_reach_the_service(layout: &LabLayout) {
    let svc = service(layout);
    let backends = backend_names(layout, &svc);
    assert_eq!(backends.len(), 2, "two backends on two nodes");
    for client in layout.pods.iter().filter(|p| !svc.backends.contains(&p.ip)) {
        for (udp, port) in [(false, svc.tcp_port), (true, svc.udp_port)] {
            let seen = query_all(&client.netns, SocketAddrV4::new(svc.cluster_ip, port), udp);
            let answered: BTreeSet<String> = seen.keys().cloned().collect();
            assert_eq!(
                answered,
                backends,
                "{} ({}) reached both backends over {}",
                client.name,
                client.node,
                if udp { "UDP" } else { "TCP" }
            );
            for (backend, sources) in &seen {
                assert_eq!(
                    sources,
                    &BTreeSet::from([client.ip]),
                    "{backend} saw {} as its own address",
                    client.name
                );
            }
        }
    }
}

/// Waits (5 s at most) until `addr` answers from `netns`: a Service the
/// datapath translates reaches the maps within a second of its apply.
pub fn wait_for_the_service(netns: &str, addr: SocketAddrV4) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tcp_query(netns, addr, Duration::from_millis(500)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never answered from {netns}"
        );
    }
}
