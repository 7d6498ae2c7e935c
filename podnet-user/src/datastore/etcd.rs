//! The etcd v3 datastore, as flannel and Calico use one.
//!
//! Keys (prefix `/podnet/`):
//! - `held/<name>/<network>_<prefix>` = empty: node `name`'s claim on a
//!   node pod CIDR. Its creation revision, which only etcd assigns, is when
//!   the claim was made: the oldest claim on a CIDR holds it
//!   ([`super::membership::decide_claims`]), so two nodes that claim one
//!   CIDR at the same moment agree on who got it (each creates its key,
//!   then reads every claim; the loser deletes its key). Claims have no
//!   lease: a node that comes back gets its CIDR again. A claim is only
//!   released by [`EtcdDatastore::release`] after the node has been gone
//!   for the release delay (see [`super::membership`]). A per-node prefix,
//!   so that with etcd roles only the node (and the operator) writes it.
//! - `cidrs/<network>_<prefix>` = node name: the shared claim keys of
//!   agents from before `held/` (read, with their creation revision, as
//!   claims; no longer written; removed with their node's release).
//! - `nodes/<name>` = [`NodeRecord`] under a lease with a TTL, kept alive by
//!   the agent: the node's liveness. etcd deletes it when the lease expires.
//! - `members/<name>` = [`NodeRecord`] without a lease: the node's durable
//!   record, so that a node whose lease expired is still known (and routed
//!   during the grace period) by every agent, also one that restarted since.
//!   Its modification revision is when the node last published itself.
//! - `gone/<observer>/<name>` = `{"since": <unix seconds>}`: the tombstone
//!   of node `name` written by node `observer`, one of its witnesses (see
//!   [`super::membership`]); `gone/<name>` is the shared one of agents from
//!   before (removed when the node is live again or released).
//!
//! A node publishes itself (liveness key, record) in one transaction that
//! checks its claim is still the one it read, and a claim is released in
//! one transaction that checks the node is still without a lease and its
//! tombstones are still the ones the decision was made on. Whichever of the
//! two commits first, the other fails: a node coming back while its claim
//! is being released either keeps its claim (the release fails) or sees it
//! gone and claims again (its publish fails), and two agents releasing at
//! once release once.
//!
//! A connection talks to one member. The client's balanced channel over all
//! members is not used: a member that is down stays "ready" in it and every
//! request the balancer sends there fails, so an agent would lose every few
//! requests while one member of three is down. The agent moves to the next
//! member instead when its member fails (`agent::follow`).

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    Permission, PutOptions, RoleRevokePermissionOptions, TlsOptions, Txn, TxnOp, UserAddOptions,
    WatchOptions,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{
    DatastoreError, JoinRequest, NodeRecord, candidate_cidr,
    membership::{LEGACY_OBSERVER, Policy, Release, Snapshot, Tombstone, decide_claims},
    store::{Datastore, LeaseId, Observation, claim_and_publish},
};

const PREFIX: &str = "/podnet/";
const CIDRS: &str = "/podnet/cidrs/";
const NODES: &str = "/podnet/nodes/";
const MEMBERS: &str = "/podnet/members/";
const GONE: &str = "/podnet/gone/";
const HELD: &str = "/podnet/held/";

fn cidr_key(cidr: Ipv4Net) -> String {
    format!("{CIDRS}{}_{}", cidr.network(), cidr.prefix_len())
}

fn parse_cidr_key(key: &str) -> Option<Ipv4Net> {
    let (net, prefix) = key.strip_prefix(CIDRS)?.split_once('_')?;
    Ipv4Net::new(net.parse().ok()?, prefix.parse().ok()?).ok()
}

fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

fn member_key(name: &str) -> String {
    format!("{MEMBERS}{name}")
}

/// The prefix of the tombstones `observer` writes.
fn gone_prefix(observer: &str) -> String {
    format!("{GONE}{observer}/")
}

/// `observer`'s tombstone of `name`; [`LEGACY_OBSERVER`]'s is the one
/// shared key of agents from before observers kept their own.
fn gone_key(observer: &str, name: &str) -> String {
    if observer == LEGACY_OBSERVER {
        format!("{GONE}{name}")
    } else {
        format!("{}{name}", gone_prefix(observer))
    }
}

/// (observer, node) of a tombstone key.
fn parse_gone_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(GONE)?;
    let (observer, name) = rest.split_once('/').unwrap_or((LEGACY_OBSERVER, rest));
    ((observer == LEGACY_OBSERVER || is_node_name(observer)) && is_node_name(name))
        .then_some((observer, name))
}

/// The prefix of `name`'s claim-order keys (the trailing `/` keeps
/// `node1`'s prefix off `node10`'s keys).
fn held_prefix(name: &str) -> String {
    format!("{HELD}{name}/")
}

fn held_key(name: &str, cidr: Ipv4Net) -> String {
    format!(
        "{}{}_{}",
        held_prefix(name),
        cidr.network(),
        cidr.prefix_len()
    )
}

/// The end of the key range of every key that starts with `key` (as etcd
/// computes it for a prefix: the last byte below 0xff plus one).
fn prefix_end(key: &str) -> Vec<u8> {
    let mut end = key.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

/// Whether `name` can name a node in keys and etcd roles: what Kubernetes
/// allows in a node name (and `_`), so that no name holds a `/` (the
/// prefix `held/a/` of node `a` would cover the keys of a node `a/b`).
#[must_use]
pub fn is_node_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn parse_held_key(key: &str) -> Option<(&str, Ipv4Net)> {
    let (name, cidr) = key.strip_prefix(HELD)?.split_once('/')?;
    if !is_node_name(name) {
        return None;
    }
    let (net, prefix) = cidr.split_once('_')?;
    Some((
        name,
        Ipv4Net::new(net.parse().ok()?, prefix.parse().ok()?).ok()?,
    ))
}

/// The value of a tombstone key.
#[derive(Debug, Serialize, Deserialize)]
struct TombstoneValue {
    since: u64,
}

/// How an agent or a tool proves who it is to etcd and checks etcd's
/// certificate: TLS with a CA (and, with etcd's `--client-cert-auth`, a
/// client certificate whose common name etcd takes as the user name), and
/// optionally an etcd user and password. The default is plain `http://`.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    tls: Option<EtcdTls>,
    user: Option<(String, String)>,
}

#[derive(Clone)]
struct EtcdTls {
    ca: Certificate,
    identity: Option<Identity>,
}

/// The files [`EtcdAccess::load`] reads: also the `--etcd-*` flags of
/// `podnetd` and `podnetctl etcd-auth` (flattened into both).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdAccessFiles {
    /// etcd: CA certificate (PEM) that signed the members' certificates;
    /// needed for https:// endpoints.
    #[arg(long = "etcd-ca", id = "etcd_ca", value_name = "ETCD_CA")]
    pub ca: Option<PathBuf>,
    /// etcd: client certificate (PEM) to log in with, for a cluster started
    /// with --client-cert-auth (its common name is the etcd user).
    #[arg(
        long = "etcd-cert",
        id = "etcd_cert",
        value_name = "ETCD_CERT",
        requires = "etcd_key"
    )]
    pub cert: Option<PathBuf>,
    /// etcd: the client certificate's private key (PEM).
    #[arg(
        long = "etcd-key",
        id = "etcd_key",
        value_name = "ETCD_KEY",
        requires = "etcd_cert"
    )]
    pub key: Option<PathBuf>,
    /// etcd: user to log in as (with --etcd-password-file).
    #[arg(
        long = "etcd-user",
        id = "etcd_user",
        value_name = "ETCD_USER",
        requires = "etcd_password_file"
    )]
    pub user: Option<String>,
    /// etcd: file holding --etcd-user's password: never a command-line
    /// argument, which every user of the machine can read.
    #[arg(
        long = "etcd-password-file",
        id = "etcd_password_file",
        value_name = "ETCD_PASSWORD_FILE",
        requires = "etcd_user"
    )]
    pub password_file: Option<PathBuf>,
}

/// Why [`EtcdAccess`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EtcdAccessError {
    #[error("reading the etcd {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the etcd {what} {} holds no PEM {expected}", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the etcd password file {} is empty", .0.display())]
    EmptyPassword(PathBuf),
    #[error("etcd access: {0}")]
    Incomplete(&'static str),
    #[error("etcd endpoint {endpoint}: {msg}")]
    Endpoint { endpoint: String, msg: &'static str },
}

impl fmt::Debug for EtcdAccess {
    // Never the password (the agent logs its configuration).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls.is_some())
            .field(
                "client_certificate",
                &self.tls.as_ref().is_some_and(|t| t.identity.is_some()),
            )
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

fn read_pem(
    what: &'static str,
    path: &Path,
    expected: &'static str,
) -> Result<Vec<u8>, EtcdAccessError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdAccessError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    // The TLS library's own message for a key file that is no PEM is
    // "unexpected EOF" at connect time; say which file it is now.
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(EtcdAccessError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

impl EtcdAccess {
    /// Plain `http://`, no user.
    #[must_use]
    pub fn plain() -> Self {
        Self::default()
    }

    /// TLS from PEM bytes: the CA, and a client certificate and key.
    #[must_use]
    pub fn from_pem(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> Self {
        Self {
            tls: Some(EtcdTls {
                ca: Certificate::from_pem(ca),
                identity: identity.map(|(cert, key)| Identity::from_pem(cert, key)),
            }),
            user: None,
        }
    }

    /// The same, also logging in as `user`.
    #[must_use]
    pub fn with_user(mut self, user: &str, password: &str) -> Self {
        self.user = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Reads the files named by the flags. A certificate needs its key (and
    /// the other way round), a client certificate needs a CA, a user needs
    /// a password file.
    pub fn load(files: &EtcdAccessFiles) -> Result<Self, EtcdAccessError> {
        let identity = match (&files.cert, &files.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read_pem("client certificate", cert, "certificate")?,
                read_pem("client key", key, "private key")?,
            )),
            _ => {
                return Err(EtcdAccessError::Incomplete(
                    "--etcd-cert and --etcd-key go together",
                ));
            }
        };
        let tls = match (&files.ca, identity) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(EtcdAccessError::Incomplete(
                    "a client certificate needs --etcd-ca (the CA of etcd's certificates)",
                ));
            }
            (Some(ca), identity) => Some(EtcdTls {
                ca: Certificate::from_pem(read_pem("CA", ca, "certificate")?),
                identity: identity.map(|(cert, key)| Identity::from_pem(cert, key)),
            }),
        };
        let user = match (&files.user, &files.password_file) {
            (None, None) => None,
            (Some(user), Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| EtcdAccessError::Read {
                        what: "password file",
                        path: path.clone(),
                        source,
                    })?;
                // One line; the newline an editor or `echo` adds is not part of it.
                let password = text.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    return Err(EtcdAccessError::EmptyPassword(path.clone()));
                }
                Some((user.clone(), password.to_owned()))
            }
            _ => {
                return Err(EtcdAccessError::Incomplete(
                    "--etcd-user and --etcd-password-file go together",
                ));
            }
        };
        Ok(Self { tls, user })
    }

    /// Whether this uses TLS.
    #[must_use]
    pub const fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Checks `endpoints` against this: `https://` needs a CA (etcd's
    /// certificate would go unchecked otherwise), and with TLS set up every
    /// endpoint is `https://` (a client certificate sent in the clear to an
    /// `http://` URL proves nothing and the traffic is readable).
    pub fn check_endpoints(&self, endpoints: &[String]) -> Result<(), EtcdAccessError> {
        for endpoint in endpoints {
            let https = endpoint.starts_with("https://");
            if https && self.tls.is_none() {
                return Err(EtcdAccessError::Endpoint {
                    endpoint: endpoint.clone(),
                    msg: "https:// needs --etcd-ca",
                });
            }
            if !https && self.tls.is_some() {
                return Err(EtcdAccessError::Endpoint {
                    endpoint: endpoint.clone(),
                    msg: "with --etcd-ca every endpoint is https://",
                });
            }
        }
        Ok(())
    }

    /// `options` with this TLS configuration and user (for a tool that
    /// talks to etcd with its own client).
    #[must_use]
    pub fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::new().ca_certificate(tls.ca.clone());
            if let Some(identity) = &tls.identity {
                config = config.identity(identity.clone());
            }
            options = options.with_tls(config);
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }
}

/// The etcd user (and role) of node `name`: the common name of its client
/// certificate. Its role may write only that node's own keys.
#[must_use]
pub fn node_user(name: &str) -> String {
    format!("podnet-node-{name}")
}

/// The etcd user and role that writes cluster-wide objects (and may do
/// everything under `/podnet/`): an operator's, never a node's.
pub const OPERATOR_USER: &str = "podnet-operator";

/// Where cluster-wide objects live (NetworkPolicies, Services, ...): only
/// the operator's role writes under it.
pub const CLUSTER_PREFIX: &str = "/podnet/cluster/";

/// What `node_user(name)`'s role may do, as (key, prefix?, write?): read
/// everything under `/podnet/` (every agent routes to every node); write
/// only keys of its own: its liveness and durable record (exact keys: a
/// prefix `/podnet/nodes/node1` would also cover `node10`), its CIDR
/// claims (`held/<name>/`) and its tombstones of other nodes
/// (`gone/<name>/`), and the records of its pods (`endpoints/<name>/`).
/// Nothing another node reads as that node's, nothing shared: a
/// compromised node can announce itself and its pods, not unseat another.
#[must_use]
pub fn node_permissions(name: &str) -> Vec<(String, bool, bool)> {
    vec![
        (PREFIX.to_owned(), true, false),
        (node_key(name), false, true),
        (member_key(name), false, true),
        (held_prefix(name), true, true),
        (gone_prefix(name), true, true),
        (super::objects::etcd::endpoint_prefix(name), true, true),
    ]
}

/// How one member of the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The answering member's ID.
    pub member_id: u64,
    /// The leader's member ID (0: none).
    pub leader: u64,
}

/// A connection to one member of the etcd cluster.
#[derive(Clone)]
pub struct EtcdDatastore {
    client: Client,
    lease_ttl: i64,
    endpoint: String,
}

impl EtcdDatastore {
    /// Connects to the first of `endpoints` that answers.
    pub async fn connect(
        endpoints: &[String],
        lease_ttl: Duration,
        access: &EtcdAccess,
    ) -> Result<Self, DatastoreError> {
        Self::connect_from(endpoints, 0, lease_ttl, access)
            .await
            .map(|(store, _)| store)
    }

    /// Tries `endpoints` in turn, starting at index `first`; returns the
    /// first member that answers and its index.
    pub async fn connect_from(
        endpoints: &[String],
        first: usize,
        lease_ttl: Duration,
        access: &EtcdAccess,
    ) -> Result<(Self, usize), DatastoreError> {
        let mut last = None;
        for k in 0..endpoints.len() {
            let i = (first + k) % endpoints.len();
            match Self::connect_one(&endpoints[i], lease_ttl, access).await {
                Ok(store) => return Ok((store, i)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DatastoreError::EtcdProtocol {
            endpoint: String::new(),
            action: "connecting".into(),
            msg: "no endpoints".into(),
        }))
    }

    /// Connects to one member and checks that it serves: a linearizable
    /// read, answered only by a member that has a leader and a quorum.
    pub async fn connect_one(
        endpoint: &str,
        lease_ttl: Duration,
        access: &EtcdAccess,
    ) -> Result<Self, DatastoreError> {
        // Short timeouts: the caller moves on to the next member. HTTP/2
        // pings find a member that vanished without closing the connection
        // (etcd refuses pings more often than every 5 s). `require_leader`:
        // a member cut off from the others refuses requests and ends
        // watches instead of serving what it had.
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_require_leader(true);
        access.check_endpoints(&[endpoint.to_owned()])?;
        let options = access.apply(options);
        let err = |action: &str| {
            let (endpoint, action) = (endpoint.to_owned(), action.to_owned());
            move |source| DatastoreError::Etcd {
                endpoint,
                action,
                source: Box::new(source),
            }
        };
        let client = Client::connect([endpoint], Some(options))
            .await
            .map_err(err("connecting"))?;
        let mut store = Self {
            client,
            lease_ttl: i64::try_from(lease_ttl.as_secs()).unwrap_or(30).max(2),
            endpoint: endpoint.to_owned(),
        };
        store
            .client
            .get(
                PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(err("reading"))?;
        Ok(store)
    }

    /// Sets up least privilege on a cluster without authentication yet
    /// (connected as anyone; idempotent when auth is on and this is root):
    /// the `root` user (etcd's own, which auth needs; `root_password`, or
    /// none for a client-certificate login with common name `root`), the
    /// operator's user and role ([`OPERATOR_USER`], everything under
    /// `/podnet/`), a user and role per node ([`node_user`],
    /// [`node_permissions`]); then turns authentication on. Users get no
    /// password: they log in with their client certificate's common name.
    pub async fn setup_auth(
        &mut self,
        root_password: Option<&str>,
        nodes: &[String],
    ) -> Result<(), DatastoreError> {
        // All checked before anything is created.
        for node in nodes {
            self.check_node_name(node)?;
        }
        let users = self.users().await?;
        if !users.iter().any(|u| u == "root") {
            let options = match root_password {
                Some(_) => None,
                None => Some(UserAddOptions::new().with_no_pwd()),
            };
            self.client
                .user_add("root", root_password.unwrap_or_default(), options)
                .await
                .map_err(self.err("adding the root user"))?;
            self.client
                .user_grant_role("root", "root")
                .await
                .map_err(self.err("granting root the root role"))?;
        }
        self.add_user(OPERATOR_USER, &[(PREFIX.to_owned(), true, true)], &users)
            .await?;
        for node in nodes {
            self.add_user(&node_user(node), &node_permissions(node), &users)
                .await?;
        }
        self.client
            .auth_enable()
            .await
            .map_err(self.err("enabling authentication"))?;
        Ok(())
    }

    /// Adds a node's user and role to a cluster with auth on (as root or
    /// anyone with the right): a node that joins later.
    pub async fn add_node_user(&mut self, node: &str) -> Result<(), DatastoreError> {
        self.check_node_name(node)?;
        let users = self.users().await?;
        self.add_user(&node_user(node), &node_permissions(node), &users)
            .await
    }

    /// The names of etcd's users.
    async fn users(&mut self) -> Result<Vec<String>, DatastoreError> {
        Ok(self
            .client
            .user_list()
            .await
            .map_err(self.err("listing the users"))?
            .users()
            .to_vec())
    }

    fn check_node_name(&self, node: &str) -> Result<(), DatastoreError> {
        if is_node_name(node) {
            return Ok(());
        }
        Err(self.protocol(
            format!("adding a user for node {node:?}"),
            "a node name is 1 to 253 letters, digits, '-', '.' or '_'",
        ))
    }

    /// The user `name` with a role of the same name holding exactly
    /// `permissions` (key, prefix?, write?).
    async fn add_user(
        &mut self,
        name: &str,
        permissions: &[(String, bool, bool)],
        existing: &[String],
    ) -> Result<(), DatastoreError> {
        let roles: Vec<String> = self
            .client
            .role_list()
            .await
            .map_err(self.err("listing the roles"))?
            .roles()
            .to_vec();
        if !roles.iter().any(|r| r == name) {
            self.client
                .role_add(name)
                .await
                .map_err(self.err(format!("adding the role {name}")))?;
        }
        // Exactly these: a role made by an earlier version (which let nodes
        // write the shared claim keys and tombstones) loses what is no
        // longer in the list.
        let wanted: Vec<(Vec<u8>, Vec<u8>)> = permissions
            .iter()
            .map(|(key, prefix, _)| {
                let end = if *prefix { prefix_end(key) } else { Vec::new() };
                (key.as_bytes().to_vec(), end)
            })
            .collect();
        let held = self
            .client
            .role_get(name)
            .await
            .map_err(self.err(format!("reading the role {name}")))?
            .permissions();
        for permission in held {
            let range = (permission.key().to_vec(), permission.range_end().to_vec());
            if wanted.contains(&range) {
                continue;
            }
            let options = (!range.1.is_empty())
                .then(|| RoleRevokePermissionOptions::new().with_range_end(range.1.clone()));
            self.client
                .role_revoke_permission(name, range.0.clone(), options)
                .await
                .map_err(self.err(format!(
                    "revoking {name}'s old permission on {}",
                    String::from_utf8_lossy(&range.0)
                )))?;
        }
        for (key, prefix, write) in permissions {
            let permission = if *write {
                Permission::read_write(key.as_str())
            } else {
                Permission::read(key.as_str())
            };
            let permission = if *prefix {
                permission.with_prefix()
            } else {
                permission
            };
            self.client
                .role_grant_permission(name, permission)
                .await
                .map_err(self.err(format!("granting {name} {key}")))?;
        }
        if !existing.iter().any(|u| u == name) {
            self.client
                .user_add(name, "", Some(UserAddOptions::new().with_no_pwd()))
                .await
                .map_err(self.err(format!("adding the user {name}")))?;
        }
        self.client
            .user_grant_role(name, name)
            .await
            .map_err(self.err(format!("granting {name} its role")))?;
        Ok(())
    }

    /// The connection, for other stores on the same member (cluster
    /// objects: [`super::objects::etcd::EtcdObjectStore::new`]); a clone
    /// shares it.
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The member this connection talks to.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn err(&self, action: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> DatastoreError {
        let (endpoint, action) = (self.endpoint.clone(), action.into());
        move |source| DatastoreError::Etcd {
            endpoint,
            action,
            source: Box::new(source),
        }
    }

    fn protocol(&self, action: impl Into<String>, msg: impl Into<String>) -> DatastoreError {
        DatastoreError::EtcdProtocol {
            endpoint: self.endpoint.clone(),
            action: action.into(),
            msg: msg.into(),
        }
    }

    /// The answering member and the leader it knows.
    pub async fn member_status(&mut self) -> Result<MemberStatus, DatastoreError> {
        let status = self
            .client
            .status()
            .await
            .map_err(self.err("asking for the member status"))?;
        Ok(MemberStatus {
            member_id: status
                .header()
                .map_or(0, etcd_client::ResponseHeader::member_id),
            leader: status.leader(),
        })
    }

    /// Claims `cidr` for `name`: creates its claim key unless it has one,
    /// then reads every claim; `Ok(false)` (and the key made here deleted)
    /// when an older claim holds the CIDR.
    async fn claim(&mut self, cidr: Ipv4Net, name: &str) -> Result<bool, DatastoreError> {
        let key = held_key(name, cidr);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), "", None)]);
        let created = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("claiming {cidr} for {name}")))?
            .succeeded();
        let (snapshot, _) = self.read().await?;
        if snapshot.claims.get(&cidr).map(String::as_str) == Some(name) {
            return Ok(true);
        }
        if created {
            self.client
                .delete(key, None)
                .await
                .map_err(self.err(format!("withdrawing {name}'s claim on {cidr}")))?;
        }
        Ok(false)
    }

    /// Takes (or gets back) this node's pod CIDR and publishes its record
    /// under a fresh lease; returns the CIDR and the lease ID.
    pub async fn join(&mut self, request: &JoinRequest) -> Result<(Ipv4Net, i64), DatastoreError> {
        claim_and_publish(self, request).await
    }

    /// Takes (or confirms) this node's pod CIDR: the fixed one, the one it
    /// holds, the preferred one if free, or the first free one.
    pub async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        let name = request.name.as_str();
        if let Some(cidr) = request.pod_cidr {
            if self.claim(cidr, name).await? {
                return Ok(cidr);
            }
            let holder = self
                .snapshot()
                .await?
                .claims
                .get(&cidr)
                .cloned()
                .unwrap_or_else(|| "?".to_owned());
            return Err(DatastoreError::Conflict { cidr, holder });
        }
        loop {
            let snapshot = self.snapshot().await?;
            let mine: Vec<Ipv4Net> = snapshot
                .claims
                .iter()
                .filter(|(_, holder)| holder.as_str() == name)
                .map(|(cidr, _)| *cidr)
                .collect();
            // The one its record announces, if it holds two (see
            // `decide_claims`).
            let announced = snapshot.members.get(name).map(|r| r.pod_cidr);
            if let Some(cidr) = announced
                .filter(|c| mine.contains(c))
                .or_else(|| mine.first().copied())
            {
                return Ok(cidr);
            }
            let taken: Vec<Ipv4Net> = snapshot.claims.keys().copied().collect();
            let candidate = candidate_cidr(request, &taken)?;
            if self.claim(candidate, name).await? {
                return Ok(candidate);
            }
            // Lost a race for it: look again.
        }
    }

    /// Publishes this node (liveness key under a new lease, durable
    /// record) if it holds `cidr`, in a transaction that checks its claim
    /// is still the one read (not released and made again meanwhile);
    /// returns the lease ID.
    pub async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<i64, DatastoreError> {
        let name = &request.name;
        let (snapshot, held) = self.read().await?;
        match snapshot.claims.get(&cidr) {
            Some(holder) if holder == name => {}
            Some(holder) => {
                return Err(DatastoreError::Conflict {
                    cidr,
                    holder: holder.clone(),
                });
            }
            None => {
                return Err(DatastoreError::ClaimLost {
                    cidr,
                    node: name.clone(),
                });
            }
        }
        let claim = match held.get(&(name.clone(), cidr)) {
            Some(at) => Compare::create_revision(held_key(name, cidr), CompareOp::Equal, *at),
            // Held by a shared claim key its agent wrote before an upgrade.
            None => Compare::value(cidr_key(cidr), CompareOp::Equal, name.as_str()),
        };
        let lease = self
            .client
            .lease_grant(self.lease_ttl, None)
            .await
            .map_err(self.err(format!("granting a lease for {name}")))?
            .id();
        let record = NodeRecord {
            name: name.clone(),
            node_ip: request.node_ip,
            pod_cidr: cidr,
        };
        let value = serde_json::to_string(&record)
            .map_err(|e| self.protocol(format!("encoding {name}'s record"), e.to_string()))?;
        let txn = Txn::new().when([claim]).and_then([
            TxnOp::put(
                node_key(name),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(member_key(name), value, None),
            // A put on an existing key keeps its creation revision: the
            // claim's age.
            TxnOp::put(held_key(name, cidr), "", None),
        ]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("publishing {name} ({cidr})")))?;
        if response.succeeded() {
            return Ok(lease);
        }
        // Nothing was written under it; let it go now rather than at its TTL.
        let _ = self.client.lease_revoke(lease).await;
        Err(DatastoreError::ClaimLost {
            cidr,
            node: name.clone(),
        })
    }

    /// Keeps `lease` alive until it fails (etcd gone, or the lease expired).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<(), DatastoreError> {
        let action = format!("keeping lease {lease:x} alive");
        let (mut keeper, mut responses) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(self.err(action.clone()))?;
        let period = Duration::from_secs(u64::try_from(self.lease_ttl / 3).unwrap_or(1).max(1));
        loop {
            keeper
                .keep_alive()
                .await
                .map_err(self.err(action.clone()))?;
            match responses
                .message()
                .await
                .map_err(self.err(action.clone()))?
            {
                Some(response) if response.ttl() > 0 => {}
                _ => return Err(self.protocol(action, "the lease expired")),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Ends `lease` now: its keys go at once (a node leaving for good, or a
    /// test standing in for an expiry).
    pub async fn revoke(&mut self, lease: i64) -> Result<(), DatastoreError> {
        self.client
            .lease_revoke(lease)
            .await
            .map_err(self.err(format!("revoking lease {lease:x}")))?;
        Ok(())
    }

    /// Everything under `/podnet/`, read at one revision.
    pub async fn snapshot(&mut self) -> Result<Snapshot, DatastoreError> {
        Ok(self.read().await?.0)
    }

    /// [`Self::snapshot`], and every claim-order key with its creation
    /// revision.
    async fn read(
        &mut self,
    ) -> Result<(Snapshot, BTreeMap<(String, Ipv4Net), i64>), DatastoreError> {
        let response = self
            .client
            .get(PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err("reading the cluster"))?;
        let mut snapshot = Snapshot {
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            ..Snapshot::default()
        };
        let mut held: BTreeMap<(String, Ipv4Net), i64> = BTreeMap::new();
        let mut legacy: BTreeMap<Ipv4Net, (String, i64)> = BTreeMap::new();
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else {
                snapshot
                    .invalid
                    .push(String::from_utf8_lossy(kv.key()).into_owned());
                continue;
            };
            let parsed = if let Some(name) = key.strip_prefix(NODES) {
                parse_record(name, kv.value())
                    .map(|r| snapshot.live.insert(name.to_owned(), r))
                    .is_some()
            } else if let Some(name) = key.strip_prefix(MEMBERS) {
                snapshot
                    .published
                    .insert(name.to_owned(), kv.mod_revision());
                parse_record(name, kv.value())
                    .map(|r| snapshot.members.insert(name.to_owned(), r))
                    .is_some()
            } else if key.starts_with(HELD) {
                parse_held_key(key)
                    .map(|(name, cidr)| held.insert((name.to_owned(), cidr), kv.create_revision()))
                    .is_some()
            } else if key.starts_with(GONE) {
                parse_gone_key(key)
                    .zip(serde_json::from_slice::<TombstoneValue>(kv.value()).ok())
                    .map(|((observer, name), t)| {
                        snapshot
                            .tombstones
                            .entry(name.to_owned())
                            .or_default()
                            .insert(
                                observer.to_owned(),
                                Tombstone {
                                    since: t.since,
                                    mod_revision: kv.mod_revision(),
                                },
                            )
                    })
                    .is_some()
            } else if key.starts_with(CIDRS) {
                parse_cidr_key(key)
                    .zip(kv.value_str().ok())
                    .map(|(cidr, holder)| {
                        legacy.insert(cidr, (holder.to_owned(), kv.create_revision()))
                    })
                    .is_some()
            } else {
                // Someone else's key under our prefix: not ours to judge.
                true
            };
            if !parsed {
                snapshot.invalid.push(key.to_owned());
            }
        }
        snapshot.claims = decide_claims(&held, &legacy, &snapshot.live, &snapshot.members);
        snapshot.order = claim_order(&snapshot, &held);
        Ok((snapshot, held))
    }

    /// Writes `observer`'s tombstone of `name` with `since` (Unix seconds)
    /// unless `name` has a lease; `Ok(true)` when written.
    pub async fn mark_gone(
        &mut self,
        observer: &str,
        name: &str,
        since: u64,
    ) -> Result<bool, DatastoreError> {
        let value = serde_json::to_string(&TombstoneValue { since })
            .map_err(|e| self.protocol(format!("encoding {name}'s tombstone"), e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::version(node_key(name), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(gone_key(observer, name), value, None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("writing {observer}'s tombstone of {name}")))?;
        Ok(response.succeeded())
    }

    /// Removes `observer`'s tombstone of a node that is live again, if it
    /// is still the one at `revision`; `Ok(true)` when removed.
    pub async fn clear_tombstone(
        &mut self,
        observer: &str,
        name: &str,
        revision: i64,
    ) -> Result<bool, DatastoreError> {
        let key = gone_key(observer, name);
        let txn = Txn::new()
            .when([
                Compare::version(node_key(name), CompareOp::Greater, 0),
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::delete(key, None)]);
        let response = self.client.txn(txn).await.map_err(self.err(format!(
            "removing the stale tombstone {observer:?} wrote of {name}"
        )))?;
        Ok(response.succeeded())
    }

    /// Releases a gone node's claims and forgets it, if everything the
    /// decision was made on still holds: no lease, the same tombstones.
    /// Its claim keys, record, tombstones, its pods' records and any shared claim key naming
    /// it go. `Ok(false)` when something changed (it came back, or someone
    /// else released it first).
    pub async fn release(&mut self, release: &Release) -> Result<bool, DatastoreError> {
        let name = release.name.as_str();
        let action = format!("releasing {name}'s claims {:?}", release.cidrs);
        let mut when = vec![Compare::version(node_key(name), CompareOp::Equal, 0)];
        let mut ops = vec![
            TxnOp::delete(member_key(name), None),
            TxnOp::delete(held_prefix(name), Some(DeleteOptions::new().with_prefix())),
            // Its pods' records: they went with it.
            TxnOp::delete(
                super::objects::etcd::endpoint_prefix(name),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ];
        for (observer, revision) in &release.tombstones {
            let key = gone_key(observer, name);
            when.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                *revision,
            ));
            ops.push(TxnOp::delete(key, None));
        }
        let legacy = self
            .client
            .get(CIDRS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err(action.clone()))?;
        for kv in legacy
            .kvs()
            .iter()
            .filter(|kv| kv.value() == name.as_bytes())
        {
            when.push(Compare::value(kv.key(), CompareOp::Equal, name));
            ops.push(TxnOp::delete(kv.key(), None));
        }
        let response = self
            .client
            .txn(Txn::new().when(when).and_then(ops))
            .await
            .map_err(self.err(action))?;
        Ok(response.succeeded())
    }

    /// What an operator does with a node that left for good (with etcd's
    /// roles on, no agent may): releases `name`'s claims and forgets its
    /// record and tombstones, now, whatever the release delay, unless it
    /// has a lease (refused: it is running). `Ok(None)` when something
    /// changed while deciding (try again).
    pub async fn release_node(&mut self, name: &str) -> Result<Option<Release>, DatastoreError> {
        let snapshot = self.snapshot().await?;
        let action = format!("releasing node {name}");
        if snapshot.live.contains_key(name) {
            return Err(self.protocol(action, "it has a lease: it is running"));
        }
        let known = snapshot.members.contains_key(name)
            || snapshot.claims.values().any(|holder| holder == name)
            || snapshot.tombstones.contains_key(name);
        if !known {
            return Err(self.protocol(action, "no such node"));
        }
        let release = Release {
            name: name.to_owned(),
            cidrs: snapshot
                .claims
                .iter()
                .filter(|(_, holder)| holder.as_str() == name)
                .map(|(cidr, _)| *cidr)
                .collect(),
            tombstones: snapshot
                .tombstones
                .get(name)
                .into_iter()
                .flatten()
                .map(|(observer, t)| (observer.clone(), t.mod_revision))
                .collect(),
        };
        Ok(self.release(&release).await?.then_some(release))
    }

    /// Waits for the next change under `/podnet/` after `revision`.
    pub async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        let action = "watching the cluster";
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = self
            .client
            .watch(PREFIX, Some(options))
            .await
            .map_err(self.err(action))?;
        loop {
            match stream.message().await.map_err(self.err(action))? {
                Some(response) if response.canceled() => {
                    return Err(self.protocol(
                        action,
                        format!("watch canceled: {}", response.cancel_reason()),
                    ));
                }
                Some(response) if !response.events().is_empty() => return Ok(()),
                Some(_) => {}
                None => return Err(self.protocol(action, "watch closed")),
            }
        }
    }
}

/// Each node's claim order: when it first published the CIDR its record
/// announces (the live record's, else the durable one's). A record without
/// one (written past the agents, e.g. by `etcdctl put`, or by an agent from
/// before claim-order keys) is left out: it counts as the newest.
#[must_use]
pub fn claim_order(
    snapshot: &Snapshot,
    held: &BTreeMap<(String, Ipv4Net), i64>,
) -> BTreeMap<String, i64> {
    snapshot
        .members
        .keys()
        .chain(snapshot.live.keys())
        .filter_map(|name| {
            // The record that is routed: the live one while there is one.
            let record = snapshot
                .live
                .get(name)
                .or_else(|| snapshot.members.get(name))?;
            held.get(&(name.clone(), record.pod_cidr))
                .map(|at| (name.clone(), *at))
        })
        .collect()
}

/// A node record stored under `name`'s key: a valid record naming the key's
/// node (a record under another node's key is no record of it).
#[must_use]
pub fn parse_record(name: &str, value: &[u8]) -> Option<NodeRecord> {
    serde_json::from_slice::<NodeRecord>(value)
        .ok()
        .filter(|r| r.name == name)
}

impl Datastore for EtcdDatastore {
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    const STARTS_WITH_CACHED_CIDR: bool = true;

    async fn join(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        Self::join(self, request).await.map(|(cidr, _lease)| cidr)
    }

    async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        Self::claim_cidr(self, request).await
    }

    async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<LeaseId, DatastoreError> {
        Self::publish(self, request, cidr).await
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<(), DatastoreError> {
        Self::keep_alive(self, lease).await
    }

    async fn observe(
        &mut self,
        policy: Policy,
        me: &str,
        now: u64,
    ) -> Result<Observation, DatastoreError> {
        let snapshot = self.snapshot().await?;
        Ok(Observation::of_snapshot(&snapshot, policy, me, now))
    }

    async fn mark_gone(
        &mut self,
        observer: &str,
        name: &str,
        since: u64,
    ) -> Result<bool, DatastoreError> {
        Self::mark_gone(self, observer, name, since).await
    }

    async fn clear_tombstone(
        &mut self,
        observer: &str,
        name: &str,
        revision: i64,
    ) -> Result<bool, DatastoreError> {
        Self::clear_tombstone(self, observer, name, revision).await
    }

    async fn release(&mut self, release: &Release) -> Result<bool, DatastoreError> {
        Self::release(self, release).await
    }

    async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        Self::wait_change(self, revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_and_claim_order_keys() {
        for ok in ["node1", "0evil", "ip-10-0-0-1.ec2.internal", "n_2"] {
            assert!(is_node_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "a b", "../x", "é", &"x".repeat(254)] {
            assert!(!is_node_name(bad), "{bad:?}");
        }
        let cidr: Ipv4Net = "10.244.1.0/24".parse().expect("cidr");
        assert_eq!(
            parse_held_key(&held_key("node1", cidr)),
            Some(("node1", cidr))
        );
        assert_eq!(parse_held_key("/podnet/held/a/b/10.244.1.0_24"), None);
        // A node's prefix is not another's whose name it begins.
        assert!(!held_key("node10", cidr).starts_with(&held_prefix("node1")));
    }

    #[test]
    fn access_files_go_together() {
        let missing = || Some(PathBuf::from("/nonexistent/podnet-test.pem"));
        for files in [
            EtcdAccessFiles {
                cert: missing(),
                ..EtcdAccessFiles::default()
            },
            EtcdAccessFiles {
                user: Some("op".into()),
                ..EtcdAccessFiles::default()
            },
        ] {
            assert!(matches!(
                EtcdAccess::load(&files),
                Err(EtcdAccessError::Incomplete(_))
            ));
        }
        let error = EtcdAccess::load(&EtcdAccessFiles {
            ca: missing(),
            ..EtcdAccessFiles::default()
        })
        .expect_err("missing CA");
        assert!(
            error.to_string().contains("/nonexistent/podnet-test.pem"),
            "{error}"
        );
        let plain = EtcdAccess::plain();
        assert!(plain.check_endpoints(&["http://a:2379".into()]).is_ok());
        assert!(plain.check_endpoints(&["https://a:2379".into()]).is_err());
    }
}
