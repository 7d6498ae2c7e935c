//! `cargo xtask run`: build everything and run the node agent.

use crate::{cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run the release binaries.
    #[arg(long)]
    release: bool,
    /// Arguments for podnetd (after `--`).
    #[arg(last = true)]
    podnetd_args: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::ensure_all()?;
    let mut build = cmd::cargo();
    build.args(["build", "--package", "podnet-user", "--bins"]);
    if args.release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let profile = if args.release { "release" } else { "debug" };
    let podnetd = cmd::workspace_root()
        .join("target")
        .join(profile)
        .join("podnetd");
    if !cmd::is_root() {
        eprintln!("xtask run: podnetd loads eBPF programs and needs root (CAP_BPF, CAP_NET_ADMIN)");
    }
    cmd::run(std::process::Command::new(podnetd).args(&args.podnetd_args))
}
