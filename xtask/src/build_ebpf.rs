//! `cargo xtask build-ebpf`: build the datapath object and check it.
//!
//! The object is built by podnet-user's build script (aya-build), which is
//! what makes the binaries self-contained; this command drives that build,
//! copies the object to `target/bpf/podnet-ebpf.o` for inspection (bpftool,
//! llvm-objdump) and checks it carries BTF: without `.BTF`/`.BTF.ext` the
//! verifier rejects the programs' func_info.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSection as _};

use crate::{cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build podnet-user in release mode (the object itself is always release).
    #[arg(long)]
    pub release: bool,
}

/// Name of the object as aya-build writes it into OUT_DIR (the bin's name).
const OBJECT_NAME: &str = "podnet";

/// Builds and returns the path of the checked object copy.
pub fn run(args: &Args) -> anyhow::Result<PathBuf> {
    setup::ensure_all()?;
    let mut cargo = cmd::cargo();
    cargo.args([
        "build",
        "--package",
        "podnet-user",
        "--message-format=json-render-diagnostics",
    ]);
    if args.release {
        cargo.arg("--release");
    }
    eprintln!(
        "xtask: $ cargo build --package podnet-user (builds podnet-ebpf for bpfel-unknown-none)"
    );
    let mut child = cargo
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut out_dir = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "build-script-executed"
            && message["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("podnet-user"))
        {
            out_dir = message["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("cargo build of podnet-user (and its eBPF object) failed: {status}");
    }
    let out_dir =
        out_dir.context("cargo did not report podnet-user's build script output directory")?;
    let built = out_dir.join(OBJECT_NAME);
    let target_dir = cmd::workspace_root().join("target").join("bpf");
    fs::create_dir_all(&target_dir)
        .with_context(|| format!("creating {}", target_dir.display()))?;
    let object_path = target_dir.join("podnet-ebpf.o");
    fs::copy(&built, &object_path)
        .with_context(|| format!("copying {} to {}", built.display(), object_path.display()))?;
    check_object(&object_path)?;
    Ok(object_path)
}

/// Checks the object is a BPF ELF with BTF and the expected programs.
fn check_object(path: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("parsing {} as ELF", path.display()))?;
    if file.architecture() != object::Architecture::Bpf {
        bail!(
            "{} is not a BPF object ({:?})",
            path.display(),
            file.architecture()
        );
    }
    for section in [".BTF", ".BTF.ext"] {
        if file.section_by_name(section).is_none() {
            bail!(
                "{} has no {section} section: the verifier would reject func_info",
                path.display()
            );
        }
    }
    let programs: Vec<String> = file
        .sections()
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|name| {
            name == "classifier" || name.starts_with("classifier/") || name.starts_with("tc")
        })
        .collect();
    if programs.is_empty() {
        bail!("{} holds no TC classifier section", path.display());
    }
    eprintln!(
        "xtask build-ebpf: {} ({} bytes): BPF ELF with .BTF and .BTF.ext; program sections {programs:?}",
        path.display(),
        bytes.len()
    );
    Ok(())
}
