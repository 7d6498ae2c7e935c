//! podnet-bench: `cargo xtask bench` runs it. See `podnet_tests::bench`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use podnet_tests::bench::{self, BenchOptions};

#[derive(Debug, Parser)]
#[command(
    name = "podnet-bench",
    about = "podnet against bridge, ptp, kernel VXLAN and the physical limits, in one run"
)]
struct Cli {
    /// A ~2 minute smoke version (1 round, 1 s runs).
    #[arg(long)]
    quick: bool,
    /// Rounds (interleaved, order shuffled every round); default 10 (1 with
    /// --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seed of the per-round order (default: from the clock; printed at
    /// the start).
    #[arg(long)]
    seed: Option<u64>,
    /// Write every raw figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw bar charts of the main figures.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Run only these parts (repeatable); default: all.
    #[arg(long, value_parser = bench::PARTS)]
    only: Vec<String>,
    /// Release builds of `podnetd` and `podnet` from an older commit: also
    /// measure podnet built from them (same-node `podnet-baseline`,
    /// cross-node `podnet-vxlan-baseline`) in the same rounds, and report
    /// per-round ratios. `cargo xtask bench-baseline REF` builds REF and
    /// passes this.
    #[arg(long, value_name = "DIR")]
    baseline_bin_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut opts = if cli.quick {
        BenchOptions::quick()
    } else {
        BenchOptions::full()
    };
    opts.only = cli.only;
    if let Some(rounds) = cli.rounds {
        opts.rounds = rounds.max(1);
    }
    if let Some(seed) = cli.seed {
        opts.seed = seed;
    }
    if let Some(dir) = cli.baseline_bin_dir {
        // Checked here rather than failing (panicking) halfway through the
        // run, after minutes of building fixtures.
        for name in ["podnetd", "podnet"] {
            anyhow::ensure!(
                dir.join(name).is_file(),
                "--baseline-bin-dir: {} has no {name}",
                dir.display()
            );
        }
        // Absolute: the agents and plugins run with other working dirs.
        opts.baseline_bin_dir = Some(
            std::path::absolute(&dir)
                .with_context(|| format!("--baseline-bin-dir {}", dir.display()))?,
        );
    }
    let figures = bench::run_all(&opts)?;
    print!("{}", bench::table(&figures)?);
    if let Some(path) = &cli.json {
        bench::write(
            path,
            &serde_json::to_string_pretty(&bench::json_report(&figures, &opts)?)?,
        )?;
        eprintln!("bench: figures written to {}", path.display());
    }
    if let Some(path) = &cli.svg {
        bench::write(path, &bench::svg(&figures))?;
        eprintln!("bench: chart written to {}", path.display());
    }
    Ok(())
}
