//! Builds the eBPF object (podnet-ebpf, target bpfel-unknown-none, nightly,
//! `-Z build-std=core`, BTF) into `OUT_DIR` so the binaries embed it and are
//! self-contained. aya-build 0.2.0 does the cross build: it sets the BTF
//! rustflags (`-C debuginfo=2 -C link-arg=--btf`) in the child's environment
//! and removes `RUSTC`/`RUSTC_WORKSPACE_WRAPPER`; `rustup run nightly` replaces
//! `RUSTUP_TOOLCHAIN`.

use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let workspace = manifest_dir
        .parent()
        .context("podnet-user has no parent directory")?;
    let ebpf_dir = workspace.join("podnet-ebpf");
    // podnet-ebpf's own dir is watched by aya-build; the shared types too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("podnet-common").display()
    );
    println!("cargo:rerun-if-env-changed=PATH");

    if env::var_os("AYA_BUILD_SKIP").is_none() && !on_path("bpf-linker") {
        bail!(
            "bpf-linker is not on PATH: the eBPF datapath cannot be built. \
             Run `cargo xtask setup` once (it installs the toolchain), then build again."
        );
    }
    let ebpf_dir = ebpf_dir.to_str().context("podnet-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "podnet-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    // With AYA_BUILD_SKIP=1 aya-build builds nothing. Builds that never load
    // the datapath (the fuzz targets) use that to skip the eBPF build: embed
    // an empty object, which `Datapath::load` refuses with a clear error.
    let object = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?).join("podnet");
    if !object.exists() {
        std::fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
