//! `cargo xtask ...`: podnet's developer commands. Every command makes sure
//! the toolchain it needs is installed first (see `setup`), so a newcomer on
//! a fresh machine never has to run anything else by hand.

mod build_ebpf;
mod cmd;
mod fuzz;
mod lab;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "podnet developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what is missing: Debian packages, the nightly's rust-src, bpf-linker. Idempotent.
    Setup,
    /// Build the eBPF object (bpfel-unknown-none, BTF) and check it.
    BuildEbpf(build_ebpf::Args),
    /// Build everything and run the node agent podnetd; arguments after `--` go to podnetd.
    Run(run::Args),
    /// The multi-node lab: up | status | check | down (see `cargo xtask lab -- --help`).
    Lab(lab::LabArgs),
    /// Setup, build, a 2x2 VXLAN lab, connectivity matrix, iperf3 figures, lab down.
    Demo,
    /// Benchmarks against bridge, ptp, kernel VXLAN and the physical limits: [--quick] [--json P] [--svg P] [--only PART].
    Bench(lab::BenchArgs),
    /// Bench with podnet built from REF as a baseline in the same rounds: bench-baseline REF [-- bench args].
    BenchBaseline(lab::BenchBaselineArgs),
    /// The long soak: every agent restarted 10 times under ping floods and iperf3, vxlan and direct: [--minutes N].
    Soak(lab::SoakArgs),
    /// The one test command: fmt check, clippy -D warnings, unit, BPF and privileged integration tests, a short fuzz pass.
    Test(test::Args),
    /// Fuzz the CNI config/env parsers and the agent's request decoding: [--time SECONDS] [--target NAME].
    Fuzz(fuzz::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::ensure_all(),
        Command::BuildEbpf(args) => build_ebpf::run(&args).map(|_| ()),
        Command::Run(args) => run::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Lab(args) => lab::run(&args),
        Command::Demo => lab::demo(),
        Command::Bench(args) => lab::bench(&args),
        Command::BenchBaseline(args) => lab::bench_baseline(&args),
        Command::Soak(args) => lab::soak(&args),
    }
}
