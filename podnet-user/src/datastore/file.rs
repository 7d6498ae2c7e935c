//! The nodes-file datastore: a JSON file `{"nodes": [NodeRecord...]}` that
//! every agent reads and watches; an agent adds itself when absent. Changes
//! are made under an `flock` on `PATH.lock` and published by rename, so
//! readers never see half a file and two agents never take one CIDR.

use std::{
    fs::{self, File, OpenOptions},
    io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{DatastoreError, JoinRequest, NodeRecord, first_free_cidr};

#[derive(Debug, Default, Serialize, Deserialize)]
struct NodesFile {
    nodes: Vec<NodeRecord>,
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

    fn io(&self, action: &str) -> impl FnOnce(io::Error) -> DatastoreError + '_ {
        let action = action.to_owned();
        move |source| DatastoreError::Io {
            what: self.path.display().to_string(),
            action,
            source,
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

    fn read(&self) -> Result<NodesFile, DatastoreError> {
        match fs::read(&self.path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(NodesFile::default()),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DatastoreError::Invalid {
                what: self.path.display().to_string(),
                msg: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(NodesFile::default()),
            Err(e) => Err(self.io("reading")(e)),
        }
    }

    fn write(&self, file: &NodesFile) -> Result<(), DatastoreError> {
        let mut temp = self.path.as_os_str().to_owned();
        temp.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| DatastoreError::Invalid {
            what: self.path.display().to_string(),
            msg: e.to_string(),
        })?;
        fs::write(&temp, bytes).map_err(self.io("writing"))?;
        fs::rename(&temp, &self.path).map_err(self.io("publishing"))
    }

    /// Adds (or updates) this node and returns its pod CIDR: the one it
    /// already has, the requested one, or the first free one.
    pub fn join(&self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
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
            None => first_free_cidr(request.cluster_cidr, request.node_prefix, &others)?,
        };
        if let Some(holder) = file.nodes.iter().find(|n| {
            n.name != request.name && (n.pod_cidr.contains(&cidr) || cidr.contains(&n.pod_cidr))
        }) {
            return Err(DatastoreError::Conflict {
                cidr,
                holder: holder.name.clone(),
            });
        }
        file.nodes.retain(|n| n.name != request.name);
        file.nodes.push(NodeRecord {
            name: request.name.clone(),
            node_ip: request.node_ip,
            pod_cidr: cidr,
        });
        file.nodes.sort();
        self.write(&file)?;
        Ok(cidr)
    }

    /// Every node in the file.
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
}
