//! `cargo xtask test`: the one test command (CI runs exactly this).
//!
//! fmt check, clippy with `-D warnings` on the host workspace and on the eBPF
//! crate for its real target, then every test: unit tests, the BPF program
//! tests (BPF_PROG_TEST_RUN) and the privileged integration tests. Those need
//! root; without it they are skipped loudly, never passed silently: each
//! prints [`SKIP_MARKER`], and the run ends by saying how many were skipped
//! (libtest reports them as `ok`). Last, a short pass of every fuzz target
//! (see `fuzz`).

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::{cmd, fuzz, setup};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip fmt and clippy (faster local iterations).
    #[arg(long)]
    no_lint: bool,
    /// Skip the fuzz pass (faster local iterations).
    #[arg(long)]
    no_fuzz: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    passthrough: Vec<String>,
}

/// Environment variable the privileged tests read: when set, a test that
/// cannot run for lack of root prints [`SKIP_MARKER`] and returns; when
/// unset it fails.
pub const ALLOW_SKIP_ENV: &str = "PODNET_TEST_ALLOW_SKIP";

/// What a privileged test that skipped prints at the start of a line,
/// followed by its name (`podnet_tests::privileged` in tests/src/lib.rs).
pub const SKIP_MARKER: &str = "SKIPPED(privileged) ";

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::ensure_all()?;
    if !args.no_lint {
        cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
        cmd::run(cmd::cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "podnet-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        clippy_ebpf()?;
        lint_fuzz()?;
    }
    // The integration tests run the real binaries, as runtimes and users do.
    // Built with the whole workspace, so cargo unifies in the tests crate's
    // `podnet-user/failpoints` feature: these debug binaries have the fail
    // points tests/tests/crash_add_del.rs arms (release builds never do).
    cmd::run(cmd::cargo().args(["build", "--workspace", "--exclude", "podnet-ebpf", "--bins"]))?;
    let mut test = cmd::cargo();
    test.args(["test", "--workspace", "--exclude", "podnet-ebpf", "--"]);
    test.args(&args.passthrough);
    let root = cmd::is_root();
    let result = if root {
        test.env_remove(ALLOW_SKIP_ENV);
        cmd::run(&mut test).map(|()| None)
    } else {
        eprintln!("{}", "=".repeat(78));
        eprintln!("xtask test: NOT ROOT — privileged tests (BPF program runs, network namespaces)");
        eprintln!(
            "xtask test: will print {} and NOT test the datapath. Run as root for a real run.",
            SKIP_MARKER.trim_end()
        );
        eprintln!("{}", "=".repeat(78));
        test.env(ALLOW_SKIP_ENV, "1");
        // libtest shows a passing test's output only when asked: the
        // skipped tests' markers are counted from it.
        test.arg("--show-output");
        let (result, skipped) = run_counting_skips(&mut test);
        let report = skip_report(skipped);
        eprintln!("{}\n{report}\n{}", "=".repeat(78), "=".repeat(78));
        // Said again last, after the fuzz pass's output.
        result.map(|()| Some(report))
    };
    let report = result?;
    if !args.no_fuzz {
        eprintln!(
            "xtask test: fuzz pass ({FUZZ_SECONDS} s per target; `cargo xtask fuzz` runs longer)"
        );
        let fuzzed = fuzz::fuzz(fuzz::TARGETS, FUZZ_SECONDS);
        if let Some(report) = &report {
            eprintln!("{report}");
        }
        fuzzed?;
    }
    Ok(())
}

/// The summary line of a run without root.
fn skip_report(skipped: usize) -> String {
    format!(
        "xtask test: {skipped} privileged tests skipped (not root): this run does not cover the datapath"
    )
}

/// Runs `cmd` with its output passed through as it comes (stdout to stdout,
/// stderr to stderr) and counted: how many lines start with
/// [`SKIP_MARKER`]. The count is returned whether or not the command
/// succeeded.
fn run_counting_skips(cmd: &mut Command) -> (anyhow::Result<()>, usize) {
    let line = cmd::describe(cmd);
    eprintln!("xtask: $ {line}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"));
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return (Err(e), 0),
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return (Err(anyhow::anyhow!("`{line}`: no pipes")), 0);
    };
    let out = std::thread::spawn(move || tee(stdout, std::io::stdout()));
    let err = std::thread::spawn(move || tee(stderr, std::io::stderr()));
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"));
    let skipped = [out, err].into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let result = status.and_then(|status| {
        anyhow::ensure!(status.success(), "`{line}` failed: {status}");
        Ok(())
    });
    (result, skipped)
}

/// Copies `from` to `to` as it arrives (no waiting for whole lines) and
/// returns how many of its lines start with [`SKIP_MARKER`].
fn tee(mut from: impl Read, mut to: impl Write) -> usize {
    let mut skipped = 0;
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let _ = to.write_all(&buf[..n]);
        let _ = to.flush();
        for &b in &buf[..n] {
            if b == b'\n' {
                skipped += usize::from(is_skip(&line));
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    skipped + usize::from(is_skip(&line))
}

fn is_skip(line: &[u8]) -> bool {
    line.trim_ascii_start().starts_with(SKIP_MARKER.as_bytes())
}

/// Seconds per fuzz target in `cargo xtask test`: a smoke pass that catches
/// a parser change breaking an invariant on the seeds or near them.
const FUZZ_SECONDS: u64 = 5;

/// Clippy on the eBPF crate for bpfel-unknown-none (what it really compiles
/// as), with the nightly and build-std like the real build.
fn clippy_ebpf() -> anyhow::Result<()> {
    cmd::run(cmd::nightly_cargo().args([
        "clippy",
        "--package",
        "podnet-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))
}

/// fmt and clippy on the fuzz crate, a workspace of its own: with the host
/// toolchain and the main target directory, whose dependencies it shares.
fn lint_fuzz() -> anyhow::Result<()> {
    cmd::run(cmd::cargo().args([
        "fmt",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--all",
        "--",
        "--check",
    ]))?;
    cmd::run(
        cmd::cargo()
            .args([
                "clippy",
                "--manifest-path",
                "fuzz/Cargo.toml",
                "--all-targets",
                // Without building libFuzzer's C++ (see fuzz/Cargo.toml).
                "--no-default-features",
                "--target-dir",
                "target",
                "--",
                "-D",
                "warnings",
            ])
            .env("AYA_BUILD_SKIP", "1"),
    )
}

#[cfg(test)]
mod tests {
    use super::{SKIP_MARKER, tee};

    #[test]
    fn skipped_tests_are_counted_and_the_output_passed_on_unchanged() {
        let output = format!(
            "running 3 tests\ntest a ... ok\n---- a stdout ----\n{SKIP_MARKER}a: needs root\n\
             {SKIP_MARKER}b: needs root\nSKIPPED c: something else\n  {SKIP_MARKER}d: needs root"
        );
        let mut copy = Vec::new();
        assert_eq!(tee(output.as_bytes(), &mut copy), 3);
        assert_eq!(copy, output.as_bytes());
    }
}
