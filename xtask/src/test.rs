//! `cargo xtask test`: the one test command (CI runs exactly this).
//!
//! fmt check, clippy with `-D warnings` on the host workspace and on the eBPF
//! crate for its real target, then every test: unit tests, the BPF program
//! tests (BPF_PROG_TEST_RUN) and the privileged integration tests. Those need
//! root; without it they are skipped loudly, never passed silently. Last, a
//! short pass of every fuzz target (see `fuzz`).

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
/// cannot run for lack of root prints SKIPPED and returns; when unset it fails.
pub const ALLOW_SKIP_ENV: &str = "PODNET_TEST_ALLOW_SKIP";

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
    test.args(["test", "--workspace", "--exclude", "podnet-ebpf"]);
    if !args.passthrough.is_empty() {
        test.arg("--").args(&args.passthrough);
    }
    if cmd::is_root() {
        test.env_remove(ALLOW_SKIP_ENV);
    } else {
        eprintln!("{}", "=".repeat(78));
        eprintln!("xtask test: NOT ROOT — privileged tests (BPF program runs, network namespaces)");
        eprintln!(
            "xtask test: will print SKIPPED and NOT test the datapath. Run as root for a real run."
        );
        eprintln!("{}", "=".repeat(78));
        test.env(ALLOW_SKIP_ENV, "1");
    }
    cmd::run(&mut test)?;
    if !args.no_fuzz {
        eprintln!(
            "xtask test: fuzz pass ({FUZZ_SECONDS} s per target; `cargo xtask fuzz` runs longer)"
        );
        fuzz::fuzz(fuzz::TARGETS, FUZZ_SECONDS)?;
    }
    Ok(())
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
