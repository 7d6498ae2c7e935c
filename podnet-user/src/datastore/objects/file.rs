//! Cluster objects beside the nodes file, for the nodes-file datastore.
//!
//! For the nodes file `PATH`, the objects live in the directory
//! `PATH.objects/` and every write holds the nodes file's own lock
//! (`PATH.lock`, an exclusive `flock`; readers that need one revision take
//! it shared):
//!
//! - `cluster/<resource>/[<namespace>/]<name>.json`: an object;
//! - `endpoints/<node>/<namespace>/<name>.json`: an endpoint record;
//! - `changes`: the change log, one JSON line per key changed:
//!   `{"revision":N,"key":"cluster/<object key>"}` (or `endpoints/...`),
//!   and a first line `{"revision":C}` without a key: history up to `C` is
//!   gone (compacted);
//! - `revision`: `{"revision":N}`, the store's revision, written last by
//!   every write.
//!
//! A value file is a one-line header `{"revision":N}` (the revision of its
//! last change), a newline, then the value's bytes exactly as applied.
//! Files are replaced by rename of a temporary file (`.tmp-<pid>`, hidden
//! names are never keys) written and fsynced first, and the
//! directory fsynced after, as the nodes file is.
//!
//! A write appends its log line(s) first (fsynced), then changes the value
//! files: a crash in between leaves a log entry for a change that did not
//! happen, which a watcher reads as the value's current state (at its old
//! revision, nothing new), and a line cut short, which readers skip and the
//! next writer starts a new line after. The store's revision is the higher
//! of the log's last and the counter's, so it never goes back, also when
//! one of them is removed by hand (with both gone: the values' highest; a
//! watcher that held more lists again).
//!
//! Files cannot be watched: a [`FileWatch`] polls the log (its inode, size
//! and time, every [`OBJECTS_POLL`]) and, when it changed, reads under the
//! shared lock the keys changed since its position and hands out each one's
//! state now: a put at the value's revision, or a delete at the revision of
//! the key's last log line. Changes to one key between two polls are
//! collapsed into its last (as a compacted etcd history would be); the
//! consumer ends at exactly the store's state at the log's revision. The
//! log keeps the last [`LOG_KEEP`] to [`LOG_LIMIT`] entries; a watcher that
//! fell further behind gets [`ObjectStoreError::Compacted`] and lists again.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{
    ApplyOutcome, Decision, EndpointKey, Expect, Listing, ObjectEvent, ObjectPath, ObjectStore,
    ObjectStoreError, ObjectWatch, ReplaceOutcome, Snapshot, StoredEndpoint, StoredObject,
    check_node, check_selector, decide_apply, decide_delete, diff_endpoints, written,
};

/// How often a [`FileWatch`] looks at the change log.
pub const OBJECTS_POLL: Duration = Duration::from_millis(250);
/// Entries the change log keeps when it is cut.
pub const LOG_KEEP: usize = 1024;
/// Entries at which the change log is cut (to the last [`LOG_KEEP`]).
pub const LOG_LIMIT: usize = 4096;

const LOG: &str = "changes";
const COUNTER: &str = "revision";
const CLUSTER_DIR: &str = "cluster";
const ENDPOINTS_DIR: &str = "endpoints";

/// A line of the change log.
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    revision: i64,
    /// The key changed; none: history up to `revision` is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

/// A value file's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    revision: i64,
}

/// An object's or an endpoint record's key, as the log names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Object(ObjectPath),
    Endpoint(EndpointKey),
}

impl Key {
    fn log_key(&self) -> String {
        match self {
            Self::Object(path) => format!("{CLUSTER_DIR}/{path}"),
            Self::Endpoint(key) => format!("{ENDPOINTS_DIR}/{key}"),
        }
    }

    fn parse_log_key(key: &str) -> Option<Self> {
        let (dir, rest) = key.split_once('/')?;
        match dir {
            CLUSTER_DIR => ObjectPath::parse(rest).ok().map(Self::Object),
            ENDPOINTS_DIR => EndpointKey::parse(rest).ok().map(Self::Endpoint),
            _ => None,
        }
    }

    /// The value file, relative to the store's directory.
    fn rel_path(&self) -> PathBuf {
        let mut path = PathBuf::from(self.log_key());
        let name = format!(
            "{}.json",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        path.set_file_name(name);
        path
    }

    fn event(&self, value: Option<(Vec<u8>, i64)>, deleted_at: i64) -> ObjectEvent {
        match (self, value) {
            (Self::Object(path), Some((value, revision))) => ObjectEvent::Put(StoredObject {
                path: path.clone(),
                value,
                revision,
            }),
            (Self::Object(path), None) => ObjectEvent::Delete {
                path: path.clone(),
                revision: deleted_at,
            },
            (Self::Endpoint(key), Some((value, revision))) => {
                ObjectEvent::EndpointPut(StoredEndpoint {
                    key: key.clone(),
                    value,
                    revision,
                })
            }
            (Self::Endpoint(key), None) => ObjectEvent::EndpointDelete {
                key: key.clone(),
                revision: deleted_at,
            },
        }
    }
}

/// The change log as read.
#[derive(Debug, Default)]
struct Log {
    /// History up to this revision is gone.
    compacted: i64,
    /// (revision, log key), in the order written.
    entries: Vec<(i64, String)>,
    exists: bool,
    /// Whether the file ends with a whole line (a crash may cut one short).
    ends_clean: bool,
    /// The revision counter file's (0: none).
    counter: i64,
}

impl Log {
    /// The store's revision.
    fn revision(&self) -> i64 {
        self.entries
            .last()
            .map_or(self.compacted, |(r, _)| *r)
            .max(self.compacted)
            .max(self.counter)
    }
}

/// Which endpoint records a read takes.
#[derive(Debug, Clone, Copy)]
enum Records<'a> {
    None,
    Node(&'a str),
    All,
}

/// A log file's identity and size: changes when a line is appended or the
/// log is cut (a new file).
type Stamp = (u64, u64, Option<SystemTime>);

/// The objects and endpoint records beside a nodes file.
#[derive(Debug, Clone)]
pub struct FileObjectStore {
    dir: PathBuf,
    lock_path: PathBuf,
    poll: Duration,
    /// Entries kept when the log is cut, and when it is cut.
    log_keep: usize,
    log_limit: usize,
}

impl FileObjectStore {
    /// The store beside the nodes file `nodes_file`: `<nodes_file>.objects/`,
    /// under the nodes file's lock `<nodes_file>.lock`.
    #[must_use]
    pub fn beside(nodes_file: &Path) -> Self {
        let with = |suffix: &str| {
            let mut path = nodes_file.as_os_str().to_owned();
            path.push(suffix);
            PathBuf::from(path)
        };
        Self {
            dir: with(".objects"),
            lock_path: with(".lock"),
            poll: OBJECTS_POLL,
            log_keep: LOG_KEEP,
            log_limit: LOG_LIMIT,
        }
    }

    /// Watches poll every `poll` instead of [`OBJECTS_POLL`].
    #[must_use]
    pub const fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The change log is cut to its last `keep` entries when it has more
    /// than `limit` instead of [`LOG_KEEP`] and [`LOG_LIMIT`].
    #[must_use]
    pub fn with_log_limits(mut self, keep: usize, limit: usize) -> Self {
        self.log_keep = keep.max(1);
        self.log_limit = limit.max(self.log_keep);
        self
    }

    /// The objects' directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(what: &Path, action: &str) -> impl FnOnce(io::Error) -> ObjectStoreError {
        let (what, action) = (what.display().to_string(), action.to_owned());
        move |source| ObjectStoreError::Io {
            what,
            action,
            source,
        }
    }

    fn corrupt(what: &Path, msg: impl Into<String>) -> ObjectStoreError {
        ObjectStoreError::Corrupt {
            what: what.display().to_string(),
            msg: msg.into(),
        }
    }

    /// The nodes file's lock: exclusive for a write, shared for a read that
    /// must see one revision.
    fn lock(&self, exclusive: bool) -> Result<Flock<File>, ObjectStoreError> {
        if let Some(dir) = self
            .lock_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            fs::create_dir_all(dir).map_err(Self::io(dir, "creating the directory"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(Self::io(&self.lock_path, "opening the lock"))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(file, arg)
            .map_err(|(_, e)| Self::io(&self.lock_path, "taking the lock")(e.into()))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    fn stamp(&self) -> Option<Stamp> {
        let meta = fs::metadata(self.log_path()).ok()?;
        Some((meta.ino(), meta.len(), meta.modified().ok()))
    }

    /// The revision counter (0: none or unreadable; the log has the
    /// revision too).
    fn read_counter(&self) -> i64 {
        fs::read(self.dir.join(COUNTER))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Header>(&bytes).ok())
            .map_or(0, |h| h.revision)
    }

    fn read_log(&self) -> Result<Log, ObjectStoreError> {
        let path = self.log_path();
        let counter = self.read_counter();
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // No log: a new store, or one whose log was removed. Its
                // history is gone and its revision goes on from the
                // counter's (or, without one, the values' highest), never
                // reusing one a watcher may hold.
                return Ok(Log {
                    compacted: counter.max(self.highest_revision()?),
                    counter,
                    ..Log::default()
                });
            }
            other => other.map_err(Self::io(&path, "reading the change log"))?,
        };
        let mut log = Log {
            exists: true,
            ends_clean: bytes.is_empty() || bytes.ends_with(b"\n"),
            counter,
            ..Log::default()
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // A line that cannot be read was cut short by a crash: its
            // change was never made (the line comes first).
            match serde_json::from_slice::<LogLine>(line) {
                Ok(LogLine {
                    revision,
                    key: None,
                }) => log.compacted = log.compacted.max(revision),
                Ok(LogLine {
                    revision,
                    key: Some(key),
                }) => log.entries.push((revision, key)),
                Err(_) => {}
            }
        }
        Ok(log)
    }

    /// The highest revision of any value file (0: none).
    fn highest_revision(&self) -> Result<i64, ObjectStoreError> {
        let mut snapshot = Snapshot::default();
        self.walk_objects(&mut snapshot, None, None)?;
        self.walk_endpoints(&mut snapshot, None)?;
        Ok(snapshot
            .objects
            .iter()
            .map(|o| o.revision)
            .chain(snapshot.endpoints.iter().map(|e| e.revision))
            .max()
            .unwrap_or(0))
    }

    /// The value at `key` and its revision, if any.
    fn read_value(&self, key: &Key) -> Result<Option<(Vec<u8>, i64)>, ObjectStoreError> {
        Self::read_file(&self.dir.join(key.rel_path()))
    }

    fn read_file(path: &Path) -> Result<Option<(Vec<u8>, i64)>, ObjectStoreError> {
        let bytes = match fs::read(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other.map_err(|source| ObjectStoreError::Io {
                what: path.display().to_string(),
                action: "reading".into(),
                source,
            })?,
        };
        let Some(split) = bytes.iter().position(|b| *b == b'\n') else {
            return Err(Self::corrupt(path, "no header line"));
        };
        let header: Header = serde_json::from_slice(&bytes[..split])
            .map_err(|e| Self::corrupt(path, format!("header: {e}")))?;
        Ok(Some((bytes[split + 1..].to_vec(), header.revision)))
    }

    /// Replaces `path` with `bytes` (temporary file, fsync, rename); the
    /// directory is fsynced by the caller.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), ObjectStoreError> {
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir).map_err(Self::io(dir, "creating the directory"))?;
        // One writer at a time (the lock): one temporary name per process
        // is enough, and it stays short whatever the value's name.
        let temp = dir.join(format!(".tmp-{}", std::process::id()));
        let written = (|| {
            let mut out = File::create(&temp).map_err(Self::io(&temp, "creating"))?;
            out.write_all(bytes).map_err(Self::io(&temp, "writing"))?;
            out.sync_all().map_err(Self::io(&temp, "syncing"))?;
            fs::rename(&temp, path).map_err(Self::io(path, "publishing"))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }

    fn sync_dir(dir: &Path) -> Result<(), ObjectStoreError> {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(dir, "syncing the directory"))
    }

    /// Makes `changes` (a value, or none: removed) at the next revision;
    /// called under the exclusive lock. The revision written.
    fn commit(&self, changes: &[(Key, Option<&[u8]>)]) -> Result<i64, ObjectStoreError> {
        let log = self.read_log()?;
        let revision = log.revision() + 1;
        let mut lines = Vec::new();
        if !log.exists {
            lines.push(LogLine {
                revision: log.compacted,
                key: None,
            });
        }
        lines.extend(changes.iter().map(|(key, _)| LogLine {
            revision,
            key: Some(key.log_key()),
        }));
        let mut text = if log.ends_clean {
            Vec::new()
        } else {
            b"\n".to_vec()
        };
        for line in &lines {
            serde_json::to_writer(&mut text, line)
                .map_err(|e| Self::corrupt(&self.log_path(), e.to_string()))?;
            text.push(b'\n');
        }
        fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir, "creating the directory"))?;
        let log_path = self.log_path();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Self::io(&log_path, "opening the change log"))?;
        file.write_all(&text)
            .and_then(|()| file.sync_data())
            .map_err(Self::io(&log_path, "appending to the change log"))?;
        let mut dirs = BTreeSet::new();
        if !log.exists {
            dirs.insert(self.dir.clone());
        }
        for (key, value) in changes {
            let path = self.dir.join(key.rel_path());
            match value {
                Some(value) => {
                    let mut bytes = serde_json::to_vec(&Header { revision })
                        .map_err(|e| Self::corrupt(&path, e.to_string()))?;
                    bytes.push(b'\n');
                    bytes.extend_from_slice(value);
                    self.write_file(&path, &bytes)?;
                }
                None => match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(Self::io(&path, "removing")(e));
                    }
                    _ => {}
                },
            }
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_owned());
            }
        }
        // Last: the counter says the change is complete (the log alone
        // would do, but a log removed by hand must not take the revision
        // back).
        let counter = serde_json::to_vec(&Header { revision })
            .map_err(|e| Self::corrupt(&self.dir.join(COUNTER), e.to_string()))?;
        self.write_file(&self.dir.join(COUNTER), &counter)?;
        dirs.insert(self.dir.clone());
        for dir in &dirs {
            Self::sync_dir(dir)?;
        }
        let total = log.entries.len() + changes.len();
        if total > self.log_limit {
            // The revision of the first entry kept; a revision is kept
            // whole (a watcher never gets half of one).
            let cut = log
                .entries
                .get(total - self.log_keep)
                .map_or(revision, |(r, _)| *r);
            self.compact_locked(cut - 1)?;
        }
        Ok(revision)
    }

    /// Forgets the change log up to `revision` (a watch from at or below
    /// it lists again). Writes cut the log themselves ([`LOG_LIMIT`]).
    pub fn compact(&self, revision: i64) -> Result<(), ObjectStoreError> {
        let _lock = self.lock(true)?;
        self.compact_locked(revision)
    }

    fn compact_locked(&self, revision: i64) -> Result<(), ObjectStoreError> {
        let log = self.read_log()?;
        let compacted = log.compacted.max(revision.min(log.revision()));
        let mut text = Vec::new();
        let lines = std::iter::once(LogLine {
            revision: compacted,
            key: None,
        })
        .chain(log.entries.into_iter().filter(|(r, _)| *r > compacted).map(
            |(revision, key)| LogLine {
                revision,
                key: Some(key),
            },
        ));
        for line in lines {
            serde_json::to_writer(&mut text, &line)
                .map_err(|e| Self::corrupt(&self.log_path(), e.to_string()))?;
            text.push(b'\n');
        }
        fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir, "creating the directory"))?;
        self.write_file(&self.log_path(), &text)?;
        Self::sync_dir(&self.dir)
    }

    /// The value files under `dir` (relative segments without `.json`,
    /// path), up to `depth` directories deep, hidden names skipped.
    fn files(
        dir: &Path,
        depth: usize,
        prefix: &[String],
        out: &mut Vec<(Vec<String>, PathBuf)>,
    ) -> Result<(), ObjectStoreError> {
        let entries = match fs::read_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(Self::io(dir, "listing"))?,
        };
        for entry in entries {
            let entry = entry.map_err(Self::io(dir, "listing"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(Self::io(&entry.path(), "reading"))?;
            let mut segments = prefix.to_vec();
            if kind.is_dir() && depth > 0 {
                segments.push(name);
                Self::files(&entry.path(), depth - 1, &segments, out)?;
            } else if let Some(stem) = name.strip_suffix(".json").filter(|_| kind.is_file()) {
                segments.push(stem.to_owned());
                out.push((segments, entry.path()));
            }
        }
        Ok(())
    }

    /// Reads the objects of `resource` in `namespace` (`None`: any) into
    /// `out`, in key order.
    fn walk_objects(
        &self,
        out: &mut Snapshot,
        resource: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(), ObjectStoreError> {
        let mut files = Vec::new();
        let (root, base) = match resource {
            Some(r) => (self.dir.join(CLUSTER_DIR).join(r), vec![r.to_owned()]),
            None => (self.dir.join(CLUSTER_DIR), Vec::new()),
        };
        Self::files(&root, 2 - base.len(), &base, &mut files)?;
        for (segments, file) in files {
            let parsed = match segments.as_slice() {
                [r, name] => ObjectPath::new(r, None, name),
                [r, ns, name] => ObjectPath::new(r, Some(ns), name),
                _ => Err(Self::corrupt(&file, "not an object's place")),
            };
            match (parsed, Self::read_file(&file)) {
                (Ok(path), Ok(Some((value, revision)))) => {
                    if path.matches(resource, namespace) {
                        out.objects.push(StoredObject {
                            path,
                            value,
                            revision,
                        });
                    }
                }
                // Removed since the directory was listed.
                (Ok(_), Ok(None)) => {}
                _ => out.invalid.push(file.display().to_string()),
            }
        }
        out.objects.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(())
    }

    /// Reads the endpoint records of `node` (`None`: every node's) into
    /// `out`, in key order.
    fn walk_endpoints(
        &self,
        out: &mut Snapshot,
        node: Option<&str>,
    ) -> Result<(), ObjectStoreError> {
        let mut files = Vec::new();
        let (root, base) = match node {
            Some(n) => (self.dir.join(ENDPOINTS_DIR).join(n), vec![n.to_owned()]),
            None => (self.dir.join(ENDPOINTS_DIR), Vec::new()),
        };
        Self::files(&root, 2 - base.len(), &base, &mut files)?;
        for (segments, file) in files {
            let parsed = match segments.as_slice() {
                [node, ns, name] => EndpointKey::new(node, ns, name),
                _ => Err(Self::corrupt(&file, "not an endpoint record's place")),
            };
            match (parsed, Self::read_file(&file)) {
                (Ok(key), Ok(Some((value, revision)))) => out.endpoints.push(StoredEndpoint {
                    key,
                    value,
                    revision,
                }),
                (Ok(_), Ok(None)) => {}
                _ => out.invalid.push(file.display().to_string()),
            }
        }
        out.endpoints.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(())
    }

    /// Under the shared lock (one revision): the objects selected
    /// (resource, namespace), the endpoint records selected, and the
    /// revision.
    fn read_all(
        &self,
        objects: Option<(Option<&str>, Option<&str>)>,
        endpoints: Records<'_>,
    ) -> Result<Snapshot, ObjectStoreError> {
        let _lock = self.lock(false)?;
        let mut snapshot = Snapshot {
            revision: self.read_log()?.revision(),
            ..Snapshot::default()
        };
        if let Some((resource, namespace)) = objects {
            self.walk_objects(&mut snapshot, resource, namespace)?;
        }
        match endpoints {
            Records::None => {}
            Records::Node(node) => self.walk_endpoints(&mut snapshot, Some(node))?,
            Records::All => self.walk_endpoints(&mut snapshot, None)?,
        }
        Ok(snapshot)
    }
}

impl ObjectStore for FileObjectStore {
    type Watch = FileWatch;

    fn endpoint(&self) -> String {
        self.dir.display().to_string()
    }

    async fn get(&mut self, path: &ObjectPath) -> Result<Option<StoredObject>, ObjectStoreError> {
        // A value file is replaced by rename: no lock needed to read one.
        Ok(self
            .read_value(&Key::Object(path.clone()))?
            .map(|(value, revision)| StoredObject {
                path: path.clone(),
                value,
                revision,
            }))
    }

    async fn list(
        &mut self,
        resource: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Listing, ObjectStoreError> {
        check_selector(resource, namespace)?;
        let snapshot = self.read_all(Some((resource, namespace)), Records::None)?;
        Ok(Listing {
            objects: snapshot.objects,
            revision: snapshot.revision,
        })
    }

    async fn apply(
        &mut self,
        path: &ObjectPath,
        value: &[u8],
        expected: Expect,
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let _lock = self.lock(true)?;
        let key = Key::Object(path.clone());
        let current = self.read_value(&key)?;
        let current = current.as_ref().map(|(v, r)| (v.as_slice(), *r));
        match decide_apply(&path.to_key(), current, value, expected)? {
            Decision::Unchanged(revision) => Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => {
                let revision = self.commit(&[(key, Some(value))])?;
                Ok(written(base, revision))
            }
        }
    }

    async fn delete(
        &mut self,
        path: &ObjectPath,
        expected: Expect,
    ) -> Result<bool, ObjectStoreError> {
        let _lock = self.lock(true)?;
        let key = Key::Object(path.clone());
        let current = self.read_value(&key)?.map(|(_, r)| r);
        if decide_delete(&path.to_key(), current, expected)?.is_none() {
            return Ok(false);
        }
        self.commit(&[(key, None)])?;
        Ok(true)
    }

    async fn put_endpoint(
        &mut self,
        key: &EndpointKey,
        value: &[u8],
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let _lock = self.lock(true)?;
        let store_key = Key::Endpoint(key.clone());
        let current = self.read_value(&store_key)?;
        let current = current.as_ref().map(|(v, r)| (v.as_slice(), *r));
        match decide_apply(&key.to_key(), current, value, Expect::Any)? {
            Decision::Unchanged(revision) => Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => {
                let revision = self.commit(&[(store_key, Some(value))])?;
                Ok(written(base, revision))
            }
        }
    }

    async fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<bool, ObjectStoreError> {
        let _lock = self.lock(true)?;
        let store_key = Key::Endpoint(key.clone());
        if self.read_value(&store_key)?.is_none() {
            return Ok(false);
        }
        self.commit(&[(store_key, None)])?;
        Ok(true)
    }

    async fn replace_endpoints(
        &mut self,
        node: &str,
        records: &[(EndpointKey, Vec<u8>)],
    ) -> Result<ReplaceOutcome, ObjectStoreError> {
        check_node(node)?;
        let _lock = self.lock(true)?;
        let mut current = Snapshot::default();
        self.walk_endpoints(&mut current, Some(node))?;
        let diff = diff_endpoints(node, &current.endpoints, records)?;
        let mut outcome = ReplaceOutcome {
            written: diff.puts.len(),
            removed: diff.deletes.len(),
            unchanged: diff.unchanged,
            transactions: 0,
            revision: self.read_log()?.revision(),
        };
        let changes: Vec<(Key, Option<&[u8]>)> = diff
            .deletes
            .iter()
            .map(|k| (Key::Endpoint(k.clone()), None))
            .chain(
                diff.puts
                    .iter()
                    .map(|(k, v)| (Key::Endpoint(k.clone()), Some(v.as_slice()))),
            )
            .collect();
        if !changes.is_empty() {
            // One write under the lock, one revision: a poll never sees
            // half of it.
            outcome.revision = self.commit(&changes)?;
            outcome.transactions = 1;
        }
        Ok(outcome)
    }

    async fn list_endpoints(
        &mut self,
        node: Option<&str>,
    ) -> Result<(Vec<StoredEndpoint>, i64), ObjectStoreError> {
        let records = match node {
            Some(node) => {
                check_node(node)?;
                Records::Node(node)
            }
            None => Records::All,
        };
        let snapshot = self.read_all(None, records)?;
        Ok((snapshot.endpoints, snapshot.revision))
    }

    async fn snapshot(&mut self) -> Result<Snapshot, ObjectStoreError> {
        self.read_all(Some((None, None)), Records::All)
    }

    async fn watch(&mut self, from_revision: i64) -> Result<FileWatch, ObjectStoreError> {
        let compacted = {
            let _lock = self.lock(false)?;
            self.read_log()?.compacted
        };
        if from_revision <= compacted {
            return Err(ObjectStoreError::Compacted {
                compact_revision: compacted,
            });
        }
        Ok(FileWatch {
            store: self.clone(),
            position: from_revision - 1,
            seen: None,
            first: true,
        })
    }
}

/// A poll-based watch on a [`FileObjectStore`] (see the module doc).
#[derive(Debug)]
pub struct FileWatch {
    store: FileObjectStore,
    /// The store revision whose changes were handed out.
    position: i64,
    /// The log as last read.
    seen: Option<Stamp>,
    first: bool,
}

impl FileWatch {
    /// The changes after `position`, read under the shared lock, and the
    /// log's revision.
    fn changes(&self) -> Result<(Vec<ObjectEvent>, i64, Option<Stamp>), ObjectStoreError> {
        let store = &self.store;
        let _lock = store.lock(false)?;
        let stamp = store.stamp();
        let log = store.read_log()?;
        let revision = log.revision();
        if revision < self.position {
            return Err(ObjectStoreError::WatchLost {
                reason: format!(
                    "{}: the store's revision went back from {} to {revision} (replaced?)",
                    store.dir.display(),
                    self.position
                ),
            });
        }
        if self.position < log.compacted {
            return Err(ObjectStoreError::Compacted {
                compact_revision: log.compacted,
            });
        }
        // Each key changed since `position`, with its last change's revision.
        let mut changed: BTreeMap<Key, i64> = BTreeMap::new();
        for (rev, key) in log.entries.iter().filter(|(r, _)| *r > self.position) {
            if let Some(key) = Key::parse_log_key(key) {
                changed.insert(key, *rev);
            }
        }
        let mut events = Vec::new();
        for (key, last) in changed {
            events.push(key.event(store.read_value(&key)?, last));
        }
        events.sort_by_key(ObjectEvent::revision);
        Ok((events, revision, stamp))
    }
}

impl ObjectWatch for FileWatch {
    async fn next(&mut self) -> Result<Vec<ObjectEvent>, ObjectStoreError> {
        loop {
            if !self.first {
                tokio::time::sleep(self.store.poll).await;
            }
            let due = self.first || self.store.stamp() != self.seen;
            self.first = false;
            if !due {
                continue;
            }
            let (events, revision, stamp) = self.changes()?;
            self.seen = stamp;
            self.position = revision;
            // A value whose change did not complete (see the module doc)
            // is handed out at its old revision: dropped by the consumer.
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}
