//! Network namespaces for tests, removed on drop (also when a test panics),
//! and the only way into one: a command started inside a namespace
//! ([`NetNs::command`], [`command_in`]) or code run on a thread inside one
//! ([`NetNs::spawn`], [`spawn_in`], [`run_in`], [`run_in_path`]). Each of them
//! enters through [`enter`].

use std::{
    fs::File,
    io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::Context as _;

/// A named network namespace (`ip netns add`), deleted on drop. Deleting it
/// also deletes every interface inside, and veths whose peer was inside.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new namespace named `pn-<tag>-<pid>-<n>`, with `lo` up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pn-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`: what a runtime passes as CNI_NETNS.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// `program` run inside this namespace (setns before exec; unlike
    /// `ip netns exec` it keeps the caller's mounts, bpffs included).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        command_at(&self.path(), program, Inherit::Descriptors)
    }

    /// Runs `ip <args>` inside the namespace; fails on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace and returns its output (any exit).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.command(program)?.args(args).output()?)
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens belong to
    /// the namespace).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<JoinHandle<T>> {
        spawn_at(&self.path(), f)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `/var/run/netns/<name>`: where `ip netns` keeps the namespace `name`.
#[must_use]
pub fn path_of(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Moves the calling thread into the network namespace `ns` (an open
/// `/var/run/netns/<name>`). Only the network namespace changes: mounts
/// (bpffs included) stay the caller's. The one place that calls setns(2).
fn enter(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// What a command started inside a namespace inherits from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inherit {
    /// Whatever `Command` passes on (stdio and any non-CLOEXEC descriptor).
    Descriptors,
    /// Stdio only: every other descriptor is marked close-on-exec.
    StdioOnly,
}

/// `program` to run inside the netns at `path`, inheriting `inherit`.
pub fn command_at(
    path: &Path,
    program: impl AsRef<std::ffi::OsStr>,
    inherit: Inherit,
) -> io::Result<Command> {
    let file = File::open(path)?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes setns(2) and close_range(2) calls, which are async-signal-safe;
    // `file` was opened before the fork and stays valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            enter(&file)?;
            if inherit == Inherit::StdioOnly
                && libc::close_range(
                    3,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC.cast_signed(),
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// `program` run inside the named netns without changing mounts, inheriting
/// nothing but stdio: the lab's agents and etcd members outlive `lab up`, and
/// an inherited descriptor (a `flock` around `podnet-lab up`, say) would be
/// held as long as they run. (Marked close-on-exec rather than closed: the
/// exec-error pipe of `Command` is among them.)
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
    command_at(&path_of(netns), program, Inherit::StdioOnly)
        .with_context(|| format!("opening netns {netns}"))
}

fn spawn_at<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let file = File::open(path)?;
    Ok(std::thread::spawn(move || {
        enter(&file).expect("setns into the test namespace");
        f()
    }))
}

/// Runs `f` on a new thread inside the named netns (sockets it opens belong
/// to the namespace); the caller joins it.
pub fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<JoinHandle<T>> {
    spawn_at(&path_of(netns), f).with_context(|| format!("opening netns {netns}"))
}

/// Runs `f` on a thread inside the named netns and waits for it.
pub fn run_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    spawn_in(netns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))
}

/// Runs `f` on a thread inside the netns at `path` and waits for it; `f` may
/// borrow from the caller (a scoped thread).
pub fn run_in_path<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(&file)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread in the test namespace panicked"))?
    })
}

/// Runs `cmd`; an error carries its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(out)
}
