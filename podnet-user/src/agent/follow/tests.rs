//! Unit tests of the follow loops' cluster logic over the in-memory
//! datastore and the nodes file, with a sink that records what it is given.

use super::*;
use crate::{agent::join::tests::request, datastore::memory::MemoryDatastore};

#[test]
fn agents_spread_over_the_members() {
    let firsts: std::collections::BTreeSet<usize> = (1..=12)
        .map(|i| first_member(&format!("node{i}"), 3))
        .collect();
    assert_eq!(firsts.len(), 3, "some agent starts at each member");
    assert_eq!(first_member("node1", 1), 0);
    assert_eq!(first_member("node1", 0), 0);
}

const MIN: u64 = 60;
const T: u64 = 1_800_000_000;

/// Records what the follower applies and reports; clones share it.
#[derive(Clone, Default)]
struct RecordingSink {
    applied: Arc<Mutex<Vec<Vec<String>>>>,
    status: Arc<Mutex<DatastoreStatus>>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl ClusterSink for RecordingSink {
    async fn apply(&self, nodes: Vec<NodeRecord>) -> bool {
        self.applied
            .lock()
            .expect("lock")
            .push(nodes.into_iter().map(|n| n.name).collect());
        !self.refuse.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn update_status(&self, f: impl FnOnce(&mut DatastoreStatus)) {
        f(&mut self.status.lock().expect("lock"));
    }
}

impl RecordingSink {
    fn last(&self) -> Vec<String> {
        self.applied
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .unwrap_or_default()
    }

    fn rounds(&self) -> usize {
        self.applied.lock().expect("lock").len()
    }

    fn state(&self, name: &str) -> Option<NodeState> {
        self.status
            .lock()
            .expect("lock")
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .map(|n| n.state)
    }
}

fn policy() -> Policy {
    Policy::new(
        Duration::from_secs(10 * MIN),
        Duration::from_secs(24 * 60 * MIN),
    )
    .expect("policy")
}

/// A cluster with "me" and "n2" joined, and me's follower.
async fn cluster() -> (MemoryDatastore, ClusterFollow<RecordingSink>) {
    let store = MemoryDatastore::new();
    for (name, host) in [("me", 1), ("n2", 2)] {
        store
            .clone()
            .join(&request(name, host))
            .await
            .expect("join");
    }
    let follow = ClusterFollow::new("me".into(), policy(), RecordingSink::default(), true);
    (store, follow)
}

#[tokio::test]
async fn an_expired_node_stays_routed_for_the_grace_period_and_its_cidr_is_released_later() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    follow.round(&mut reader, T).await.expect("round");
    assert_eq!(follow.sink.last(), ["me", "n2"]);
    assert_eq!(follow.sink.state("n2"), Some(NodeState::Live));
    let n2_cidr = store.claim_of("n2").expect("claimed");

    store.expire("n2");
    let round = follow.round(&mut reader, T).await.expect("round");
    assert_eq!(
        follow.sink.last(),
        ["me", "n2"],
        "unreachable, still routed"
    );
    assert_eq!(follow.sink.state("n2"), Some(NodeState::Unreachable));
    assert_eq!(
        store.snapshot().tombstone("n2").expect("tombstone").since,
        T,
        "tombstone written"
    );
    assert_eq!(
        round.wait,
        Duration::from_secs(10 * MIN + 1).min(RESYNC),
        "read again by the end of the grace period"
    );

    follow
        .round(&mut reader, T + 10 * MIN - 1)
        .await
        .expect("round");
    assert_eq!(follow.sink.last(), ["me", "n2"], "within the grace period");

    follow
        .round(&mut reader, T + 10 * MIN)
        .await
        .expect("round");
    assert_eq!(follow.sink.last(), ["me"], "gone after the grace period");
    assert_eq!(follow.sink.state("n2"), Some(NodeState::Gone));
    assert_eq!(store.claim_of("n2"), Some(n2_cidr), "the claim is kept");

    follow
        .round(&mut reader, T + 24 * 60 * MIN - 1)
        .await
        .expect("round");
    assert_eq!(
        store.claim_of("n2"),
        Some(n2_cidr),
        "kept until the release delay"
    );
    follow
        .round(&mut reader, T + 24 * 60 * MIN)
        .await
        .expect("round");
    assert_eq!(store.claim_of("n2"), None, "released");
    assert!(!store.snapshot().members.contains_key("n2"), "forgotten");
    follow
        .round(&mut reader, T + 24 * 60 * MIN)
        .await
        .expect("round");
    assert_eq!(follow.sink.state("n2"), None, "no longer listed");

    let n3 = store.clone().join(&request("n3", 3)).await.expect("n3");
    assert_eq!(n3, n2_cidr, "a released CIDR is handed out again");
}

#[tokio::test]
async fn a_node_back_within_the_grace_period_changes_nothing() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    store.expire("n2");
    follow.round(&mut reader, T).await.expect("round");
    assert!(store.snapshot().tombstones.contains_key("n2"));
    let cidr = store.claim_of("n2").expect("claimed");
    store
        .clone()
        .publish(&request("n2", 2), cidr)
        .await
        .expect("back");
    follow.round(&mut reader, T + MIN).await.expect("round");
    assert_eq!(follow.sink.last(), ["me", "n2"]);
    assert_eq!(follow.sink.state("n2"), Some(NodeState::Live));
    assert!(
        !store.snapshot().tombstones.contains_key("n2"),
        "its tombstone went"
    );
    // Much later: nothing is due for a live node.
    follow
        .round(&mut reader, T + 365 * 24 * 60 * MIN)
        .await
        .expect("round");
    assert_eq!(store.claim_of("n2"), Some(cidr));
}

#[tokio::test]
async fn a_round_without_this_nodes_record_ends_the_session_and_changes_nothing() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    follow.round(&mut reader, T).await.expect("round");
    store.expire("me");
    assert!(follow.round(&mut reader, T).await.is_err());
    assert_eq!(follow.sink.rounds(), 1, "nothing applied");
    // The nodes file has no leases: a follower of it goes on.
    follow.require_published = false;
    follow.round(&mut reader, T).await.expect("round");
    assert_eq!(follow.sink.last(), ["n2"]);
}

#[tokio::test]
async fn an_unreachable_store_keeps_the_last_applied_state() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    follow.round(&mut reader, T).await.expect("round");
    store.set_reachable(false);
    assert!(follow.round(&mut reader, T + 60 * MIN).await.is_err());
    assert_eq!(follow.sink.rounds(), 1, "nothing applied, nothing removed");
    assert!(follow.sink.status.lock().expect("lock").connected);
}

#[tokio::test]
async fn an_unreadable_key_is_ignored_and_good_nodes_stay() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    store.put_invalid("/podnet/nodes/broken");
    follow.round(&mut reader, T).await.expect("round");
    follow.round(&mut reader, T).await.expect("round");
    assert_eq!(follow.sink.last(), ["me", "n2"]);
    assert_eq!(
        follow.invalid_logged,
        ["/podnet/nodes/broken"],
        "logged once"
    );
}

#[tokio::test]
async fn a_failed_apply_is_reported_and_not_counted_as_a_sync() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    follow
        .sink
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let round = follow.round(&mut reader, T).await.expect("round");
    assert!(!round.applied);
    assert_eq!(follow.sink.status.lock().expect("lock").last_sync_ms, None);
}

#[tokio::test]
async fn a_session_whose_cidr_was_taken_while_away_is_refused() {
    let (store, mut follow) = cluster().await;
    let cidr = store.claim_of("me").expect("claimed");
    // Released while "me" was away, and taken by another node.
    store.reassign(cidr, "thief");
    let mut running = request("me", 1);
    running.pod_cidr = Some(cidr);
    let mut synced = false;
    let error = session(store.clone(), &running, &mut follow, &mut synced).await;
    assert!(
        matches!(error, DatastoreError::Conflict { ref holder, .. } if holder == "thief"),
        "{error:?}"
    );
    assert!(!synced);
    assert_eq!(follow.sink.rounds(), 0, "nothing applied");
}

/// A node holding a second CIDR (with a claim key of its own, or a shared
/// one written past the agents) is named in the datastore status, where
/// the operator looks (`podnetctl datastore`).
#[tokio::test]
async fn a_node_holding_two_claims_is_named_in_the_status() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    follow.round(&mut reader, T).await.expect("round");
    let problems = || {
        follow
            .sink
            .status
            .lock()
            .expect("lock")
            .claim_problems
            .clone()
    };
    assert!(problems().is_empty(), "{:?}", problems());
    store.put_claim("10.244.77.0/24".parse().expect("cidr"), "n2");
    follow.round(&mut reader, T).await.expect("round");
    let problems = follow
        .sink
        .status
        .lock()
        .expect("lock")
        .claim_problems
        .clone();
    assert!(
        problems.iter().any(|p| p.starts_with("n2 holds 2 claims")),
        "{problems:?}"
    );
}

/// Issue 21: a claim key rewritten while the node was away (what a node
/// with write access to the old shared `cidrs/` keys could do) no longer
/// keeps it from publishing itself again: its own claim is older.
#[tokio::test]
async fn a_claim_rewritten_while_away_does_not_keep_the_node_out() {
    let (store, follow) = cluster().await;
    let sink = follow.sink.clone();
    let cidr = store.claim_of("me").expect("claimed");
    store.expire("me");
    store.put_claim(cidr, "thief");
    assert_eq!(store.claim_of("me"), Some(cidr), "the older claim holds");
    let mut running = request("me", 1);
    running.pod_cidr = Some(cidr);
    let task = tokio::spawn({
        let store = store.clone();
        async move {
            let mut follow = follow;
            let mut synced = false;
            session(store, &running, &mut follow, &mut synced).await
        }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while sink.last() != ["me", "n2"] {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("routed again within 10 s");
    assert!(store.snapshot().live.contains_key("me"), "published again");
    store.expire("me");
    task.await.expect("task");
}

#[tokio::test]
async fn a_session_publishes_follows_and_ends_when_its_lease_expires() {
    let (store, follow) = cluster().await;
    let sink = follow.sink.clone();
    let cidr = store.claim_of("me").expect("claimed");
    store.expire("me");
    let mut running = request("me", 1);
    running.pod_cidr = Some(cidr);
    let task = tokio::spawn({
        let store = store.clone();
        async move {
            let mut follow = follow;
            let mut synced = false;
            let error = session(store, &running, &mut follow, &mut synced).await;
            (error, synced)
        }
    });
    while sink.last() != ["me", "n2"] {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(store.snapshot().live.contains_key("me"), "published again");
    // A change is followed.
    store.clone().join(&request("n3", 3)).await.expect("n3");
    while sink.last() != ["me", "n2", "n3"] {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    store.expire("me");
    let (error, synced) = task.await.expect("task");
    assert!(synced);
    // The keeper sees the lease expire, or the next read misses the
    // record: either ends the session.
    assert!(
        matches!(
            error,
            DatastoreError::Invalid { .. } | DatastoreError::EtcdProtocol { .. }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_nodes_file_routes_every_record_in_its_order() {
    let dir = std::env::temp_dir().join(format!("podnet-follow-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("nodes.json");
    // Hand-written: not sorted, a name twice (the later is refused by
    // `routable_nodes`, which needs both, in this order).
    std::fs::write(
        &path,
        br#"{"nodes": [
            {"name": "b", "nodeIP": "192.168.100.2", "podCIDR": "10.244.2.0/24"},
            {"name": "a", "nodeIP": "192.168.100.3", "podCIDR": "10.244.3.0/24"},
            {"name": "b", "nodeIP": "192.168.100.4", "podCIDR": "10.244.4.0/24"}
        ]}"#,
    )
    .expect("file");
    let mut store = Follower::new(FileDatastore::new(&path), FOLLOW_RESYNC);
    let mut follow = ClusterFollow::new("me".into(), policy(), RecordingSink::default(), false);
    let round = follow.round(&mut store, T).await;
    let _ = std::fs::remove_dir_all(&dir);
    round.expect("round");
    assert_eq!(follow.sink.last(), ["b", "a", "b"]);
    assert_eq!(follow.sink.state("a"), Some(NodeState::Live));
}

/// Issue 21 through the follow loop: a liveness record `0evil` written
/// past the agents (one `etcdctl put`) with n2's pod CIDR. The round hands
/// the sink n2 and not `0evil` (before, `0evil` came first by name and took
/// n2's CIDR in `routable_nodes`), and keeps doing so while n2 restarts.
#[tokio::test]
async fn a_record_written_later_is_not_applied_over_the_node_holding_its_cidr() {
    let (store, mut follow) = cluster().await;
    let mut reader = store.clone();
    let n2_cidr = store.claim_of("n2").expect("claimed");
    store.put_live_only(NodeRecord {
        name: "0evil".into(),
        node_ip: std::net::Ipv4Addr::new(192, 168, 100, 66),
        pod_cidr: n2_cidr,
    });
    follow.round(&mut reader, T).await.expect("round");
    assert_eq!(follow.sink.last(), ["me", "n2"]);
    store.expire("n2");
    follow.round(&mut reader, T).await.expect("round");
    assert_eq!(
        follow.sink.last(),
        ["me", "n2"],
        "n2 restarting still holds"
    );
}
