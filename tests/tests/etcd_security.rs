//! Issue 21, finding 1: "anyone who reaches etcd owns the cluster's
//! routing". Against a real etcd started by the test on loopback with
//! `--client-cert-auth` and certificates the test makes:
//!
//! - the agent's etcd client speaks TLS, checks etcd's certificate against
//!   `--etcd-ca` and proves itself with a client certificate; without them
//!   (or with another CA's) it gets nowhere;
//! - a record written later (`put /podnet/nodes/0evil` with node2's pod CIDR
//!   and another node IP) does not take node2's CIDR: every reader keeps
//!   node2 (the incumbent) and refuses `0evil`;
//! - with etcd authentication on, a node's credential writes only its own
//!   keys (not another node's record, not a cluster-wide object), the
//!   operator's writes cluster-wide objects.
//!
//! No root needed (loopback only), but the test starts etcd processes: run
//! it under `flock /tmp/podnet-privileged.lock` like the other etcd tests.

use std::{net::Ipv4Addr, time::Duration};

use etcd_client::{Client, ConnectOptions, PutOptions};
use ipnet::Ipv4Net;
use podnet::datastore::{
    DatastoreError, JoinRequest, NodeRecord,
    etcd::{
        CLUSTER_PREFIX, EtcdAccess, EtcdAccessError, EtcdAccessFiles, EtcdDatastore, OPERATOR_USER,
        node_user,
    },
    membership::{self, Policy},
    routable_nodes,
};
use podnet_tests::etcd_tls::{LocalEtcd, Pki};

const TTL: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn request(name: &str, host: u8) -> JoinRequest {
    JoinRequest {
        name: name.into(),
        node_ip: Ipv4Addr::new(192, 168, 201, host),
        pod_cidr: None,
        preferred: None,
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        node_prefix: 24,
    }
}

async fn raw_client(endpoint: &str, access: &EtcdAccess) -> Client {
    Client::connect(
        [endpoint],
        Some(access.apply(ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)))),
    )
    .await
    .expect("raw client")
}

/// What node `me` routes to after reading etcd, as its agent decides it
/// (membership plan, then the record checks): accepted (name, node IP) and
/// refused names.
async fn routes_seen_by(
    store: &mut EtcdDatastore,
    me: &str,
    my_ip: Ipv4Addr,
    my_cidr: Ipv4Net,
) -> (Vec<(String, Ipv4Addr)>, Vec<String>) {
    let snapshot = store.snapshot().await.expect("snapshot");
    let plan = membership::plan(&snapshot, Policy::default(), Some(me), 0);
    let (ok, refused) = routable_nodes(
        &plan.routed,
        (me, my_ip),
        my_cidr,
        "10.244.0.0/16".parse().expect("cidr"),
    );
    let mut refused: Vec<String> = refused.into_iter().map(|(n, _)| n.name).collect();
    refused.extend(
        plan.nodes
            .iter()
            .filter(|n| !n.routed)
            .map(|n| n.record.name.clone()),
    );
    (
        ok.into_iter().map(|n| (n.name, n.node_ip)).collect(),
        refused,
    )
}

#[test]
fn etcd_over_tls_needs_its_ca_and_a_client_certificate() {
    let etcd = LocalEtcd::start("tls", &["root"]).expect("etcd");
    let other_dir = etcd.dir.join("other-ca");
    let other = Pki::generate(&other_dir, &[Ipv4Addr::LOCALHOST], &["root"]).expect("other CA");
    let (cert, key) = etcd.pki.client("root");
    let rt = runtime();
    let connect = |endpoint: &str, access: &EtcdAccess| {
        rt.block_on(EtcdDatastore::connect_one(endpoint, TTL, access))
    };

    // https:// without a CA: refused before a byte is sent.
    assert!(matches!(
        connect(&etcd.endpoint, &EtcdAccess::plain()),
        Err(DatastoreError::Access(EtcdAccessError::Endpoint { .. }))
    ));
    // Plain http:// to a TLS member: no answer.
    let http = etcd.endpoint.replace("https://", "http://");
    assert!(connect(&http, &EtcdAccess::plain()).is_err(), "plain http");
    // The CA but no client certificate: etcd wants one.
    let ca_only = EtcdAccess::load(&EtcdAccessFiles {
        ca: Some(etcd.pki.ca()),
        ..EtcdAccessFiles::default()
    })
    .expect("CA only");
    assert!(
        connect(&etcd.endpoint, &ca_only).is_err(),
        "no client certificate"
    );
    // Another CA's certificates: etcd's certificate is not trusted, and
    // the client's is not etcd's CA's.
    let foreign = other.access("root").expect("foreign access");
    assert!(connect(&etcd.endpoint, &foreign).is_err(), "another CA");
    // The right ones: a node joins over TLS.
    let access = etcd.pki.access("root").expect("access");
    let mut store = connect(&etcd.endpoint, &access).expect("TLS with a client certificate");
    let (cidr, _lease) = rt
        .block_on(store.join(&request("node1", 11)))
        .expect("join");
    assert!(cidr.prefix_len() == 24);

    // The flags' files: errors name the file.
    let missing = etcd.dir.join("missing.pem");
    let error = EtcdAccess::load(&EtcdAccessFiles {
        ca: Some(missing.clone()),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        ..EtcdAccessFiles::default()
    })
    .expect_err("missing CA");
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );
    let not_pem = etcd.dir.join("etcd.log");
    let error = EtcdAccess::load(&EtcdAccessFiles {
        ca: Some(etcd.pki.ca()),
        cert: Some(cert.clone()),
        key: Some(not_pem.clone()),
        ..EtcdAccessFiles::default()
    })
    .expect_err("a key that is no PEM");
    assert!(
        error.to_string().contains(&not_pem.display().to_string()),
        "{error}"
    );
    assert!(matches!(
        EtcdAccess::load(&EtcdAccessFiles {
            ca: Some(etcd.pki.ca()),
            cert: Some(cert),
            ..EtcdAccessFiles::default()
        }),
        Err(EtcdAccessError::Incomplete(_))
    ));
    // A password file: read, never shown.
    let password = etcd.dir.join("password");
    std::fs::write(&password, "s3cret\n").expect("password file");
    let with_user = EtcdAccess::load(&EtcdAccessFiles {
        ca: Some(etcd.pki.ca()),
        user: Some("op".into()),
        password_file: Some(password),
        ..EtcdAccessFiles::default()
    })
    .expect("user");
    assert!(!format!("{with_user:?}").contains("s3cret"));
}

/// The attack of the issue, on real etcd: node1 and node2 joined; then
/// one `put /podnet/nodes/0evil` (what `etcdctl put` does) with node2's pod
/// CIDR and the attacker's node IP. Before, every reader took `0evil` (name
/// order) and refused node2: node1's pods' traffic to node2's went to the
/// attacker. Now node2, which claimed first, holds.
#[test]
fn a_record_written_later_does_not_take_a_running_nodes_cidr_on_etcd() {
    let etcd = LocalEtcd::start("incumbent", &["root"]).expect("etcd");
    let access = etcd.pki.access("root").expect("access");
    let rt = runtime();
    rt.block_on(async {
        let endpoints = vec![etcd.endpoint.clone()];
        let mut node1 = EtcdDatastore::connect(&endpoints, TTL, &access)
            .await
            .expect("connect");
        let mut node2 = node1.clone();
        let (cidr1, _) = node1.join(&request("node1", 11)).await.expect("node1");
        let (cidr2, _) = node2.join(&request("node2", 12)).await.expect("node2");
        let evil_ip = Ipv4Addr::new(192, 168, 201, 66);
        let evil = serde_json::to_string(&NodeRecord {
            name: "0evil".into(),
            node_ip: evil_ip,
            pod_cidr: cidr2,
        })
        .expect("json");
        let mut raw = raw_client(&etcd.endpoint, &access).await;
        raw.put("/podnet/nodes/0evil", evil.clone(), None)
            .await
            .expect("put");
        let node2_ip = Ipv4Addr::new(192, 168, 201, 12);
        let seen =
            routes_seen_by(&mut node1, "node1", Ipv4Addr::new(192, 168, 201, 11), cidr1).await;
        assert_eq!(seen.0, [("node2".to_owned(), node2_ip)], "{seen:?}");
        assert!(seen.1.contains(&"0evil".to_owned()), "{seen:?}");

        // Also with a durable record and the claim key rewritten: the
        // claim order is etcd's creation revision, which nobody chooses.
        raw.put("/podnet/members/0evil", evil, None)
            .await
            .expect("put");
        raw.put(
            format!("/podnet/cidrs/{}_{}", cidr2.network(), cidr2.prefix_len()),
            "0evil",
            None,
        )
        .await
        .expect("put");
        let seen =
            routes_seen_by(&mut node1, "node1", Ipv4Addr::new(192, 168, 201, 11), cidr1).await;
        assert_eq!(seen.0, [("node2".to_owned(), node2_ip)], "{seen:?}");
    });
}

/// Least privilege: with etcd auth on (`EtcdDatastore::setup_auth`), node1's
/// credential (its certificate, common name `podnet-node-node1`) joins and
/// publishes itself but cannot write node2's records, delete them, or write
/// a cluster-wide object; the operator's credential can.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn a_nodes_credential_writes_only_its_own_keys() {
    let node1_user = node_user("node1");
    let node2_user = node_user("node2");
    let etcd = LocalEtcd::start(
        "roles",
        &["root", OPERATOR_USER, &node1_user, &node2_user, "stranger"],
    )
    .expect("etcd");
    let rt = runtime();
    let access = |user: &str| etcd.pki.access(user).expect("access");
    rt.block_on(async {
        let endpoints = vec![etcd.endpoint.clone()];
        let mut root = EtcdDatastore::connect(&endpoints, TTL, &access("root"))
            .await
            .expect("root");
        root.setup_auth(None, &["node1".to_owned(), "node2".to_owned()])
            .await
            .expect("auth on");

        let mut node1 = EtcdDatastore::connect(&endpoints, TTL, &access(&node1_user))
            .await
            .expect("node1 connects");
        let mut node2 = EtcdDatastore::connect(&endpoints, TTL, &access(&node2_user))
            .await
            .expect("node2 connects");
        let (cidr1, lease1) = node1
            .join(&request("node1", 11))
            .await
            .expect("node1 joins");
        let (cidr2, _) = node2
            .join(&request("node2", 12))
            .await
            .expect("node2 joins");
        assert!(
            node1
                .mark_gone("node1", "node9", 1)
                .await
                .expect("its own tombstone of another node")
        );

        let denied = |what: &str, result: Result<_, etcd_client::Error>| match result {
            Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("permission denied") => {}
            other => panic!("{what}: {other:?}"),
        };
        let mut raw1 = raw_client(&etcd.endpoint, &access(&node1_user)).await;
        let evil = serde_json::to_string(&NodeRecord {
            name: "node2".into(),
            node_ip: Ipv4Addr::new(192, 168, 201, 66),
            pod_cidr: cidr2,
        })
        .expect("json");
        denied(
            "node1 writes node2's liveness record",
            raw1.put("/podnet/nodes/node2", evil.clone(), None)
                .await
                .map(|_| ()),
        );
        denied(
            "node1 writes node2's durable record",
            raw1.put("/podnet/members/node2", evil, None)
                .await
                .map(|_| ()),
        );
        denied(
            "node1 deletes node2's durable record",
            raw1.delete("/podnet/members/node2", None).await.map(|_| ()),
        );
        denied(
            "node1 writes a new node's record",
            raw1.put("/podnet/nodes/0evil", "{}", None)
                .await
                .map(|_| ()),
        );
        let policy_key = format!("{CLUSTER_PREFIX}networkpolicies/default/allow-all");
        denied(
            "node1 writes a cluster-wide object",
            raw1.put(policy_key.as_str(), "{}", None).await.map(|_| ()),
        );
        // Its own record, even one naming node2's CIDR, is written, and
        // taken for nothing: node2 claimed first.
        let own = serde_json::to_string(&NodeRecord {
            name: "node1".into(),
            node_ip: Ipv4Addr::new(192, 168, 201, 11),
            pod_cidr: cidr2,
        })
        .expect("json");
        raw1.put(
            "/podnet/nodes/node1",
            own,
            Some(PutOptions::new().with_lease(lease1)),
        )
        .await
        .expect("node1 writes its own record");
        // As a third node sees it (node2 itself never routes its own CIDR
        // away): node2 holds its CIDR, node1's new record is refused.
        let observer_cidr: Ipv4Net = "10.244.200.0/24".parse().expect("cidr");
        let observer_ip = Ipv4Addr::new(192, 168, 201, 13);
        let seen = routes_seen_by(&mut node2, "node3", observer_ip, observer_cidr).await;
        assert_eq!(
            seen.0,
            [("node2".to_owned(), Ipv4Addr::new(192, 168, 201, 12))],
            "{seen:?}"
        );
        assert!(seen.1.contains(&"node1".to_owned()), "{seen:?}");
        // Its own claim-order key for node2's CIDR is new: no help.
        raw1.put(
            format!(
                "/podnet/held/node1/{}_{}",
                cidr2.network(),
                cidr2.prefix_len()
            ),
            "",
            None,
        )
        .await
        .expect("node1 writes its own claim-order key");
        let seen = routes_seen_by(&mut node2, "node3", observer_ip, observer_cidr).await;
        assert_eq!(
            seen.0,
            [("node2".to_owned(), Ipv4Addr::new(192, 168, 201, 12))],
            "{seen:?}"
        );
        denied(
            "node1 writes node2's claim-order key",
            raw1.put(
                format!(
                    "/podnet/held/node2/{}_{}",
                    cidr1.network(),
                    cidr1.prefix_len()
                ),
                "",
                None,
            )
            .await
            .map(|_| ()),
        );
        denied(
            "node1 writes a key of node10's (a prefix is no wildcard)",
            raw1.put("/podnet/held/node10/10.244.1.0_24", "", None)
                .await
                .map(|_| ()),
        );

        // Nothing shared: the old claim keys and another's tombstones.
        denied(
            "node1 writes a shared claim key",
            raw1.put(
                format!("/podnet/cidrs/{}_{}", cidr2.network(), cidr2.prefix_len()),
                "node1",
                None,
            )
            .await
            .map(|_| ()),
        );
        denied(
            "node1 writes node2's tombstone of another node",
            raw1.put("/podnet/gone/node2/node9", r#"{"since":0}"#, None)
                .await
                .map(|_| ()),
        );
        denied(
            "node1 writes an old-style shared tombstone",
            raw1.put("/podnet/gone/node2", r#"{"since":0}"#, None)
                .await
                .map(|_| ()),
        );

        // Releasing another node is not a node's to do.
        let release = membership::Release {
            name: "node2".into(),
            cidrs: vec![cidr2],
            tombstones: vec![],
        };
        let error = node1.release(&release).await.expect_err("release by node1");
        assert!(error.is_permission_denied(), "{error}");

        let mut operator = raw_client(&etcd.endpoint, &access(OPERATOR_USER)).await;
        operator
            .put(policy_key.as_str(), "{}", None)
            .await
            .expect("the operator writes cluster-wide objects");

        // A certificate of the right CA without an etcd user gets nothing.
        let mut stranger = raw_client(&etcd.endpoint, &access("stranger")).await;
        assert!(stranger.get("/podnet/", None).await.is_err());
    });
}

/// Issue 21, the rest of finding 1: the CIDR claims (`cidrs/`) and the
/// tombstones (`gone/<name>`) were keys every node's role could write, so
/// a compromised node could rewrite a restarting node's claim (its publish
/// then failed: it stayed out) and tombstone it with an early time (every
/// agent then took it for gone and removed its routes). With the roles on,
/// node1 (the attacker) does everything its credential allows while node2
/// restarts: node2 stays routed as unreachable, then publishes itself
/// again with its own CIDR.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn a_nodes_credential_cannot_keep_a_restarting_node_out_or_make_it_gone_early() {
    let users: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| node_user(n))
        .collect();
    let mut all: Vec<&str> = vec!["root", OPERATOR_USER];
    all.extend(users.iter().map(String::as_str));
    let etcd = LocalEtcd::start("restart", &all).expect("etcd");
    let rt = runtime();
    let access = |user: &str| etcd.pki.access(user).expect("access");
    rt.block_on(async {
        let endpoints = vec![etcd.endpoint.clone()];
        let mut root = EtcdDatastore::connect(&endpoints, TTL, &access("root"))
            .await
            .expect("root");
        let names = ["node1".to_owned(), "node2".to_owned(), "node3".to_owned()];
        root.setup_auth(None, &names).await.expect("auth on");
        let mut stores = Vec::new();
        let mut joined = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut store = EtcdDatastore::connect(&endpoints, TTL, &access(&node_user(name)))
                .await
                .expect("connect");
            let host = 11 + u8::try_from(i).expect("small");
            joined.push(store.join(&request(name, host)).await.expect("join"));
            stores.push(store);
        }
        let (cidr2, lease2) = joined[1];
        // node2 restarts: its lease is gone.
        stores[1].revoke(lease2).await.expect("node2 away");

        // node1, compromised, while node2 is away: a claim of its own on
        // node2's CIDR, a tombstone of its own with an early time, and
        // an attempt at the shared claim key.
        let mut raw1 = raw_client(&etcd.endpoint, &access(&users[0])).await;
        let cidr_suffix = format!("{}_{}", cidr2.network(), cidr2.prefix_len());
        raw1.put(format!("/podnet/held/node1/{cidr_suffix}"), "", None)
            .await
            .expect("its own claim key");
        raw1.put("/podnet/gone/node1/node2", r#"{"since":0}"#, None)
            .await
            .expect("its own tombstone");
        assert!(
            raw1.put(format!("/podnet/cidrs/{cidr_suffix}"), "node1", None)
                .await
                .is_err(),
            "the shared claim key is not node1's to write"
        );

        // node3 (a witness of node2) reads the cluster at once: node2 is
        // unreachable and still routed, node1's early time counting for
        // nothing; node3 writes its own tombstone.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let policy =
            Policy::new(Duration::from_mins(10), Duration::from_hours(24)).expect("policy");
        let snapshot = stores[2].snapshot().await.expect("snapshot");
        assert_eq!(
            snapshot.claims.get(&cidr2).map(String::as_str),
            Some("node2")
        );
        let plan = membership::plan(&snapshot, policy, Some("node3"), now);
        let node2 = plan
            .nodes
            .iter()
            .find(|n| n.record.name == "node2")
            .expect("node2 listed");
        assert_eq!(
            (node2.state, node2.routed),
            (membership::NodeState::Unreachable, true),
            "{plan:?}"
        );
        assert_eq!(plan.mark_gone, ["node2"]);
        assert!(
            stores[2]
                .mark_gone("node3", "node2", now)
                .await
                .expect("node3's tombstone")
        );
        // Every reader, also one that is no node, sees the same.
        let snapshot = stores[2].snapshot().await.expect("snapshot");
        assert_eq!(snapshot.tombstone("node2").map(|t| t.since), Some(now));
        let plan = membership::plan(&snapshot, policy, None, now);
        assert!(plan.routed.iter().any(|r| r.name == "node2"), "{plan:?}");

        // node2 comes back with its own CIDR.
        let mut back = request("node2", 12);
        back.preferred = Some(cidr2);
        let (again, lease2) = stores[1].join(&back).await.expect("node2 publishes again");
        assert_eq!(again, cidr2);
        let snapshot = stores[2].snapshot().await.expect("snapshot");
        assert_eq!(snapshot.live.get("node2").map(|r| r.pod_cidr), Some(cidr2));
        assert!(
            membership::claim_problems(&snapshot).is_empty(),
            "{snapshot:?}"
        );

        // Releasing node2 for good is the operator's: not node1's, and not
        // while node2 runs.
        let error = stores[0]
            .release_node("node2")
            .await
            .expect_err("node1 releases node2");
        assert!(error.to_string().contains("it is running"), "{error}");
        // A pod record of node2's, which goes with it.
        let mut pods2 = podnet::datastore::objects::etcd::EtcdObjectStore::new(
            stores[1].client(),
            stores[1].endpoint(),
        );
        let pod_key =
            podnet::datastore::objects::EndpointKey::new("node2", "default", "p").expect("key");
        podnet::datastore::objects::ObjectStore::put_endpoint(&mut pods2, &pod_key, b"{}")
            .await
            .expect("node2 publishes a pod");
        stores[1].revoke(lease2).await.expect("node2 leaves");
        let error = stores[0]
            .release_node("node2")
            .await
            .expect_err("node1 releases node2");
        assert!(error.is_permission_denied(), "{error}");
        let mut operator = EtcdDatastore::connect(&endpoints, TTL, &access(OPERATOR_USER))
            .await
            .expect("operator");
        let released = operator
            .release_node("node2")
            .await
            .expect("the operator releases node2")
            .expect("nothing changed meanwhile");
        assert_eq!(released.cidrs, [cidr2]);
        let snapshot = operator.snapshot().await.expect("snapshot");
        // node1's own claim key on it, made while it attacked, is what
        // holds it now: one CIDR besides its own is what a compromised node
        // can hold, and the claim check (`podnetctl datastore`) names it.
        assert_eq!(
            snapshot.claims.get(&cidr2).map(String::as_str),
            Some("node1"),
            "{snapshot:?}"
        );
        let problems = membership::claim_problems(&snapshot);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("node1 holds 2 claims")),
            "{problems:?}"
        );
        assert!(
            !snapshot.members.contains_key("node2") && !snapshot.tombstones.contains_key("node2"),
            "{snapshot:?}"
        );
        let left =
            podnet::datastore::objects::ObjectStore::list_endpoints(&mut pods2, Some("node2"))
                .await
                .expect("records");
        assert!(
            left.0.is_empty(),
            "node2's pod records went with it: {left:?}"
        );
    });
}

/// The operator's way to turn the roles on: `podnetctl etcd-auth` as etcd's
/// root (its certificate), then `--add-node` for a node that comes later.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn podnetctl_etcd_auth_turns_the_roles_on() {
    let (node1_user, node2_user) = (node_user("node1"), node_user("node2"));
    let etcd = LocalEtcd::start("ctl", &["root", &node1_user, &node2_user]).expect("etcd");
    let (cert, key) = etcd.pki.client("root");
    let podnetctl = |extra: &[&str]| {
        let output = std::process::Command::new(podnet_tests::bins::binary("podnetctl"))
            .arg("etcd-auth")
            .arg(format!("--etcd={}", etcd.endpoint))
            .arg(format!("--etcd-ca={}", etcd.pki.ca().display()))
            .arg(format!("--etcd-cert={}", cert.display()))
            .arg(format!("--etcd-key={}", key.display()))
            .args(extra)
            .output()
            .expect("podnetctl runs");
        assert!(
            output.status.success(),
            "podnetctl etcd-auth {extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    podnetctl(&["--node=node1"]);
    let rt = runtime();
    // node1's role as an earlier version made it: also the shared claim
    // keys. Adding the node again takes that away.
    rt.block_on(async {
        let mut root = raw_client(&etcd.endpoint, &etcd.pki.access("root").expect("access")).await;
        root.role_grant_permission(
            node_user("node1"),
            etcd_client::Permission::read_write("/podnet/cidrs/").with_prefix(),
        )
        .await
        .expect("old grant");
        let mut raw1 = raw_client(
            &etcd.endpoint,
            &etcd.pki.access(&node1_user).expect("access"),
        )
        .await;
        raw1.put("/podnet/cidrs/10.244.9.0_24", "node1", None)
            .await
            .expect("the old role writes shared claims");
    });
    podnetctl(&["--add-node", "--node=node1"]);
    podnetctl(&["--add-node", "--node=node2"]);
    rt.block_on(async {
        let endpoints = vec![etcd.endpoint.clone()];
        for (name, host) in [("node1", 11), ("node2", 12)] {
            let access = etcd.pki.access(&node_user(name)).expect("access");
            let mut store = EtcdDatastore::connect(&endpoints, TTL, &access)
                .await
                .expect("connect");
            store.join(&request(name, host)).await.expect("join");
        }
        let mut raw1 = raw_client(
            &etcd.endpoint,
            &etcd.pki.access(&node1_user).expect("access"),
        )
        .await;
        let error = raw1
            .put("/podnet/members/node2", "{}", None)
            .await
            .expect_err("node1 writes node2's record");
        assert!(error.to_string().contains("permission denied"), "{error}");
        let error = raw1
            .put("/podnet/cidrs/10.244.9.0_24", "node1", None)
            .await
            .expect_err("the updated role writes shared claims");
        assert!(error.to_string().contains("permission denied"), "{error}");
    });
    // node2 leaves for good: `podnetctl release` is the operator's (here
    // root's certificate), refused with a node's.
    rt.block_on(async {
        let access = etcd.pki.access(&node2_user).expect("access");
        let mut node2 = EtcdDatastore::connect(std::slice::from_ref(&etcd.endpoint), TTL, &access)
            .await
            .expect("connect");
        let snapshot = node2.snapshot().await.expect("snapshot");
        assert!(snapshot.live.contains_key("node2"));
        // Its lease: what the join granted, found through the record's key.
        let mut raw2 = raw_client(&etcd.endpoint, &access).await;
        let lease = raw2
            .get("/podnet/nodes/node2", None)
            .await
            .expect("get")
            .kvs()
            .first()
            .map(etcd_client::KeyValue::lease)
            .expect("node2's liveness key");
        node2.revoke(lease).await.expect("node2 leaves");
    });
    let release = |user: &str| {
        let (cert, key) = etcd.pki.client(user);
        std::process::Command::new(podnet_tests::bins::binary("podnetctl"))
            .args(["release", "node2"])
            .arg(format!("--datastore=etcd:{}", etcd.endpoint))
            .arg(format!("--etcd-ca={}", etcd.pki.ca().display()))
            .arg(format!("--etcd-cert={}", cert.display()))
            .arg(format!("--etcd-key={}", key.display()))
            .output()
            .expect("podnetctl runs")
    };
    let refused = release(&node1_user);
    assert!(!refused.status.success(), "node1 releases node2");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let released = release("root");
    assert!(
        released.status.success(),
        "{}",
        String::from_utf8_lossy(&released.stderr)
    );
    rt.block_on(async {
        let access = etcd.pki.access("root").expect("access");
        let mut root = EtcdDatastore::connect(std::slice::from_ref(&etcd.endpoint), TTL, &access)
            .await
            .expect("connect");
        let snapshot = root.snapshot().await.expect("snapshot");
        assert!(!snapshot.members.contains_key("node2"), "{snapshot:?}");
        assert!(
            !snapshot.claims.values().any(|n| n == "node2"),
            "{snapshot:?}"
        );
    });
}
