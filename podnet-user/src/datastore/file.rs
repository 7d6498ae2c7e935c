//! The nodes-file datastore: a JSON file `{"nodes": [NodeRecord...]}` that
//! every agent reads and watches; an agent adds itself when absent. Changes
//! are made under an `flock` on `PATH.lock` and published by rename of a
//! temporary file in the same directory, written and fsynced first, so
//! readers never see half a file (even after a crash) and two agents never
//! take one CIDR.
//!
//! A file that cannot be read as a list of nodes (missing, unreadable,
//! empty, cut short, not JSON) is an error, never "no nodes": reading it as
//! an empty cluster would remove every route on every node, because of a
//! half-written edit. A cluster without nodes is written as
//! `{"nodes": []}`. [`Follower`] keeps the last good list meanwhile.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{
    DatastoreError, JoinRequest, NodeRecord, candidate_cidr,
    membership::{NodeState, NodeStatus, Plan, Policy, Release},
    store::{Datastore, LeaseId, Observation},
};

/// How often [`Follower::wait_change`](Datastore::wait_change) looks at the
/// file.
pub const FILE_POLL: Duration = Duration::from_millis(300);
/// An agent's [`Follower`] reads the file again this often even without a
/// change (a lost update, or a datapath someone changed by hand, heals).
pub const FOLLOW_RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Serialize, Deserialize)]
struct NodesFile {
    nodes: Vec<NodeRecord>,
}

/// The records of a nodes file's contents, in the file's order; an error
/// for anything that is not a complete nodes file (see the module doc).
pub fn parse_nodes(bytes: &[u8]) -> Result<Vec<NodeRecord>, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "the file is empty (a cluster without nodes is written as {\"nodes\": []})".into(),
        );
    }
    serde_json::from_slice::<NodesFile>(bytes)
        .map(|file| file.nodes)
        .map_err(|e| e.to_string())
}

/// The nodes file at a path.
#[derive(Debug, Clone)]
pub struct FileDatastore {
    path: PathBuf,
}

impl FileDatastore {
    #[must_use]
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, action: &str) -> impl FnOnce(io::Error) -> DatastoreError + '_ {
        let action = action.to_owned();
        move |source| DatastoreError::Io {
            what: self.path.display().to_string(),
            action,
            source,
        }
    }

    fn invalid(&self, msg: impl Into<String>) -> DatastoreError {
        DatastoreError::Invalid {
            what: self.path.display().to_string(),
            msg: msg.into(),
        }
    }

    fn lock(&self) -> Result<Flock<File>, DatastoreError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(self.io("creating its directory"))?;
        }
        let mut lock_path = self.path.as_os_str().to_owned();
        lock_path.push(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(lock_path))
            .map_err(self.io("opening the lock"))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| self.io("taking the lock")(e.into()))
    }

    /// The file's contents; an error for anything that is not a complete
    /// nodes file, including a missing or empty one.
    fn read(&self) -> Result<NodesFile, DatastoreError> {
        let bytes = fs::read(&self.path).map_err(self.io("reading"))?;
        parse_nodes(&bytes)
            .map(|nodes| NodesFile { nodes })
            .map_err(|msg| self.invalid(msg))
    }

    /// The file to change under the lock: a missing file is a new cluster;
    /// a broken one is refused (writing this node into an empty list would
    /// drop every other node).
    fn read_for_update(&self) -> Result<NodesFile, DatastoreError> {
        match fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(NodesFile::default()),
            _ => self.read(),
        }
    }

    /// Replaces the file: a temporary file in the same directory (same
    /// filesystem, so the rename is atomic), fsynced before the rename and
    /// the directory fsynced after it, so neither a reader nor a crash ever
    /// leaves half a file. Called under the lock.
    fn write(&self, file: &NodesFile) -> Result<(), DatastoreError> {
        let mut temp = self.path.as_os_str().to_owned();
        temp.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| self.invalid(e.to_string()))?;
        let written = (|| {
            let mut out = File::create(&temp).map_err(self.io("creating the temporary file"))?;
            out.write_all(&bytes)
                .map_err(self.io("writing the temporary file"))?;
            out.sync_all()
                .map_err(self.io("syncing the temporary file"))?;
            fs::rename(&temp, &self.path).map_err(self.io("publishing"))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
            return written;
        }
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("syncing its directory"))
    }

    /// Adds (or updates) this node and returns its pod CIDR: the one it
    /// already has, the requested one, the preferred one if free, or the
    /// first free one.
    pub fn join(&self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        let _lock = self.lock()?;
        let mut file = self.read_for_update()?;
        let others: Vec<Ipv4Net> = file
            .nodes
            .iter()
            .filter(|n| n.name != request.name)
            .map(|n| n.pod_cidr)
            .collect();
        let existing = file
            .nodes
            .iter()
            .find(|n| n.name == request.name)
            .map(|n| n.pod_cidr);
        let cidr = match request.pod_cidr.or(existing) {
            Some(cidr) => cidr,
            None => candidate_cidr(request, &others)?,
        };
        // Only a record ahead of this node's own (all of them, for a new
        // node) holds against it: one appended after it with its CIDR was
        // written past the checks and is refused by every reader.
        let place = file
            .nodes
            .iter()
            .position(|n| n.name == request.name)
            .unwrap_or(file.nodes.len());
        if let Some(holder) = file.nodes[..place].iter().find(|n| {
            n.name != request.name && (n.pod_cidr.contains(&cidr) || cidr.contains(&n.pod_cidr))
        }) {
            return Err(DatastoreError::Conflict {
                cidr,
                holder: holder.name.clone(),
            });
        }
        let record = NodeRecord {
            name: request.name.clone(),
            node_ip: request.node_ip,
            pod_cidr: cidr,
        };
        // The file's order is the order nodes joined, and it decides
        // conflicts between records (`datastore::routable_nodes`: the earlier
        // holds). A node that is in the file already keeps its place; a new
        // one goes last. Never sorted: sorting by name would let a record
        // named `0evil`, appended with node2's CIDR, move ahead of node2 at
        // the next join and take its pods' traffic.
        match file.nodes.iter().position(|n| n.name == request.name) {
            Some(at) => {
                file.nodes[at] = record;
                let mut seen = false;
                // A name twice (a hand edit): the first place holds.
                file.nodes.retain(|n| {
                    let again = seen && n.name == request.name;
                    seen |= n.name == request.name;
                    !again
                });
            }
            None => file.nodes.push(record),
        }
        self.write(&file)?;
        Ok(cidr)
    }

    /// Every node in the file; an error when the file is not a complete
    /// nodes file (see the module doc).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, DatastoreError> {
        Ok(self.read()?.nodes)
    }

    /// A token that changes when the file does (for polling).
    #[must_use]
    pub fn version(&self) -> Option<(SystemTime, u64)> {
        let meta = fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
}

/// What [`Follower::poll`] found.
#[derive(Debug)]
pub enum FileUpdate {
    /// The nodes to apply (the file changed, or it is time to resync).
    Nodes(Vec<NodeRecord>),
    /// Nothing new.
    Unchanged,
    /// The file is broken: the last good list stays. `first` is set on the
    /// first poll that found it broken (or broken differently), so that it
    /// is logged once, not every poll.
    Broken { error: DatastoreError, first: bool },
}

/// Follows the nodes file for an agent: reads it when it changes (and
/// every `resync` anyway, so a lost update heals), and never hands out a
/// broken file's contents. The nodes file's [`Datastore`].
#[derive(Debug, Clone)]
pub struct Follower {
    store: FileDatastore,
    resync: Duration,
    seen: Option<(SystemTime, u64)>,
    last_read: Option<Instant>,
    broken: Option<String>,
}

impl Follower {
    #[must_use]
    pub fn new(store: FileDatastore, resync: Duration) -> Self {
        Self {
            store,
            resync,
            seen: None,
            last_read: None,
            broken: None,
        }
    }

    /// Whether the last read found the file broken.
    #[must_use]
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Reads the file again at the next poll, changed or not (what was
    /// read could not be applied).
    pub fn forget(&mut self) {
        self.seen = None;
        self.last_read = None;
    }

    /// The nodes file followed.
    #[must_use]
    pub fn store(&self) -> &FileDatastore {
        &self.store
    }

    /// Whether the file should be read: it changed, it is time to resync,
    /// or it was broken last time.
    fn due(&self) -> bool {
        self.store.version() != self.seen
            || self.last_read.is_none_or(|t| t.elapsed() >= self.resync)
            || self.broken.is_some()
    }

    /// Reads the file; `first` with an error that differs from the last.
    fn read(&mut self) -> Result<Vec<NodeRecord>, (DatastoreError, bool)> {
        let version = self.store.version();
        match self.store.nodes() {
            Ok(nodes) => {
                self.seen = version;
                self.last_read = Some(Instant::now());
                self.broken = None;
                Ok(nodes)
            }
            Err(error) => {
                let text = error.to_string();
                let first = self.broken.as_deref() != Some(text.as_str());
                self.broken = Some(text);
                Err((error, first))
            }
        }
    }

    /// Looks at the file once.
    pub fn poll(&mut self) -> FileUpdate {
        if !self.due() {
            return FileUpdate::Unchanged;
        }
        match self.read() {
            Ok(nodes) => FileUpdate::Nodes(nodes),
            Err((error, first)) => FileUpdate::Broken { error, first },
        }
    }
}

/// The nodes file has no leases: every node in it is live and routed, in
/// the file's order (the order nodes added themselves, which decides
/// conflicts between records, see `datastore::routable_nodes`); there are
/// no tombstones and nothing is released. Joining, claiming and publishing
/// are one write.
impl Datastore for Follower {
    fn endpoint(&self) -> String {
        self.store.path.display().to_string()
    }

    const STARTS_WITH_CACHED_CIDR: bool = false;

    async fn join(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        self.store.join(request)
    }

    async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        self.store.join(request)
    }

    async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<LeaseId, DatastoreError> {
        let fixed = JoinRequest {
            pod_cidr: Some(cidr),
            ..request.clone()
        };
        self.store.join(&fixed).map(|_| 0)
    }

    async fn keep_alive(&mut self, _lease: LeaseId) -> Result<(), DatastoreError> {
        std::future::pending().await
    }

    async fn observe(
        &mut self,
        _policy: Policy,
        me: &str,
        _now: u64,
    ) -> Result<Observation, DatastoreError> {
        let nodes = self.read().map_err(|(error, _)| error)?;
        Ok(Observation {
            revision: 0,
            published: nodes.iter().any(|n| n.name == me),
            plan: Plan {
                nodes: nodes
                    .iter()
                    .map(|n| NodeStatus {
                        record: n.clone(),
                        state: NodeState::Live,
                        since: None,
                        routed: true,
                    })
                    .collect(),
                routed: nodes,
                ..Plan::default()
            },
            invalid: Vec::new(),
            // The file holds no claims: the join order decides.
            claim_problems: Vec::new(),
        })
    }

    async fn mark_gone(
        &mut self,
        _observer: &str,
        _name: &str,
        _since: u64,
    ) -> Result<bool, DatastoreError> {
        Ok(false)
    }

    async fn clear_tombstone(
        &mut self,
        _observer: &str,
        _name: &str,
        _revision: i64,
    ) -> Result<bool, DatastoreError> {
        Ok(false)
    }

    async fn release(&mut self, _release: &Release) -> Result<bool, DatastoreError> {
        Ok(false)
    }

    async fn wait_change(&mut self, _revision: i64) -> Result<(), DatastoreError> {
        // At least one pause: a broken file is due at once, and must not
        // be read in a busy loop.
        loop {
            tokio::time::sleep(FILE_POLL).await;
            if self.due() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn request(name: &str, ip: u8) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            node_ip: Ipv4Addr::new(192, 168, 100, ip),
            pod_cidr: None,
            preferred: None,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_prefix: 24,
        }
    }

    #[test]
    fn nodes_get_distinct_cidrs_and_keep_them() {
        let dir = std::env::temp_dir().join(format!("podnet-nodes-test-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        let store = FileDatastore::new(&dir.join("nodes.json"));
        let cidrs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=8)
                .map(|i| {
                    let store = store.clone();
                    s.spawn(move || store.join(&request(&format!("n{i}"), i)).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let unique: std::collections::HashSet<_> = cidrs.iter().collect();
        assert_eq!(unique.len(), 8, "no two nodes share a CIDR: {cidrs:?}");
        let again = store.join(&request("n3", 3)).unwrap();
        assert_eq!(again, cidrs[2], "a returning node keeps its CIDR");
        assert_eq!(store.nodes().unwrap().len(), 8);
        let mut clash = request("n9", 9);
        clash.pod_cidr = Some(cidrs[0]);
        assert!(matches!(
            store.join(&clash),
            Err(DatastoreError::Conflict { .. })
        ));
    }

    /// Issue 21 in the nodes file: a record named `0evil` appended with
    /// cidr2's pod CIDR and the attacker's node IP. The file was sorted by
    /// name at the next join, which put `0evil` first, and the first record
    /// holds: cidr2's pods' traffic went to the attacker. Join order holds.
    #[test]
    fn a_record_appended_later_cannot_take_a_running_nodes_cidr() {
        let (dir, _cleanup) = temp_dir("evil");
        let path = dir.join("nodes.json");
        let store = FileDatastore::new(&path);
        let first = store.join(&request("node1", 11)).unwrap();
        let cidr2 = store.join(&request("node2", 12)).unwrap();
        let mut file = store.read().unwrap();
        file.nodes.push(NodeRecord {
            name: "0evil".into(),
            node_ip: Ipv4Addr::new(192, 168, 100, 66),
            pod_cidr: cidr2,
        });
        fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let check = |when: &str| {
            let nodes = store.nodes().unwrap();
            let (ok, refused) = crate::datastore::routable_nodes(
                &nodes,
                ("node1", Ipv4Addr::new(192, 168, 100, 11)),
                first,
                "10.244.0.0/16".parse().unwrap(),
            );
            let ok: Vec<_> = ok.iter().map(|n| (n.name.as_str(), n.node_ip)).collect();
            assert_eq!(
                ok,
                [
                    ("node2", Ipv4Addr::new(192, 168, 100, 12)),
                    ("node3", Ipv4Addr::new(192, 168, 100, 13))
                ],
                "{when}: {nodes:?}"
            );
            assert_eq!(
                refused
                    .iter()
                    .map(|(n, _)| n.name.as_str())
                    .collect::<Vec<_>>(),
                ["0evil"],
                "{when}"
            );
            let names: Vec<_> = nodes.iter().map(|n| n.name.clone()).collect();
            assert_eq!(
                names,
                ["node1", "node2", "0evil", "node3"],
                "{when}: join order kept"
            );
        };
        // Any later join rewrites the file.
        store.join(&request("node3", 13)).unwrap();
        check("after node3 joined");
        // node2 restarting keeps its CIDR and its place.
        assert_eq!(store.join(&request("node2", 12)).unwrap(), cidr2);
        check("after node2 joined again");
    }

    fn temp_dir(tag: &str) -> (PathBuf, Cleanup) {
        let dir = std::env::temp_dir().join(format!(
            "podnet-nodes-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&dir).unwrap();
        (dir.clone(), Cleanup(dir))
    }

    /// The ways a nodes file is found broken in the field: truncated by a
    /// non-atomic writer (`>` in a shell, an editor), cut short by a crash,
    /// not JSON, or gone.
    fn breakages(good: &[u8]) -> Vec<(&'static str, Option<Vec<u8>>)> {
        vec![
            ("empty", Some(Vec::new())),
            ("whitespace", Some(b"  \n".to_vec())),
            ("half", Some(good[..good.len() / 2].to_vec())),
            ("not JSON", Some(b"nodes: [n1]".to_vec())),
            ("wrong shape", Some(b"{\"nodes\": {}}".to_vec())),
            ("missing", None),
        ]
    }

    fn set(path: &Path, contents: Option<&[u8]>) {
        match contents {
            Some(bytes) => fs::write(path, bytes).unwrap(),
            None => {
                let _ = fs::remove_file(path);
            }
        }
    }

    #[test]
    fn a_broken_file_is_an_error_never_an_empty_cluster() {
        let (dir, _cleanup) = temp_dir("broken");
        let path = dir.join("nodes.json");
        let store = FileDatastore::new(&path);
        store.join(&request("n1", 1)).unwrap();
        store.join(&request("n2", 2)).unwrap();
        let good = fs::read(&path).unwrap();
        for (what, contents) in breakages(&good) {
            set(&path, contents.as_deref());
            assert!(
                store.nodes().is_err(),
                "{what}: read as {:?}",
                store.nodes()
            );
        }
        fs::write(&path, br#"{"nodes": []}"#).unwrap();
        assert_eq!(
            store.nodes().unwrap(),
            [],
            "an explicit empty list is an empty cluster"
        );
    }

    #[test]
    fn joining_never_overwrites_a_broken_file() {
        let (dir, _cleanup) = temp_dir("nojoin");
        let path = dir.join("nodes.json");
        let store = FileDatastore::new(&path);
        store.join(&request("n1", 1)).unwrap();
        store.join(&request("n2", 2)).unwrap();
        let good = fs::read(&path).unwrap();
        for (what, contents) in breakages(&good) {
            if contents.is_none() {
                continue; // A missing file is a new cluster.
            }
            set(&path, contents.as_deref());
            assert!(store.join(&request("n3", 3)).is_err(), "{what}: joined");
            assert_eq!(
                fs::read(&path).unwrap(),
                contents.unwrap(),
                "{what}: the file was rewritten"
            );
        }
    }

    #[test]
    fn the_follower_keeps_the_last_good_list_and_reports_a_breakage_once() {
        let (dir, _cleanup) = temp_dir("follow");
        let path = dir.join("nodes.json");
        let store = FileDatastore::new(&path);
        store.join(&request("n1", 1)).unwrap();
        store.join(&request("n2", 2)).unwrap();
        let good = fs::read(&path).unwrap();
        let mut follower = Follower::new(store.clone(), Duration::from_hours(1));
        assert!(matches!(follower.poll(), FileUpdate::Nodes(n) if n.len() == 2));
        assert!(matches!(follower.poll(), FileUpdate::Unchanged));
        for (what, contents) in breakages(&good) {
            set(&path, contents.as_deref());
            match follower.poll() {
                FileUpdate::Broken { first: true, .. } => {}
                other => panic!("{what}: {other:?}"),
            }
            match follower.poll() {
                FileUpdate::Broken { first: false, .. } => {}
                other => panic!("{what}, again: {other:?}"),
            }
            assert!(follower.is_broken());
            fs::write(&path, &good).unwrap();
            assert!(
                matches!(follower.poll(), FileUpdate::Nodes(n) if n.len() == 2),
                "{what}: the repaired file is read again"
            );
            assert!(!follower.is_broken());
        }
    }

    #[test]
    fn readers_never_see_a_half_written_file_and_no_temporary_file_is_left() {
        let (dir, _cleanup) = temp_dir("atomic");
        let path = dir.join("nodes.json");
        let store = FileDatastore::new(&path);
        store.join(&request("n0", 100)).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (reads, failures) = std::thread::scope(|s| {
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let (mut reads, mut failures) = (0u32, Vec::new());
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            match store.nodes() {
                                Ok(_) => reads += 1,
                                Err(e) => failures.push(e.to_string()),
                            }
                        }
                        (reads, failures)
                    })
                })
                .collect();
            let writers: Vec<_> = (1..=4u8)
                .map(|w| {
                    let store = store.clone();
                    s.spawn(move || {
                        for i in 0..10u8 {
                            let n = w * 10 + i;
                            store.join(&request(&format!("n{n}"), n)).unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            readers.into_iter().map(|r| r.join().unwrap()).fold(
                (0, Vec::new()),
                |(n, mut f), (r, fails)| {
                    f.extend(fails);
                    (n + r, f)
                },
            )
        });
        assert!(reads > 0);
        assert!(
            failures.is_empty(),
            "a reader saw a broken file: {failures:?}"
        );
        assert_eq!(store.nodes().unwrap().len(), 41);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "nodes.json" && n != "nodes.json.lock")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
