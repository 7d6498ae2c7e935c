//! Network namespaces for tests, removed on drop (also when a test panics).

use std::{
    fs::File,
    io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

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
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `program` run inside this namespace (setns before exec; unlike
    /// `ip netns exec` it keeps the caller's mounts, bpffs included).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        let file = File::open(self.path())?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; `file` was opened
        // before the fork and stays valid in the child.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
            });
        }
        Ok(cmd)
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
    ) -> io::Result<std::thread::JoinHandle<T>> {
        let file = File::open(self.path())?;
        Ok(std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            f()
        }))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
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
