//! podnetd: the podnet node agent. For now it loads the datapath (programs
//! verified and loaded, maps pinned), reports what it loaded and runs until
//! Ctrl-C / SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use podnet::{bpffs, datapath::Datapath};
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "podnetd", version, about = "podnet node agent")]
struct Args {
    /// Directory on a bpffs where maps (and later links) are pinned.
    #[arg(long, env = "PODNETD_BPFFS_DIR", default_value = "/sys/fs/bpf/podnet")]
    bpffs_dir: PathBuf,
    /// Load, report and exit instead of running until signalled.
    #[arg(long)]
    once: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let mounted = bpffs::ensure_pin_dir(&args.bpffs_dir)
        .with_context(|| format!("preparing the pin directory {}", args.bpffs_dir.display()))?;
    if mounted {
        info!(dir = %args.bpffs_dir.display(), "mounted bpffs");
    }
    let datapath = Datapath::load(&args.bpffs_dir).context("loading the eBPF datapath")?;
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    info!(
        attach = if tcx { "tcx" } else { "clsact (netlink)" },
        pin_dir = %args.bpffs_dir.display(),
        "datapath loaded"
    );
    for program in datapath.programs()? {
        println!(
            "program {:<16} id {:<6} tag {:016x}",
            program.name, program.id, program.tag
        );
    }
    for map in datapath.maps()? {
        println!(
            "map     {:<16} id {:<6} key {}B value {}B",
            map.name, map.id, map.key_size, map.value_size
        );
    }
    if args.once {
        return Ok(());
    }

    wait_for_shutdown().await?;
    info!("shutting down; pinned maps stay for the next start");
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
