//! The agent's endpoint records on disk: its memory of the node's
//! endpoints across restarts, one JSON file per endpoint under
//! `<state-dir>/endpoints/`, named `<container ID>:<ifname>.json`.
//!
//! The record is a type of its own, not the socket's wire type
//! ([`Endpoint`]): the socket's messages change with features, the records
//! must survive upgrades (and downgrades) of the agent that reads them.
//! Rules:
//! - Every record carries `version`; records written before records were
//!   versioned have none and read as version 0, which has the same fields
//!   as version 1 (test: `a_record_of_the_previous_release_loads`).
//! - A field added later gets a default (`#[serde(default)]`), so older
//!   records read; a change that cannot be defaulted bumps
//!   [`RECORD_VERSION`] and converts in [`EndpointRecord::into_endpoint`].
//! - A record that cannot be read (corrupt, or from a newer agent after a
//!   downgrade) is never deleted: it is moved to `unreadable/` beside the
//!   records, logged, and reported by `podnetctl status` until an operator
//!   removes it. Its endpoint is not installed (the agent cannot know what
//!   it was); its address stays held while its veth exists.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    endpoint::{Endpoint, Owner, PodRef},
    shaping::Bandwidth,
};

/// The version this agent writes.
pub const RECORD_VERSION: u32 = 1;

/// Where unreadable records are kept, under the records' directory.
pub const UNREADABLE_DIR: &str = "unreadable";

/// One endpoint as the agent keeps it on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// 0 (absent): written before records were versioned.
    #[serde(default)]
    pub version: u32,
    pub owner: Owner,
    pub network: String,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// The pod's namespace and name (added in version 1 with a default:
    /// older records have none; an older agent ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// Why a record was set aside.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading endpoint record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint record {path} is not a record this agent can read")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "endpoint record {path} has version {version}, newer than this agent's {RECORD_VERSION} (written by a newer podnet?)"
    )]
    Newer { path: PathBuf, version: u32 },
    #[error("writing endpoint record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<&Endpoint> for EndpointRecord {
    fn from(ep: &Endpoint) -> Self {
        Self {
            version: RECORD_VERSION,
            owner: ep.owner.clone(),
            network: ep.network.clone(),
            netns: ep.netns.clone(),
            ip: ep.ip,
            host_ifname: ep.host_ifname.clone(),
            host_ifindex: ep.host_ifindex,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            bandwidth: ep.bandwidth,
            pod: ep.pod.clone(),
        }
    }
}

impl EndpointRecord {
    /// The endpoint this record describes (versions 0 and 1 have the same
    /// fields).
    #[must_use]
    pub fn into_endpoint(self) -> Endpoint {
        Endpoint {
            owner: self.owner,
            network: self.network,
            netns: self.netns,
            ip: self.ip,
            host_ifname: self.host_ifname,
            host_ifindex: self.host_ifindex,
            pod_mac: self.pod_mac,
            host_mac: self.host_mac,
            bandwidth: self.bandwidth,
            pod: self.pod,
        }
    }
}

/// The record file's name. Container IDs and ifnames are validated
/// ([`crate::endpoint::container_id`], [`crate::endpoint::ifname`]): no
/// '/', no ':'.
#[must_use]
pub fn record_name(owner: &Owner) -> String {
    format!("{}:{}.json", owner.container_id, owner.ifname)
}

fn parse(path: &Path) -> Result<Endpoint, RecordError> {
    let bytes = fs::read(path).map_err(|source| RecordError::Read {
        path: path.to_owned(),
        source,
    })?;
    let record: EndpointRecord =
        serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse {
            path: path.to_owned(),
            source,
        })?;
    if record.version > RECORD_VERSION {
        return Err(RecordError::Newer {
            path: path.to_owned(),
            version: record.version,
        });
    }
    Ok(record.into_endpoint())
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub endpoints: BTreeMap<Owner, Endpoint>,
    /// Records that could not be read, where they are now (under
    /// [`UNREADABLE_DIR`]).
    pub set_aside: Vec<PathBuf>,
}

/// Reads every record in `dir`; an unreadable one is moved to
/// `dir/unreadable/` (see the module docs) and listed, never deleted.
/// Records set aside earlier are listed too, so they stay reported across
/// restarts.
pub fn load(dir: &Path) -> io::Result<Loaded> {
    let mut loaded = Loaded::default();
    let aside_dir = dir.join(UNREADABLE_DIR);
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") || !path.is_file() {
            continue;
        }
        match parse(&path) {
            Ok(ep) => {
                loaded.endpoints.insert(ep.owner.clone(), ep);
            }
            Err(e) => {
                let kept = set_aside(&path, &aside_dir)?;
                warn!(error = %error_chain(&e), kept = %kept.display(),
                      "an endpoint record cannot be read: kept aside, its endpoint is not installed");
            }
        }
    }
    if aside_dir.is_dir() {
        for entry in fs::read_dir(&aside_dir)? {
            loaded.set_aside.push(entry?.path());
        }
        loaded.set_aside.sort();
    }
    Ok(loaded)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Moves `path` into `aside_dir` under a name no earlier record took.
fn set_aside(path: &Path, aside_dir: &Path) -> io::Result<PathBuf> {
    fs::create_dir_all(aside_dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "record".into(), |n| n.to_string_lossy().into_owned());
    let mut target = aside_dir.join(&name);
    let mut n = 1;
    while target.exists() {
        target = aside_dir.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    Ok(target)
}

/// Writes `ep`'s record atomically (a temporary file renamed over it).
pub fn write(dir: &Path, ep: &Endpoint) -> Result<(), RecordError> {
    let path = dir.join(record_name(&ep.owner));
    let temp = path.with_extension("tmp");
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| RecordError::Write { path, source }
    };
    let bytes = serde_json::to_vec_pretty(&EndpointRecord::from(ep))
        .map_err(io::Error::other)
        .map_err(failed(&temp))?;
    fs::write(&temp, bytes).map_err(failed(&temp))?;
    fs::rename(&temp, &path).map_err(failed(&path))
}

/// Removes `owner`'s record; none is not an error.
pub fn remove(dir: &Path, owner: &Owner) {
    let path = dir.join(record_name(owner));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!(error = %e, path = %path.display(), "removing an endpoint record");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records exactly as the release before versioned records wrote them
    /// (`serde_json::to_vec_pretty` of the socket's `Endpoint`).
    const PREVIOUS_RELEASE: [(&str, &str); 2] = [
        ("c1:eth0.json", include_str!("testdata/v0-plain.json")),
        ("c2:eth0.json", include_str!("testdata/v0-shaped.json")),
    ];

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn a_record_of_the_previous_release_loads() {
        let d = dir();
        for (name, text) in PREVIOUS_RELEASE {
            fs::write(d.path().join(name), text).expect("write");
        }
        let loaded = load(d.path()).expect("load");
        assert!(loaded.set_aside.is_empty(), "{:?}", loaded.set_aside);
        assert_eq!(loaded.endpoints.len(), 2);
        let plain = loaded
            .endpoints
            .values()
            .find(|e| e.owner.container_id == "c1")
            .expect("c1");
        assert_eq!(plain.ip, Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(plain.host_ifname, "pnec43057c07aaa");
        assert_eq!(plain.host_ifindex, 7);
        assert_eq!(plain.pod_mac, [2, 0, 0, 0, 0, 5]);
        assert_eq!(plain.bandwidth, None);
        // Records from before pods were named have no pod.
        assert!(loaded.endpoints.values().all(|e| e.pod.is_none()));
        let shaped = loaded
            .endpoints
            .values()
            .find(|e| e.owner.container_id == "c2")
            .expect("c2");
        let bw = shaped.bandwidth.expect("limits");
        assert_eq!((bw.ingress_rate, bw.egress_burst), (100_000_000, 2_000_000));
    }

    #[test]
    fn what_is_written_reads_back_with_its_version() {
        let d = dir();
        let loaded = {
            let (_, text) = PREVIOUS_RELEASE[1];
            let record: EndpointRecord = serde_json::from_str(text).expect("v0");
            assert_eq!(record.version, 0);
            let ep = record.into_endpoint();
            write(d.path(), &ep).expect("write");
            let on_disk: serde_json::Value = serde_json::from_slice(
                &fs::read(d.path().join(record_name(&ep.owner))).expect("read"),
            )
            .expect("json");
            assert_eq!(on_disk["version"], RECORD_VERSION);
            (ep, load(d.path()).expect("load"))
        };
        let (ep, loaded) = loaded;
        assert_eq!(loaded.endpoints.get(&ep.owner), Some(&ep));
        remove(d.path(), &ep.owner);
        assert!(load(d.path()).expect("load").endpoints.is_empty());
    }

    #[test]
    fn the_pod_ref_is_kept_and_an_older_agent_reads_past_it() {
        let d = dir();
        let (_, text) = PREVIOUS_RELEASE[0];
        let mut ep = serde_json::from_str::<EndpointRecord>(text)
            .expect("v0")
            .into_endpoint();
        ep.pod = Some(PodRef {
            namespace: "x".into(),
            name: "a".into(),
        });
        write(d.path(), &ep).expect("write");
        let loaded = load(d.path()).expect("load");
        assert_eq!(loaded.endpoints.get(&ep.owner), Some(&ep));
        // The record stays version 1: the field has a default, and the
        // previous release's reader (no unknown-field check) ignores it.
        let on_disk: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join(record_name(&ep.owner))).expect("read"))
                .expect("json");
        assert_eq!(on_disk["version"], 1);
        assert_eq!(on_disk["pod"]["namespace"], "x");
        assert_eq!(on_disk["pod"]["name"], "a");
    }

    #[test]
    fn unreadable_records_are_kept_aside_and_stay_reported() {
        let d = dir();
        fs::write(d.path().join("bad:eth0.json"), b"{ not json").expect("write");
        let mut newer: serde_json::Value = serde_json::from_str(PREVIOUS_RELEASE[0].1).expect("v0");
        newer["version"] = serde_json::json!(RECORD_VERSION + 1);
        fs::write(d.path().join("c1:eth0.json"), newer.to_string()).expect("write");
        fs::write(d.path().join("c2:eth0.json"), PREVIOUS_RELEASE[1].1).expect("write");
        let loaded = load(d.path()).expect("load");
        assert_eq!(loaded.endpoints.len(), 1, "the good record still loads");
        assert_eq!(loaded.set_aside.len(), 2);
        for kept in &loaded.set_aside {
            assert!(kept.starts_with(d.path().join(UNREADABLE_DIR)));
            assert!(fs::metadata(kept).is_ok(), "{} kept", kept.display());
        }
        // The newer agent's record is kept byte for byte (a later upgrade
        // can put it back).
        let kept =
            fs::read_to_string(d.path().join(UNREADABLE_DIR).join("c1:eth0.json")).expect("kept");
        assert_eq!(kept, newer.to_string());
        // Still reported after a restart, and a second bad record with the
        // same name does not overwrite the first.
        fs::write(d.path().join("bad:eth0.json"), b"also bad").expect("write");
        let again = load(d.path()).expect("load");
        assert_eq!(again.set_aside.len(), 3, "{:?}", again.set_aside);
    }
}
