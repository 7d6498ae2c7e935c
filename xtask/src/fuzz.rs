//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (the CNI config
//! and environment parsers, the agent's request decoding, the datastores'
//! node records, the membership planner and the cluster objects' decoding
//! and validation), each for a given
//! time with libFuzzer, built with the machine's nightly. Reports the
//! executions libFuzzer made per target and fails on a crash (a panic,
//! a broken invariant, a timeout, an out-of-memory).
//!
//! Each target starts from its committed seeds (`fuzz/corpus/<target>/`,
//! read only) and from what earlier runs found (`fuzz/target/corpus/<target>/`,
//! not committed); a crashing input lands in `fuzz/artifacts/<target>/`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

/// The targets, in the order they run (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "cni_config",
    "cni_env",
    "agent_request",
    "datastore_records",
    "membership_plan",
    "cluster_objects",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of fuzzing per target (libFuzzer's -max_total_time; 0 would mean no limit).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    time: u64,
    /// Run only this target (default: all).
    #[arg(long, value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
}

/// What one target's run came to.
#[derive(Debug)]
pub struct Outcome {
    pub target: &'static str,
    /// Inputs run, as libFuzzer counts them.
    pub executions: Option<u64>,
    /// Coverage (edges) at the end, from libFuzzer's DONE line.
    pub coverage: Option<u64>,
    pub elapsed: Duration,
    /// `None` when the run ended cleanly, else what went wrong.
    pub failure: Option<String>,
    pub log: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::ensure_all()?;
    let targets: Vec<&'static str> = match &args.target {
        None => TARGETS.to_vec(),
        Some(name) => TARGETS.iter().copied().filter(|t| t == name).collect(),
    };
    fuzz(&targets, args.time)
}

/// Builds the targets once, runs each for `seconds`, prints a summary and
/// fails if any target crashed.
pub fn fuzz(targets: &[&'static str], seconds: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    // Built with the flags `cargo fuzz run` uses, so that run finds it built.
    cmd::run(cargo_fuzz("build").args(["--fuzz-dir", "fuzz"]))
        .context("building the fuzz targets")?;
    let build = started.elapsed();
    let mut outcomes = Vec::new();
    for target in targets {
        eprintln!("xtask fuzz: {target} for {seconds} s");
        let outcome = run_target(target, seconds)?;
        match &outcome.failure {
            None => eprintln!(
                "xtask fuzz: {target}: {} executions",
                count(outcome.executions)
            ),
            Some(failure) => eprintln!("xtask fuzz: {target}: FAILED: {failure}"),
        }
        outcomes.push(outcome);
    }
    summary(&outcomes, seconds, build, started.elapsed());
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failure.is_some())
        .map(|o| o.target)
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzz target(s) {} crashed: see the output above and the inputs in fuzz/artifacts/",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz <verb>` from the workspace root, with the build
/// settings every run uses.
fn cargo_fuzz(verb: &str) -> std::process::Command {
    let mut cmd = cmd::nightly_cargo();
    cmd.args(["fuzz", verb])
        .args(BUILD_FLAGS)
        // The targets never load the datapath: no eBPF build (see podnet-user/build.rs).
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Release build (fuzz/Cargo.toml optimizes only the code on the fuzzed
/// path, for a shorter cold build) with debug assertions and overflow
/// checks. No sanitizer: the parsers are safe Rust, and without
/// AddressSanitizer the targets run 4 to 5 times as many inputs and build in
/// half the time. 16 codegen units instead of cargo-fuzz's 1: a shorter
/// build, the same speed here.
const BUILD_FLAGS: &[&str] = &[
    "--release",
    "--debug-assertions",
    "--sanitizer",
    "none",
    "--codegen-units",
    "16",
];

fn run_target(target: &'static str, seconds: u64) -> anyhow::Result<Outcome> {
    let root = cmd::workspace_root();
    let work = root.join("fuzz/target/corpus").join(target);
    let logs = root.join("fuzz/target/logs");
    for dir in [&work, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file")?;
    let mut run = cargo_fuzz("run");
    run.args(["--fuzz-dir", "fuzz", target])
        // New inputs go to the first directory; the seeds are only read.
        .arg(&work)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict=fuzz/dict/{target}.dict"))
        // One input taking seconds is a bug (the parsers take microseconds).
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(out)
        .stderr(err);
    eprintln!(
        "xtask: $ {} (output in {})",
        cmd::describe(&run),
        log.display()
    );
    let started = Instant::now();
    let status = run
        .status()
        .with_context(|| format!("starting cargo fuzz for {target}"))?;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let found = parse_stats(&text);
    let failure = (!status.success()).then(|| {
        print_tail(&text, &log);
        failure_reason(&text).unwrap_or_else(|| format!("cargo fuzz exited with {status}"))
    });
    Ok(Outcome {
        target,
        executions: found.executions,
        coverage: found.coverage,
        elapsed,
        failure,
        log,
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    executions: Option<u64>,
    coverage: Option<u64>,
}

/// The executions from libFuzzer's output: `stat::number_of_executed_units`
/// (with `-print_final_stats=1`), else the `#N DONE` line, else the last
/// `#N` status line (a run that crashed); coverage from the last status line.
fn parse_stats(text: &str) -> Stats {
    let mut stats = Stats::default();
    let mut last_status = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = n.trim().parse().ok().or(stats.executions);
        } else if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            let Some(n) = words.next().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let kind = words.next();
            last_status = Some(n);
            if kind == Some("DONE") && stats.executions.is_none() {
                stats.executions = Some(n);
            }
            if let Some(cov) = words
                .skip_while(|w| *w != "cov:")
                .nth(1)
                .and_then(|c| c.parse().ok())
            {
                stats.coverage = Some(cov);
            }
        }
    }
    stats.executions = stats.executions.or(last_status);
    stats
}

/// The first line that says why libFuzzer stopped (a Rust panic message, a
/// sanitizer report, a timeout or out-of-memory), and where the input is.
fn failure_reason(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let reason = lines.iter().enumerate().find_map(|(i, line)| {
        if line.contains("panicked at") {
            // The panic message is on the next line.
            let message = lines.get(i + 1).copied().unwrap_or_default();
            Some(format!("{line} {message}"))
        } else {
            (line.starts_with("==") && line.contains("ERROR:")).then(|| (*line).to_owned())
        }
    })?;
    let input = lines
        .iter()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()));
    Some(match input {
        Some(path) => format!("{reason} (input: {path})"),
        None => reason,
    })
}

/// The end of a failed run's output, without backtrace frames (the panic
/// message, libFuzzer's report, the input and how to reproduce it).
fn print_tail(text: &str, log: &Path) {
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            let frame = line
                .split_once(": ")
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
            !(frame || line.starts_with("at ") || line == "Stack backtrace:")
        })
        .collect();
    eprintln!(
        "---- last lines of {} (backtraces left out) ----",
        log.display()
    );
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{line}");
    }
    eprintln!("----");
}

/// `1234567` as `1,234,567`.
fn count(n: Option<u64>) -> String {
    let Some(n) = n else {
        return "?".to_owned();
    };
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn summary(outcomes: &[Outcome], seconds: u64, build: Duration, total: Duration) {
    eprintln!("{}", "=".repeat(78));
    eprintln!(
        "xtask fuzz: {seconds} s per target; build {:.0} s, total {:.0} s",
        build.as_secs_f64(),
        total.as_secs_f64()
    );
    eprintln!(
        "  {:<15} {:>13} {:>9} {:>6}  result",
        "target", "executions", "exec/s", "cov"
    );
    for o in outcomes {
        let rate = o.executions.map(|n| {
            let secs = o.elapsed.as_secs().max(1);
            n / secs
        });
        eprintln!(
            "  {:<15} {:>13} {:>9} {:>6}  {}",
            o.target,
            count(o.executions),
            count(rate),
            o.coverage.map_or_else(|| "?".to_owned(), |c| c.to_string()),
            o.failure.as_ref().map_or("ok", |_| "CRASHED"),
        );
        if o.failure.is_some() {
            eprintln!("  {:<15} log: {}", "", o.log.display());
        }
    }
    eprintln!("{}", "=".repeat(78));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_from_libfuzzer_output() {
        let done = "#2\tINITED cov: 1335 ft: 2182 corp: 6/1681b exec/s: 0 rss: 66Mb\n\
                    #699335\tDONE   cov: 2264 ft: 5555 corp: 1073/81Kb lim: 1075 exec/s: 43708 rss: 503Mb\n\
                    Done 699335 runs in 16 second(s)\n\
                    stat::number_of_executed_units: 699336\n\
                    stat::average_exec_per_sec:     43708\n";
        assert_eq!(
            parse_stats(done),
            Stats {
                executions: Some(699_336),
                coverage: Some(2264)
            }
        );
        let no_stats = "#1024\tpulse  cov: 10 ft: 2 corp: 1/1b\n#4096\tDONE   cov: 12 ft: 3\n";
        assert_eq!(parse_stats(no_stats).executions, Some(4096));
        let crashed = "#1024\tpulse  cov: 10 ft: 2\n#2000\tNEW    cov: 11 ft: 2\n\
                       thread '<unnamed>' panicked at fuzz_targets/x.rs:3:5:\nboom\n\
                       ==1== ERROR: libFuzzer: deadly signal\n\
                       artifact_prefix='a/'; Test unit written to fuzz/artifacts/x/crash-1\n";
        assert_eq!(parse_stats(crashed).executions, Some(2000));
        assert_eq!(
            failure_reason(crashed).as_deref(),
            Some(
                "thread '<unnamed>' panicked at fuzz_targets/x.rs:3:5: boom (input: fuzz/artifacts/x/crash-1)"
            )
        );
        assert_eq!(count(Some(1_234_567)), "1,234,567");
        assert_eq!(count(Some(999)), "999");
    }
}
