//! The socket LB (see `podnet_common::socket_lb`): its cgroup programs
//! attached to one cgroup v2 directory by pinned links, and its counters.
//!
//! The links are pinned as the node devices' are, so the translation goes
//! on while the agent is down or restarting. A restart attaches this
//! build's programs beside the running ones and then renames the new pins
//! over the old: the old links' last reference goes and the kernel
//! detaches them. Meanwhile both run, which is harmless: the second
//! `connect4` sees the backend the first one chose, which is no frontend,
//! and the second `recvmsg4` sees the frontend the first one restored,
//! which is no backend. (aya 0.14 offers no `bpf_link_update` for cgroup
//! links, which would swap the program in place.)

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use podnet_common::{SocketLbCounter, names};

use super::{Datapath, DatapathError, map_err, prog_err};

#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error(
        "{}: not a cgroup v2 directory (find cgroup2 in /proc/self/mounts: \
         /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one)",
        path.display()
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{}: the root cgroup; every process of the host would have its Services \
         translated: give the cgroup of the node's pods",
        path.display()
    )]
    RootCgroup { path: PathBuf },
    #[error("{}: {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> SocketLbError {
    let path = path.to_owned();
    move |source| SocketLbError::Io {
        path,
        action,
        source,
    }
}

/// Checks that `path` is a cgroup v2 directory other than the hierarchy's
/// root, the only kind the socket LB attaches to.
pub fn check_cgroup(path: &Path) -> Result<(), SocketLbError> {
    let stat = statfs(path).map_err(|e| SocketLbError::Io {
        path: path.to_owned(),
        action: "checking the filesystem type",
        source: e.into(),
    })?;
    if stat.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(SocketLbError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    // Every cgroup but the root has `cgroup.type` (cgroup-v2.rst, "Core
    // Interface Files": "exists on non-root cgroups"), whatever path the
    // hierarchy is mounted at.
    if !path.join("cgroup.type").exists() {
        return Err(SocketLbError::RootCgroup {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err(name, "is not a cgroup sock_addr program"))
}

/// Loads (verifies) the socket LB's programs; done at every load of the
/// datapath, attached or not, so that a build the verifier refuses fails
/// at once and everywhere.
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for name in names::SOCKET_LB_PROGRAMS {
        sock_addr_program(ebpf, name)?
            .load()
            .map_err(prog_err(name, "loading into the kernel (verifier)"))?;
    }
    Ok(())
}

impl Datapath {
    /// Attaches the socket LB's programs to the cgroup v2 directory
    /// `cgroup` and pins their links in `pin_dir` (on a bpffs), replacing
    /// whatever links were pinned there (see the module's doc). Every
    /// program is attached before any pin changes: a failure leaves the
    /// previous links as they were.
    pub fn attach_socket_lb(&mut self, cgroup: &Path, pin_dir: &Path) -> Result<(), SocketLbError> {
        check_cgroup(cgroup)?;
        let dir = fs::File::open(cgroup).map_err(io_err(cgroup, "opening the cgroup"))?;
        let mut links = Vec::with_capacity(names::SOCKET_LB_PROGRAMS.len());
        for name in names::SOCKET_LB_PROGRAMS {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            // A link (Linux >= 5.7) lives as long as its pin, and sits
            // beside other programs of the cgroup: `Single` is the
            // link's flags of 0, the kernel runs every link's program.
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(prog_err(name, "attaching to the cgroup"))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(prog_err(name, "taking the link"))?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    name,
                    action: format!("{}: the attachment is not a bpf_link", cgroup.display()),
                    source: Box::new(source),
                })?;
            links.push((name, link));
        }
        fs::create_dir_all(pin_dir).map_err(io_err(pin_dir, "creating the pin directory"))?;
        for (name, link) in links {
            let pin = pin_dir.join(name);
            // bpffs refuses names with a dot (`bpf_lookup`: reserved).
            let fresh = pin_dir.join(format!("{name}_new"));
            let _ = fs::remove_file(&fresh);
            link.pin(&fresh).map_err(|source| DatapathError::Pin {
                path: fresh.clone(),
                source: Box::new(source),
            })?;
            fs::rename(&fresh, &pin).map_err(io_err(&pin, "replacing the pinned link"))?;
        }
        Ok(())
    }
}

/// Removes the socket LB's pinned links from `pin_dir`: with their last
/// reference gone the kernel detaches them from their cgroup. Returns how
/// many there were.
pub fn detach_socket_lb(pin_dir: &Path) -> Result<usize, SocketLbError> {
    let mut removed = 0;
    for name in names::SOCKET_LB_PROGRAMS {
        for pin in [pin_dir.join(name), pin_dir.join(format!("{name}_new"))] {
            match fs::remove_file(&pin) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&pin, "removing the pinned link")(e)),
            }
        }
    }
    Ok(removed)
}

/// The socket programs' counters, summed over CPUs, from the pinned map in
/// `pin_dir` (the agent's, or a test's).
pub fn socket_lb_counters(pin_dir: &Path) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
    let name = names::MAP_SOCKET_LB_COUNTERS;
    let data =
        MapData::from_pin(pin_dir.join(name)).map_err(map_err(name, "opening the pinned map"))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name, "reading its type"))?;
    socket_lb_counters_of(&map)
}

/// [`socket_lb_counters`] of the counters map `map`, opened already (the
/// metrics keep it open).
pub fn socket_lb_counters_of(
    map: &aya::maps::Map,
) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
    let name = names::MAP_SOCKET_LB_COUNTERS;
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(map_err(name, "opening as per-CPU array"))?;
    SocketLbCounter::ALL
        .iter()
        .map(|&counter| {
            let index = counter as u32;
            let values = array
                .get(&index, 0)
                .map_err(map_err(name, format!("reading index {index}")))?;
            Ok((counter.name(), values.iter().sum()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cgroup2_directory_is_accepted() {
        let dir = std::env::temp_dir();
        assert!(
            matches!(check_cgroup(&dir), Err(SocketLbError::NotCgroup2 { .. })),
            "{} is no cgroup",
            dir.display()
        );
        assert!(matches!(
            check_cgroup(Path::new("/nonexistent/podnet-cgroup")),
            Err(SocketLbError::Io { .. })
        ));
    }

    #[test]
    fn the_root_of_a_cgroup2_hierarchy_is_refused() {
        let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let roots: Vec<&str> = mounts
            .lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let target = fields.nth(1)?;
                (fields.next()? == "cgroup2").then_some(target)
            })
            .collect();
        if roots.is_empty() {
            eprintln!("no cgroup2 mount here: nothing to check");
        }
        for root in roots {
            let refused = check_cgroup(Path::new(root));
            assert!(
                matches!(refused, Err(SocketLbError::RootCgroup { .. })),
                "{root}: {refused:?}"
            );
        }
    }

    #[test]
    fn detaching_without_pins_is_not_an_error() {
        let dir = std::env::temp_dir().join(format!("podnet-socklb-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a scratch dir");
        assert_eq!(detach_socket_lb(&dir).expect("nothing to remove"), 0);
        fs::write(dir.join(names::PROG_SOCK_CONNECT4), b"").expect("a stand-in pin");
        assert_eq!(detach_socket_lb(&dir).expect("removes it"), 1);
        fs::remove_dir(&dir).expect("the scratch dir is empty again");
    }
}
