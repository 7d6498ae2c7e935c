//! Pinned maps across podnet builds.
//!
//! The maps are pinned so that a restarted agent finds the forwarding state
//! the running programs use. A new build may declare a map differently (a
//! value that grew a field, more counters). aya re-opens a pin whatever its
//! layout (aya 0.14 `MapData::create_pinned_by_name` does not compare), so
//! a mismatched pin would fail the verifier or, worse, be read with the
//! wrong layout. Before loading, every pin whose layout differs from the
//! object's is moved aside (`<name>-retired`); the new object then creates
//! the map afresh and its entries are copied over from the retired one:
//!
//! - the key must be the same size (a different key is a different map:
//!   nothing is copied, the agent fills it again from its own state);
//! - a value is copied byte for byte up to the shorter of the two sizes and
//!   zero-filled after it. That is the layout rule for podnet's maps: fields
//!   are only ever appended, and a zero field means "as before" (counters
//!   follow the same rule: indices are appended, never renumbered);
//! - per-CPU values are converted CPU by CPU.
//!
//! The running programs keep the old map until the agent re-points them,
//! and go on updating it meanwhile; [`Migration::finish`] copies what they
//! added (entries the new map does not have yet) once every program has
//! been replaced, and lets the old map go.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo, MapType};

/// Suffix of a pin moved aside for migration (bpffs refuses names with a
/// dot, `bpf_lookup`).
pub const RETIRED_SUFFIX: &str = "-retired";

/// What makes two maps of one name interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("reading the map definitions of the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("moving the pin {} aside", pin.display())]
    Retire {
        pin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the retired map {}", pin.display())]
    OpenRetired {
        pin: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("copying the entries of map {name} into its new layout")]
    Copy {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The layouts the object declares for its pinned (`podnet_*`) maps.
pub fn object_layouts(object: &[u8]) -> Result<Vec<(String, MapLayout)>, MigrationError> {
    let obj = aya_obj::Object::parse(object).map_err(MigrationError::Parse)?;
    let mut layouts: Vec<(String, MapLayout)> = obj
        .maps
        .iter()
        .filter(|(name, _)| name.starts_with("podnet_"))
        .map(|(name, map)| {
            (
                name.clone(),
                MapLayout {
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                },
            )
        })
        .collect();
    layouts.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(layouts)
}

fn layout_of(info: &MapInfo) -> MapLayout {
    MapLayout {
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }
}

/// The pins in `pin_dir` whose layout differs from `layouts`.
#[must_use]
pub fn incompatible(pin_dir: &Path, layouts: &[(String, MapLayout)]) -> Vec<String> {
    layouts
        .iter()
        .filter(|(name, want)| {
            MapInfo::from_pin(pin_dir.join(name)).is_ok_and(|info| layout_of(&info) != *want)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Moves every incompatible pin aside (`<name>-retired`) so the loader
/// creates the map afresh. A retired pin already there is from a start that
/// stopped before migrating it: it holds the older state, and is kept.
pub fn retire_incompatible(
    pin_dir: &Path,
    layouts: &[(String, MapLayout)],
) -> Result<Vec<String>, MigrationError> {
    let names = incompatible(pin_dir, layouts);
    for name in &names {
        let pin = pin_dir.join(name);
        let retired = pin_dir.join(format!("{name}{RETIRED_SUFFIX}"));
        let moved = if retired.exists() {
            std::fs::remove_file(&pin)
        } else {
            std::fs::rename(&pin, &retired)
        };
        moved.map_err(|source| MigrationError::Retire { pin, source })?;
    }
    Ok(names)
}

/// Maps being migrated: the old maps, held open until the programs that
/// use them are gone.
#[derive(Default)]
pub struct Migration {
    old: Vec<(String, MapData)>,
}

impl Migration {
    /// Copies every retired map in `pin_dir` into its new map (`new_map`
    /// gives the loaded map of a name) and removes the retired pins.
    pub fn start<'a>(
        pin_dir: &Path,
        mut new_map: impl FnMut(&str) -> Option<&'a MapData>,
    ) -> Result<Self, MigrationError> {
        let mut migration = Self::default();
        let Ok(entries) = std::fs::read_dir(pin_dir) else {
            return Ok(migration);
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(RETIRED_SUFFIX) else {
                continue;
            };
            let pin = entry.path();
            let old = MapData::from_pin(&pin).map_err(|source| MigrationError::OpenRetired {
                pin: pin.clone(),
                source,
            })?;
            if let Some(new) = new_map(name) {
                let copied =
                    copy_entries(&old, new, false).map_err(|source| MigrationError::Copy {
                        name: name.to_owned(),
                        source,
                    })?;
                tracing::info!(
                    map = name,
                    entries = copied,
                    "migrated a pinned map to its new layout"
                );
            } else {
                tracing::info!(map = name, "a pinned map this build no longer has: dropped");
            }
            // The old map lives on while programs or `old` hold it.
            let _ = std::fs::remove_file(&pin);
            migration.old.push((name.to_owned(), old));
        }
        Ok(migration)
    }

    /// Names of the maps being migrated.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.old.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Once no program uses the old maps any more: copies the entries the
    /// old programs added meanwhile (those the new map lacks), then lets
    /// the old maps go.
    pub fn finish<'a>(
        self,
        mut new_map: impl FnMut(&str) -> Option<&'a MapData>,
    ) -> Result<(), MigrationError> {
        for (name, old) in &self.old {
            if let Some(new) = new_map(name) {
                copy_entries(old, new, true).map_err(|source| MigrationError::Copy {
                    name: name.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

// The raw map element commands: aya's typed maps need the key and value
// types at compile time, and a migration handles layouts of other builds.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

fn bpf_elem(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        _pad: 0,
        key: key as u64,
        value_or_next_key: value as u64,
        flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command; the key
    // and value pointers point to buffers of the map's key and value sizes
    // (the callers size them from the map's info), live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_per_cpu(map_type: &Result<MapType, aya::maps::MapError>) -> bool {
    matches!(
        map_type,
        Ok(MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash)
    )
}

fn is_array(map_type: &Result<MapType, aya::maps::MapError>) -> bool {
    matches!(map_type, Ok(MapType::Array | MapType::PerCpuArray))
}

/// Copies `old`'s entries into `new`, converting each value; with
/// `only_missing`, only keys `new` does not have (hash-like maps; arrays
/// always have every key and are skipped). Returns how many were copied.
fn copy_entries(old: &MapData, new: &MapData, only_missing: bool) -> io::Result<usize> {
    let old_info = old.info().map_err(io::Error::other)?;
    let new_info = new.info().map_err(io::Error::other)?;
    if old_info.key_size() != new_info.key_size() {
        // Another key is another map: the agent fills it from its state.
        return Ok(0);
    }
    let new_type = new_info.map_type();
    if only_missing && is_array(&new_type) {
        return Ok(0);
    }
    // A per-CPU value is one slot per possible CPU, each rounded up to 8
    // bytes (`bpf_map_value_size`).
    let per_cpu = is_per_cpu(&new_type);
    let cpus = if per_cpu {
        aya::util::nr_cpus().map_err(|(_, e)| e)?
    } else {
        1
    };
    let slot = |size: u32| {
        let size = size as usize;
        if per_cpu { size.div_ceil(8) * 8 } else { size }
    };
    let (old_slot, new_slot) = (slot(old_info.value_size()), slot(new_info.value_size()));
    let keep = old_info.value_size().min(new_info.value_size()) as usize;
    let key_size = old_info.key_size() as usize;
    let (old_fd, new_fd) = (old.fd().as_fd(), new.fd().as_fd());
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut old_value = vec![0u8; old_slot * cpus];
    let mut new_value = vec![0u8; new_slot * cpus];
    let mut have_key = false;
    let mut copied = 0;
    loop {
        let from: *const u8 = if have_key {
            key.as_ptr()
        } else {
            std::ptr::null()
        };
        match bpf_elem(BPF_MAP_GET_NEXT_KEY, old_fd, from, next.as_mut_ptr(), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        key.copy_from_slice(&next);
        have_key = true;
        match bpf_elem(
            BPF_MAP_LOOKUP_ELEM,
            old_fd,
            key.as_ptr(),
            old_value.as_mut_ptr(),
            0,
        ) {
            Ok(()) => {}
            // Deleted since (an LRU eviction, a program's delete).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        new_value.fill(0);
        for cpu in 0..cpus {
            let (o, n) = (cpu * old_slot, cpu * new_slot);
            new_value[n..n + keep].copy_from_slice(&old_value[o..o + keep]);
        }
        let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
        match bpf_elem(
            BPF_MAP_UPDATE_ELEM,
            new_fd,
            key.as_ptr(),
            new_value.as_mut_ptr(),
            flags,
        ) {
            Ok(()) => copied += 1,
            // Already there (only_missing), or an index the new array no
            // longer has.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::E2BIG)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}
