//! `cargo xtask lab ...` and `cargo xtask demo`. The lab itself is the
//! `podnet-lab` binary (tests crate), which the tests share; xtask builds it
//! and runs it, so the toolchain is installed before anything compiles.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

const RUN_DIR: &str = "/run/podnet-lab";

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Arguments for podnet-lab: up [--nodes N] [--pods-per-node M] [--mode vxlan|direct]
    /// [--datastore file|etcd] [--etcd-members N] [--etcd-tls] [--agent-arg=ARG ...]
    /// [--service iptables|nft|bpf|none] [--pod-model e2e] | status | check | down
    /// | etcd [status|stop|kill|start MEMBER]
    /// | get NODE [/metrics|/healthz|/readyz] [--addr IP:PORT]
    /// | apply|delete -f FILE|- [-n NS] | delete KIND NAME... | get KIND [NAME...] [-n NS|-A] [-o wide|yaml|json]
    /// (cluster objects in the lab's datastore, with the operator's credential)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn build() -> anyhow::Result<PathBuf> {
    setup::ensure_all()?;
    cmd::run(cmd::cargo().args(["build", "--workspace", "--exclude", "podnet-ebpf", "--bins"]))?;
    Ok(cmd::workspace_root().join("target/debug"))
}

fn lab(bin_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin_dir.join("podnet-lab"));
    c.args(args);
    c
}

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Minutes per mode.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Restarts of each agent per mode.
    #[arg(long, default_value_t = 10)]
    restarts: usize,
}

/// `cargo xtask soak`: the soak in vxlan and then direct mode (each its own
/// lab); fails when either lost anything.
pub fn soak(args: &SoakArgs) -> anyhow::Result<()> {
    let bin_dir = build()?;
    let mut failed = Vec::new();
    for mode in ["vxlan", "direct"] {
        let minutes = args.minutes.to_string();
        let restarts = args.restarts.to_string();
        let status = lab(
            &bin_dir,
            &[
                "soak",
                "--mode",
                mode,
                "--minutes",
                &minutes,
                "--restarts",
                &restarts,
            ],
        )
        .status()
        .context("running podnet-lab soak")?;
        if !status.success() {
            failed.push(mode);
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "the soak lost traffic in {failed:?} mode"
    );
    Ok(())
}

pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    let bin_dir = build()?;
    let args: Vec<&str> = args.args.iter().map(String::as_str).collect();
    cmd::run(&mut lab(&bin_dir, &args))
}

/// Throughput of a 3 s iperf3 TCP stream between two lab pods, in Gbit/s.
fn iperf(server_ns: &str, server_ip: &str, client_ns: &str) -> anyhow::Result<f64> {
    cmd::run(Command::new("ip").args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-D"]))?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = cmd::output(Command::new("ip").args([
        "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", "3", "-O", "1", "-J",
    ]))
    .context("iperf3 client failed")?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no throughput in iperf3's output")?;
    Ok(bps / 1e9)
}

/// The running lab's `lab.json`.
fn lab_json() -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(
        &std::fs::read(Path::new(RUN_DIR).join("lab.json")).context("reading lab.json")?,
    )?)
}

fn pods_from_layout() -> anyhow::Result<Vec<(String, String, String)>> {
    Ok(lab_json()?["pods"]
        .as_array()
        .context("pods in lab.json")?
        .iter()
        .map(|p| {
            (
                p["netns"].as_str().unwrap_or_default().to_owned(),
                p["node"].as_str().unwrap_or_default().to_owned(),
                p["ip"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Setup, build, a 2-node x 2-pod VXLAN lab, the connectivity matrix, a
/// short iperf3 same-node and cross-node, a summary, and the lab removed
/// again (also when something failed).
pub fn demo() -> anyhow::Result<()> {
    let bin_dir = build()?;
    let result = demo_steps(&bin_dir);
    eprintln!("xtask demo: removing the lab");
    let down = cmd::run(&mut lab(&bin_dir, &["down"]));
    result.and(down)
}

fn demo_steps(bin_dir: &Path) -> anyhow::Result<()> {
    cmd::run(&mut lab(
        bin_dir,
        &[
            "up",
            "--nodes",
            "2",
            "--pods-per-node",
            "2",
            "--mode",
            "vxlan",
            // The demo Service translated by podnet's datapath (agents
            // with `--services bpf`), not by kube-proxy-style rules.
            "--service",
            "bpf",
            &format!("--agent-arg=--metrics-addr={DEMO_METRICS_ADDR}"),
        ],
    ))?;
    let check = lab(bin_dir, &["check"])
        .status()
        .context("running the check")?;
    // The pods as the datastore knows them: each one's namespace, name and
    // labels (the Pod objects `lab up` applied) joined with the node and
    // address its agent published.
    eprintln!("xtask demo: the pods in the datastore (podnetctl get pods -A -o wide)");
    cmd::run(&mut lab(bin_dir, &["get", "pods", "-A", "-o", "wide"]))?;
    let pods = pods_from_layout()?;
    let same = pods
        .iter()
        .find(|p| p.1 == pods[0].1 && p.0 != pods[0].0)
        .context("two pods on one node")?;
    let cross = pods
        .iter()
        .find(|p| p.1 != pods[0].1)
        .context("a pod on another node")?;
    eprintln!("xtask demo: iperf3 {} -> {} (same node)", pods[0].0, same.0);
    let same_gbps = iperf(&same.0, &same.2, &pods[0].0)?;
    eprintln!(
        "xtask demo: iperf3 {} -> {} (cross node, VXLAN)",
        pods[0].0, cross.0
    );
    let cross_gbps = iperf(&cross.0, &cross.2, &pods[0].0)?;
    println!();
    println!("podnet demo summary");
    println!(
        "  {:<34} {}",
        "connectivity matrix",
        if check.success() {
            "all passed"
        } else {
            "FAILURES (see above)"
        }
    );
    println!(
        "  {:<34} {same_gbps:>6.2} Gbit/s",
        "TCP same node (redirect_peer)"
    );
    println!(
        "  {:<34} {cross_gbps:>6.2} Gbit/s",
        "TCP cross node (VXLAN, eBPF encap)"
    );
    println!(
        "  (single 3 s iperf3 runs on a shared machine: indicative; `cargo xtask bench` compares)"
    );
    println!();
    println!(
        "podnetctl explain --from {} --to {}:5201 (on {}: what the datapath does with it, no packet sent)",
        pods[0].2, cross.2, pods[0].1
    );
    let socket = node_socket(&pods[0].1)?;
    cmd::run(
        Command::new(bin_dir.join("podnetctl"))
            .arg("--socket")
            .arg(&socket)
            .args([
                "explain",
                "--from",
                &pods[0].2,
                "--to",
                &format!("{}:5201", cross.2),
            ]),
    )?;
    println!();
    println!(
        "podnetctl services (on {}: the demo Service as its datapath translates it)",
        pods[0].1
    );
    cmd::run(
        Command::new(bin_dir.join("podnetctl"))
            .arg("--socket")
            .arg(&socket)
            .arg("services"),
    )?;
    print_metrics(bin_dir, &pods[0].1)?;
    demo_policy(bin_dir, &pods[0], same, cross)?;
    if !check.success() {
        bail!("the connectivity check failed");
    }
    Ok(())
}

/// The lab name of the pod whose netns is `netns` (its Pod object is
/// labelled `pod: <name>` in namespace `default`).
fn pod_name(netns: &str) -> anyhow::Result<String> {
    lab_json()?["pods"]
        .as_array()
        .context("pods in lab.json")?
        .iter()
        .find(|p| p["netns"] == netns)
        .and_then(|p| p["name"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no pod with netns {netns} in lab.json"))
}

/// Whether one ping from the pod in `netns` to `ip` is answered.
fn pings(netns: &str, ip: &str) -> anyhow::Result<bool> {
    Ok(Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1", ip])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running ping")?
        .success())
}

/// A NetworkPolicy: `cross` (a pod on the other node) takes traffic only
/// from `same`; `first`'s ping is denied, `same`'s allowed, and `podnetctl
/// explain` names the policy. Each pod is (netns, node, IP).
fn demo_policy(
    bin_dir: &Path,
    first: &(String, String, String),
    same: &(String, String, String),
    cross: &(String, String, String),
) -> anyhow::Result<()> {
    let (same_name, cross_name) = (pod_name(&same.0)?, pod_name(&cross.0)?);
    let policy = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-from-{same_name}, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{pod: {cross_name}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: {same_name}}}}}\n"
    );
    println!();
    println!("NetworkPolicy: {cross_name} takes traffic only from {same_name} (podnetctl apply):");
    print!("{policy}");
    let mut apply = lab(bin_dir, &["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running podnet-lab apply")?;
    std::io::Write::write_all(
        &mut apply.stdin.take().context("apply's stdin")?,
        policy.as_bytes(),
    )?;
    anyhow::ensure!(apply.wait()?.success(), "applying the demo policy failed");
    // Both nodes' agents compile it within a second or so; poll the
    // denial rather than sleep.
    let started = std::time::Instant::now();
    let mut denied = false;
    while !denied && started.elapsed() < std::time::Duration::from_secs(10) {
        denied = !pings(&first.0, &cross.2)?;
    }
    let allowed = pings(&same.0, &cross.2)?;
    println!(
        "  ping {} -> {cross_name} ({}): {}",
        first.2,
        cross.2,
        if denied {
            "denied"
        } else {
            "ANSWERED (not denied)"
        }
    );
    println!(
        "  ping {same_name} ({}) -> {cross_name} ({}): {}",
        same.2,
        cross.2,
        if allowed { "allowed" } else { "NOT ANSWERED" }
    );
    for from in [first, same] {
        println!();
        println!("podnetctl explain --from {} --to {}:", from.2, cross.2);
        cmd::run(
            Command::new(bin_dir.join("podnetctl"))
                .arg("--socket")
                .arg(node_socket(&from.1)?)
                .args(["explain", "--from", &from.2, "--to", &cross.2]),
        )?;
    }
    anyhow::ensure!(
        denied && allowed,
        "the demo policy did not do what it says (denied {denied}, allowed {allowed})"
    );
    Ok(())
}

/// Where the demo's agents serve their metrics, each in its node's netns.
const DEMO_METRICS_ADDR: &str = "127.0.0.1:9962";

/// Scrapes `node`'s agent and prints its URL and the series that moved.
fn print_metrics(bin_dir: &Path, node: &str) -> anyhow::Result<()> {
    let out = lab(bin_dir, &["get", node, "/metrics"])
        .output()
        .context("running podnet-lab get")?;
    anyhow::ensure!(
        out.status.success(),
        "scraping {node}'s metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!();
    println!(
        "metrics of {node}: http://{DEMO_METRICS_ADDR}/metrics in its netns (`cargo xtask lab get {node}`); what moved:"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| {
        [
            "podnet_datapath_",
            "podnet_cni_operations_total",
            "podnet_map_entries",
        ]
        .iter()
        .any(|p| l.starts_with(p))
            && !l.ends_with(" 0")
    }) {
        println!("  {line}");
    }
    Ok(())
}

/// The agent socket of lab node `node`.
fn node_socket(node: &str) -> anyhow::Result<String> {
    lab_json()?["nodes"]
        .as_array()
        .context("nodes in lab.json")?
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["agent_socket"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no socket of {node} in lab.json"))
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Arguments for podnet-bench: [--quick] [--rounds N] [--seed N] [--json PATH] [--svg PATH] [--only PART]
    /// [--baseline-bin-dir DIR]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct BenchBaselineArgs {
    /// The commit (hash, tag or branch) whose podnetd and podnet are the baseline.
    #[arg(value_name = "REF")]
    git_ref: String,
    /// Arguments for podnet-bench after `--`, as for `cargo xtask bench`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// `cargo xtask bench`: builds everything in release mode (the plugin and
/// the agent are timed too) and runs podnet-bench.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    setup::ensure_all()?;
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "podnet-ebpf",
        "--bins",
    ]))?;
    let bin_dir = cmd::workspace_root().join("target/release");
    cmd::run(Command::new(bin_dir.join("podnet-bench")).args(&args.args))
}

fn git(root: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(root);
    c
}

/// `cargo xtask bench-baseline REF [-- ARGS]`: builds REF's podnetd and
/// podnet (release) in a temporary git worktree and runs `cargo xtask bench
/// ARGS --baseline-bin-dir <them>`, so podnet before and after a change is
/// measured in the same rounds of one run. The worktree is removed
/// afterwards, also when something failed (not when the process is killed:
/// then `git worktree prune` after deleting the directory).
pub fn bench_baseline(args: &BenchBaselineArgs) -> anyhow::Result<()> {
    setup::ensure_all()?;
    let root = cmd::workspace_root();
    let commit = cmd::output(git(&root).args([
        "rev-parse",
        "--verify",
        "--end-of-options",
        &format!("{}^{{commit}}", args.git_ref),
    ]))
    .with_context(|| format!("{} is not a commit of this repository", args.git_ref))?;
    let commit = commit.trim();
    let worktree =
        std::env::temp_dir().join(format!("podnet-bench-baseline-{}", std::process::id()));
    cmd::run(
        git(&root)
            .args(["worktree", "add", "--detach"])
            .arg(&worktree)
            .arg(commit),
    )
    .context("creating the baseline's worktree")?;
    let result = bench_against(&worktree, commit, &args.args);
    eprintln!(
        "xtask bench-baseline: removing the worktree {}",
        worktree.display()
    );
    let removed = cmd::run(
        git(&root)
            .args(["worktree", "remove", "--force"])
            .arg(&worktree),
    );
    result.and(removed)
}

fn bench_against(worktree: &Path, commit: &str, bench_args: &[String]) -> anyhow::Result<()> {
    // The worktree's own target dir, set explicitly: an inherited
    // CARGO_TARGET_DIR would otherwise make the baseline build overwrite this
    // build's binaries. podnet-user's build script builds REF's eBPF object
    // and embeds it, so podnetd there is REF's datapath.
    cmd::run(
        cmd::cargo()
            .current_dir(worktree)
            .env("CARGO_TARGET_DIR", worktree.join("target"))
            .args(["build", "--release", "--bins", "-p", "podnet-user"]),
    )
    .with_context(|| format!("building the baseline {commit}"))?;
    let baseline = worktree.join("target/release");
    eprintln!(
        "xtask bench-baseline: podnet-baseline is {commit} ({})",
        baseline.display()
    );
    let mut args = vec![
        "--baseline-bin-dir".to_owned(),
        baseline.to_string_lossy().into_owned(),
    ];
    args.extend_from_slice(bench_args);
    bench(&BenchArgs { args })
}
