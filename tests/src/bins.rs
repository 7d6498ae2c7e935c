//! The real podnet binaries, run by the tests exactly as users and runtimes
//! run them. `cargo xtask test` builds them before the tests; the path is the
//! target directory the test executable itself lives in.

use std::path::{Path, PathBuf};

/// Overrides where the binaries are looked up.
pub const BIN_DIR_ENV: &str = "PODNET_BIN_DIR";

/// Path of binary `name` (`podnetd`, `podnet`, `podnetctl`).
///
/// # Panics
/// When it is not built: a test must not silently run something else.
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os(BIN_DIR_ENV).map_or_else(
        || {
            // target/<profile>/deps/<test-exe> or target/<profile>/<bin>
            let exe = std::env::current_exe().expect("the executable's path");
            let dir = exe.parent().expect("the executable's directory");
            if dir.ends_with("deps") {
                dir.parent().unwrap_or(dir).to_path_buf()
            } else {
                dir.to_path_buf()
            }
        },
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo xtask test` (it builds the binaries first) or `cargo build --bins`",
        path.display()
    );
    path
}

/// Path of binary `name` in `dir` when given (an explicit build, e.g. the
/// bench's baseline binaries from an older commit), else [`binary`]. Explicit
/// rather than through [`BIN_DIR_ENV`], so fixtures built side by side with
/// different binaries cannot race on a process-wide variable.
///
/// # Panics
/// When it is not there: a fixture must not silently run other binaries
/// than it was asked to.
#[must_use]
pub fn binary_in(dir: Option<&Path>, name: &str) -> PathBuf {
    let Some(dir) = dir else {
        return binary(name);
    };
    let path = dir.join(name);
    assert!(path.is_file(), "{} does not exist", path.display());
    path
}

/// The binaries of another commit of this repository, built once into
/// `target/other-builds/<commit>` (its sources exported with `git archive`,
/// its own target dir) and reused afterwards: an older podnet to upgrade
/// from.
pub fn build_at_commit(commit: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?
        .to_path_buf();
    let out = root.join("target/other-builds").join(commit);
    let bin_dir = out.join("target/debug");
    let built = ["podnetd", "podnet", "podnetctl"]
        .iter()
        .all(|b| bin_dir.join(b).is_file());
    if built {
        return Ok(bin_dir);
    }
    let src = out.join("src");
    if !src.join("Cargo.toml").is_file() {
        std::fs::create_dir_all(&src)?;
        let archive = std::process::Command::new("git")
            .current_dir(&root)
            .args(["archive", "--format=tar", commit])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("git archive")?;
        let untar = std::process::Command::new("tar")
            .current_dir(&src)
            .arg("-x")
            .stdin(archive.stdout.context("git archive's output")?)
            .status()
            .context("tar -x")?;
        anyhow::ensure!(untar.success(), "exporting commit {commit}");
    }
    let status = std::process::Command::new("cargo")
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", out.join("target"))
        .args(["build", "-p", "podnet-user", "--bins"])
        .status()
        .context("building the other commit")?;
    anyhow::ensure!(status.success(), "building commit {commit} failed");
    Ok(bin_dir)
}
