//! The agents' side of the cluster objects, on etcd labs: pods named by
//! `CNI_ARGS` are published as endpoint records (ADD), removed (DEL) and
//! republished exactly after an agent restart; every node's view of the
//! objects converges after an apply (measured), after a compaction and
//! after the etcd member the agents use is killed; the same on the
//! nodes-file datastore (records beside the nodes file).
//!
//! Tests print `FIGURE` lines with what they measured (RELIABILITY.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use podnet::{
    api::{AgentStatus, Client, ClusterObjectsStatus, EndpointStatus, Request},
    datastore::objects::{
        EndpointKey, Expect, ObjectPath, ObjectStore, ObjectStoreError, etcd::EtcdObjectStore,
        file::FileObjectStore,
    },
    model::cluster::{ClusterObject, PodEndpointRecord, decode},
};
use podnet_tests::{
    lab::{LAB_NAMESPACE, LabDatastore, LabGuard, LabLayout, LabOptions},
    privileged, wait_up_to,
};

/// How long a node's view may take to show a change (generous: timings
/// on a shared machine are noisy; the measured figure is printed).
const CONVERGE_WITHIN: Duration = Duration::from_secs(5);

/// Runs `op` on the cluster objects in the lab's etcd, as the lab's
/// operator tools reach it.
fn with_store<T, F, Fut>(layout: &LabLayout, op: F) -> T
where
    T: Send + 'static,
    F: FnOnce(EtcdObjectStore) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ObjectStoreError>> + Send,
{
    let endpoints = layout.etcd_endpoints();
    let access = layout.etcd_access().expect("etcd access");
    layout
        .on_fabric_runtime(async move {
            let store =
                EtcdObjectStore::connect(&endpoints, &access, Duration::from_secs(10)).await?;
            op(store).await
        })
        .expect("fabric runtime")
        .expect("etcd")
}

/// Every node's endpoint records in etcd: key -> record.
fn records(layout: &LabLayout) -> BTreeMap<String, PodEndpointRecord> {
    with_store(layout, |mut store| async move {
        let (stored, _) = store.list_endpoints(None).await?;
        Ok(stored
            .into_iter()
            .map(|e| {
                let record = serde_json::from_slice(&e.value).expect("a record");
                (e.key.to_key(), record)
            })
            .collect())
    })
}

/// The records the lab's pods should have, by key.
fn expected(layout: &LabLayout) -> BTreeMap<String, PodEndpointRecord> {
    layout
        .pods
        .iter()
        .map(|p| {
            (
                format!("{}/{LAB_NAMESPACE}/{}", p.node, p.name),
                PodEndpointRecord {
                    node: p.node.clone(),
                    namespace: LAB_NAMESPACE.into(),
                    name: p.name.clone(),
                    ip: p.ip,
                },
            )
        })
        .collect()
}

fn wait_records(layout: &LabLayout, what: &str) {
    let want = expected(layout);
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + CONVERGE_WITHIN;
    while Instant::now() < deadline {
        seen = records(layout);
        if seen == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: records in etcd {seen:#?}, wanted {want:#?}");
}

fn objects_status(layout: &LabLayout, node: &str) -> ClusterObjectsStatus {
    let node = layout.node(node).expect("node");
    let status: AgentStatus = Client::new(&node.agent_socket)
        .call(&Request::Status)
        .expect("status");
    status
        .cluster_objects
        .expect("an agent with etcd holds the cluster objects")
}

fn apply(layout: &LabLayout, yaml: &str) -> i64 {
    let objects = decode(yaml).expect("decodes");
    with_store(layout, move |mut store| async move {
        let mut revision = 0;
        for object in objects {
            let path = path_of(&object);
            let bytes = object.to_stored_json().expect("encodes");
            revision = store.apply(&path, &bytes, Expect::Any).await?.revision();
        }
        Ok(revision)
    })
}

fn path_of(object: &ClusterObject) -> ObjectPath {
    ObjectPath::new(object.kind().plural(), object.namespace(), object.name()).expect("path")
}

/// What etcd holds: counts by resource, endpoint records, and the
/// revision of the latest change among them.
fn truth(layout: &LabLayout) -> (BTreeMap<String, usize>, usize, i64) {
    with_store(layout, |mut store| async move {
        let snapshot = store.snapshot().await?;
        let mut counts = BTreeMap::new();
        for o in &snapshot.objects {
            *counts.entry(o.path.resource().to_owned()).or_insert(0) += 1;
        }
        let latest = snapshot
            .objects
            .iter()
            .map(|o| o.revision)
            .chain(snapshot.endpoints.iter().map(|e| e.revision))
            .max()
            .unwrap_or(0);
        Ok((counts, snapshot.endpoints.len(), latest))
    })
}

/// Whether `node`'s view holds exactly what etcd holds.
fn node_matches(layout: &LabLayout, node: &str) -> bool {
    let (counts, records, latest) = truth(layout);
    let status = objects_status(layout, node);
    let held: BTreeMap<String, usize> = status
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    status.connected && held == counts && status.pod_records == records && status.revision >= latest
}

fn wait_views_match(layout: &LabLayout, what: &str) -> Duration {
    let started = Instant::now();
    let nodes: Vec<String> = layout.nodes.iter().map(|n| n.name.clone()).collect();
    wait_up_to(CONVERGE_WITHIN * 3, what, || {
        nodes.iter().all(|n| node_matches(layout, n))
    });
    started.elapsed()
}

const POLICY: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: default}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

fn two_nodes(tag: &str) -> LabGuard {
    LabGuard::up(tag, 2, 1, "vxlan", LabDatastore::Etcd).expect("lab up")
}

#[test]
fn pods_are_published_on_add_removed_on_del_and_republished_after_a_restart() {
    if !privileged("pods_are_published_on_add_removed_on_del_and_republished_after_a_restart") {
        return;
    }
    let mut lab = two_nodes("cop");
    wait_records(&lab.layout, "the lab's pods published");
    // The agent keeps the pod's name with the endpoint.
    let node1 = lab.layout.node("node1").expect("node1").clone();
    let endpoints: Vec<EndpointStatus> = Client::new(&node1.agent_socket)
        .call(&Request::ListEndpoints)
        .expect("endpoints");
    let pod = endpoints[0].endpoint.pod.clone().expect("a pod ref");
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        (LAB_NAMESPACE, "node1-pod1")
    );

    // A pod name the API server would refuse: ADD refused before anything
    // is made (CNI error 4, invalid environment), nothing published.
    let (ok, out) = lab
        .layout
        .cni(
            &node1,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "bad-name"),
                ("CNI_NETNS", "/var/run/netns/none"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=Bad_Name",
                ),
            ],
        )
        .expect("ADD");
    assert!(!ok, "{out}");
    assert_eq!(out["code"], 4, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("invalid K8S_POD_NAME \"Bad_Name\"")),
        "{out}"
    );

    let added = Instant::now();
    let extra = lab.layout.add_pod("node1", "extra").expect("ADD");
    wait_records(&lab.layout, "a pod ADDed is published");
    let published = added.elapsed();
    let deleted = Instant::now();
    let (ok, out) = lab
        .layout
        .cni(
            &node1,
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", &extra.container_id),
                ("CNI_NETNS", &format!("/var/run/netns/{}", extra.netns)),
                ("CNI_IFNAME", "eth0"),
            ],
        )
        .expect("DEL");
    assert!(ok, "DEL: {out}");
    lab.layout.pods.retain(|p| p.name != "extra");
    wait_records(&lab.layout, "a pod DELeted is removed");
    let removed = deleted.elapsed();

    // While node1's agent is down: its pod's record removed by hand, one
    // it does not hold written under its prefix by hand.
    lab.layout.stop_agent("node1").expect("stop");
    let mine = EndpointKey::new("node1", LAB_NAMESPACE, "node1-pod1").expect("key");
    let ghost = EndpointKey::new("node1", LAB_NAMESPACE, "ghost").expect("key");
    with_store(&lab.layout, move |mut store| async move {
        assert!(store.delete_endpoint(&mine).await?);
        let value = br#"{"node":"node1","namespace":"default","name":"ghost","ip":"10.244.1.99"}"#;
        store.put_endpoint(&ghost, value).await?;
        Ok(())
    });
    assert_ne!(records(&lab.layout), expected(&lab.layout));
    let restarted = Instant::now();
    lab.layout.start_agent("node1").expect("start");
    wait_records(
        &lab.layout,
        "a restarted agent republishes exactly what it holds",
    );
    let republished = restarted.elapsed();
    let status = objects_status(&lab.layout, "node1").publish;
    assert!(status.in_sync && status.pending.is_empty(), "{status:?}");
    assert_eq!(status.records, 1);
    eprintln!(
        "FIGURE cluster objects: pod record published {} ms after ADD began, removed {} ms after DEL began, \
         republished {} ms after the agent was started",
        published.as_millis(),
        removed.as_millis(),
        republished.as_millis()
    );
}

#[test]
fn node_views_converge_after_an_apply_and_resume_after_a_compaction() {
    if !privileged("node_views_converge_after_an_apply_and_resume_after_a_compaction") {
        return;
    }
    let lab = two_nodes("coc");
    wait_records(&lab.layout, "the lab's pods published");
    wait_views_match(&lab.layout, "both views hold the pods' records");

    let applied = Instant::now();
    let revision = apply(&lab.layout, POLICY);
    let mut took = BTreeMap::new();
    while took.len() < lab.layout.nodes.len() {
        for node in &lab.layout.nodes {
            if took.contains_key(&node.name) {
                continue;
            }
            let status = objects_status(&lab.layout, &node.name);
            if status.revision >= revision && status.counts.get("networkpolicies") == Some(&1) {
                took.insert(node.name.clone(), applied.elapsed());
            }
        }
        assert!(
            applied.elapsed() < CONVERGE_WITHIN,
            "views did not converge within {CONVERGE_WITHIN:?}: {took:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let slowest = took.values().max().copied().unwrap_or_default();
    eprintln!(
        "FIGURE cluster objects: node view converged in {} ms after an apply (per node: {})",
        slowest.as_millis(),
        took.iter()
            .map(|(n, d)| format!("{n} {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Compact etcd at its current revision, then change things: the
    // agents' watches go on (or list again) and hold exactly etcd's state.
    let compacted = compact(&lab.layout);
    apply(
        &lab.layout,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n",
    );
    let policy = ObjectPath::namespaced("networkpolicies", "default", "deny-all").expect("path");
    with_store(&lab.layout, move |mut store| async move {
        store.delete(&policy, Expect::Any).await
    });
    let caught_up = wait_views_match(&lab.layout, "views match etcd after a compaction");
    for node in &lab.layout.nodes {
        let status = objects_status(&lab.layout, &node.name);
        assert_eq!(status.counts.get("namespaces"), Some(&1), "{status:?}");
        assert_eq!(status.counts.get("networkpolicies"), Some(&0), "{status:?}");
    }
    eprintln!(
        "FIGURE cluster objects: views matched etcd {} ms after changes made past a compaction at revision {compacted}",
        caught_up.as_millis()
    );
    // What an operator reads.
    let node1 = lab.layout.node("node1").expect("node1");
    let out = std::process::Command::new(podnet_tests::bins::binary("podnetctl"))
        .arg("--socket")
        .arg(&node1.agent_socket)
        .arg("status")
        .output()
        .expect("podnetctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    let status = objects_status(&lab.layout, "node1");
    let line = format!(
        "cluster objects: revision {}, namespaces 1, pods 0, networkpolicies 0, services 0, \
         endpointslices 0, pod records 2 ({} resync{})",
        status.revision,
        status.resyncs,
        if status.resyncs == 1 { "" } else { "s" }
    );
    assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
}

/// Compacts etcd's history up to its current revision; returns it.
fn compact(layout: &LabLayout) -> i64 {
    with_store(layout, |store| async move {
        let etcd = |action: &'static str| {
            move |e| ObjectStoreError::Etcd {
                endpoint: "lab".into(),
                action: action.into(),
                source: Box::new(e),
            }
        };
        let mut client = store.client().clone();
        let revision = client
            .get(
                "/podnet/",
                Some(etcd_client::GetOptions::new().with_count_only()),
            )
            .await
            .map_err(etcd("reading the revision"))?
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        client
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .map_err(etcd("compacting"))?;
        Ok(revision)
    })
}

#[test]
fn node_views_resume_after_the_etcd_member_they_watch_is_killed() {
    if !privileged("node_views_resume_after_the_etcd_member_they_watch_is_killed") {
        return;
    }
    let mut lab = LabGuard::up_with(
        "cok",
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
    wait_records(&lab.layout, "the lab's pods published");
    wait_views_match(&lab.layout, "both views hold the pods' records");
    // The member node1's agent talks to (its objects' tasks share the
    // agent's connection): their watch is on it.
    let used: BTreeMap<String, String> = lab
        .layout
        .nodes
        .iter()
        .filter_map(|n| {
            let endpoint = lab.layout.datastore_status(&n.name).ok()?.endpoint?;
            Some((n.name.clone(), endpoint))
        })
        .collect();
    let victim = lab
        .layout
        .etcd
        .iter()
        .find(|m| used.get("node1") == Some(&m.client_url))
        .expect("node1's agent talks to a member")
        .name
        .clone();
    let victim_url = lab
        .layout
        .etcd_member(&victim)
        .expect("victim")
        .client_url
        .clone();
    let on_victim: BTreeSet<String> = used
        .iter()
        .filter(|(_, url)| **url == victim_url)
        .map(|(node, _)| node.clone())
        .collect();
    let before: BTreeMap<String, u64> = lab
        .layout
        .nodes
        .iter()
        .map(|n| (n.name.clone(), objects_status(&lab.layout, &n.name).resyncs))
        .collect();
    lab.layout.kill_etcd_member(&victim).expect("kill");
    let killed = Instant::now();
    apply(&lab.layout, POLICY);
    let caught_up = wait_views_match(&lab.layout, "views match etcd after a member was killed");
    let after: BTreeMap<String, u64> = lab
        .layout
        .nodes
        .iter()
        .map(|n| (n.name.clone(), objects_status(&lab.layout, &n.name).resyncs))
        .collect();
    // Those whose watch was on the killed member listed again elsewhere.
    for node in &on_victim {
        assert!(
            after[node] > before[node],
            "{node} was on {victim}: resyncs before {before:?}, after {after:?}"
        );
    }
    lab.layout.start_etcd_member(&victim).expect("restart");
    eprintln!(
        "FIGURE cluster objects: views matched etcd {} ms after the member {on_victim:?} watched ({victim}) was killed (resyncs {after:?})",
        killed.elapsed().as_millis().max(caught_up.as_millis())
    );
}

#[test]
fn nodes_on_the_nodes_file_publish_their_pods_and_see_applied_objects() {
    if !privileged("nodes_on_the_nodes_file_publish_their_pods_and_see_applied_objects") {
        return;
    }
    let lab = LabGuard::up("cof", 2, 1, "vxlan", LabDatastore::File).expect("lab up");
    let store = FileObjectStore::beside(&lab.layout.run_dir.join("nodes.json"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let want = expected(&lab.layout);
    wait_up_to(
        CONVERGE_WITHIN,
        "the pods' records beside the nodes file",
        || {
            let mut store = store.clone();
            let stored = runtime
                .block_on(async move { store.list_endpoints(None).await })
                .expect("list");
            let seen: BTreeMap<String, PodEndpointRecord> = stored
                .0
                .into_iter()
                .map(|e| {
                    (
                        e.key.to_key(),
                        serde_json::from_slice(&e.value).expect("record"),
                    )
                })
                .collect();
            seen == want
        },
    );
    let object = decode("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
        .expect("decodes")
        .remove(0);
    let applied = Instant::now();
    let revision = {
        let mut store = store.clone();
        runtime
            .block_on(async move {
                store
                    .apply(
                        &path_of(&object),
                        &object.to_stored_json().expect("encodes"),
                        Expect::Any,
                    )
                    .await
            })
            .expect("apply")
            .revision()
    };
    wait_up_to(CONVERGE_WITHIN, "both nodes see the namespace", || {
        lab.layout.nodes.iter().all(|n| {
            let status = objects_status(&lab.layout, &n.name);
            status.revision >= revision
                && status.counts.get("namespaces") == Some(&1)
                && status.pod_records == want.len()
                && status.publish.in_sync
        })
    });
    eprintln!(
        "FIGURE cluster objects: nodes-file views converged in {} ms after an apply",
        applied.elapsed().as_millis()
    );
}

#[test]
fn nodes_publish_and_watch_with_their_own_etcd_credential() {
    if !privileged("nodes_publish_and_watch_with_their_own_etcd_credential") {
        return;
    }
    let lab = LabGuard::up_with(
        "cot",
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
    // Over TLS, each agent as its own etcd user, whose role writes only
    // its own records.
    wait_records(&lab.layout, "the pods' records published by their nodes");
    apply(&lab.layout, POLICY);
    wait_views_match(&lab.layout, "views follow with the nodes' credentials");
    // A quiet watch stays open: no request timeout cuts it, nothing is
    // listed again.
    std::thread::sleep(Duration::from_secs(8));
    for node in &lab.layout.nodes {
        let status = objects_status(&lab.layout, &node.name);
        assert!(status.publish.in_sync, "{status:?}");
        assert_eq!(status.counts.get("networkpolicies"), Some(&1), "{status:?}");
        assert_eq!((status.connected, status.resyncs), (true, 0), "{status:?}");
    }
}

/// The lab in the upstream NetworkPolicy e2e suite's shape (`podnet-lab up
/// --pod-model e2e`): namespaces x, y, z with pods a, b, c, each pod
/// named to the plugin as kubelet names it and described to the datastore
/// with the model's labels, so `podnetctl get pods -A -o wide` shows every
/// pod's namespace, name, node, address and labels.
#[test]
fn the_lab_gives_its_pods_the_e2e_models_namespaces_names_and_labels() {
    if !privileged("the_lab_gives_its_pods_the_e2e_models_namespaces_names_and_labels") {
        return;
    }
    let mut lab = LabGuard::up("e2e", 2, 0, "vxlan", LabDatastore::File).expect("lab up");
    lab.layout.add_e2e_model().expect("the e2e model");
    assert_eq!(lab.layout.pods.len(), 9);
    let rows = || -> Vec<serde_json::Value> {
        let output = lab
            .layout
            .podnetctl_objects(&["get", "pods", "-A", "-o", "wide", "--json"].map(String::from))
            .expect("podnetctl")
            .output()
            .expect("podnetctl get");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("rows")
    };
    // The agents publish within a poll of the nodes-file store.
    wait_up_to(CONVERGE_WITHIN, "every pod's record is published", || {
        rows().iter().filter(|r| r["node"].is_string()).count() == 9
    });
    let rows = rows();
    for pod in &lab.layout.pods {
        let row = rows
            .iter()
            .find(|r| r["namespace"] == pod.k8s_namespace() && r["name"] == pod.k8s_name())
            .unwrap_or_else(|| {
                panic!(
                    "{}/{} listed: {rows:?}",
                    pod.k8s_namespace(),
                    pod.k8s_name()
                )
            });
        assert_eq!(row["node"], pod.node.as_str(), "{row}");
        assert_eq!(row["ip"], pod.ip.to_string(), "{row}");
        assert_eq!(row["labels"]["pod"], pod.k8s_name(), "{row}");
    }
    let namespaces: BTreeSet<&str> = lab
        .layout
        .pods
        .iter()
        .map(podnet_tests::lab::LabPod::k8s_namespace)
        .collect();
    assert_eq!(namespaces, BTreeSet::from(["x", "y", "z"]));
    let nodes: BTreeSet<&str> = lab.layout.pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes");
}
