//! A three-member etcd cluster under the agents, and its faults: one member
//! killed, the leader killed, every member down for a minute. Throughout
//! each, a pod on node1 pings a pod on node2 every 20 ms and loses nothing,
//! every node keeps its routes to the others, and no CIDR is ever claimed
//! twice (sampled all along and checked at the end); the agents follow etcd
//! again within 10 s (a node joining is seen by all).
//!
//! Each test prints a `FIGURE` line with what it measured (RELIABILITY.md).

use std::time::{Duration, Instant};

use podnet_tests::{
    faults::{self, Converged, Sampler},
    lab::{LabDatastore, LabGuard, LabOptions},
    ping::{PingReport, Pinger},
    privileged,
};

const PING_EVERY: Duration = Duration::from_millis(20);
/// How soon after etcd serves again the agents must follow it.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);

fn three_members(tag: &str) -> LabGuard {
    let lab = LabGuard::up_with(
        tag,
        2,
        1,
        "vxlan",
        LabDatastore::Etcd,
        LabOptions {
            etcd_members: 3,
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    assert_eq!(lab.layout.etcd.len(), 3);
    // Everyone sees everyone before the fault.
    faults::wait_converged(
        &lab.layout,
        Instant::now(),
        Converged::default(),
        Duration::from_secs(20),
    )
    .expect("the lab converges");
    lab
}

/// The traffic and the samplers that run through a fault.
struct Watch {
    pinger: Pinger,
    routes: Sampler,
    claims: Sampler,
}

impl Watch {
    fn start(lab: &LabGuard) -> Self {
        let (a, b) = (&lab.layout.pods[0], &lab.layout.pods[1]);
        assert_ne!(a.node, b.node, "a cross-node pair");
        Self {
            pinger: Pinger::start(&a.netns, b.ip, PING_EVERY).expect("pinger"),
            routes: Sampler::start(
                Duration::from_millis(250),
                faults::all_routes_present(&lab.layout),
            ),
            claims: Sampler::start(
                Duration::from_millis(500),
                faults::claims_unique(&lab.layout),
            ),
        }
    }

    /// Stops everything and asserts: nothing lost, routes and claims
    /// sound all along.
    fn finish(self, what: &str) -> PingReport {
        let ping = self.pinger.finish().expect("pinger");
        let routes = self.routes.finish();
        let claims = self.claims.finish();
        eprintln!("{what}: {}", ping.summary());
        assert!(ping.sent > 0);
        assert_eq!(ping.lost(), 0, "{what}: {}", ping.summary());
        routes.assert_clean(&format!("{what}: routes"));
        claims.assert_clean(&format!("{what}: CIDR claims"));
        ping
    }
}

/// A node joins; returns how long from the start of its agent until every
/// agent sees it live and routed (and it sees them).
fn join_and_converge(lab: &mut LabGuard) -> Duration {
    let started = Instant::now();
    let node = lab.layout.join_node().expect("a node joins");
    faults::wait_converged(&lab.layout, started, Converged::default(), CONVERGE_WITHIN)
        .unwrap_or_else(|e| panic!("{node} is not seen by all within {CONVERGE_WITHIN:?}: {e}"))
}

fn assert_claims_unique(lab: &LabGuard) {
    let snapshot = lab.layout.etcd_snapshot().expect("etcd snapshot");
    let problems = podnet::datastore::membership::claim_problems(&snapshot);
    assert!(problems.is_empty(), "claims: {problems:?}");
    assert_eq!(
        snapshot.claims.len(),
        lab.layout.nodes.len(),
        "one claim per node: {:?}",
        snapshot.claims
    );
}

/// The member node1's agent talks to, and how many agents talk to it.
fn member_in_use(lab: &LabGuard) -> (String, usize) {
    let used: Vec<String> = lab
        .layout
        .nodes
        .iter()
        .filter_map(|n| lab.layout.datastore_status(&n.name).ok()?.endpoint)
        .collect();
    let member = lab
        .layout
        .etcd
        .iter()
        .find(|m| used.first() == Some(&m.client_url))
        .expect("node1's agent talks to a member");
    let agents = used.iter().filter(|u| **u == member.client_url).count();
    (member.name.clone(), agents)
}

/// Kills `victim` and checks the agents move on: returns (how long until
/// every agent follows etcd through another member, how long until a node
/// joining then is seen by all).
fn kill_member_and_move_on(lab: &mut LabGuard, victim: &str) -> (Duration, Duration) {
    let victim_url = lab
        .layout
        .etcd_member(victim)
        .expect("victim")
        .client_url
        .clone();
    let killed = Instant::now();
    lab.layout.kill_etcd_member(victim).expect("kill");
    let moved = faults::wait_converged(
        &lab.layout,
        killed,
        Converged {
            since_ms: 0,
            not_on: Some(&victim_url),
        },
        CONVERGE_WITHIN,
    )
    .unwrap_or_else(|e| panic!("agents did not move off {victim} within {CONVERGE_WITHIN:?}: {e}"));
    let seen = join_and_converge(lab);
    (moved, seen)
}

#[test]
fn a_killed_etcd_member_costs_no_packet_and_agents_move_on() {
    if !privileged("a_killed_etcd_member_costs_no_packet_and_agents_move_on") {
        return;
    }
    let mut lab = three_members("ekm");
    // The member node1's agent uses, made a follower: an agent must move.
    let (victim, agents_on_victim) = member_in_use(&lab);
    let other = lab
        .layout
        .etcd
        .iter()
        .find(|m| m.name != victim)
        .expect("another member")
        .name
        .clone();
    if lab.layout.etcd_leader().expect("leader").as_deref() == Some(victim.as_str()) {
        lab.layout
            .etcd_move_leader(&other)
            .expect("move the leader");
    }

    let watch = Watch::start(&lab);
    std::thread::sleep(Duration::from_secs(2));
    let (moved, seen) = kill_member_and_move_on(&mut lab, &victim);
    std::thread::sleep(Duration::from_secs(2));
    let restarted = Instant::now();
    lab.layout.start_etcd_member(&victim).expect("restart");
    let rejoined = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let ping = watch.finish("one member killed");
    assert_claims_unique(&lab);
    eprintln!(
        "FIGURE etcd follower killed ({victim}, {agents_on_victim} agents on it): pings sent {} lost {}, \
         agents on other members {:.1} s after the kill, a joining node seen by all {:.1} s after its agent started, \
         member back in {:.1} s",
        ping.sent,
        ping.lost(),
        moved.as_secs_f64(),
        seen.as_secs_f64(),
        rejoined.as_secs_f64()
    );
}

#[test]
fn a_killed_etcd_leader_costs_no_packet_and_agents_move_on() {
    if !privileged("a_killed_etcd_leader_costs_no_packet_and_agents_move_on") {
        return;
    }
    let mut lab = three_members("ekl");
    // The member node1's agent uses, made the leader: an agent must move.
    let (leader, agents_on_leader) = member_in_use(&lab);
    lab.layout
        .etcd_move_leader(&leader)
        .expect("move the leader");

    let watch = Watch::start(&lab);
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    let (moved, seen) = kill_member_and_move_on(&mut lab, &leader);
    let mut new_leader = None;
    while new_leader.is_none() && killed.elapsed() < CONVERGE_WITHIN {
        new_leader = lab
            .layout
            .etcd_leader()
            .expect("leader")
            .filter(|l| *l != leader);
        std::thread::sleep(Duration::from_millis(100));
    }
    let new_leader = new_leader.expect("a new leader");
    lab.layout.start_etcd_member(&leader).expect("restart");
    std::thread::sleep(Duration::from_secs(2));
    let ping = watch.finish("leader killed");
    assert_claims_unique(&lab);
    eprintln!(
        "FIGURE etcd leader killed ({leader} -> {new_leader}, {agents_on_leader} agents on it): pings sent {} lost {}, \
         agents on other members {:.1} s after the kill, a joining node seen by all {:.1} s after its agent started",
        ping.sent,
        ping.lost(),
        moved.as_secs_f64(),
        seen.as_secs_f64()
    );
}

#[test]
fn every_etcd_member_down_for_a_minute_costs_no_packet_and_agents_catch_up() {
    if !privileged("every_etcd_member_down_for_a_minute_costs_no_packet_and_agents_catch_up") {
        return;
    }
    let mut lab = three_members("eall");
    let watch = Watch::start(&lab);
    std::thread::sleep(Duration::from_secs(2));

    lab.layout.stop_etcd().expect("stop every member");
    let down = Instant::now();
    // The agents notice (and keep forwarding: the pinger).
    let mut disconnected = false;
    while down.elapsed() < Duration::from_mins(1) {
        disconnected |= lab.layout.nodes.iter().all(|n| {
            lab.layout
                .datastore_status(&n.name)
                .is_ok_and(|s| !s.connected)
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        disconnected,
        "the agents report etcd unreachable while it is down"
    );

    let started = Instant::now();
    lab.layout.start_etcd().expect("every member back");
    let serving = started.elapsed();
    let back_ms = faults::unix_ms();
    let back = Instant::now();
    let caught_up = faults::wait_converged(
        &lab.layout,
        back,
        Converged {
            since_ms: back_ms,
            not_on: None,
        },
        CONVERGE_WITHIN,
    )
    .unwrap_or_else(|e| panic!("the agents did not catch up within {CONVERGE_WITHIN:?}: {e}"));
    let seen = join_and_converge(&mut lab);
    std::thread::sleep(Duration::from_secs(1));
    let ping = watch.finish("every member down for 60 s");
    assert_claims_unique(&lab);
    // Nobody was taken for gone: the leases were renewed in time.
    let snapshot = lab.layout.etcd_snapshot().expect("snapshot");
    assert!(
        snapshot.tombstones.is_empty(),
        "tombstones: {:?}",
        snapshot.tombstones
    );
    eprintln!(
        "FIGURE etcd all 3 members down 60 s: pings sent {} lost {}, etcd serving {:.1} s after start, \
         agents caught up {:.1} s after that, a joining node seen by all {:.1} s after its agent started",
        ping.sent,
        ping.lost(),
        serving.as_secs_f64(),
        caught_up.as_secs_f64(),
        seen.as_secs_f64()
    );
}
