//! Issue 22's storage of cluster objects against a real etcd (started by
//! the test on loopback, over TLS):
//!
//! - objects and endpoint records round-trip under their keys
//!   (`/podnet/cluster/...`, `/podnet/endpoints/<node>/...`), an apply of
//!   the stored bytes leaves etcd's revision where it was, and stale writes
//!   are refused;
//! - concurrent applies from one base: exactly one wins, the others are
//!   refused (nothing lost);
//! - a watcher sees puts and deletes in revision order, and after an etcd
//!   compaction of the history it needs it lists again and ends with
//!   exactly the current objects, also one deleted inside the compacted
//!   range (which a resume from the compaction point would miss);
//! - a node's credential, with write access to its own endpoint prefix
//!   only, publishes its records and nothing else.
//!
//! No root needed (loopback only), but the test starts etcd processes: run
//! it under `flock /tmp/podnet-privileged.lock` like the other etcd tests.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, Permission};
use podnet::datastore::{
    etcd::{CLUSTER_PREFIX, EtcdAccess, EtcdDatastore, OPERATOR_USER, node_user},
    objects::{
        ApplyOutcome, EndpointKey, Expect, ObjectCache, ObjectEvent, ObjectPath, ObjectStore,
        ObjectStoreError, ObjectWatch, Update, Watcher,
        etcd::{ENDPOINTS_PREFIX, EtcdObjectStore, MAX_TXN_OPS, endpoint_prefix},
    },
};
use podnet_tests::etcd_tls::{LocalEtcd, etcd_installed};

const TIMEOUT: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

fn policy(ns: &str, name: &str) -> ObjectPath {
    ObjectPath::namespaced("networkpolicies", ns, name).expect("path")
}

fn endpoint(node: &str, ns: &str, name: &str) -> EndpointKey {
    EndpointKey::new(node, ns, name).expect("key")
}

async fn store(etcd: &LocalEtcd, access: &EtcdAccess) -> EtcdObjectStore {
    EtcdObjectStore::connect(std::slice::from_ref(&etcd.endpoint), access, TIMEOUT)
        .await
        .expect("connect")
}

async fn raw_client(endpoint: &str, access: &EtcdAccess) -> Client {
    Client::connect(
        [endpoint],
        Some(access.apply(ConnectOptions::new().with_connect_timeout(TIMEOUT))),
    )
    .await
    .expect("raw client")
}

/// etcd's revision now.
async fn etcd_revision(raw: &mut Client) -> i64 {
    raw.get("/", Some(GetOptions::new().with_count_only()))
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision()
}

/// The next update within 10 s.
async fn next_update(watcher: &mut Watcher<EtcdObjectStore>) -> Update {
    tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("an update within 10 s")
        .expect("update")
}

/// Follows until `cache` holds what etcd holds now (each object and record
/// at its revision); every batch in revision order, after what the cache
/// held. The updates seen.
async fn catch_up(
    watcher: &mut Watcher<EtcdObjectStore>,
    cache: &mut ObjectCache,
    store: &mut EtcdObjectStore,
) -> Vec<Update> {
    let want = store.snapshot().await.expect("snapshot");
    let mut seen = Vec::new();
    while !cache.holds(&want) {
        let update = next_update(watcher).await;
        if let Update::Events { events, .. } = &update {
            let revisions: Vec<i64> = events.iter().map(ObjectEvent::revision).collect();
            assert!(
                revisions.is_sorted() && revisions.first() > Some(&cache.revision),
                "in order, after {}: {revisions:?}",
                cache.revision
            );
        }
        cache.apply(update.clone());
        seen.push(update);
    }
    seen
}

#[test]
fn objects_round_trip_unchanged_writes_nothing_and_stale_writes_are_refused() {
    if !etcd_installed("objects_round_trip_unchanged_writes_nothing_and_stale_writes_are_refused") {
        return;
    }
    let etcd = LocalEtcd::start("objects-rt", &["root"]).expect("etcd");
    let access = etcd.pki.access("root").expect("access");
    runtime().block_on(async {
        let mut store = store(&etcd, &access).await;
        let mut raw = raw_client(&etcd.endpoint, &access).await;
        let a = policy("x", "a");
        let v1 = br#"{"kind":"NetworkPolicy","spec":{"podSelector":{}}}"#.as_slice();
        let v2 = br#"{"kind":"NetworkPolicy","spec":{"podSelector":{"matchLabels":{"a":"b"}}}}"#;
        let created = store
            .apply(&a, v1, Expect::Revision(0))
            .await
            .expect("create");
        let ApplyOutcome::Created(r1) = created else {
            panic!("created: {created:?}");
        };
        // Under its key, byte for byte, its revision etcd's mod revision.
        let got = raw
            .get(format!("{CLUSTER_PREFIX}networkpolicies/x/a"), None)
            .await
            .expect("raw get");
        let kv = got.kvs().first().expect("the key");
        assert_eq!((kv.value(), kv.mod_revision()), (v1, r1));
        let stored = store.get(&a).await.expect("get").expect("stored");
        assert_eq!((stored.value.as_slice(), stored.revision), (v1, r1));

        let before = etcd_revision(&mut raw).await;
        for expected in [Expect::Any, Expect::Revision(r1), Expect::Revision(0)] {
            assert_eq!(
                store.apply(&a, v1, expected).await.expect("same bytes"),
                ApplyOutcome::Unchanged(r1)
            );
        }
        assert_eq!(etcd_revision(&mut raw).await, before, "nothing written");

        let r2 = match store.apply(&a, v2, Expect::Revision(r1)).await {
            Ok(ApplyOutcome::Updated(r2)) => r2,
            other => panic!("update: {other:?}"),
        };
        match store.apply(&a, v1, Expect::Revision(r1)).await {
            Err(ObjectStoreError::Conflict {
                expected, found, ..
            }) => assert_eq!((expected, found), (r1, r2)),
            other => panic!("a stale write is refused: {other:?}"),
        }
        assert!(matches!(
            store.delete(&a, Expect::Revision(r1)).await,
            Err(ObjectStoreError::Conflict { .. })
        ));
        assert_eq!(store.get(&a).await.expect("get").expect("a").value, v2);

        let ns = ObjectPath::cluster_scoped("namespaces", "x").expect("path");
        store.apply(&ns, b"{}", Expect::Any).await.expect("ns");
        store
            .apply(&policy("y", "b"), b"{}", Expect::Any)
            .await
            .expect("b");
        let listing = store
            .list(Some("networkpolicies"), Some("x"))
            .await
            .expect("list");
        assert_eq!(listing.objects.len(), 1);
        assert_eq!(listing.revision, etcd_revision(&mut raw).await);
        let all = store.list(None, None).await.expect("list");
        let keys: Vec<String> = all.objects.iter().map(|o| o.path.to_key()).collect();
        assert_eq!(
            keys,
            ["namespaces/x", "networkpolicies/x/a", "networkpolicies/y/b"]
        );

        // Endpoint records under the node's prefix.
        let record = endpoint("n1", "x", "a");
        store
            .put_endpoint(&record, b"10.244.1.2")
            .await
            .expect("record");
        let got = raw
            .get(format!("{ENDPOINTS_PREFIX}n1/x/a"), None)
            .await
            .expect("raw get");
        assert_eq!(got.kvs().first().expect("the key").value(), b"10.244.1.2");
        let before = etcd_revision(&mut raw).await;
        assert!(matches!(
            store.put_endpoint(&record, b"10.244.1.2").await,
            Ok(ApplyOutcome::Unchanged(_))
        ));
        assert_eq!(etcd_revision(&mut raw).await, before, "nothing written");
        let snapshot = store.snapshot().await.expect("snapshot");
        assert_eq!((snapshot.objects.len(), snapshot.endpoints.len()), (3, 1));

        assert!(
            store
                .delete(&a, Expect::Revision(r2))
                .await
                .expect("delete")
        );
        assert!(!store.delete(&a, Expect::Any).await.expect("again"));
        assert!(store.delete_endpoint(&record).await.expect("delete record"));
        assert!(!store.delete_endpoint(&record).await.expect("again"));
    });
}

#[test]
fn concurrent_applies_from_one_base_one_wins() {
    if !etcd_installed("concurrent_applies_from_one_base_one_wins") {
        return;
    }
    let etcd = LocalEtcd::start("objects-race", &["root"]).expect("etcd");
    let access = etcd.pki.access("root").expect("access");
    runtime().block_on(async {
        let a = policy("x", "a");
        let tasks = 16;
        let mut stores = Vec::new();
        for _ in 0..tasks {
            stores.push(store(&etcd, &access).await);
        }
        // Creates: one wins, the others find it there.
        // Each task its own bytes (`tag` apart from the other rounds': the
        // same bytes as stored would be unchanged, not a conflict).
        let race = |tag: &'static str, expected: Expect, stores: Vec<EtcdObjectStore>| {
            let a = a.clone();
            async move {
                let handles: Vec<_> = stores
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut store)| {
                        let a = a.clone();
                        tokio::spawn(async move {
                            store
                                .apply(&a, format!("{{\"{tag}\":{i}}}").as_bytes(), expected)
                                .await
                        })
                    })
                    .collect();
                let mut outcomes = Vec::new();
                for handle in handles {
                    outcomes.push(handle.await.expect("task"));
                }
                outcomes
            }
        };
        let outcomes = race("create", Expect::Revision(0), stores.clone()).await;
        let created: Vec<i64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Ok(ApplyOutcome::Created(r)) => Some(*r),
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 1, "{outcomes:?}");
        assert!(
            outcomes.iter().all(|o| matches!(
                o,
                Ok(ApplyOutcome::Created(_)) | Err(ObjectStoreError::Conflict { .. })
            )),
            "{outcomes:?}"
        );

        // Updates from that base: one wins, its value is stored.
        let base = created[0];
        let outcomes = race("update", Expect::Revision(base), stores.clone()).await;
        let winners: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Ok(ApplyOutcome::Updated(_))))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        let won = match outcomes[winners[0]] {
            Ok(outcome) => outcome.revision(),
            Err(ref e) => panic!("{e}"),
        };
        for outcome in &outcomes {
            match outcome {
                Ok(ApplyOutcome::Updated(_)) => {}
                Err(ObjectStoreError::Conflict {
                    expected, found, ..
                }) => assert_eq!((*expected, *found), (base, won)),
                other => panic!("refused with the winner's revision: {other:?}"),
            }
        }
        let mut store = stores[0].clone();
        let kept = store.get(&a).await.expect("get").expect("a");
        assert_eq!(
            kept.value,
            format!("{{\"update\":{}}}", winners[0]).as_bytes()
        );
        assert_eq!(kept.revision, won);
    });
}

/// A consumer that stopped following at `held` (its watch lost) while `a`
/// was deleted and `c` created and etcd compacted its history: it lists
/// again and ends with exactly etcd's objects. What it ends with.
async fn lagging_watcher_lists_again(
    store: &mut EtcdObjectStore,
    raw: &mut Client,
    held: i64,
) -> ObjectCache {
    let (a, b, c) = (policy("x", "a"), policy("x", "b"), policy("y", "c"));
    // The consumer stops following (its watch is lost); meanwhile `a`
    // is deleted and `c` created, and etcd compacts its history.
    let mut lagging = Watcher::new(store.clone());
    let mut lagging_cache = ObjectCache::default();
    lagging_cache.apply(next_update(&mut lagging).await);
    assert_eq!(lagging_cache.revision, held);
    store.delete(&a, Expect::Any).await.expect("delete a");
    store.apply(&c, b"c", Expect::Any).await.expect("c");
    let compacted = etcd_revision(raw).await;
    raw.compact(compacted, None).await.expect("compact");
    store
        .apply(&b, b"b again", Expect::Any)
        .await
        .expect("b again");

    // What a resume from the compaction point would see: not the
    // delete of `a` (the test would catch a watcher that did that).
    let mut naive = store.watch(compacted + 1).await.expect("naive watch");
    let events = tokio::time::timeout(Duration::from_secs(10), naive.next())
        .await
        .expect("events")
        .expect("events");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ObjectEvent::Delete { path, .. } if *path == a)),
        "{events:?}"
    );
    // A watch from before the compaction is refused with its point.
    let mut old = store.watch(held + 1).await.expect("watch");
    match tokio::time::timeout(Duration::from_secs(10), old.next()).await {
        Ok(Err(ObjectStoreError::Compacted { compact_revision })) => {
            assert_eq!(compact_revision, compacted);
        }
        other => panic!("a compacted start revision: {other:?}"),
    }

    // The watcher lists again and ends with exactly etcd's objects.
    let seen = catch_up(&mut lagging, &mut lagging_cache, store).await;
    assert!(matches!(seen.first(), Some(Update::Resync(_))), "{seen:?}");
    assert_eq!(lagging.resyncs(), 1);
    assert!(
        lagging
            .last_loss()
            .is_some_and(|why| why.contains("compacted"))
    );
    assert!(
        !lagging_cache.objects.contains_key(&a),
        "a's delete is not missed"
    );
    assert_eq!(
        lagging_cache
            .objects
            .keys()
            .map(ObjectPath::to_key)
            .collect::<Vec<_>>(),
        ["networkpolicies/x/b", "networkpolicies/y/c"]
    );
    lagging_cache
}

#[test]
fn a_watcher_sees_changes_in_order_and_lists_again_after_a_compaction() {
    if !etcd_installed("a_watcher_sees_changes_in_order_and_lists_again_after_a_compaction") {
        return;
    }
    let etcd = LocalEtcd::start("objects-watch", &["root"]).expect("etcd");
    let access = etcd.pki.access("root").expect("access");
    runtime().block_on(async {
        let mut store = store(&etcd, &access).await;
        let mut raw = raw_client(&etcd.endpoint, &access).await;
        let (a, b) = (policy("x", "a"), policy("x", "b"));
        store.apply(&a, b"a", Expect::Any).await.expect("a");
        // A key of the watched range that is neither an object nor a
        // record: left out.
        raw.put("/podnet/dns/x", "not ours", None)
            .await
            .expect("put");
        let mut watcher = Watcher::new(store.clone());
        let mut cache = ObjectCache::default();
        let first = next_update(&mut watcher).await;
        assert!(
            matches!(&first, Update::Resync(s) if s.objects.len() == 1),
            "{first:?}"
        );
        cache.apply(first);

        // Live: puts and deletes of objects and records, in order.
        store.apply(&b, b"b", Expect::Any).await.expect("b");
        store.apply(&a, b"a2", Expect::Any).await.expect("a2");
        store.delete(&b, Expect::Any).await.expect("delete b");
        store
            .replace_endpoints(
                "n1",
                &[
                    (endpoint("n1", "x", "a"), b"10.244.1.2".to_vec()),
                    (endpoint("n1", "x", "b"), b"10.244.1.3".to_vec()),
                ],
            )
            .await
            .expect("records");
        store
            .delete_endpoint(&endpoint("n1", "x", "b"))
            .await
            .expect("delete record");
        let seen = catch_up(&mut watcher, &mut cache, &mut store).await;
        assert!(
            seen.iter().all(|u| matches!(u, Update::Events { .. })),
            "{seen:?}"
        );
        let deletes = seen
            .iter()
            .flat_map(|u| match u {
                Update::Events { events, .. } => events.clone(),
                Update::Resync(_) => Vec::new(),
            })
            .filter(|e| {
                matches!(
                    e,
                    ObjectEvent::Delete { .. } | ObjectEvent::EndpointDelete { .. }
                )
            })
            .count();
        assert_eq!(deletes, 2, "{seen:?}");
        assert_eq!(watcher.resyncs(), 0);

        let lagging = lagging_watcher_lists_again(&mut store, &mut raw, cache.revision).await;
        // The live watcher is unaffected by the compaction.
        catch_up(&mut watcher, &mut cache, &mut store).await;
        assert_eq!(cache, lagging);
        assert_eq!(watcher.resyncs(), 0);
    });
}

#[test]
fn a_large_republish_is_split_at_the_transaction_limit() {
    if !etcd_installed("a_large_republish_is_split_at_the_transaction_limit") {
        return;
    }
    let etcd = LocalEtcd::start("objects-replace", &["root"]).expect("etcd");
    let access = etcd.pki.access("root").expect("access");
    runtime().block_on(async {
        let mut store = store(&etcd, &access).await;
        store
            .put_endpoint(&endpoint("n2", "x", "a"), b"10.244.2.2")
            .await
            .expect("n2's record");
        let count = 2 * MAX_TXN_OPS + 44;
        let records: Vec<(EndpointKey, Vec<u8>)> = (0..count)
            .map(|i| {
                (
                    endpoint("n1", "x", &format!("p{i}")),
                    format!("{i}").into_bytes(),
                )
            })
            .collect();
        let outcome = store
            .replace_endpoints("n1", &records)
            .await
            .expect("replace");
        assert_eq!((outcome.written, outcome.transactions), (count, 3));
        let (n1, _) = store.list_endpoints(Some("n1")).await.expect("list");
        assert_eq!(n1.len(), count);

        let keep = &records[..10];
        let outcome = store.replace_endpoints("n1", keep).await.expect("replace");
        assert_eq!(
            (outcome.unchanged, outcome.removed, outcome.transactions),
            (10, count - 10, 3)
        );
        let small = store
            .replace_endpoints("n1", &records[..5])
            .await
            .expect("replace");
        assert_eq!((small.removed, small.transactions), (5, 1));
        let (all, _) = store.list_endpoints(None).await.expect("list");
        let keys: Vec<String> = all.iter().map(|e| e.key.to_key()).collect();
        assert_eq!(keys.len(), 6, "n2's record is not n1's to remove: {keys:?}");
        assert!(keys.contains(&"n2/x/a".to_owned()));
    });
}

/// With etcd auth on and a node's role given its endpoint prefix (the
/// permission `node_permissions` needs for this), the node publishes and
/// replaces its own records, reads and watches everything, and cannot
/// write another node's records or an object; the operator writes objects.
#[test]
fn a_nodes_credential_writes_its_own_endpoint_records_only() {
    if !etcd_installed("a_nodes_credential_writes_its_own_endpoint_records_only") {
        return;
    }
    let n1 = node_user("n1");
    let etcd = LocalEtcd::start("objects-roles", &["root", OPERATOR_USER, &n1]).expect("etcd");
    let access = |user: &str| etcd.pki.access(user).expect("access");
    runtime().block_on(async {
        let mut root = EtcdDatastore::connect(
            std::slice::from_ref(&etcd.endpoint),
            TIMEOUT,
            &access("root"),
        )
        .await
        .expect("root");
        root.setup_auth(None, &["n1".to_owned()])
            .await
            .expect("auth on");
        let mut raw_root = raw_client(&etcd.endpoint, &access("root")).await;
        raw_root
            .role_grant_permission(
                n1.as_str(),
                Permission::read_write(endpoint_prefix("n1")).with_prefix(),
            )
            .await
            .expect("grant n1 its endpoint prefix");

        let mut operator = store(&etcd, &access(OPERATOR_USER)).await;
        let mut node = store(&etcd, &access(&n1)).await;
        let denied = |what: &str, result: Result<(), ObjectStoreError>| match result {
            Err(ObjectStoreError::Etcd { source, .. })
                if source.to_string().contains("permission denied") => {}
            other => panic!("{what}: {other:?}"),
        };
        operator
            .apply(&policy("x", "a"), b"{}", Expect::Any)
            .await
            .expect("the operator writes objects");
        denied(
            "a node writes an object",
            node.apply(&policy("x", "b"), b"{}", Expect::Any)
                .await
                .map(drop),
        );
        node.put_endpoint(&endpoint("n1", "x", "a"), b"10.244.1.2")
            .await
            .expect("n1 writes its record");
        node.replace_endpoints("n1", &[(endpoint("n1", "x", "b"), b"10.244.1.3".to_vec())])
            .await
            .expect("n1 replaces its records");
        denied(
            "n1 writes n10's record (a prefix is no wildcard)",
            node.put_endpoint(&endpoint("n10", "x", "a"), b"10.244.9.9")
                .await
                .map(drop),
        );
        let mut watcher = Watcher::new(node.clone());
        let mut cache = ObjectCache::default();
        catch_up(&mut watcher, &mut cache, &mut node).await;
        assert_eq!(cache.objects.len(), 1);
        assert_eq!(
            cache
                .endpoints
                .keys()
                .map(EndpointKey::to_key)
                .collect::<Vec<_>>(),
            ["n1/x/b"]
        );
    });
}
