//! On-disk IPAM store: host-local's layout, one store per node instead of
//! one per network. The pod CIDR is the node's, so every network that uses
//! the built-in IPAM on the node allocates from the same records.
//!
//! Under the IPAM root (the agent's `<state-dir>/ipam`, or a conf's
//! `ipam.dataDir`):
//!
//! | path | what |
//! | --- | --- |
//! | `<root>/_node/<ip>` | one record per allocated address: container ID, ifname, network name (a line each) |
//! | `<root>/_node/last_reserved_ip.0` | the round-robin cursor |
//! | `<root>/_node/lock` | `flock`, held for each allocation and release |
//! | `<root>/_node/served_by` | only in the agent's root: the root of the store that serves the node when it is not this one ([`FileStore::claim_node`]) |
//! | `<root>/<network>/<ip>` | old layout (one store per network): read, released, never written |
//!
//! `_node` cannot be a network name (those start with a letter or a digit),
//! so it never meets an old-layout directory.
//!
//! **Old layout.** podnet before issue 10 kept one store per network,
//! `<root>/<network>/<ip>` holding `container\nifname\n`. Those records are
//! not moved, they are read in place: every scan includes them (the network
//! is the directory's name), so their addresses are not handed out again, a
//! repeated ADD, CHECK, DEL, GC and the agent's reconcile find them, and a
//! directory whose last record is released is removed (its cursor seeds
//! `_node`'s when that has none). Reading in place needs no migration step
//! that could be interrupted half-way, and keeps visible what the old
//! layout already got wrong: an address two networks' stores both handed
//! out has two records and stays taken until both are released (one record
//! per address in `_node` could not hold both). What reading in place cannot
//! cover: an ADD by the old binary that is already running at the instant
//! of the upgrade sees only its own network's old directory.
//!
//! **Crash safety.** A record is written to a temporary file and then
//! hard-linked to its address name. `link(2)` is atomic and fails when the
//! name exists, so after a process crash a record is either absent or
//! complete; a crash can only leave a temporary file, which the next locked
//! operation removes. The lock is an `flock`, released by the kernel when its
//! holder dies. There is no fsync (it cost ~20 ms per ADD here, more than
//! everything else): after a power loss a record may come back empty, and an
//! empty record holds no address (it is removed at the next scan) — the pods
//! it belonged to did not survive the power loss either. host-local does not
//! sync either.

use std::{
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use nix::fcntl::{Flock, FlockArg};

use super::{Holder, IpamError, IpamStore, Owner, PodRange, Reservation};

/// The node store's directory under an IPAM root.
pub const NODE_STORE_DIR: &str = "_node";
const LOCK_FILE: &str = "lock";
const CURSOR_FILE: &str = "last_reserved_ip.0";
const SERVED_BY_FILE: &str = "served_by";
const TEMP_PREFIX: &str = ".tmp-";

fn store_err(path: &Path, action: impl Into<String>) -> impl FnOnce(io::Error) -> IpamError {
    let path = path.display().to_string();
    let action = action.into();
    move |source| IpamError::Store {
        path,
        action,
        source,
    }
}

/// Old-layout directories are named by the network (validated names only:
/// nothing else under the root is read as a store).
fn is_network_name(name: &str) -> bool {
    crate::endpoint::network_name(name).is_ok()
}

fn parse_record(content: &str, old_layout_network: Option<&str>) -> Option<Holder> {
    let mut lines = content.lines().map(str::trim);
    let mut field = || lines.next().filter(|s| !s.is_empty());
    let container_id = field()?.to_owned();
    let ifname = field()?.to_owned();
    let network = match old_layout_network {
        Some(network) => network.to_owned(),
        None => field()?.to_owned(),
    };
    Some(Holder {
        network,
        owner: Owner {
            container_id,
            ifname,
        },
    })
}

/// The holder named by the record at `path`; `None` when there is none (or
/// it is unreadable).
fn read_holder(path: &Path, old_layout_network: Option<&str>) -> Result<Option<Holder>, IpamError> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(parse_record(&content, old_layout_network)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(store_err(path, "reading a record")(e)),
    }
}

fn remove_if_present(path: &Path, action: &str) -> Result<(), IpamError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(store_err(path, action)(e)),
        _ => Ok(()),
    }
}

/// The node's reservations under one IPAM root (see the module docs).
#[derive(Debug, Clone)]
pub struct FileStore {
    /// Canonical, so that two spellings of one root are one store.
    root: PathBuf,
    dir: PathBuf,
}

impl FileStore {
    /// The store under the IPAM root `root`, created if missing.
    pub fn open(root: &Path) -> Result<Self, IpamError> {
        let dir = root.join(NODE_STORE_DIR);
        fs::create_dir_all(&dir).map_err(store_err(&dir, "creating the directory"))?;
        let root = fs::canonicalize(root).map_err(store_err(root, "resolving the path"))?;
        Ok(Self {
            dir: root.join(NODE_STORE_DIR),
            root,
        })
    }

    /// The IPAM root (canonical).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node store's directory, `<root>/_node`.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long ago the record of `reservation` was written, if it is there.
    #[must_use]
    pub fn record_age(&self, reservation: &Reservation) -> Option<Duration> {
        let path = self.record_path(reservation).ok()??;
        fs::metadata(path).ok()?.modified().ok()?.elapsed().ok()
    }

    /// Where the record of `r` is: in `_node`, or in its network's
    /// old-layout directory.
    fn record_path(&self, r: &Reservation) -> Result<Option<PathBuf>, IpamError> {
        let name = r.ip.to_string();
        let node = self.dir.join(&name);
        if read_holder(&node, None)?.as_ref() == Some(&r.holder) {
            return Ok(Some(node));
        }
        let network = &r.holder.network;
        if is_network_name(network) {
            let old = self.root.join(network).join(&name);
            if read_holder(&old, Some(network))?.as_ref() == Some(&r.holder) {
                return Ok(Some(old));
            }
        }
        Ok(None)
    }

    /// The old-layout directories under the root: (network, path), sorted.
    fn old_layout_dirs(&self) -> Result<Vec<(String, PathBuf)>, IpamError> {
        let listing = store_err(&self.root, "listing old-layout stores");
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(listing)? {
            let entry = entry.map_err(store_err(&self.root, "listing old-layout stores"))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if is_network_name(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push((name, entry.path()));
            }
        }
        dirs.sort();
        Ok(dirs)
    }

    /// Adds the records in `dir` to `found`. In `_node` (we hold its lock)
    /// leftovers of interrupted writes are removed; an old-layout directory
    /// has no lock of ours, and an older podnet may be writing there right
    /// now, so its temporary files are left alone.
    fn scan(
        dir: &Path,
        old_layout_network: Option<&str>,
        found: &mut Vec<Reservation>,
    ) -> Result<(), IpamError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // An old-layout directory removed since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound && old_layout_network.is_some() => {
                return Ok(());
            }
            Err(e) => return Err(store_err(dir, "listing records")(e)),
        };
        for entry in entries {
            let entry = entry.map_err(store_err(dir, "listing records"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                if old_layout_network.is_none() {
                    // Left by a writer that died; we hold the lock, so
                    // nobody is writing it now.
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            match read_holder(&entry.path(), old_layout_network)? {
                Some(holder) => found.push(Reservation { ip, holder }),
                // Not written by the link() protocol (hand edit, foreign
                // tool, power loss): an unreadable record must not hold an
                // address. (Also true in an old-layout directory: link()
                // never publishes a record that is still being written.)
                None => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn cursor_in(dir: &Path) -> Option<(Ipv4Addr, SystemTime)> {
        let path = dir.join(CURSOR_FILE);
        let ip = fs::read_to_string(&path).ok()?.trim().parse().ok()?;
        Some((ip, fs::metadata(&path).ok()?.modified().ok()?))
    }

    /// Removes the old-layout directory of `network` if it holds no record
    /// any more (called with the lock held). Its cursor seeds `_node`'s
    /// when that has none. A file we do not know (an older podnet's write
    /// in progress) keeps the directory. Returns whether it was removed.
    fn tidy_old_layout_dir(&self, network: &str) -> bool {
        let dir = self.root.join(network);
        let Ok(entries) = fs::read_dir(&dir) else {
            return false;
        };
        let has_records = entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok());
        if has_records {
            return false;
        }
        if Self::cursor_in(&self.dir).is_none()
            && let Some((ip, _)) = Self::cursor_in(&dir)
        {
            let _ = self.set_last_reserved(ip);
        }
        let _ = fs::remove_file(dir.join(CURSOR_FILE));
        let _ = fs::remove_file(dir.join(LOCK_FILE));
        fs::remove_dir(&dir).is_ok()
    }

    /// Removes the old-layout directories that hold no record (the agent
    /// does this at start-up); returns their networks.
    pub fn remove_empty_old_layout_dirs(&self) -> Result<Vec<String>, IpamError> {
        let _lock = self.lock()?;
        let mut removed = Vec::new();
        for (network, dir) in self.old_layout_dirs()? {
            // Empty records hold nothing: the scan removes them first.
            Self::scan(&dir, Some(&network), &mut Vec::new())?;
            if self.tidy_old_layout_dir(&network) {
                removed.push(network);
            }
        }
        Ok(removed)
    }

    /// The root of the store that serves the node whose agent keeps this
    /// store; `None`: this one.
    fn served_by(&self) -> Result<Option<PathBuf>, IpamError> {
        let path = self.dir.join(SERVED_BY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                let bytes = bytes.trim_ascii_end();
                Ok((!bytes.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(bytes))))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err(&path, "reading which store serves the node")(e)),
        }
    }

    /// Records which store serves the node (`None`: this one). Called with
    /// this store's lock held.
    fn set_served_by(&self, root: Option<&Path>) -> Result<(), IpamError> {
        let path = self.dir.join(SERVED_BY_FILE);
        let Some(root) = root else {
            return remove_if_present(&path, "removing the serving store's name");
        };
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{SERVED_BY_FILE}-{}",
            std::process::id()
        ));
        let mut content = root.as_os_str().as_bytes().to_vec();
        content.push(b'\n');
        fs::write(&temp, content).map_err(store_err(&temp, "naming the serving store"))?;
        fs::rename(&temp, &path).map_err(store_err(&path, "naming the serving store"))
    }

    /// The store that serves the node whose agent keeps this store: the one
    /// `served_by` names (while it exists), else this one.
    pub fn serving_store(&self) -> Result<FileStore, IpamError> {
        match self.served_by()? {
            Some(root) if root.join(NODE_STORE_DIR).is_dir() => FileStore::open(&root),
            _ => Ok(self.clone()),
        }
    }

    /// Clears this store to allocate the addresses of the node whose agent
    /// keeps `home` (the agent's IPAM root; all of this is about a network
    /// whose `ipam.dataDir` names another root).
    ///
    /// One store serves a node; `home` records which (`served_by`, absent:
    /// `home` itself). Another store takes over only while the serving one
    /// holds no address of `range`: then the record moves, under `home`'s
    /// lock and the serving store's. Otherwise this is a
    /// [`IpamError::StoreConflict`]: the two would hand out the same
    /// addresses. The returned [`NodeStore`] checks the record again under
    /// its own lock at every allocation, so a takeover between this call
    /// and the allocation is caught too.
    pub fn claim_node(self, home: &FileStore, range: PodRange) -> Result<NodeStore, IpamError> {
        let want = (self.root != home.root).then(|| self.root.clone());
        if home.served_by()? != want {
            let _home_lock = home.lock()?;
            let current = home.served_by()?;
            if current != want {
                let serving = match &current {
                    None => Some(home.clone()),
                    Some(root) if *root == home.root => Some(home.clone()),
                    // A serving root that is gone holds nothing.
                    Some(root) if root.join(NODE_STORE_DIR).is_dir() => {
                        Some(FileStore::open(root)?)
                    }
                    Some(_) => None,
                };
                // Held until the record has moved: an allocation in the
                // serving store checks the record under its lock. (`home`'s
                // own lock is already held.)
                let _serving_lock = match &serving {
                    Some(serving) if serving.root != home.root => Some(serving.lock()?),
                    _ => None,
                };
                if let Some(serving) = &serving {
                    let in_use: Vec<Reservation> = serving
                        .reservations()?
                        .into_iter()
                        .filter(|r| range.contains(r.ip))
                        .collect();
                    if !in_use.is_empty() {
                        return Err(conflict(&self, &serving.root, range, &in_use));
                    }
                }
                home.set_served_by(want.as_deref())?;
            }
        }
        Ok(NodeStore {
            store: self,
            home: home.clone(),
            range,
            want,
        })
    }
}

fn conflict(
    store: &FileStore,
    serving: &Path,
    range: PodRange,
    in_use: &[Reservation],
) -> IpamError {
    let in_use = if in_use.is_empty() {
        String::new()
    } else {
        let mut networks: Vec<&str> = in_use.iter().map(|r| r.holder.network.as_str()).collect();
        networks.sort_unstable();
        networks.dedup();
        format!(
            " ({} address{} in use by network{} {})",
            in_use.len(),
            if in_use.len() == 1 { "" } else { "es" },
            if networks.len() == 1 { "" } else { "s" },
            networks.join(", ")
        )
    };
    IpamError::StoreConflict {
        store: store.root.display().to_string(),
        serving: serving.display().to_string(),
        cidr: range.cidr().to_string(),
        in_use,
    }
}

impl IpamStore for FileStore {
    type Lock = Flock<File>;

    fn lock(&self) -> Result<Self::Lock, IpamError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(store_err(&path, "opening the lock file"))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| store_err(&path, "taking the lock")(errno.into()))
    }

    fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let mut found = Vec::new();
        Self::scan(&self.dir, None, &mut found)?;
        for (network, dir) in self.old_layout_dirs()? {
            Self::scan(&dir, Some(&network), &mut found)?;
        }
        found.sort_by(|a, b| (a.ip, &a.holder).cmp(&(b.ip, &b.holder)));
        Ok(found)
    }

    fn reserve(&self, ip: Ipv4Addr, holder: &Holder) -> Result<bool, IpamError> {
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{ip}-{}", std::process::id()));
        {
            let mut file = File::create(&temp).map_err(store_err(&temp, "writing a record"))?;
            write!(
                file,
                "{}\n{}\n{}\n",
                holder.owner.container_id, holder.owner.ifname, holder.network
            )
            .map_err(store_err(&temp, "writing a record"))?;
        }
        let path = self.dir.join(ip.to_string());
        let linked = fs::hard_link(&temp, &path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(store_err(&path, "publishing a record")(e)),
        }
    }

    fn release(&self, reservation: &Reservation) -> Result<(), IpamError> {
        let Some(path) = self.record_path(reservation)? else {
            return Ok(());
        };
        remove_if_present(&path, "removing a record")?;
        if path.parent() != Some(self.dir.as_path()) {
            self.tidy_old_layout_dir(&reservation.holder.network);
        }
        Ok(())
    }

    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        let path = self.dir.join(CURSOR_FILE);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().parse().ok()),
            // Not written yet: carry on from where the old layout's newest
            // cursor stopped, so an upgrade does not restart the round robin.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(self
                .old_layout_dirs()?
                .iter()
                .filter_map(|(_, dir)| Self::cursor_in(dir))
                .max_by_key(|(_, modified)| *modified)
                .map(|(ip, _)| ip)),
            Err(e) => Err(store_err(&path, "reading the cursor")(e)),
        }
    }

    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        // A torn cursor only changes where the next search starts.
        let path = self.dir.join(CURSOR_FILE);
        fs::write(&path, ip.to_string()).map_err(store_err(&path, "writing the cursor"))
    }
}

/// A [`FileStore`] cleared by [`FileStore::claim_node`] to allocate the
/// node's addresses. Taking its lock checks that it still serves the node.
#[derive(Debug, Clone)]
pub struct NodeStore {
    store: FileStore,
    home: FileStore,
    range: PodRange,
    /// What `home` must say serves the node (`None`: `home`).
    want: Option<PathBuf>,
}

impl NodeStore {
    #[must_use]
    pub fn store(&self) -> &FileStore {
        &self.store
    }
}

impl IpamStore for NodeStore {
    type Lock = Flock<File>;

    fn lock(&self) -> Result<Self::Lock, IpamError> {
        let lock = self.store.lock()?;
        // Moves only under the serving store's lock, which this is when the
        // record names it: what we read here holds until we unlock.
        let current = self.home.served_by()?;
        if current != self.want {
            let serving = current.unwrap_or_else(|| self.home.root.clone());
            return Err(conflict(&self.store, &serving, self.range, &[]));
        }
        Ok(lock)
    }

    fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        self.store.reservations()
    }

    fn reserve(&self, ip: Ipv4Addr, holder: &Holder) -> Result<bool, IpamError> {
        self.store.reserve(ip, holder)
    }

    fn release(&self, reservation: &Reservation) -> Result<(), IpamError> {
        self.store.release(reservation)
    }

    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        self.store.last_reserved()
    }

    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.store.set_last_reserved(ip)
    }
}

#[cfg(test)]
mod tests;
