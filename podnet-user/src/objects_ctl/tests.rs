//! The commands over the in-memory store: kubectl's lines, nothing written
//! for refused or unchanged objects, conflicts refused, the pods join.

use super::*;
use crate::model::cluster::ObjectKey;
use crate::{
    datastore::objects::{EndpointKey, ObjectStore, memory::MemoryObjectStore},
    model::cluster::{ClusterObject, PodEndpointRecord, decode},
};

/// A Namespace, a labelled Pod in it and a NetworkPolicy.
const OBJECTS: &str = include_str!("../model/cluster/testdata/small-cluster.yaml");

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// What a command printed (stdout, stderr) and its outcome.
fn run(
    json: bool,
    f: impl AsyncFnOnce(&mut Console<'_>) -> Result<(), CtlError>,
) -> (String, String, Outcome) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = {
        let mut console = Console::new(&mut out, &mut err, json);
        block_on(f(&mut console)).expect("runs");
        console.finish().expect("finishes")
    };
    (
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(err).expect("utf-8"),
        outcome,
    )
}

fn objects(text: &str) -> Vec<ClusterObject> {
    decode(text).expect("decodes")
}

fn apply_text(store: &MemoryObjectStore, text: &str) -> (String, String, Outcome) {
    let prepared = prepare_apply(&objects(text)).expect("valid");
    let mut store = store.clone();
    run(false, async |c| apply(&mut store, &prepared, c).await)
}

#[test]
fn apply_says_created_unchanged_configured_and_writes_nothing_unchanged() {
    let store = MemoryObjectStore::new();
    let (out, err, outcome) = apply_text(&store, OBJECTS);
    assert_eq!(
        out,
        "namespace/x created\npod/a created\nnetworkpolicy.networking.k8s.io/deny created\n"
    );
    assert_eq!((err.as_str(), outcome), ("", Outcome::Success));
    let revision = store.revision();
    let (out, _, _) = apply_text(&store, OBJECTS);
    assert_eq!(out.matches(" unchanged\n").count(), 3, "{out}");
    assert_eq!(store.revision(), revision, "nothing written");
    let changed = OBJECTS.replace("app: web", "app: api");
    let (out, _, _) = apply_text(&store, &changed);
    assert!(out.contains("pod/a configured\n"), "{out}");
    assert_eq!(store.revision(), revision + 1);
}

#[test]
fn one_invalid_object_refuses_all_in_kubectls_words() {
    let text = format!(
        "{OBJECTS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{ports: [{{port: 0}}]}}\n"
    );
    let refused = prepare_apply(&objects(&text)).expect_err("refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].message,
        "The Service \"s\" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
    );
    let bad_version =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, resourceVersion: abc}\n";
    let refused = prepare_apply(&objects(bad_version)).expect_err("refused");
    assert!(
        refused[0].message.starts_with(
            "The Namespace \"x\" is invalid: metadata.resourceVersion: Invalid value: \"abc\""
        ),
        "{}",
        refused[0].message
    );
}

#[test]
fn a_stale_resource_version_is_a_conflict_and_the_rest_is_applied() {
    let store = MemoryObjectStore::new();
    apply_text(&store, OBJECTS);
    let stale = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, resourceVersion: '1', labels: {a: b}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n";
    // Revision 1 is the namespace's own: a write over it succeeds once...
    let (out, _, outcome) = apply_text(&store, stale);
    assert_eq!(outcome, Outcome::Success, "{out}");
    // ...and the same revision again, with other content, is refused.
    let (out, err, outcome) = apply_text(&store, &stale.replace("a: b", "a: c"));
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        err.starts_with(
            "Error from server (Conflict): Operation cannot be fulfilled on namespaces \"x\": the object has been modified"
        ),
        "{err}"
    );
    assert_eq!(out, "namespace/y unchanged\n");
}

#[test]
fn delete_says_deleted_or_not_found() {
    let mut store = MemoryObjectStore::new();
    apply_text(&store, OBJECTS);
    let all: Vec<ObjectKey> = objects(OBJECTS).iter().map(ClusterObject::key).collect();
    let (out, err, outcome) = run(false, async |c| delete(&mut store, &all[1..], c).await);
    assert_eq!(
        out,
        "pod \"a\" deleted\nnetworkpolicy.networking.k8s.io \"deny\" deleted\n"
    );
    assert_eq!((err.as_str(), outcome), ("", Outcome::Success));
    let (out, err, outcome) = run(true, async |c| delete(&mut store, &all, c).await);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(err, "", "with --json, in the JSON");
    let results: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(results[0]["result"], "deleted");
    assert_eq!(results[1]["result"], "not-found");
    assert_eq!(
        results[2]["error"],
        "Error from server (NotFound): networkpolicies.networking.k8s.io \"deny\" not found"
    );
}

fn request(kind: Kind, output: OutputFormat) -> GetRequest {
    GetRequest {
        kind,
        names: Vec::new(),
        namespace: Some("x".into()),
        all_namespaces: false,
        output,
    }
}

#[test]
fn get_prints_tables_and_lists() {
    let mut store = MemoryObjectStore::new();
    apply_text(&store, OBJECTS);
    let (out, _, _) = run(false, async |c| {
        get(
            &mut store,
            &request(Kind::NetworkPolicy, OutputFormat::Table),
            c,
        )
        .await
    });
    assert_eq!(out, "NAME   POD-SELECTOR\ndeny   <none>\n");
    let mut all = request(Kind::Namespace, OutputFormat::Table);
    all.all_namespaces = true;
    let (out, _, _) = run(false, async |c| get(&mut store, &all, c).await);
    assert_eq!(out, "NAME   LABELS\nx      <none>\n", "no NAMESPACE column");
    let (out, _, _) = run(true, async |c| {
        get(
            &mut store,
            &request(Kind::NetworkPolicy, OutputFormat::Table),
            c,
        )
        .await
    });
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["resourceVersion"], "3");
    let mut one = request(Kind::Pod, OutputFormat::Yaml);
    one.names = vec!["a".into(), "b".into()];
    let (out, err, outcome) = run(false, async |c| get(&mut store, &one, c).await);
    assert!(out.starts_with("apiVersion: v1\nitems:\n"), "{out}");
    assert_eq!(err, "Error from server (NotFound): pods \"b\" not found\n");
    assert_eq!(outcome, Outcome::Failed);
    let (out, err, _) = run(false, async |c| {
        get(&mut store, &request(Kind::Service, OutputFormat::Table), c).await
    });
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("", "No resources found in x namespace.\n")
    );
}

#[test]
fn pods_are_joined_with_their_endpoint_records() {
    let mut store = MemoryObjectStore::new();
    apply_text(&store, OBJECTS);
    for (node, name, ip) in [("node1", "a", "10.244.1.2"), ("node2", "b", "10.244.2.3")] {
        let record = PodEndpointRecord {
            node: node.into(),
            namespace: "x".into(),
            name: name.into(),
            ip: ip.parse().expect("ip"),
        };
        let key = EndpointKey::new(node, "x", name).expect("key");
        let value = serde_json::to_vec(&record).expect("json");
        block_on(store.put_endpoint(&key, &value)).expect("put");
    }
    apply_text(
        &store,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: x}\nspec: {containers: [{name: c, image: i}]}\n",
    );
    let mut wide = request(Kind::Pod, OutputFormat::Wide);
    wide.all_namespaces = true;
    wide.namespace = None;
    let (out, _, _) = run(false, async |c| get(&mut store, &wide, c).await);
    assert_eq!(
        out,
        "NAMESPACE   NAME   NODE     IP           LABELS\n\
         x           a      node1    10.244.1.2   app=web\n\
         x           b      node2    10.244.2.3   <none>\n\
         x           c      <none>   <none>       <none>\n"
    );
    let (out, _, _) = run(false, async |c| {
        get(&mut store, &request(Kind::Pod, OutputFormat::Table), c).await
    });
    assert_eq!(
        out,
        "NAME   LABELS\na      app=web\nb      <none>\nc      <none>\n"
    );
}

#[test]
fn files_directories_and_stdin_are_read_and_namespaced() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("b.yaml"), OBJECTS).expect("write");
    std::fs::write(
        dir.path().join("a.json"),
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"n"}}"#,
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").expect("write");
    let stdin = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}\n";
    let paths = [dir.path().to_owned(), "-".into()];
    let sources = read_sources(&paths, stdin.as_bytes()).expect("read");
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}: the .txt is no manifest");
    assert!(
        names[0].ends_with("a.json") && names[2] == STDIN_NAME,
        "{names:?}"
    );
    let keys: Vec<String> = objects_of(&sources, Some("x"), "apply")
        .expect("objects")
        .iter()
        .map(|o| o.key().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "namespaces/n",
            "namespaces/x",
            "pods/x/a",
            "networkpolicies/x/deny",
            "pods/x/p"
        ]
    );
    // An object in x with -n y is refused, as kubectl refuses it.
    let err = objects_of(&sources, Some("y"), "apply").expect_err("mismatch");
    assert!(err.to_string().contains("--namespace=x"), "{err}");
    let twice = read_sources(&["-".into(), "-".into()], stdin.as_bytes());
    assert!(matches!(twice, Err(InputError::StdinTwice)));
    let empty = objects_of(&[], None, "delete").expect_err("nothing");
    assert_eq!(empty.to_string(), "no objects passed to delete");
    let bad = Source {
        name: "f.yaml".into(),
        text: "kind: [".into(),
    };
    let err = objects_of(&[bad], None, "apply").expect_err("syntax");
    assert!(err.to_string().starts_with("f.yaml: document 1: "), "{err}");
}
