//! Issue 22's operator commands, through the real `podnetctl` binary
//! against both datastores (the nodes-file datastore in a temporary
//! directory, and an etcd started on loopback over TLS with authentication
//! on, logged in with the operator's client certificate):
//!
//! - every kind round-trips (apply, `get -o json`, the same spec back); an
//!   apply of the same file says `unchanged` for every object and the
//!   datastore's revision does not move; a changed field is `configured`;
//!   delete removes them;
//! - every invalid object of the model's corpus is refused with its field
//!   named and nothing stored;
//! - a node's credential cannot apply a NetworkPolicy;
//! - concurrent applies from one base revision: exactly one wins, the
//!   others are refused as conflicts, the winner is what is stored;
//! - `get pods -o wide` joins Pod objects with the endpoint records;
//! - `podnet-lab apply|get|delete` on a lab with etcd over TLS use the
//!   operator's certificate (root needed: the lab is namespaces).
//!
//! No root needed; the etcd tests start etcd processes: run them under
//! `flock /tmp/podnet-privileged.lock` like the other etcd tests.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use podnet::datastore::{
    etcd::{EtcdDatastore, OPERATOR_USER, node_user},
    objects::{EndpointKey, ObjectStore, etcd::EtcdObjectStore, file::FileObjectStore},
};
use podnet::model::cluster::PodEndpointRecord;
use podnet_tests::{
    bins,
    etcd_tls::{LocalEtcd, etcd_installed},
    lab::{LabDatastore, LabGuard, LabOptions},
    privileged,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(10);
/// podnetctl processes racing to apply one object.
const WRITERS: u16 = 6;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/cluster_objects")
}

/// The model's own corpus (podnet-user/src/model/cluster/testdata).
fn model_corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../podnet-user/src/model/cluster/testdata")
        .join(dir)
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("podnet-objects-cli-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A datastore as podnetctl is pointed at it, and as the test reads it.
#[derive(Clone)]
enum Store {
    File(PathBuf),
    Etcd {
        endpoint: String,
        pki: podnet_tests::etcd_tls::Pki,
        user: String,
    },
}

/// What podnetctl did.
struct Ran {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Store {
    fn file(dir: &Path) -> Self {
        Self::File(dir.join("nodes.json"))
    }

    fn etcd(etcd: &LocalEtcd, user: &str) -> Self {
        Self::Etcd {
            endpoint: etcd.endpoint.clone(),
            pki: etcd.pki.clone(),
            user: user.to_owned(),
        }
    }

    /// The same etcd, logged in as `user`.
    fn as_user(&self, user: &str) -> Self {
        match self {
            Self::Etcd { endpoint, pki, .. } => Self::Etcd {
                endpoint: endpoint.clone(),
                pki: pki.clone(),
                user: user.to_owned(),
            },
            Self::File(_) => self.clone(),
        }
    }

    /// `--datastore` and the etcd flags.
    fn args(&self) -> Vec<String> {
        match self {
            Self::File(path) => vec![format!("--datastore=file:{}", path.display())],
            Self::Etcd {
                endpoint,
                pki,
                user,
            } => {
                let (cert, key) = pki.client(user);
                vec![
                    format!("--datastore=etcd:{endpoint}"),
                    format!("--etcd-ca={}", pki.ca().display()),
                    format!("--etcd-cert={}", cert.display()),
                    format!("--etcd-key={}", key.display()),
                ]
            }
        }
    }

    /// The podnetctl command of `args` on this datastore (not started).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bins::binary("podnetctl"));
        command
            .args(args)
            .args(self.args())
            .env_remove("PODNET_DATASTORE");
        command
    }

    /// Runs podnetctl `args` on this datastore, `stdin` on its input.
    fn ctl(&self, args: &[&str], stdin: &str) -> Ran {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podnetctl runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("writing stdin");
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().expect("podnetctl ends");
        Ran {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            code: status.code(),
        }
    }

    /// The object at `kind`/`name` as `get -o json` shows it.
    fn get_json(&self, kind: &str, name: &str, namespace: Option<&str>) -> Option<Value> {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let ran = self.ctl(&args, "");
        if !ran.ok() {
            assert!(ran.stderr.contains("(NotFound)"), "{ran:?}");
            return None;
        }
        Some(serde_json::from_str(&ran.stdout).expect("JSON"))
    }

    /// Runs `op` on the library's store for this datastore (as the
    /// operator, for etcd).
    fn with_store<T>(&self, op: impl AsyncFnOnce(&mut dyn StoreOps) -> T) -> T {
        block_on(async {
            match self {
                Self::File(path) => op(&mut FileObjectStore::beside(path)).await,
                Self::Etcd { endpoint, pki, .. } => {
                    let access = pki.access(OPERATOR_USER).expect("access");
                    let mut store =
                        EtcdObjectStore::connect(std::slice::from_ref(endpoint), &access, TIMEOUT)
                            .await
                            .expect("connect");
                    op(&mut store).await
                }
            }
        })
    }

    /// The datastore's revision and how many objects it holds.
    fn revision_and_count(&self) -> (i64, usize) {
        self.with_store(async |s| s.revision_and_count().await)
    }
}

/// What the test reads and writes through the library, over either store
/// (`ObjectStore` itself is not object-safe).
trait StoreOps {
    fn revision_and_count(&mut self) -> std::pin::Pin<Box<dyn Future<Output = (i64, usize)> + '_>>;
    fn put_endpoint(
        &mut self,
        key: EndpointKey,
        value: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + '_>>;
}

impl<S: ObjectStore> StoreOps for S {
    fn revision_and_count(&mut self) -> std::pin::Pin<Box<dyn Future<Output = (i64, usize)> + '_>> {
        Box::pin(async move {
            let listing = self.list(None, None).await.expect("list");
            (listing.revision, listing.objects.len())
        })
    }

    fn put_endpoint(
        &mut self,
        key: EndpointKey,
        value: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + '_>> {
        Box::pin(async move {
            ObjectStore::put_endpoint(self, &key, &value)
                .await
                .expect("put endpoint");
        })
    }
}

/// An etcd with authentication on, users root, the operator and node1's
/// (each with its client certificate).
fn etcd_with_auth(tag: &str) -> LocalEtcd {
    let node1 = node_user("node1");
    let etcd = LocalEtcd::start(tag, &["root", OPERATOR_USER, &node1]).expect("etcd");
    let access = etcd.pki.access("root").expect("root access");
    block_on(async {
        let mut root = EtcdDatastore::connect_one(&etcd.endpoint, TIMEOUT, &access)
            .await
            .expect("connect as root");
        root.setup_auth(None, &["node1".to_owned()])
            .await
            .expect("auth on");
    });
    etcd
}

/// The parts of an object `apply` must keep: everything but metadata,
/// apiVersion and kind, plus the labels.
fn content(object: &Value) -> Value {
    let mut content = object.clone();
    let labels = object["metadata"]["labels"].clone();
    if let Some(map) = content.as_object_mut() {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        map.insert("labels".into(), labels);
    }
    content
}

/// Apply, get back, apply again (unchanged, nothing written), change one
/// field (configured), delete (gone): for every kind.
fn round_trip(store: &Store) {
    let file = corpus_dir().join("one-of-each.yaml");
    let file_arg = file.display().to_string();
    let text = fs::read_to_string(&file).expect("corpus");
    let inputs: Vec<Value> = text
        .split("\n---\n")
        .map(|doc| serde_norway::from_str(doc).expect("YAML"))
        .collect();
    assert_eq!(inputs.len(), 5, "one object of each kind");

    let ran = store.ctl(&["apply", "-f", &file_arg], "");
    assert!(ran.ok(), "{ran:?}");
    assert_eq!(
        ran.stdout,
        "namespace/shop created\npod/frontend created\n\
         networkpolicy.networking.k8s.io/allow-frontend created\nservice/frontend created\n\
         endpointslice.discovery.k8s.io/frontend-1 created\n"
    );
    for input in &inputs {
        let kind = input["kind"].as_str().expect("kind");
        let name = input["metadata"]["name"].as_str().expect("name");
        let namespace = input["metadata"]["namespace"].as_str();
        let got = store
            .get_json(kind, name, namespace)
            .unwrap_or_else(|| panic!("{kind} {name} stored"));
        assert_eq!(content(&got), content(input), "{kind} {name}");
        assert_eq!(got["kind"], input["kind"]);
        let version = got["metadata"]["resourceVersion"].as_str().expect("rv");
        assert!(version.parse::<i64>().is_ok_and(|r| r > 0), "{version}");
    }

    let (revision, count) = store.revision_and_count();
    assert_eq!(count, 5);
    // Again, from standard input: nothing to write.
    let ran = store.ctl(&["apply", "-f", "-"], &text);
    assert!(ran.ok(), "{ran:?}");
    assert_eq!(ran.stdout.lines().count(), 5, "{ran:?}");
    assert!(
        ran.stdout.lines().all(|l| l.ends_with(" unchanged")),
        "{ran:?}"
    );
    assert_eq!(store.revision_and_count(), (revision, 5), "nothing written");

    let changed = text.replace("port: 80, targetPort: http", "port: 8080, targetPort: http");
    let ran = store.ctl(&["apply", "-f", "-"], &changed);
    assert!(ran.ok(), "{ran:?}");
    assert!(
        ran.stdout.contains("service/frontend configured\n"),
        "{ran:?}"
    );
    assert_eq!(ran.stdout.matches(" unchanged\n").count(), 4, "{ran:?}");
    let service = store
        .get_json("svc", "frontend", Some("shop"))
        .expect("service");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);

    // By kind and name, as kubectl's `delete svc frontend -n shop`.
    let ran = store.ctl(&["delete", "svc", "frontend", "-n", "shop"], "");
    assert!(ran.ok(), "{ran:?}");
    assert_eq!(ran.stdout, "service \"frontend\" deleted\n");
    // The rest by the file; the Service is not there any more.
    let ran = store.ctl(&["delete", "-f", &file_arg], "");
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stdout
            .contains("networkpolicy.networking.k8s.io \"allow-frontend\" deleted\n"),
        "{ran:?}"
    );
    assert_eq!(ran.stdout.matches(" deleted\n").count(), 4, "{ran:?}");
    assert_eq!(
        ran.stderr,
        "Error from server (NotFound): services \"frontend\" not found\n"
    );
    assert_eq!(store.revision_and_count().1, 0, "all gone");
    assert!(store.get_json("pod", "frontend", Some("shop")).is_none());
}

#[test]
fn every_kind_round_trips_through_the_file_datastore() {
    let dir = TempDir::new("rt");
    round_trip(&Store::file(&dir.0));
}

#[test]
fn every_kind_round_trips_through_etcd_with_the_operators_certificate() {
    if !etcd_installed("every_kind_round_trips_through_etcd_with_the_operators_certificate") {
        return;
    }
    let etcd = etcd_with_auth("objects-cli-rt");
    let store = Store::etcd(&etcd, OPERATOR_USER);
    round_trip(&store);
    // One invalid object through etcd too: refused, nothing stored.
    let bad = model_corpus("invalid").join("np-endport-below-port.yaml");
    refused_and_nothing_stored(&store, &bad);
}

/// The `# field:` lines of a corpus file.
fn fields(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# field: "))
        .collect()
}

/// `file` (one invalid object) is refused naming its fields, exit 1, and
/// nothing is stored.
fn refused_and_nothing_stored(store: &Store, file: &Path) {
    let text = fs::read_to_string(file).expect("corpus file");
    let before = store.revision_and_count();
    let ran = store.ctl(&["apply", "-f", &file.display().to_string()], "");
    let name = file.display();
    assert_eq!(ran.code, Some(1), "{name}: {ran:?}");
    assert!(ran.stderr.starts_with("The "), "{name}: {ran:?}");
    assert!(ran.stderr.contains(" is invalid: "), "{name}: {ran:?}");
    for field in fields(&text) {
        assert!(
            ran.stderr.contains(field),
            "{name}: {field} not named: {ran:?}"
        );
    }
    assert_eq!(ran.stdout, "", "{name}");
    assert_eq!(store.revision_and_count(), before, "{name}: nothing stored");
}

#[test]
fn every_invalid_object_of_the_corpus_is_refused_and_nothing_stored() {
    let dir = TempDir::new("invalid");
    let store = Store::file(&dir.0);
    let mut files: Vec<PathBuf> = fs::read_dir(model_corpus("invalid"))
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() > 50, "the corpus is there");
    for file in &files {
        refused_and_nothing_stored(&store, file);
    }
    assert_eq!(store.revision_and_count(), (0, 0));
    // With a valid object beside an invalid one, neither is stored.
    let valid = corpus_dir().join("one-of-each.yaml");
    let ran = store.ctl(
        &[
            "apply",
            "-f",
            &valid.display().to_string(),
            "-f",
            &files[0].display().to_string(),
        ],
        "",
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert_eq!(store.revision_and_count(), (0, 0), "{ran:?}");
}

#[test]
fn a_nodes_credential_cannot_apply_a_network_policy() {
    if !etcd_installed("a_nodes_credential_cannot_apply_a_network_policy") {
        return;
    }
    let etcd = etcd_with_auth("objects-cli-node");
    let node = Store::etcd(&etcd, &node_user("node1"));
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec: {podSelector: {}}\n";
    let ran = node.ctl(&["apply", "-f", "-"], policy);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.starts_with(
            "Error from server (Forbidden): networkpolicies.networking.k8s.io \"deny-all\" is forbidden"
        ),
        "{ran:?}"
    );
    assert!(ran.stderr.contains(OPERATOR_USER), "{ran:?}");
    assert_eq!(node.revision_and_count().1, 0, "nothing stored");
    // The operator's may; the node's may still read it.
    let operator = node.as_user(OPERATOR_USER);
    assert!(operator.ctl(&["apply", "-f", "-"], policy).ok());
    let ran = node.ctl(&["get", "netpol", "-n", "x"], "");
    assert_eq!(
        ran.stdout, "NAME       POD-SELECTOR\ndeny-all   <none>\n",
        "{ran:?}"
    );
    let ran = node.ctl(&["delete", "-f", "-"], policy);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("(Forbidden)"), "{ran:?}");
}

/// Several podnetctl processes at once, each applying its own version of
/// one object carrying the same base resourceVersion: exactly one wins.
fn concurrent_applies(store: &Store) {
    let base = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {ports: [{port: 80}]}\n";
    assert!(store.ctl(&["apply", "-f", "-"], base).ok());
    let got = store.get_json("svc", "web", Some("x")).expect("stored");
    let version = got["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    let children: Vec<(u16, std::process::Child)> = (0..WRITERS)
        .map(|i| {
            let mut child = store
                .command(&["apply", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("podnetctl");
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x, resourceVersion: '{version}'}}\nspec: {{ports: [{{port: {}}}]}}\n",
                1000 + i
            );
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("stdin");
            (i, child)
        })
        .collect();
    let mut winners = Vec::new();
    for (i, child) in children {
        let out = child.wait_with_output().expect("ends");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        if out.status.success() {
            assert_eq!(stdout, "service/web configured\n");
            winners.push(i);
        } else {
            assert!(
                stderr.starts_with(
                    "Error from server (Conflict): Operation cannot be fulfilled on services \"web\""
                ),
                "writer {i}: {stderr}"
            );
        }
    }
    assert_eq!(winners.len(), 1, "exactly one wins: {winners:?}");
    let stored = store.get_json("svc", "web", Some("x")).expect("stored");
    assert_eq!(
        stored["spec"]["ports"][0]["port"],
        1000 + winners[0],
        "the winner's version is stored"
    );
}

#[test]
fn concurrent_applies_from_one_revision_one_wins_through_the_file_datastore() {
    let dir = TempDir::new("race");
    concurrent_applies(&Store::file(&dir.0));
}

#[test]
fn concurrent_applies_from_one_revision_one_wins_through_etcd() {
    if !etcd_installed("concurrent_applies_from_one_revision_one_wins_through_etcd") {
        return;
    }
    let etcd = etcd_with_auth("objects-cli-race");
    concurrent_applies(&Store::etcd(&etcd, OPERATOR_USER));
}

#[test]
fn get_pods_wide_joins_pod_objects_with_endpoint_records() {
    let dir = TempDir::new("wide");
    let store = Store::file(&dir.0);
    for (node, name, ip) in [("node1", "a", "10.244.1.2"), ("node2", "b", "10.244.2.3")] {
        let record = PodEndpointRecord {
            node: node.into(),
            namespace: "x".into(),
            name: name.into(),
            ip: ip.parse().expect("ip"),
        };
        let key = EndpointKey::new(node, "x", name).expect("key");
        let value = serde_json::to_vec(&record).expect("json");
        store.with_store(async |s| s.put_endpoint(key, value).await);
    }
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: web, tier: front}}\nspec: {containers: [{name: c, image: i}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: x}\nspec: {containers: [{name: c, image: i}]}\n";
    assert!(store.ctl(&["apply", "-f", "-"], pods).ok());
    let ran = store.ctl(&["get", "pods", "-n", "x", "-o", "wide"], "");
    assert!(ran.ok(), "{ran:?}");
    assert_eq!(
        ran.stdout,
        "NAME   NODE     IP           LABELS\n\
         a      node1    10.244.1.2   app=web,tier=front\n\
         b      node2    10.244.2.3   <none>\n\
         c      <none>   <none>       <none>\n"
    );
    let ran = store.ctl(&["get", "pods", "-A", "-o", "wide", "--json"], "");
    let rows: Value = serde_json::from_str(&ran.stdout).expect("JSON rows");
    assert_eq!(rows[1]["node"], "node2");
    assert_eq!(rows[1]["ip"], "10.244.2.3");
    assert_eq!(rows[1]["labels"], Value::Null);
    // The default namespace has none of them.
    let ran = store.ctl(&["get", "pods"], "");
    assert_eq!(
        (ran.stdout.as_str(), ran.stderr.as_str()),
        ("", "No resources found in default namespace.\n")
    );
}

#[test]
fn the_lab_applies_gets_and_deletes_with_the_operators_certificate() {
    let test = "the_lab_applies_gets_and_deletes_with_the_operators_certificate";
    if !privileged(test) || !etcd_installed(test) {
        return;
    }
    let lab = LabGuard::up_with(
        "objcli",
        1,
        0,
        "vxlan",
        LabDatastore::Etcd,
        LabOptions {
            etcd_tls: true,
            ..LabOptions::default()
        },
    )
    .expect("lab up");
    let file = corpus_dir().join("one-of-each.yaml").display().to_string();
    let lab_cli = |args: &[&str]| {
        let out = Command::new(bins::binary("podnet-lab"))
            .arg(format!("--run-dir={}", lab.layout.run_dir.display()))
            .args(args)
            .env_remove("PODNET_DATASTORE")
            .output()
            .expect("podnet-lab");
        Ran {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        }
    };
    let ran = lab_cli(&["apply", "-f", &file]);
    assert!(ran.ok(), "{ran:?}");
    assert_eq!(ran.stdout.matches(" created\n").count(), 5, "{ran:?}");
    let ran = lab_cli(&["get", "netpol", "-n", "shop"]);
    assert_eq!(
        ran.stdout, "NAME             POD-SELECTOR\nallow-frontend   app=backend\n",
        "{ran:?}"
    );
    // The operator's certificate, not a node's: the node's would be refused.
    assert!(lab.layout.etcd_pki().client(OPERATOR_USER).0.is_file());
    let ran = lab_cli(&["delete", "-f", &file]);
    assert!(ran.ok(), "{ran:?}");
    let ran = lab_cli(&["get", "ns", "shop"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("namespaces \"shop\" not found"),
        "{ran:?}"
    );
}
