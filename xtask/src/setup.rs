//! `cargo xtask setup`: install exactly what is missing, say what is done.
//!
//! The eBPF build needs the installed `nightly` toolchain with `rust-src`
//! and bpf-linker built against LLVM 22 (the nightly's LLVM: bpf-linker reads
//! its bitcode, so the nightly must never be updated). Tests and benchmarks
//! need iperf3, sockperf, the reference CNI plugins, etcd and bpftool; the
//! fuzz targets cargo-fuzz and a C++ compiler (libFuzzer).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages and why each is needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links against LLVM 22 (the nightly's LLVM)",
    ),
    ("libpolly-22-dev", "bpf-linker's LLVM link needs Polly"),
    ("zlib1g-dev", "bpf-linker's LLVM link"),
    ("libzstd-dev", "bpf-linker's LLVM link"),
    (
        "iproute2",
        "network namespaces and veths in tests and the lab",
    ),
    (
        "iputils-ping",
        "ping in tests and the lab connectivity check",
    ),
    (
        "iptables",
        "the reference portmap plugin in chained-plugin tests",
    ),
    ("nftables", "pod egress masquerade (podnetd runs nft)"),
    ("iperf3", "TCP throughput in tests and benchmarks"),
    ("sockperf", "TCP latency in benchmarks"),
    (
        "containernetworking-plugins",
        "reference CNI plugins (bridge, ptp, host-local, portmap, ...)",
    ),
    ("etcd-server", "the etcd datastore in tests and the lab"),
    ("protobuf-compiler", "etcd-client's gRPC code generation"),
    (
        "libprotobuf-dev",
        "the well-known .proto files etcd-client's build imports",
    ),
    ("bpftool", "inspecting programs, maps and links"),
    (
        "podman",
        "a real container runtime (CNI backend) calling the plugin in tests",
    ),
    ("runc", "the OCI runtime podman uses in tests"),
    (
        "g++",
        "libfuzzer-sys builds libFuzzer (C++) for the fuzz targets",
    ),
    (
        "busybox-static",
        "the one binary of the test container image",
    ),
];

pub use crate::cmd::NIGHTLY;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn missing_debian_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            let status = cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]));
            !status.is_some_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

fn install_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    for name in packages {
        let why = DEBIAN_PACKAGES
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, why)| *why);
        eprintln!("xtask setup: installing Debian package {name} ({why})");
    }
    if !cmd::is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo cargo xtask setup` (missing: {packages:?})"
        );
    }
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains =
        cmd::output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        bail!(
            "the `{NIGHTLY}` toolchain is not installed. podnet's eBPF build needs the machine's nightly \
             (its LLVM must match bpf-linker's); install a nightly whose LLVM is 22 with rustup"
        );
    }
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: adding rust-src to the {NIGHTLY} toolchain (needed by -Z build-std=core)"
    );
    cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn bpf_linker_installed() -> bool {
    cmd::succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", cmd::path_with_cargo_bin()),
    )
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_installed() {
        return Ok(());
    }
    eprintln!("xtask setup: building bpf-linker against LLVM 22 (takes a few minutes on 2 cores)");
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // Installing with the host toolchain, whatever the caller's override.
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("installing bpf-linker")?;
    if !bpf_linker_installed() {
        bail!("bpf-linker was installed but does not run; look at the output above");
    }
    Ok(())
}

fn cargo_fuzz_installed() -> bool {
    cmd::succeeds(
        Command::new("cargo-fuzz")
            .arg("--version")
            .env("PATH", cmd::path_with_cargo_bin()),
    )
}

/// cargo-fuzz, which builds and runs the fuzz targets (`cargo xtask fuzz`).
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if cargo_fuzz_installed() {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-fuzz (builds and runs the fuzz targets)");
    cmd::run(
        cmd::cargo()
            .args(["install", "cargo-fuzz", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("installing cargo-fuzz")?;
    if !cargo_fuzz_installed() {
        bail!("cargo-fuzz was installed but does not run; look at the output above");
    }
    Ok(())
}

/// Installs everything that is missing; prints one line when nothing is.
pub fn ensure_all() -> anyhow::Result<()> {
    let missing = missing_debian_packages();
    if !missing.is_empty() {
        install_debian_packages(&missing)?;
    }
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    eprintln!(
        "xtask setup: toolchain complete (nightly + rust-src, bpf-linker, LLVM 22, cargo-fuzz, test tools)"
    );
    Ok(())
}
