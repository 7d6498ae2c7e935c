//! Cluster objects in the datastore: where they are stored, not what they
//! mean. Objects (Namespaces, Pods, NetworkPolicies, ...) are opaque values
//! (canonical JSON bytes) under a string path `<resource>/[<namespace>/]<name>`
//! ([`ObjectPath`]), written by the operator; endpoint records are opaque
//! values under `<node>/<namespace>/<name>` ([`EndpointKey`]), written by
//! each node's agent for its own pods only. One trait ([`ObjectStore`])
//! over etcd ([`etcd::EtcdObjectStore`]), the nodes-file datastore
//! ([`file::FileObjectStore`]) and memory ([`memory::MemoryObjectStore`]).
//!
//! Every stored value carries the store's revision of its last change (etcd:
//! the key's mod revision; it is the object's `resourceVersion`). Writes are
//! compare-and-swap against the revision read, so a concurrent write is
//! refused ([`ObjectStoreError::Conflict`]) and never lost, and a write of
//! the bytes already stored writes nothing (the store's revision does not
//! move, watchers see nothing).
//!
//! Following the store: [`Watcher`] lists, then watches from the list's
//! revision + 1; when the history it needs was compacted, or the watch was
//! lost, it lists again and hands out the whole state as a replacement
//! ([`Update::Resync`]). Each event carries its revision, and a consumer
//! ([`ObjectCache`]) ignores events at or below the revision it holds, so
//! nothing is applied twice or missed.

pub mod etcd;
pub mod file;
pub mod memory;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    ops::ControlFlow,
    time::Duration,
};

use super::etcd::is_node_name;

/// The longest key segment: a file name is at most 255 bytes, and the
/// file store adds `.json` (Kubernetes allows 253: the 3 bytes are this
/// store's, in every datastore alike).
pub const MAX_SEGMENT: usize = 250;

/// Why `segment` cannot be one segment of a key (`None`: it can). Keys
/// become etcd keys and file paths: a `/` would move the value to another
/// path, `.`/`..` would leave the store's directory, a leading `.` is kept
/// for the file store's temporary files.
fn segment_problem(segment: &str) -> Option<&'static str> {
    if segment.is_empty() {
        Some("is empty")
    } else if segment.contains('/') {
        Some("contains '/'")
    } else if segment.starts_with('.') {
        Some("starts with '.' ('.', '..' and hidden names are not keys)")
    } else if segment.len() > MAX_SEGMENT {
        Some("is longer than 250 bytes")
    } else if segment
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        Some("contains whitespace, a control character or '\\'")
    } else {
        None
    }
}

fn check_segment(what: &str, segment: &str, key: &str) -> Result<(), ObjectStoreError> {
    match segment_problem(segment) {
        Some(why) => Err(ObjectStoreError::InvalidKey {
            key: key.to_owned(),
            msg: format!("{what} {segment:?} {why}"),
        }),
        None => Ok(()),
    }
}

/// Checks a listing's selector: a resource and a namespace are key
/// segments (a `/` in one would select another prefix).
pub fn check_selector(
    resource: Option<&str>,
    namespace: Option<&str>,
) -> Result<(), ObjectStoreError> {
    ObjectPath::new(resource.unwrap_or("any"), namespace, "any").map(drop)
}

/// Checks a node name as a key segment of endpoint records.
pub fn check_node(node: &str) -> Result<(), ObjectStoreError> {
    EndpointKey::new(node, "any", "any").map(drop)
}

/// Where an object lives: `<resource>/<namespace>/<name>` for a namespaced
/// object (`networkpolicies/x/deny-all`), `<resource>/<name>` for a
/// cluster-scoped one (`namespaces/x`). The resource is the Kubernetes
/// API's plural (lowercase) name; the store does not know which resources
/// are namespaced, the number of segments says it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectPath {
    resource: String,
    namespace: Option<String>,
    name: String,
}

impl ObjectPath {
    /// A path with each segment checked: non-empty, no `/`, not `.`/`..`
    /// (nor any leading `.`), no whitespace; a namespace has no `.` either
    /// (it is a DNS label in Kubernetes, and the file store puts namespaces
    /// beside `<name>.json` files).
    pub fn new(
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Self, ObjectStoreError> {
        let key = match namespace {
            Some(ns) => format!("{resource}/{ns}/{name}"),
            None => format!("{resource}/{name}"),
        };
        check_segment("resource", resource, &key)?;
        if let Some(ns) = namespace {
            check_segment("namespace", ns, &key)?;
            if ns.contains('.') {
                return Err(ObjectStoreError::InvalidKey {
                    key,
                    msg: format!("namespace {ns:?} contains '.' (a namespace is a DNS label)"),
                });
            }
        }
        check_segment("name", name, &key)?;
        Ok(Self {
            resource: resource.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// `<resource>/<namespace>/<name>`.
    pub fn namespaced(
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Self, ObjectStoreError> {
        Self::new(resource, Some(namespace), name)
    }

    /// `<resource>/<name>`.
    pub fn cluster_scoped(resource: &str, name: &str) -> Result<Self, ObjectStoreError> {
        Self::new(resource, None, name)
    }

    /// The path of a key as [`Self::to_key`] writes it.
    pub fn parse(key: &str) -> Result<Self, ObjectStoreError> {
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            [resource, name] => Self::new(resource, None, name),
            [resource, namespace, name] => Self::new(resource, Some(namespace), name),
            _ => Err(ObjectStoreError::InvalidKey {
                key: key.to_owned(),
                msg: "an object key is <resource>/<name> or <resource>/<namespace>/<name>".into(),
            }),
        }
    }

    #[must_use]
    pub fn resource(&self) -> &str {
        &self.resource
    }

    #[must_use]
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<resource>/<namespace>/<name>` or `<resource>/<name>`.
    #[must_use]
    pub fn to_key(&self) -> String {
        self.to_string()
    }

    /// Whether this is selected by a listing of `resource` in `namespace`
    /// (`None`: any).
    #[must_use]
    pub fn matches(&self, resource: Option<&str>, namespace: Option<&str>) -> bool {
        resource.is_none_or(|r| r == self.resource)
            && namespace.is_none_or(|ns| self.namespace.as_deref() == Some(ns))
    }
}

impl fmt::Display for ObjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{ns}/{}", self.resource, self.name),
            None => write!(f, "{}/{}", self.resource, self.name),
        }
    }
}

/// Where a node's endpoint record (one of its pods) lives:
/// `<node>/<namespace>/<name>`. Under a per-node prefix, so that a node's
/// etcd role may write its own records and no one else's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    node: String,
    namespace: String,
    name: String,
}

impl EndpointKey {
    /// A key with the node name checked as node names are
    /// ([`super::etcd::is_node_name`]) and the namespace and name as
    /// [`ObjectPath`]'s.
    pub fn new(node: &str, namespace: &str, name: &str) -> Result<Self, ObjectStoreError> {
        let key = format!("{node}/{namespace}/{name}");
        if !is_node_name(node) || node.starts_with('.') {
            return Err(ObjectStoreError::InvalidKey {
                key,
                msg: format!(
                    "node {node:?} is not a node name (1 to 253 letters, digits, '-', '.' or '_', \
                     not starting with '.')"
                ),
            });
        }
        // The same rules as an object's namespace and name.
        ObjectPath::namespaced("endpoints", namespace, name).map_err(|e| match e {
            ObjectStoreError::InvalidKey { msg, .. } => ObjectStoreError::InvalidKey {
                key: key.clone(),
                msg,
            },
            other => other,
        })?;
        Ok(Self {
            node: node.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The key of [`Self::to_key`].
    pub fn parse(key: &str) -> Result<Self, ObjectStoreError> {
        match key.split('/').collect::<Vec<_>>().as_slice() {
            [node, namespace, name] => Self::new(node, namespace, name),
            _ => Err(ObjectStoreError::InvalidKey {
                key: key.to_owned(),
                msg: "an endpoint key is <node>/<namespace>/<name>".into(),
            }),
        }
    }

    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<node>/<namespace>/<name>`.
    #[must_use]
    pub fn to_key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.node, self.namespace, self.name)
    }
}

/// An object as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub path: ObjectPath,
    /// The bytes applied, as they were applied.
    pub value: Vec<u8>,
    /// The store's revision of the object's last change (its
    /// `resourceVersion`).
    pub revision: i64,
}

/// An endpoint record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEndpoint {
    pub key: EndpointKey,
    pub value: Vec<u8>,
    /// The store's revision of the record's last change.
    pub revision: i64,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (create or update), as long as it does not change
    /// between the read and the write.
    Any,
    /// The object at this revision (0: no object).
    Revision(i64),
}

/// What [`ObjectStore::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Written, new, at this revision.
    Created(i64),
    /// Written over the object, at this revision.
    Updated(i64),
    /// The stored bytes were these already: nothing written; the object's
    /// revision.
    Unchanged(i64),
}

impl ApplyOutcome {
    /// The object's revision after the call.
    #[must_use]
    pub const fn revision(self) -> i64 {
        match self {
            Self::Created(r) | Self::Updated(r) | Self::Unchanged(r) => r,
        }
    }
}

/// What [`ObjectStore::replace_endpoints`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaceOutcome {
    /// Records written (new or changed).
    pub written: usize,
    /// Records removed (stored, not in the new set).
    pub removed: usize,
    /// Records stored with the same bytes already (not written).
    pub unchanged: usize,
    /// Writes made: 0 when nothing changed, 1 when it was one atomic
    /// change, more when etcd's operation limit split it (watchers may
    /// then see the set half replaced for a moment).
    pub transactions: usize,
    /// The store's revision after the last write (or of the read).
    pub revision: i64,
}

/// Objects read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<StoredObject>,
    pub revision: i64,
}

/// Everything (objects and endpoint records) read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub objects: Vec<StoredObject>,
    pub endpoints: Vec<StoredEndpoint>,
    /// The store's revision of the read.
    pub revision: i64,
    /// Keys found under the store's prefixes that are not object or
    /// endpoint keys (written past podnet): left out, reported.
    pub invalid: Vec<String>,
}

/// One change, at the store revision that made it. Several events may
/// share a revision (one transaction); events come in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectEvent {
    Put(StoredObject),
    Delete { path: ObjectPath, revision: i64 },
    EndpointPut(StoredEndpoint),
    EndpointDelete { key: EndpointKey, revision: i64 },
}

impl ObjectEvent {
    #[must_use]
    pub const fn revision(&self) -> i64 {
        match self {
            Self::Put(StoredObject { revision, .. })
            | Self::EndpointPut(StoredEndpoint { revision, .. })
            | Self::Delete { revision, .. }
            | Self::EndpointDelete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("key {key:?}: {msg}")]
    InvalidKey { key: String, msg: String },
    #[error(
        "{key}: expected revision {expected}, found {found} (written by someone else meanwhile: \
         read it again)"
    )]
    Conflict {
        key: String,
        expected: i64,
        found: i64,
    },
    #[error(
        "the history a watch needs was compacted (up to revision {compact_revision}): list again"
    )]
    Compacted { compact_revision: i64 },
    #[error("watch lost: {reason}")]
    WatchLost { reason: String },
    #[error("{what}: {action}")]
    Io {
        what: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {msg}")]
    Corrupt { what: String, msg: String },
    #[error("etcd {endpoint}: {action}")]
    Etcd {
        endpoint: String,
        action: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("no etcd endpoint to connect to")]
    NoEndpoints,
    #[error(transparent)]
    Access(#[from] super::etcd::EtcdAccessError),
}

/// A watch opened by [`ObjectStore::watch`].
pub trait ObjectWatch: Send + 'static {
    /// The next changes, in revision order, each revision whole; waits
    /// until there are some. [`ObjectStoreError::Compacted`] when the
    /// history from the watch's start is gone, [`ObjectStoreError::WatchLost`]
    /// when the watch ended: the watch is over either way (list again).
    fn next(&mut self) -> impl Future<Output = Result<Vec<ObjectEvent>, ObjectStoreError>> + Send;
}

/// Where cluster objects and endpoint records live.
///
/// Futures are `Send` and the store `Clone` for the same reasons as
/// [`super::Datastore`]: agents follow it from tasks, and one handle may
/// watch while another writes.
pub trait ObjectStore: Clone + Send + Sync + 'static {
    type Watch: ObjectWatch;

    /// What the store is (a directory, an etcd member), for logs.
    fn endpoint(&self) -> String;

    /// The object at `path`, if any.
    fn get(
        &mut self,
        path: &ObjectPath,
    ) -> impl Future<Output = Result<Option<StoredObject>, ObjectStoreError>> + Send;

    /// The objects of `resource` in `namespace` (`None`: all), read at one
    /// revision, in key order.
    fn list(
        &mut self,
        resource: Option<&str>,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Listing, ObjectStoreError>> + Send;

    /// Writes `value` at `path` if the stored object is `expected` (see
    /// [`decide_apply`]): byte-equal → [`ApplyOutcome::Unchanged`], nothing
    /// written; otherwise a compare-and-swap against the revision read, so
    /// a write in between is a [`ObjectStoreError::Conflict`], not lost.
    fn apply(
        &mut self,
        path: &ObjectPath,
        value: &[u8],
        expected: Expect,
    ) -> impl Future<Output = Result<ApplyOutcome, ObjectStoreError>> + Send;

    /// Deletes the object at `path` if it is `expected`; `Ok(false)` when
    /// there is none.
    fn delete(
        &mut self,
        path: &ObjectPath,
        expected: Expect,
    ) -> impl Future<Output = Result<bool, ObjectStoreError>> + Send;

    /// Writes a node's endpoint record (the node is its only writer:
    /// unconditional, but nothing is written when the bytes are the same).
    fn put_endpoint(
        &mut self,
        key: &EndpointKey,
        value: &[u8],
    ) -> impl Future<Output = Result<ApplyOutcome, ObjectStoreError>> + Send;

    /// Removes a node's endpoint record; `Ok(false)` when there is none.
    fn delete_endpoint(
        &mut self,
        key: &EndpointKey,
    ) -> impl Future<Output = Result<bool, ObjectStoreError>> + Send;

    /// Makes `node`'s endpoint records exactly `records` (an agent that
    /// restarted republishes what it holds): writes the new and changed
    /// ones, removes the others, leaves the same ones alone. Every key must
    /// be `node`'s, once.
    fn replace_endpoints(
        &mut self,
        node: &str,
        records: &[(EndpointKey, Vec<u8>)],
    ) -> impl Future<Output = Result<ReplaceOutcome, ObjectStoreError>> + Send;

    /// The endpoint records of `node` (`None`: every node's), at one
    /// revision, and that revision.
    fn list_endpoints(
        &mut self,
        node: Option<&str>,
    ) -> impl Future<Output = Result<(Vec<StoredEndpoint>, i64), ObjectStoreError>> + Send;

    /// Every object and endpoint record at one revision.
    fn snapshot(&mut self) -> impl Future<Output = Result<Snapshot, ObjectStoreError>> + Send;

    /// The changes from `from_revision` (inclusive) on.
    fn watch(
        &mut self,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, ObjectStoreError>> + Send;
}

/// What a write of `value` over `current` (bytes, revision) does under
/// `expected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The bytes are stored already: nothing to write.
    Unchanged(i64),
    /// Write, comparing against `base` (the revision read; 0: absent).
    Write { base: i64 },
}

/// The one rule of [`ObjectStore::apply`] for every store: the same bytes
/// are [`Decision::Unchanged`] whatever was expected (the caller gets the
/// state it asked for, and nothing moves); otherwise `expected` must
/// match what was read.
pub fn decide_apply(
    key: &str,
    current: Option<(&[u8], i64)>,
    value: &[u8],
    expected: Expect,
) -> Result<Decision, ObjectStoreError> {
    if let Some((stored, revision)) = current
        && stored == value
    {
        return Ok(Decision::Unchanged(revision));
    }
    let found = current.map_or(0, |(_, revision)| revision);
    match expected {
        Expect::Revision(wanted) if wanted != found => Err(ObjectStoreError::Conflict {
            key: key.to_owned(),
            expected: wanted,
            found,
        }),
        _ => Ok(Decision::Write { base: found }),
    }
}

/// The rule of [`ObjectStore::delete`]: `Ok(None)` when there is nothing
/// to delete, `Ok(Some(base))` to delete comparing against `base`.
pub fn decide_delete(
    key: &str,
    current: Option<i64>,
    expected: Expect,
) -> Result<Option<i64>, ObjectStoreError> {
    match (current, expected) {
        (None, _) => Ok(None),
        (Some(found), Expect::Revision(wanted)) if wanted != found => {
            Err(ObjectStoreError::Conflict {
                key: key.to_owned(),
                expected: wanted,
                found,
            })
        }
        (Some(found), _) => Ok(Some(found)),
    }
}

/// The outcome of a write decided as `Write { base }` that committed at
/// `revision`.
#[must_use]
pub const fn written(base: i64, revision: i64) -> ApplyOutcome {
    if base == 0 {
        ApplyOutcome::Created(revision)
    } else {
        ApplyOutcome::Updated(revision)
    }
}

/// What replacing `current` with `wanted` changes: records to write,
/// records to remove, and how many are unchanged.
#[derive(Debug, Default)]
pub struct EndpointDiff {
    pub puts: Vec<(EndpointKey, Vec<u8>)>,
    pub deletes: Vec<EndpointKey>,
    pub unchanged: usize,
}

/// Checks `records` (all `node`'s, each once) and diffs them against
/// `current` (the node's stored records).
pub fn diff_endpoints(
    node: &str,
    current: &[StoredEndpoint],
    records: &[(EndpointKey, Vec<u8>)],
) -> Result<EndpointDiff, ObjectStoreError> {
    let mut wanted: BTreeMap<&EndpointKey, &[u8]> = BTreeMap::new();
    for (key, value) in records {
        if key.node() != node {
            return Err(ObjectStoreError::InvalidKey {
                key: key.to_key(),
                msg: format!("replacing node {node}'s endpoint records: not one of them"),
            });
        }
        if wanted.insert(key, value).is_some() {
            return Err(ObjectStoreError::InvalidKey {
                key: key.to_key(),
                msg: format!("replacing node {node}'s endpoint records: given twice"),
            });
        }
    }
    let stored: BTreeMap<&EndpointKey, &[u8]> = current
        .iter()
        .map(|e| (&e.key, e.value.as_slice()))
        .collect();
    let mut diff = EndpointDiff::default();
    for (key, value) in &wanted {
        if stored.get(key) == Some(value) {
            diff.unchanged += 1;
        } else {
            diff.puts.push(((*key).clone(), value.to_vec()));
        }
    }
    diff.deletes = stored
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(|k| (*k).clone())
        .collect();
    Ok(diff)
}

/// What a [`Watcher`] hands its consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole state at `revision`, replacing whatever the consumer held:
    /// the first update, and the one after a compaction or a lost watch.
    Resync(Snapshot),
    /// Changes after the previous update, in revision order, each revision
    /// whole; `revision` is the last one's.
    Events {
        events: Vec<ObjectEvent>,
        revision: i64,
    },
}

/// Follows a store: list, then watch from the list's revision + 1; on a
/// compaction or a lost watch, list again ([`Update::Resync`]). Events at
/// or below the revision handed out already are dropped (a watch opened
/// again may repeat some), so a consumer sees each change once, in order.
pub struct Watcher<S: ObjectStore> {
    store: S,
    /// The revision of the last update handed out (0: none yet).
    revision: i64,
    watch: Option<S::Watch>,
    /// Whether the next update is a resync (the first, and after a
    /// compaction or a lost watch).
    must_list: bool,
    /// Whether a list was handed out (the ones after it are resyncs).
    listed: bool,
    resyncs: u64,
    last_loss: Option<String>,
}

impl<S: ObjectStore> Watcher<S> {
    #[must_use]
    pub fn new(store: S) -> Self {
        Self {
            store,
            revision: 0,
            watch: None,
            must_list: true,
            listed: false,
            resyncs: 0,
            last_loss: None,
        }
    }

    /// The revision of the last update handed out: what the consumer holds.
    #[must_use]
    pub const fn revision(&self) -> i64 {
        self.revision
    }

    /// How many times the watcher listed again after the first list.
    #[must_use]
    pub const fn resyncs(&self) -> u64 {
        self.resyncs
    }

    /// Why the last watch ended (compaction, lost stream), if one did.
    #[must_use]
    pub fn last_loss(&self) -> Option<&str> {
        self.last_loss.as_deref()
    }

    fn lost(&mut self, why: &ObjectStoreError) {
        self.watch = None;
        self.must_list = true;
        self.last_loss = Some(why.to_string());
    }

    /// The next update; waits for one. An error (the store cannot be
    /// reached) leaves the watcher to list again at the next call: call
    /// again after a pause ([`follow`] does).
    pub async fn next(&mut self) -> Result<Update, ObjectStoreError> {
        loop {
            if self.must_list {
                let snapshot = self.store.snapshot().await?;
                if self.listed {
                    self.resyncs += 1;
                }
                self.listed = true;
                self.revision = snapshot.revision;
                self.must_list = false;
                self.watch = None;
                return Ok(Update::Resync(snapshot));
            }
            let watch = match &mut self.watch {
                Some(watch) => watch,
                None => match self.store.watch(self.revision + 1).await {
                    Ok(watch) => self.watch.insert(watch),
                    Err(e @ ObjectStoreError::Compacted { .. }) => {
                        self.lost(&e);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            match watch.next().await {
                Ok(events) => {
                    let fresh: Vec<ObjectEvent> = events
                        .into_iter()
                        .filter(|e| e.revision() > self.revision)
                        .collect();
                    let Some(last) = fresh.last().map(ObjectEvent::revision) else {
                        continue;
                    };
                    self.revision = last;
                    return Ok(Update::Events {
                        events: fresh,
                        revision: last,
                    });
                }
                Err(
                    e @ (ObjectStoreError::Compacted { .. } | ObjectStoreError::WatchLost { .. }),
                ) => {
                    self.lost(&e);
                }
                Err(e) => {
                    // A stream that failed is a lost watch too; the caller
                    // hears why (the store may be unreachable), and the next
                    // call lists again.
                    self.lost(&e);
                    return Err(e);
                }
            }
        }
    }
}

/// Runs a [`Watcher`] over `store`, handing every update (or error) to
/// `sink` until it breaks; after an error it waits `retry` before trying
/// again.
pub async fn follow<S, F>(store: S, retry: Duration, mut sink: F)
where
    S: ObjectStore,
    F: FnMut(Result<Update, ObjectStoreError>) -> ControlFlow<()> + Send,
{
    let mut watcher = Watcher::new(store);
    loop {
        let update = watcher.next().await;
        let failed = update.is_err();
        if sink(update).is_break() {
            return;
        }
        if failed {
            tokio::time::sleep(retry).await;
        }
    }
}

/// A consumer's copy of the store, kept from a [`Watcher`]'s updates:
/// what an agent holds in memory, and how the tests check what a watcher
/// delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectCache {
    pub objects: BTreeMap<ObjectPath, StoredObject>,
    pub endpoints: BTreeMap<EndpointKey, StoredEndpoint>,
    /// The revision of the last update applied.
    pub revision: i64,
}

impl ObjectCache {
    /// Applies an update: a resync replaces everything; events at or below
    /// the revision held are ignored (applied already). Returns how many
    /// events were applied.
    pub fn apply(&mut self, update: Update) -> usize {
        match update {
            Update::Resync(snapshot) => {
                self.objects = snapshot
                    .objects
                    .into_iter()
                    .map(|o| (o.path.clone(), o))
                    .collect();
                self.endpoints = snapshot
                    .endpoints
                    .into_iter()
                    .map(|e| (e.key.clone(), e))
                    .collect();
                self.revision = snapshot.revision;
                self.objects.len() + self.endpoints.len()
            }
            Update::Events { events, revision } => {
                let held = self.revision;
                let mut applied = 0;
                for event in events.into_iter().filter(|e| e.revision() > held) {
                    applied += 1;
                    match event {
                        ObjectEvent::Put(object) => {
                            self.objects.insert(object.path.clone(), object);
                        }
                        ObjectEvent::Delete { path, .. } => {
                            self.objects.remove(&path);
                        }
                        ObjectEvent::EndpointPut(endpoint) => {
                            self.endpoints.insert(endpoint.key.clone(), endpoint);
                        }
                        ObjectEvent::EndpointDelete { key, .. } => {
                            self.endpoints.remove(&key);
                        }
                    }
                }
                self.revision = self.revision.max(revision);
                applied
            }
        }
    }

    /// How many objects of each resource, and endpoint records
    /// (`"endpoints"`), are held.
    #[must_use]
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for path in self.objects.keys() {
            *counts.entry(path.resource().to_owned()).or_insert(0) += 1;
        }
        if !self.endpoints.is_empty() {
            counts.insert("endpoints".to_owned(), self.endpoints.len());
        }
        counts
    }

    /// Whether this holds exactly `snapshot`'s objects and records (same
    /// bytes, same revisions).
    #[must_use]
    pub fn holds(&self, snapshot: &Snapshot) -> bool {
        let objects: BTreeSet<_> = snapshot
            .objects
            .iter()
            .map(|o| (&o.path, &o.value, o.revision))
            .collect();
        let endpoints: BTreeSet<_> = snapshot
            .endpoints
            .iter()
            .map(|e| (&e.key, &e.value, e.revision))
            .collect();
        objects
            == self
                .objects
                .values()
                .map(|o| (&o.path, &o.value, o.revision))
                .collect()
            && endpoints
                == self
                    .endpoints
                    .values()
                    .map(|e| (&e.key, &e.value, e.revision))
                    .collect()
    }
}

#[cfg(test)]
mod tests;
