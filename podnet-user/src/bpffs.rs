//! The BPF filesystem the agent pins maps and links in.
//!
//! A fresh machine may not have bpffs mounted at `/sys/fs/bpf`, and a process
//! started with `ip netns exec` sees a fresh sysfs without it; the agent
//! mounts it where missing, as Cilium does.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("checking the filesystem type of {path}")]
    Statfs { path: PathBuf, source: nix::Error },
    #[error("mounting bpffs on {path}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("creating pin directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
}

/// True when `path` lies on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let stat = statfs(path).map_err(|source| BpffsError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}

/// The conventional bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Where podnetd pins its maps and links unless told otherwise (and where
/// podnetctl reads them).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/podnet";

fn mount_bpffs(at: &Path) -> Result<(), BpffsError> {
    mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|source| {
        BpffsError::Mount {
            path: at.to_owned(),
            source,
        }
    })
}

fn create_dir(path: &Path) -> Result<(), BpffsError> {
    fs::create_dir_all(path).map_err(|source| BpffsError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Makes sure `pin_dir` exists on a bpffs and returns whether it mounted one.
///
/// Under `/sys/fs/bpf`, mounts bpffs there when missing (a fresh machine, or
/// a process started by `ip netns exec`, which remounts /sys). Anywhere else,
/// never mounts over an existing directory tree: it creates `pin_dir` and, if
/// that is not on a bpffs, mounts a private bpffs instance on `pin_dir`
/// itself (what tests and labs use to keep agents apart).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<bool, BpffsError> {
    let default = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(default) {
        let mounted = if is_bpffs(default)? {
            false
        } else {
            mount_bpffs(default)?;
            true
        };
        create_dir(pin_dir)?;
        return Ok(mounted);
    }
    create_dir(pin_dir)?;
    if is_bpffs(pin_dir)? {
        return Ok(false);
    }
    mount_bpffs(pin_dir)?;
    Ok(true)
}
