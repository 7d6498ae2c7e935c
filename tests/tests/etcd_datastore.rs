//! The etcd datastore: CIDR claims under races; a node whose lease expires
//! is unreachable (routes kept for the grace period, no packet lost, no
//! flap when it returns), gone after the grace period (routes removed), and
//! its claim released after the release delay, safely under races.
//!
//! Tests print `FIGURE` lines with what they measured (RELIABILITY.md).

use std::{
    collections::HashSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::Ipv4Net;
use podnet::{
    api::{Client, Request},
    datastore::{
        DatastoreError, JoinRequest, NodeRecord,
        etcd::{EtcdAccess, EtcdDatastore},
        membership::{self, NodeState, Policy, Release},
    },
};
use podnet_tests::{
    faults::{self, Converged, Sampler},
    lab::{self, FABRIC_HOST, LabDatastore, LabGuard, LabNode, LabOptions},
    ping::Pinger,
    privileged, wait_up_to,
};

fn remote_nodes(node: &LabNode) -> Vec<String> {
    let nodes: Vec<NodeRecord> = Client::new(&node.agent_socket)
        .call(&Request::Nodes)
        .expect("nodes");
    nodes.into_iter().map(|n| n.name).collect()
}

fn ping(netns: &str, ip: std::net::Ipv4Addr) -> bool {
    lab::in_netns(netns, "ping")
        .expect("command")
        .args(["-c", "1", "-W", "1", &ip.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How `observer`'s agent sees node `name`: (state, routed), if listed.
fn seen_as(lab: &LabGuard, observer: &str, name: &str) -> Option<(NodeState, bool)> {
    lab.layout
        .datastore_status(observer)
        .ok()?
        .nodes
        .into_iter()
        .find(|n| n.record.name == name)
        .map(|n| (n.state, n.routed))
}

#[test]
fn racing_agents_never_share_a_cidr_and_a_returning_node_keeps_its_own() {
    if !privileged("racing_agents_never_share_a_cidr_and_a_returning_node_keeps_its_own") {
        return;
    }
    let lab = LabGuard::up("race", 1, 0, "vxlan", LabDatastore::Etcd).expect("lab up");
    let fabric = lab.layout.fabric_netns.clone();
    let claimed = lab::on_netns_thread(&fabric, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let endpoints = vec![format!("http://{FABRIC_HOST}:2379")];
            let joins = (0..16).map(|i| {
                let endpoints = endpoints.clone();
                async move {
                    let mut store = EtcdDatastore::connect(
                        &endpoints,
                        Duration::from_secs(30),
                        &EtcdAccess::plain(),
                    )
                    .await
                    .expect("connect");
                    let request = JoinRequest {
                        name: format!("racer{i}"),
                        node_ip: std::net::Ipv4Addr::new(
                            192,
                            168,
                            200,
                            u8::try_from(i + 1).expect("small"),
                        ),
                        pod_cidr: None,
                        preferred: None,
                        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
                        node_prefix: 24,
                    };
                    (
                        request.name.clone(),
                        store.join(&request).await.expect("join").0,
                    )
                }
            });
            let first: Vec<_> = futures::future::join_all(joins).await;
            // racer3 comes back.
            let mut store =
                EtcdDatastore::connect(&endpoints, Duration::from_secs(30), &EtcdAccess::plain())
                    .await
                    .expect("connect");
            let again = store
                .join(&JoinRequest {
                    name: "racer3".into(),
                    node_ip: std::net::Ipv4Addr::new(192, 168, 200, 4),
                    pod_cidr: None,
                    preferred: None,
                    cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
                    node_prefix: 24,
                })
                .await
                .expect("rejoin")
                .0;
            (first, again)
        })
    })
    .expect("fabric thread");
    let (first, again) = claimed;
    let cidrs: HashSet<_> = first.iter().map(|(_, c)| *c).collect();
    // 16 racers + the lab's own node: all distinct.
    assert_eq!(cidrs.len(), 16, "no two racers share a CIDR: {first:?}");
    let node1_cidr: ipnet::Ipv4Net = lab.layout.nodes[0].pod_cidr.parse().expect("node1 cidr");
    assert!(!cidrs.contains(&node1_cidr), "nor with the running node");
    let racer3 = first.iter().find(|(n, _)| n == "racer3").expect("racer3").1;
    assert_eq!(again, racer3, "a returning node gets its CIDR back");
}

/// The case this exists for: an agent stopped (restart, upgrade, crash
/// loop) for longer than the lease TTL. Before, node2 removed node1 when its
/// lease expired and lost half the pings; now node1 is unreachable, keeps
/// its routes for the grace period, and coming back changes nothing.
#[test]
fn an_agent_away_longer_than_its_lease_costs_no_packet_and_no_route_flap() {
    if !privileged("an_agent_away_longer_than_its_lease_costs_no_packet_and_no_route_flap") {
        return;
    }
    let mut lab = LabGuard::up("grace", 2, 1, "vxlan", LabDatastore::Etcd).expect("lab up");
    let ttl = Duration::from_secs(lab.layout.etcd_lease_ttl);
    let (n1, n2) = (lab.layout.nodes[0].clone(), lab.layout.nodes[1].clone());
    let (p1, p2) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    assert_eq!(p1.node, n1.name);
    // node2's pod pings node1's pod; node2 must keep its route to node1.
    let pinger = Pinger::start(&p2.netns, p1.ip, Duration::from_millis(20)).expect("pinger");
    let (ns2, cidr1) = (n2.netns.clone(), n1.pod_cidr.clone());
    let routes = Sampler::start(Duration::from_millis(250), move || {
        if faults::has_route(&ns2, &cidr1) {
            Ok(())
        } else {
            Err(format!("node2 has no route to {cidr1}"))
        }
    });
    std::thread::sleep(Duration::from_secs(1));

    lab.layout.stop_agent("node1").expect("stop node1's agent");
    let stopped = std::time::Instant::now();
    wait_up_to(
        ttl * 2 + Duration::from_secs(5),
        "node2 sees node1 unreachable",
        || seen_as(&lab, "node2", "node1") == Some((NodeState::Unreachable, true)),
    );
    let unreachable_after = stopped.elapsed();
    let tombstone = lab
        .layout
        .etcd_snapshot()
        .expect("snapshot")
        .tombstone("node1");
    assert!(tombstone.is_some(), "node1's tombstone is in etcd");
    // 25 s away, as in the measurement that found the problem.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(stopped.elapsed()));
    assert_eq!(remote_nodes(&n2), ["node1"], "node2 still routes to node1");

    lab.layout
        .start_agent("node1")
        .expect("node1's agent is back");
    wait_up_to(
        Duration::from_secs(10),
        "node2 sees node1 live again",
        || seen_as(&lab, "node2", "node1") == Some((NodeState::Live, true)),
    );
    std::thread::sleep(Duration::from_secs(1));
    let report = pinger.finish().expect("pinger");
    routes.finish().assert_clean("node2's route to node1");
    eprintln!("agent away 25 s: {}", report.summary());
    assert_eq!(report.lost(), 0, "{}", report.summary());
    let log = std::fs::read_to_string(n2.state_dir.with_file_name("podnetd.log")).expect("log");
    assert!(
        !log.contains("node left"),
        "node2 never removed node1's routes:\n{log}"
    );
    assert!(
        log.contains("node unreachable"),
        "node2 logged node1 as unreachable"
    );
    let snapshot = lab.layout.etcd_snapshot().expect("snapshot");
    assert!(
        !snapshot.tombstones.contains_key("node1"),
        "its witness removed its tombstone when it returned"
    );
    assert_eq!(
        lab.layout.nodes[0].pod_cidr, n1.pod_cidr,
        "node1 kept its CIDR"
    );
    eprintln!(
        "FIGURE agent stopped 25 s at lease TTL {} s: pings sent {} lost {}; unreachable after {:.1} s, routes kept",
        ttl.as_secs(),
        report.sent,
        report.lost(),
        unreachable_after.as_secs_f64()
    );
}

/// With a tiny grace period and release delay: a node that does not come
/// back is removed after the grace period, its claim released after the
/// release delay (not before), and when it does come back later it gets
/// its CIDR again (nobody took it) and is routed again.
#[test]
fn a_node_gone_past_the_grace_period_is_removed_and_its_claim_released_later() {
    if !privileged("a_node_gone_past_the_grace_period_is_removed_and_its_claim_released_later") {
        return;
    }
    let grace = Duration::from_secs(3);
    let release_after = Duration::from_secs(12);
    let mut lab = LabGuard::up_with(
        "gone",
        2,
        1,
        "vxlan",
        LabDatastore::Etcd,
        LabOptions {
            agent_args: vec![
                "--node-grace-period".into(),
                format!("{}s", grace.as_secs()),
                "--cidr-release-after".into(),
                format!("{}s", release_after.as_secs()),
            ],
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let ttl = Duration::from_secs(lab.layout.etcd_lease_ttl);
    let n1 = lab.layout.nodes[0].clone();
    let (p1, p2) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    let cidr2: Ipv4Net = lab.layout.nodes[1].pod_cidr.parse().expect("cidr");
    assert!(ping(&p1.netns, p2.ip));

    lab.layout.kill_agent("node2").expect("node2 vanishes");
    let killed = std::time::Instant::now();
    wait_up_to(
        ttl * 2 + Duration::from_secs(5),
        "node1 sees node2 unreachable",
        || seen_as(&lab, "node1", "node2") == Some((NodeState::Unreachable, true)),
    );
    let unreachable = killed.elapsed();
    wait_up_to(
        grace + Duration::from_secs(5),
        "node1 removes node2",
        || seen_as(&lab, "node1", "node2") == Some((NodeState::Gone, false)),
    );
    let gone = killed.elapsed();
    assert!(remote_nodes(&n1).is_empty(), "node2 is no longer routed");
    assert!(
        !faults::has_route(&n1.netns, &cidr2.to_string()),
        "node2's route is removed"
    );
    assert!(!ping(&p1.netns, p2.ip), "node2's pod is no longer routed");
    let snapshot = lab.layout.etcd_snapshot().expect("snapshot");
    assert_eq!(
        snapshot.claims.get(&cidr2).map(String::as_str),
        Some("node2"),
        "the claim outlives the grace period"
    );
    let since = snapshot.tombstone("node2").expect("tombstone").since;

    wait_up_to(
        release_after + Duration::from_secs(5),
        "node2's claim is released",
        || {
            lab.layout
                .etcd_snapshot()
                .is_ok_and(|s| !s.claims.contains_key(&cidr2))
        },
    );
    let released = killed.elapsed();
    let released_at = unix_now();
    assert!(
        released_at >= since + release_after.as_secs(),
        "not released before the delay: tombstone {since}, released {released_at}"
    );
    let snapshot = lab.layout.etcd_snapshot().expect("snapshot");
    assert!(
        !snapshot.members.contains_key("node2") && !snapshot.tombstones.contains_key("node2"),
        "node2 is forgotten: {snapshot:?}"
    );
    wait_up_to(Duration::from_secs(5), "node1 forgets node2", || {
        seen_as(&lab, "node1", "node2").is_none()
    });

    // It comes back after all: its CIDR is free, it gets it again.
    lab.layout.start_agent("node2").expect("node2 returns");
    assert_eq!(lab.layout.nodes[1].pod_cidr, cidr2.to_string());
    faults::wait_converged(
        &lab.layout,
        std::time::Instant::now(),
        Converged::default(),
        Duration::from_secs(10),
    )
    .expect("node2 is routed again");
    wait_up_to(
        Duration::from_secs(5),
        "node1's pod reaches node2's again",
        || ping(&p1.netns, p2.ip),
    );
    eprintln!(
        "FIGURE grace 3 s / release 12 s at lease TTL {} s: unreachable {:.1} s, removed {:.1} s, claim released {:.1} s after the agent was killed",
        ttl.as_secs(),
        unreachable.as_secs_f64(),
        gone.as_secs_f64(),
        released.as_secs_f64()
    );
}

fn request(name: &str, host: u8) -> JoinRequest {
    JoinRequest {
        name: name.into(),
        node_ip: std::net::Ipv4Addr::new(192, 168, 201, host),
        pod_cidr: None,
        preferred: None,
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        node_prefix: 24,
    }
}

async fn connect(endpoints: &[String]) -> EtcdDatastore {
    EtcdDatastore::connect(endpoints, Duration::from_mins(2), &EtcdAccess::plain())
        .await
        .expect("connect")
}

/// A node that joined, lost its lease and was seen gone two days ago by
/// its witness, node `observer` (see [`observer`]).
async fn ghost(store: &mut EtcdDatastore, name: &str, host: u8) -> Ipv4Net {
    let (cidr, lease) = store.join(&request(name, host)).await.expect("join");
    // Revoked: its keys go at once, as when the lease expires.
    store.revoke(lease).await.expect("revoke");
    assert!(
        store
            .mark_gone("observer", name, unix_now() - 2 * 86_400)
            .await
            .expect("mark gone")
    );
    cidr
}

/// The live node that witnesses the ghosts leave (only the tombstones of a
/// node's witnesses count), joined before them.
async fn observer(store: &mut EtcdDatastore) {
    store
        .join(&request("observer", 250))
        .await
        .expect("observer joins");
}

/// The release of `name` that an agent would decide on now.
async fn due(store: &mut EtcdDatastore, name: &str) -> Release {
    let policy = Policy::new(Duration::from_mins(1), Duration::from_hours(1)).expect("policy");
    let snapshot = store.snapshot().await.expect("snapshot");
    membership::plan(&snapshot, policy, None, unix_now())
        .releases
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no release due for {name}"))
}

async fn problems(store: &mut EtcdDatastore) -> Vec<String> {
    membership::claim_problems(&store.snapshot().await.expect("snapshot"))
}

/// The dangerous orders, one step at a time (see
/// [`releasing_claims_never_leaves_a_cidr_claimed_twice`]).
async fn ordered_release_cases(endpoints: &[String]) {
    let mut agent_a = connect(endpoints).await;
    let mut agent_b = connect(endpoints).await;
    observer(&mut agent_a).await;

    // 1. The node publishes before the release: the release fails.
    let c0 = ghost(&mut agent_a, "ghost0", 1).await;
    let release = due(&mut agent_a, "ghost0").await;
    let req = request("ghost0", 1);
    assert_eq!(agent_b.claim_cidr(&req).await.expect("claim"), c0);
    agent_b.publish(&req, c0).await.expect("publish");
    assert!(
        !agent_a.release(&release).await.expect("release"),
        "its lease lives"
    );
    assert!(
        !agent_a
            .mark_gone("observer", "ghost0", 0)
            .await
            .expect("mark"),
        "no tombstone for a live node"
    );

    // 2. The release lands between the node's claim check and its
    // publish, and a new node takes the CIDR at once: the publish
    // fails, the node claims another CIDR.
    let c1 = ghost(&mut agent_a, "ghost1", 2).await;
    let release = due(&mut agent_a, "ghost1").await;
    let mut req = request("ghost1", 2);
    assert_eq!(agent_b.claim_cidr(&req).await.expect("claim"), c1);
    assert!(agent_a.release(&release).await.expect("release"));
    let (taken, _) = agent_a.join(&request("new1", 3)).await.expect("new node");
    assert_eq!(taken, c1, "the new node takes the lowest free CIDR");
    match agent_b.publish(&req, c1).await {
        Err(DatastoreError::Conflict { holder, .. }) => assert_eq!(holder, "new1"),
        other => panic!("publishing a CIDR someone else holds: {other:?}"),
    }
    req.preferred = Some(c1);
    let (again, _) = agent_b.join(&req).await.expect("rejoin");
    assert_ne!(again, c1, "it got another CIDR");
    assert!(problems(&mut agent_a).await.is_empty());

    // 3. Two agents release at once: once.
    ghost(&mut agent_a, "ghost2", 4).await;
    let release = due(&mut agent_a, "ghost2").await;
    let (first, second) = tokio::join!(agent_a.release(&release), agent_b.release(&release));
    let released = [first.expect("release"), second.expect("release")];
    assert_eq!(released.iter().filter(|r| **r).count(), 1, "{released:?}");

    // 4. The node came back and went again since the decision: the
    // old decision does not apply to the new tombstone.
    let c3 = ghost(&mut agent_a, "ghost3", 5).await;
    let release = due(&mut agent_a, "ghost3").await;
    let (_, lease) = agent_b.join(&request("ghost3", 5)).await.expect("back");
    agent_b.revoke(lease).await.expect("away again");
    assert!(
        agent_b
            .mark_gone("observer", "ghost3", unix_now())
            .await
            .expect("mark")
    );
    assert!(
        !agent_a.release(&release).await.expect("release"),
        "a newer tombstone"
    );
    let snapshot = agent_a.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.claims.get(&c3).map(String::as_str), Some("ghost3"));
}

/// Releasers, the node returning and new nodes racing for the lowest CIDR,
/// all at once, `rounds` times; returns in how many rounds the returning
/// node kept its CIDR.
async fn concurrent_release_rounds(
    endpoints: &[String],
    agent_a: &mut EtcdDatastore,
    rounds: u8,
) -> u8 {
    // 5. All at once, many times: releasers, the node returning,
    // new nodes racing for the lowest CIDR.
    let mut kept = 0;
    for round in 0..rounds {
        let name = format!("rghost{round}");
        let mut returning = connect(endpoints).await;
        let cidr = ghost(&mut returning, &name, 10 + round).await;
        let releasers = (0..3).map(|_| {
            let endpoints = endpoints.to_vec();
            async move {
                let mut s = connect(&endpoints).await;
                let snapshot = s.snapshot().await.expect("snapshot");
                let policy =
                    Policy::new(Duration::from_secs(1), Duration::from_secs(2)).expect("policy");
                for r in membership::plan(&snapshot, policy, None, unix_now()).releases {
                    s.release(&r).await.expect("release");
                }
            }
        });
        let newcomers = (0..2u8).map(|k| {
            let endpoints = endpoints.to_vec();
            let name = format!("new{round}-{k}");
            async move {
                let mut s = connect(&endpoints).await;
                s.join(&request(&name, 100 + round * 2 + k))
                    .await
                    .expect("newcomer joins")
            }
        });
        let mut back = request(&name, 10 + round);
        back.preferred = Some(cidr);
        let (_, _, returned) = tokio::join!(
            futures::future::join_all(releasers),
            futures::future::join_all(newcomers),
            returning.join(&back)
        );
        let (returned, _) = returned.expect("the ghost returns");
        if returned == cidr {
            kept += 1;
        }
        let found = problems(agent_a).await;
        assert!(found.is_empty(), "round {round}: {found:?}");
    }
    kept
}

/// Concurrent rounds of [`releasing_claims_never_leaves_a_cidr_claimed_twice`]
/// (each a tenth of a second or so).
const ROUNDS: u8 = 30;

/// Releasing a gone node's claim while it comes back, while another agent
/// releases it too, while new nodes race for CIDRs: whatever the order, no
/// CIDR ends up claimed twice and no node announces a CIDR it does not hold.
/// The dangerous orders are played one step at a time, then many rounds
/// run at once.
#[test]
fn releasing_claims_never_leaves_a_cidr_claimed_twice() {
    if !privileged("releasing_claims_never_leaves_a_cidr_claimed_twice") {
        return;
    }
    // etcd only: no agent to interfere.
    let lab = LabGuard::up("rel", 0, 0, "vxlan", LabDatastore::Etcd).expect("lab up");
    let endpoints = lab.layout.etcd_endpoints();
    let fabric = lab.layout.fabric_netns.clone();
    let outcome = lab::on_netns_thread(&fabric, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            ordered_release_cases(&endpoints).await;
            let mut observer = connect(&endpoints).await;
            concurrent_release_rounds(&endpoints, &mut observer, ROUNDS).await
        })
    })
    .expect("fabric thread");
    eprintln!(
        "FIGURE claim release races: 4 ordered cases and {ROUNDS} concurrent rounds, no CIDR claimed twice; the returning node kept its CIDR in {outcome} of {ROUNDS} rounds"
    );
}

/// Issue 21 on a lab whose etcd speaks only TLS with client certificates
/// and has its roles on (`--etcd-tls`): the agents reach it with their own
/// certificates and run with their nodes' roles, and the
/// issue's attack (one put of `/podnet/nodes/0evil` with node2's pod CIDR
/// and another node IP, which before took node1's pings to a node2 pod
/// from 5/5 to 0/5) changes nothing: every ping still arrives and node1
/// lists `0evil` as not routed.
#[test]
fn on_a_tls_lab_a_record_written_later_does_not_take_a_nodes_pods() {
    if !privileged("on_a_tls_lab_a_record_written_later_does_not_take_a_nodes_pods") {
        return;
    }
    let lab = LabGuard::up_with(
        "tls",
        2,
        1,
        "vxlan",
        LabDatastore::Etcd,
        LabOptions {
            etcd_tls: true,
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let endpoints = lab.layout.etcd_endpoints();
    assert!(
        endpoints.iter().all(|u| u.starts_with("https://")),
        "{endpoints:?}"
    );
    // Without a certificate etcd answers nobody.
    let plain = endpoints[0].replace("https://", "http://");
    let refused = lab
        .layout
        .on_fabric_runtime(async move {
            EtcdDatastore::connect_one(&plain, Duration::from_secs(5), &EtcdAccess::plain())
                .await
                .is_err()
        })
        .expect("fabric");
    assert!(refused, "plain http to the TLS etcd");

    let (p1, p2) = (lab.layout.pods[0].clone(), lab.layout.pods[1].clone());
    assert_eq!((p1.node.as_str(), p2.node.as_str()), ("node1", "node2"));
    let pings = || (0..5).filter(|_| ping(&p1.netns, p2.ip)).count();
    assert_eq!(pings(), 5, "node1's pod reaches node2's before");

    let node2 = lab.layout.nodes[1].clone();
    let evil = serde_json::to_string(&NodeRecord {
        name: "0evil".into(),
        node_ip: std::net::Ipv4Addr::new(192, 168, 100, 66),
        pod_cidr: node2.pod_cidr.parse().expect("node2's CIDR"),
    })
    .expect("json");
    let put_as = |access: EtcdAccess| {
        let (url, evil) = (endpoints[0].clone(), evil.clone());
        lab.layout
            .on_fabric_runtime(async move {
                let mut client = etcd_client::Client::connect(
                    [url],
                    Some(access.apply(etcd_client::ConnectOptions::new())),
                )
                .await?;
                client.put("/podnet/nodes/0evil", evil, None).await?;
                Ok::<_, etcd_client::Error>(())
            })
            .expect("fabric")
    };
    // The lab turns etcd's roles on: node1's own credential may not write
    // another node's key (issue 21's least privilege).
    let node1_access = lab
        .layout
        .etcd_pki()
        .access(&podnet::datastore::etcd::node_user("node1"))
        .expect("node1's access");
    assert!(put_as(node1_access).is_err(), "node1 writes 0evil's key");
    // Root (or anyone with auth off) may: the claim order must hold then.
    put_as(lab.layout.etcd_access().expect("root access")).expect("root's put");
    wait_up_to(Duration::from_secs(10), "node1 sees 0evil", || {
        seen_as(&lab, "node1", "0evil").is_some()
    });
    assert_eq!(
        seen_as(&lab, "node1", "0evil"),
        Some((NodeState::Live, false)),
        "0evil is listed, not routed"
    );
    assert_eq!(
        seen_as(&lab, "node1", "node2"),
        Some((NodeState::Live, true))
    );
    assert_eq!(pings(), 5, "node1's pod still reaches node2's");
}
