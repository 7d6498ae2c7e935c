use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::*;
use crate::{
    datastore::objects::{Expect, ObjectPath, ObjectStore, Update, memory::MemoryObjectStore},
    endpoint::{PodRef, host_ifname},
    model::cluster::{ALL_KINDS, ClusterObject, Kind, decode},
};

const NODE: &str = "node-a";

fn endpoint(id: &str, pod: Option<(&str, &str)>, host: u8) -> (Owner, Endpoint) {
    let owner = Owner {
        container_id: id.into(),
        ifname: "eth0".into(),
    };
    let ep = Endpoint {
        host_ifname: host_ifname(&owner),
        owner: owner.clone(),
        network: "podnet".into(),
        netns: format!("/var/run/netns/{id}").into(),
        ip: Ipv4Addr::new(10, 244, 0, host),
        host_ifindex: u32::from(host),
        pod_mac: [2, 0, 0, 0, 0, host],
        host_mac: [2, 0, 0, 0, 0xff, host],
        bandwidth: None,
        pod: pod.map(|(namespace, name)| PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }),
    };
    (owner, ep)
}

fn held(list: &[(Owner, Endpoint)]) -> BTreeMap<Owner, Endpoint> {
    list.iter().cloned().collect()
}

/// The node's records in the store, as (namespace, name, ip).
async fn stored(store: &mut MemoryObjectStore) -> Vec<(String, String, Ipv4Addr)> {
    let (records, _) = store.list_endpoints(Some(NODE)).await.expect("list");
    records
        .iter()
        .map(|r| {
            let record: PodEndpointRecord = serde_json::from_slice(&r.value).expect("record");
            assert_eq!(record.node, NODE);
            assert_eq!(
                (r.key.namespace(), r.key.name()),
                (record.namespace.as_str(), record.name.as_str())
            );
            (record.namespace, record.name, record.ip)
        })
        .collect()
}

fn row(ns: &str, name: &str, host: u8) -> (String, String, Ipv4Addr) {
    (ns.into(), name.into(), Ipv4Addr::new(10, 244, 0, host))
}

#[test]
fn one_record_per_named_pod() {
    let eps = held(&[
        endpoint("c1", Some(("x", "a")), 5),
        endpoint("c2", None, 6),
        // A second sandbox of x/a (its DEL not seen yet): the first owner's.
        endpoint("c3", Some(("x", "a")), 7),
        // Valid for the API server (253 bytes), too long for a key segment.
        endpoint("c4", Some(("x", &"b".repeat(252))), 8),
    ]);
    let (wanted, problems) = records_for(NODE, &eps);
    assert_eq!(wanted.len(), 1, "{wanted:?}");
    let (key, bytes) = wanted.iter().next().expect("one");
    assert_eq!(key.to_key(), "node-a/x/a");
    let record: PodEndpointRecord = serde_json::from_slice(bytes).expect("json");
    assert_eq!(record.ip, Ipv4Addr::new(10, 244, 0, 5));
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("c3:eth0"), "{problems:?}");
    assert!(problems[1].contains("c4:eth0"), "{problems:?}");
}

fn fast() -> Timing {
    Timing {
        first_retry: Duration::from_millis(5),
        max_retry: Duration::from_millis(20),
        republish: Duration::from_hours(1),
    }
}

/// Polls `check` until it holds (5 s at most).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

fn start_publisher(
    store: &MemoryObjectStore,
    failures: usize,
) -> (
    ClusterObjects,
    tokio::task::JoinHandle<()>,
    Arc<AtomicUsize>,
) {
    let (objects, tasks) = ClusterObjects::new(NODE, "memory");
    let attempts = Arc::new(AtomicUsize::new(0));
    let (store, counter) = (store.clone(), Arc::clone(&attempts));
    let connect = move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let store = store.clone();
        async move {
            if n < failures {
                Err(ObjectStoreError::NoEndpoints)
            } else {
                Ok(store)
            }
        }
    };
    let task = tokio::spawn(publish(
        NODE.into(),
        connect,
        tasks.wanted,
        tasks.publish,
        fast(),
    ));
    (objects, task, attempts)
}

use crate::datastore::objects::ObjectStoreError;

#[tokio::test]
async fn the_node_publishes_exactly_the_pods_it_holds() {
    let mut store = MemoryObjectStore::new();
    let (objects, task, _) = start_publisher(&store, 0);
    let mut eps = held(&[endpoint("c1", Some(("x", "a")), 5), endpoint("c2", None, 6)]);
    objects.set_endpoints(&eps);
    eventually("ADD published", || {
        let mut s = store.clone();
        async move { stored(&mut s).await == vec![row("x", "a", 5)] }
    })
    .await;
    let (o, e) = endpoint("c3", Some(("y", "b")), 7);
    eps.insert(o, e);
    objects.set_endpoints(&eps);
    eventually("second ADD published", || {
        let mut s = store.clone();
        async move { stored(&mut s).await == vec![row("x", "a", 5), row("y", "b", 7)] }
    })
    .await;
    eps.retain(|o, _| o.container_id != "c1");
    objects.set_endpoints(&eps);
    eventually("DEL removed", || {
        let mut s = store.clone();
        async move { stored(&mut s).await == vec![row("y", "b", 7)] }
    })
    .await;
    let status = objects.status().publish;
    assert!(status.in_sync && status.pending.is_empty(), "{status:?}");
    assert_eq!(status.records, 1);
    task.abort();

    // Meanwhile, by hand: the record of y/b removed, one this node does
    // not hold written under its prefix, another node's record written.
    let key = |node: &str, ns: &str, name: &str| EndpointKey::new(node, ns, name).expect("key");
    store
        .delete_endpoint(&key(NODE, "y", "b"))
        .await
        .expect("delete");
    let extra = br#"{"node":"node-a","namespace":"z","name":"c","ip":"10.244.0.9"}"#;
    store
        .put_endpoint(&key(NODE, "z", "c"), extra)
        .await
        .expect("put");
    let other = br#"{"node":"node-b","namespace":"z","name":"c","ip":"10.244.1.9"}"#;
    store
        .put_endpoint(&key("node-b", "z", "c"), other)
        .await
        .expect("put");
    // A restarted agent republishes exactly what it holds.
    let (objects, task, _) = start_publisher(&store, 0);
    objects.set_endpoints(&eps);
    eventually("republished after a restart", || {
        let mut s = store.clone();
        async move { stored(&mut s).await == vec![row("y", "b", 7)] }
    })
    .await;
    let (others, _) = store.list_endpoints(Some("node-b")).await.expect("list");
    assert_eq!(others.len(), 1, "another node's record is not this node's");
    task.abort();
}

#[tokio::test]
async fn a_failing_store_is_retried_and_shown_pending() {
    let mut store = MemoryObjectStore::new();
    let (objects, task, attempts) = start_publisher(&store, 1_000_000);
    objects.set_endpoints(&held(&[endpoint("c1", Some(("x", "a")), 5)]));
    eventually("retried", || {
        let n = attempts.load(Ordering::SeqCst);
        async move { n >= 3 }
    })
    .await;
    let status = objects.status().publish;
    assert!(!status.in_sync, "{status:?}");
    assert!(status.failures >= 2, "{status:?}");
    assert!(
        status.pending[0].starts_with("1 endpoint record(s) to publish (retrying: "),
        "{status:?}"
    );
    assert!(stored(&mut store).await.is_empty());
    task.abort();

    // Three failures, then the store answers: published, in sync.
    let (objects, task, attempts) = start_publisher(&store, 3);
    objects.set_endpoints(&held(&[endpoint("c1", Some(("x", "a")), 5)]));
    eventually("published after failures", || {
        let mut s = store.clone();
        async move { stored(&mut s).await == vec![row("x", "a", 5)] }
    })
    .await;
    eventually("in sync", || {
        let in_sync = objects.status().publish.in_sync;
        async move { in_sync }
    })
    .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    let status = objects.status().publish;
    assert_eq!((status.failures, status.last_error), (0, None));
    task.abort();
}

/// A Namespace, a labelled Pod in it and a NetworkPolicy.
const OBJECTS: &str = include_str!("../../model/cluster/testdata/small-cluster.yaml");

fn path_of(object: &ClusterObject) -> ObjectPath {
    ObjectPath::new(object.kind().plural(), object.namespace(), object.name()).expect("path")
}

async fn apply_all(store: &mut MemoryObjectStore, text: &str) {
    for object in decode(text).expect("decodes") {
        let bytes = object.to_stored_json().expect("encodes");
        store
            .apply(&path_of(&object), &bytes, Expect::Any)
            .await
            .expect("apply");
    }
}

/// Whether the view holds exactly what the store holds.
async fn matches_store(view: &Mutex<AgentView>, store: &mut MemoryObjectStore) -> bool {
    let snapshot = store.snapshot().await.expect("snapshot");
    let v = view.lock().expect("view");
    let objects: Vec<String> = ALL_KINDS
        .into_iter()
        .flat_map(|kind| v.model().objects(kind, None))
        .map(|o| path_of(o).to_key())
        .collect();
    let mut want: Vec<String> = snapshot.objects.iter().map(|o| o.path.to_key()).collect();
    want.sort();
    let mut have = objects;
    have.sort();
    let records: Vec<_> = v.pod_records().cloned().collect();
    let want_records: Vec<PodEndpointRecord> = snapshot
        .endpoints
        .iter()
        .map(|e| serde_json::from_slice(&e.value).expect("record"))
        .collect();
    v.revision() == snapshot.revision && have == want && records == want_records
}

#[tokio::test]
async fn the_view_follows_through_compactions_and_lost_watches() {
    let mut store = MemoryObjectStore::new();
    apply_all(&mut store, OBJECTS).await;
    let (objects, tasks) = ClusterObjects::new(NODE, "memory");
    let connect = {
        let store = store.clone();
        move || {
            let store = store.clone();
            async move { Ok::<_, ObjectStoreError>(store) }
        }
    };
    let task = tokio::spawn(follow(
        connect,
        Arc::clone(&tasks.view),
        Duration::from_millis(5),
    ));
    let view = objects.view();
    eventually("listed", || {
        let (v, mut s) = (Arc::clone(&view), store.clone());
        async move { matches_store(&v, &mut s).await }
    })
    .await;
    let status = objects.status();
    assert_eq!(status.counts.get("pods"), Some(&1), "{status:?}");
    assert_eq!(status.counts.get("networkpolicies"), Some(&1));
    assert_eq!(status.counts.get("services"), Some(&0));
    assert_eq!((status.resyncs, status.connected), (0, true));

    // A record, then a compaction of everything so far and more changes:
    // the watch from the old revision is gone, the view lists again.
    let key = EndpointKey::new("node-b", "x", "a").expect("key");
    let record = br#"{"node":"node-b","namespace":"x","name":"a","ip":"10.244.1.5"}"#;
    store.put_endpoint(&key, record).await.expect("put");
    store.compact(store.revision());
    apply_all(
        &mut store,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n",
    )
    .await;
    let deny = ObjectPath::namespaced("networkpolicies", "x", "deny").expect("path");
    store.delete(&deny, Expect::Any).await.expect("delete");
    eventually("caught up after a compaction", || {
        let (v, mut s) = (Arc::clone(&view), store.clone());
        async move { matches_store(&v, &mut s).await }
    })
    .await;

    // A lost watch, with changes made while it is lost.
    store.break_watches();
    store.delete_endpoint(&key).await.expect("delete");
    apply_all(
        &mut store,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n",
    )
    .await;
    eventually("caught up after a lost watch", || {
        let (v, mut s) = (Arc::clone(&view), store.clone());
        async move { matches_store(&v, &mut s).await }
    })
    .await;
    let status = objects.status();
    assert_eq!(status.counts.get("namespaces"), Some(&3), "{status:?}");
    assert_eq!(status.counts.get("networkpolicies"), Some(&0));
    assert_eq!(status.pod_records, 0);
    assert!(status.resyncs >= 1, "{status:?}");
    task.abort();
}

#[test]
fn pod_labels_and_addresses_come_from_objects_and_records() {
    let mut store = MemoryObjectStore::new();
    let update = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(async {
            apply_all(&mut store, OBJECTS).await;
            for (node, name, ip) in [("node-a", "a", "10.244.0.5"), ("node-b", "b", "10.244.1.5")] {
                let key = EndpointKey::new(node, "x", name).expect("key");
                let value =
                    format!(r#"{{"node":"{node}","namespace":"x","name":"{name}","ip":"{ip}"}}"#);
                store
                    .put_endpoint(&key, value.as_bytes())
                    .await
                    .expect("put");
            }
            // A record whose value names another key: left out.
            let key = EndpointKey::new("node-b", "x", "c").expect("key");
            let lie = br#"{"node":"node-a","namespace":"x","name":"c","ip":"10.244.1.6"}"#;
            store.put_endpoint(&key, lie).await.expect("put");
            store.snapshot().await.expect("snapshot")
        });
    let mut view = AgentView::default();
    view.apply(Update::Resync(update));
    let labels = view.pod_labels("x", "a").expect("x/a has a Pod object");
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    // An endpoint record without a Pod object: no labels.
    assert_eq!(view.pod_labels("x", "b"), None);
    let at = |ip: &str, routed: &'static [&str]| -> Vec<String> {
        view.pods_at(ip.parse().expect("ip"), |n| routed.contains(&n))
            .map(|r| format!("{}/{}/{}", r.node, r.namespace, r.name))
            .collect()
    };
    assert_eq!(at("10.244.1.5", &["node-a", "node-b"]), ["node-b/x/b"]);
    // A node the plan does not route (gone): its records count for nothing.
    assert!(at("10.244.1.5", &["node-a"]).is_empty());
    assert!(at("10.244.1.6", &["node-a", "node-b"]).is_empty());
    let status = view.status();
    assert_eq!((status.pod_records, status.unreadable), (2, 1));
    assert_eq!(
        Kind::Pod.plural(),
        "pods",
        "status counts use the API's plural names"
    );
}

#[tokio::test]
async fn the_view_connects_again_after_failures_and_says_why_meanwhile() {
    let mut store = MemoryObjectStore::new();
    apply_all(&mut store, OBJECTS).await;
    let (objects, tasks) = ClusterObjects::new(NODE, "memory");
    let attempts = Arc::new(AtomicUsize::new(0));
    let connect = {
        let (store, attempts) = (store.clone(), Arc::clone(&attempts));
        move || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            let store = store.clone();
            async move {
                if n < 3 {
                    Err(ObjectStoreError::NoEndpoints)
                } else {
                    Ok(store)
                }
            }
        }
    };
    let task = tokio::spawn(follow(
        connect,
        Arc::clone(&tasks.view),
        Duration::from_millis(5),
    ));
    eventually("a failure shown", || {
        let status = objects.status();
        async move { !status.connected && status.last_error.is_some() }
    })
    .await;
    let view = objects.view();
    eventually("listed once the store answers", || {
        let (v, mut s) = (Arc::clone(&view), store.clone());
        async move { matches_store(&v, &mut s).await }
    })
    .await;
    let status = objects.status();
    assert!(status.connected, "{status:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    // The first list is not a resync: nothing was held before it.
    assert_eq!(status.resyncs, 0);
    assert!(
        status.summary().starts_with("revision "),
        "{}",
        status.summary()
    );
    task.abort();
}
