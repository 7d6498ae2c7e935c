//! On-disk IPAM store in host-local's layout: a directory per network with
//! one file per allocated address (named by the address, holding the owner),
//! `last_reserved_ip.0` as the round-robin cursor and `lock` for `flock`.
//!
//! Crash safety: a record is written to a temporary file and then
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
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use super::{IpamError, IpamStore, Owner, Reservation};

const LOCK_FILE: &str = "lock";
const CURSOR_FILE: &str = "last_reserved_ip.0";
const TEMP_PREFIX: &str = ".tmp-";

/// Reservations of one network in one directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// The store in `dir`, created if missing.
    pub fn open(dir: &Path) -> Result<Self, IpamError> {
        fs::create_dir_all(dir).map_err(|source| IpamError::Store {
            path: dir.display().to_string(),
            action: "creating the directory".into(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long ago the record held by `owner` was written, if there is one.
    #[must_use]
    pub fn record_age(&self, owner: &Owner) -> Option<std::time::Duration> {
        fs::read_dir(&self.dir)
            .ok()?
            .filter_map(Result::ok)
            .find_map(|entry| {
                let name = entry.file_name();
                name.to_string_lossy().parse::<Ipv4Addr>().ok()?;
                let content = fs::read_to_string(entry.path()).ok()?;
                (Self::parse_record(&content).as_ref() == Some(owner))
                    .then(|| entry.metadata().ok()?.modified().ok()?.elapsed().ok())
                    .flatten()
            })
    }

    fn err(&self, action: impl Into<String>) -> impl FnOnce(io::Error) -> IpamError + '_ {
        let action = action.into();
        move |source| IpamError::Store {
            path: self.dir.display().to_string(),
            action,
            source,
        }
    }

    fn parse_record(content: &str) -> Option<Owner> {
        let mut lines = content.lines().map(str::trim);
        let container_id = lines.next().filter(|s| !s.is_empty())?;
        let ifname = lines.next().filter(|s| !s.is_empty())?;
        Some(Owner {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        })
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
            .map_err(self.err("opening the lock file"))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| IpamError::Store {
            path: self.dir.display().to_string(),
            action: "taking the lock".into(),
            source: errno.into(),
        })
    }

    fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(self.err("listing records"))? {
            let entry = entry.map_err(self.err("listing records"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                // Left by a writer that died; we hold the lock, so nobody
                // is writing it now.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            let content = fs::read_to_string(entry.path())
                .map_err(self.err(format!("reading record {ip}")))?;
            match Self::parse_record(&content) {
                Some(owner) => found.push(Reservation { ip, owner }),
                // Not written by the link() protocol (hand edit, foreign
                // tool): an unreadable record must not hold an address.
                None => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        found.sort_by_key(|r| r.ip);
        Ok(found)
    }

    fn reserve(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{ip}-{}", std::process::id()));
        {
            let mut file = File::create(&temp).map_err(self.err(format!("writing record {ip}")))?;
            write!(file, "{}\n{}\n", owner.container_id, owner.ifname)
                .map_err(self.err(format!("writing record {ip}")))?;
        }
        let linked = fs::hard_link(&temp, self.dir.join(ip.to_string()));
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.err(format!("publishing record {ip}"))(e)),
        }
    }

    fn release(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        match fs::remove_file(self.dir.join(ip.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(self.err(format!("removing record {ip}"))(e))
            }
            _ => Ok(()),
        }
    }

    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        match fs::read_to_string(self.dir.join(CURSOR_FILE)) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("reading the cursor")(e)),
        }
    }

    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        // A torn cursor only changes where the next search starts.
        fs::write(self.dir.join(CURSOR_FILE), ip.to_string())
            .map_err(self.err("writing the cursor"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Allocator, PodRange};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("podnet-ipam-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn records_survive_reopen_and_leftovers_are_cleaned() {
        let dir = temp_dir("reopen");
        let _cleanup = Cleanup(dir.clone());
        let range = PodRange::new("10.244.3.0/24".parse().unwrap()).unwrap();
        let ip = Allocator::new(range, FileStore::open(&dir).unwrap())
            .allocate(&owner("a"))
            .unwrap()
            .ip;
        assert_eq!(
            fs::read_to_string(dir.join(ip.to_string())).unwrap(),
            "a\neth0\n"
        );
        // What a crash can leave: a temp file; and a foreign empty record.
        fs::write(dir.join(".tmp-10.244.3.9-1"), "").unwrap();
        fs::write(dir.join("10.244.3.10"), "").unwrap();
        let alloc = Allocator::new(range, FileStore::open(&dir).unwrap());
        let again = alloc.allocate(&owner("a")).unwrap();
        assert!(again.existing);
        assert_eq!(again.ip, ip);
        assert_eq!(alloc.reservations().unwrap().len(), 1);
        assert!(!dir.join(".tmp-10.244.3.9-1").exists());
        assert!(
            !dir.join("10.244.3.10").exists(),
            "an empty record holds no address"
        );
    }

    #[test]
    fn concurrent_allocators_never_share_an_address() {
        let dir = temp_dir("concurrent");
        let _cleanup = Cleanup(dir.clone());
        let range = PodRange::new("10.244.4.0/27".parse().unwrap()).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..40)
                .map(|n| {
                    let dir = dir.clone();
                    s.spawn(move || {
                        Allocator::new(range, FileStore::open(&dir).unwrap())
                            .allocate(&owner(&format!("c{n}")))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: std::collections::HashSet<_> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|a| a.ip))
            .collect();
        let exhausted = results
            .iter()
            .filter(|r| matches!(r, Err(IpamError::Exhausted { .. })))
            .count();
        assert_eq!(ok.len(), 29, "every free address handed out exactly once");
        assert_eq!(exhausted, 11);
    }
}
