//! The eBPF datapath as the agent and the tests see it: the embedded object,
//! loading it with its maps pinned, reading and writing the maps.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{SchedClassifier, links::LinkError},
};

use crate::pinned_maps;

mod attach;
mod counters;
mod entries;
mod flow_owners;
mod policy;
mod services;
mod socket_lb;

pub use attach::{NodeProgram, POD_TC_HANDLE, POD_TC_PRIORITY, PodProgram};
pub use counters::{Counters, FILLED_MAPS, MapFill, PinnedMapReader, pinned_fill};
pub use entries::RemoteEntry;
pub use flow_owners::{FlowSweeper, FlowTally, SweepReport, tally};
use podnet_common::names;
pub use socket_lb::{SocketLbError, check_cgroup, detach_socket_lb, socket_lb_counters};

/// The eBPF object built by `build.rs` from podnet-ebpf (with BTF), embedded
/// so every binary is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podnet"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (maps pinned in {})", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("migrating pinned maps of another layout in {}", pin_dir.display())]
    Migration {
        pin_dir: PathBuf,
        #[source]
        source: Box<crate::pinned_maps::MigrationError>,
    },
    #[error("this build has no eBPF object (it was built with AYA_BUILD_SKIP=1)")]
    NotEmbedded,
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {action}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name}: {action}")]
    Link {
        name: &'static str,
        action: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning at {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("{ifname}: {action}")]
    TcFilter {
        ifname: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the number of possible CPUs for per-CPU map values")]
    PossibleCpus {
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}: {action}")]
    Map {
        name: &'static str,
        action: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

impl DatapathError {
    /// The error with every source below it, one line (`a: b: c`): what a
    /// status line or a report shows of it.
    #[must_use]
    pub fn with_sources(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            text.push_str(": ");
            text.push_str(&e.to_string());
            source = e.source();
        }
        text
    }
}

/// A map removal whose key was not there succeeded: aya 0.14 reports that
/// as the syscall's ENOENT, not as `MapError::KeyNotFound` (which only its
/// lookups return), so both mean "already gone".
fn removed(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn map_err(
    name: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        action: action.into(),
        source: Box::new(source),
    }
}

fn prog_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        action,
        source: Box::new(source),
    }
}

/// A loaded program, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedProgram {
    pub name: &'static str,
    pub id: u32,
    pub tag: u64,
}

/// A loaded map, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedMap {
    pub name: String,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
}

/// The loaded datapath: programs verified and loaded into the kernel, maps
/// created (or re-opened from their pins).
pub struct Datapath {
    ebpf: Ebpf,
    /// Old maps of another layout, until [`Datapath::finish_migration`].
    migration: Option<pinned_maps::Migration>,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded object. Maps are pinned in `pin_dir` by name, and
    /// maps already pinned there are re-used with their contents (that is how
    /// a restarted agent keeps the forwarding state). The directory must
    /// already be on a bpffs (see [`crate::bpffs`]). Always explicit: aya
    /// would otherwise pin straight into `/sys/fs/bpf`.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotEmbedded);
        }
        let migration_error = |source| DatapathError::Migration {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        };
        let layouts = pinned_maps::object_layouts(EBPF_OBJECT).map_err(migration_error)?;
        let retired =
            pinned_maps::retire_incompatible(pin_dir, &layouts).map_err(migration_error)?;
        if !retired.is_empty() {
            tracing::info!(maps = ?retired, "pinned maps of another layout (another podnet build): migrating them");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        for name in names::ALL_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?
                .try_into()
                .map_err(prog_err(name, "is not a TC classifier"))?;
            program
                .load()
                .map_err(prog_err(name, "loading into the kernel (verifier)"))?;
        }
        socket_lb::load(&mut ebpf)?;
        let migration = pinned_maps::Migration::start(pin_dir, |name| ebpf.map(name).map(map_data))
            .map_err(migration_error)?;
        Ok(Self {
            ebpf,
            migration: Some(migration),
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Ends a migration of pinned maps (see [`crate::pinned_maps`]): to be
    /// called once every program of the old build has been replaced (pod
    /// veths and node devices re-pointed). No-op without one.
    pub fn finish_migration(&mut self) -> Result<(), DatapathError> {
        let Some(migration) = self.migration.take() else {
            return Ok(());
        };
        if !migration.names().is_empty() {
            tracing::info!(maps = ?migration.names(), "migration of pinned maps finished");
        }
        let ebpf = &self.ebpf;
        migration
            .finish(|name| ebpf.map(name).map(map_data))
            .map_err(|source| DatapathError::Migration {
                pin_dir: self.pin_dir.clone(),
                source: Box::new(source),
            })
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A program by name, as a TC classifier (to attach or test-run it).
    pub fn classifier(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(prog_err(name, "is not a TC classifier"))
    }

    /// The loaded programs with their kernel ids.
    pub fn programs(&self) -> Result<Vec<LoadedProgram>, DatapathError> {
        names::ALL_PROGRAMS
            .iter()
            .map(|&name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::MissingProgram { name })?;
                let info = program.info().map_err(prog_err(name, "reading its info"))?;
                Ok(LoadedProgram {
                    name,
                    id: info.id(),
                    tag: info.tag(),
                })
            })
            .collect()
    }

    /// The maps with their kernel ids.
    pub fn maps(&self) -> Result<Vec<LoadedMap>, DatapathError> {
        self.ebpf
            .maps()
            .map(|(name, map)| {
                let info = map_data(map).info().map_err(|source| DatapathError::Map {
                    name: "(listing)",
                    action: format!("reading the info of {name}"),
                    source: Box::new(source),
                })?;
                Ok(LoadedMap {
                    name: name.to_owned(),
                    id: info.id(),
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                })
            })
            .collect()
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })
    }
}

/// The kernel object behind a map of one of the kinds the datapath declares.
fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map;
    match map {
        Map::HashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::LpmTrie(data)
        | Map::Array(data)
        | Map::LruHashMap(data)
        | Map::RingBuf(data)
        | Map::Unsupported(data) => data,
        other => unreachable!("podnet-ebpf declares no map of kind {other:?}"),
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of the datapath's
/// timestamps (`bpf_ktime_get_coarse_ns`).
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns` (drop
/// events' timestamps).
#[must_use]
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// Map key of a pod address: the address bytes as they are on the wire,
/// which is what the program reads from the packet.
#[must_use]
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

#[cfg(test)]
mod tests {
    use aya::{maps::MapError, sys::SyscallError};

    use super::removed;

    fn syscall(errno: i32) -> MapError {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn removing_an_absent_key_is_not_an_error() {
        assert!(removed(Err(syscall(libc::ENOENT))).is_ok());
        assert!(removed(Err(MapError::KeyNotFound)).is_ok());
        assert!(removed(Ok(())).is_ok());
        assert!(removed(Err(syscall(libc::EPERM))).is_err());
    }
}
