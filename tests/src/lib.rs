//! Fixtures for podnet's privileged tests: the root guard, a private bpffs
//! per test, and crafted frames. Everything a fixture creates is removed by a
//! guard's `Drop`, so a failing (panicking) test cleans up too.

pub mod bench;
pub mod bins;
pub mod bpf_fixture;
pub mod bpf_run;
pub mod counters;
pub mod etcd_tls;
pub mod faults;
pub mod frames;
pub mod inventory;
pub mod lab;
pub mod netns;
pub mod netpol;
pub mod node;
pub mod ping;
pub mod podman;
pub mod podnetd;
pub mod scrape;
pub mod services;
pub mod soak;
pub mod socket_lb;
pub mod spoof;
pub mod traffic;

use std::{
    env,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Set by `cargo xtask test` when it runs without root: privileged tests then
/// print SKIPPED and return instead of failing.
pub const ALLOW_SKIP_ENV: &str = "PODNET_TEST_ALLOW_SKIP";

/// True when the test may run. Without root it either skips loudly (when
/// [`ALLOW_SKIP_ENV`] is set) or fails: a privileged test never passes
/// silently without having run.
#[must_use]
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        env::var_os(ALLOW_SKIP_ENV).is_some(),
        "{test} needs root (BPF, network namespaces); run as root or set {ALLOW_SKIP_ENV}=1 to skip"
    );
    eprintln!("SKIPPED(privileged) {test}: needs root");
    false
}

/// Runs a CNI plugin exactly as a runtime does: a clean environment with
/// `CNI_PATH` and the CNI_* variables in `env`, the network configuration
/// on stdin. `cmd` is the plugin, already placed in the node's netns.
pub fn run_cni_plugin(
    mut cmd: std::process::Command,
    cni_path: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> anyhow::Result<std::process::Output> {
    use std::{io::Write as _, process::Stdio};
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", cni_path)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("plugin stdin"))?
        .write_all(stdin)?;
    Ok(child.wait_with_output()?)
}

/// Polls `f` until it holds; panics naming `what` after `limit`.
pub fn wait_up_to(limit: std::time::Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// A private bpffs instance mounted on a fresh directory; unmounted and
/// removed on drop, pins and all.
pub struct PrivateBpffs {
    dir: PathBuf,
}

impl PrivateBpffs {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = env::temp_dir().join(format!(
            "podnet-test-bpffs-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Guard first, so a failed mount still removes the directory.
        let guard = Self { dir };
        let mounted = podnet::bpffs::ensure_pin_dir(&guard.dir)?;
        anyhow::ensure!(mounted, "{} was already on a bpffs", guard.dir.display());
        Ok(guard)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // MNT_DETACH: pins held open by a still-running program do not keep
        // the mount (and the test's directory) around.
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
