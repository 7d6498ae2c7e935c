//! podnet itself: a two-node lab with a pod on each.

use std::path::Path;

use super::super::Pair;
use crate::lab::{LabDatastore, LabGuard};

/// A two-node podnet lab with one pod each; with `bin_dir`, running the
/// agents and the CNI plugin from there (the baseline), under its own
/// namespace prefix so it coexists with this build's lab of the same mode.
pub fn podnet_cluster(mode: &str, bin_dir: Option<&Path>) -> anyhow::Result<(LabGuard, Pair)> {
    podnet_cluster_with(mode, &[], bin_dir)
}

/// [`podnet_cluster`] whose agents get `agent_args` too (another lab
/// prefix when there are any, so it coexists with the plain one).
pub fn podnet_cluster_with(
    mode: &str,
    agent_args: &[&str],
    bin_dir: Option<&Path>,
) -> anyhow::Result<(LabGuard, Pair)> {
    let tag = match (mode == "vxlan", bin_dir.is_some(), agent_args.is_empty()) {
        (true, false, true) => "bvx",
        (false, false, true) => "bdr",
        (true, true, true) => "bvxb",
        (false, true, true) => "bdrb",
        (true, _, false) => "bvxa",
        (false, _, false) => "bdra",
    };
    podnet_lab(tag, mode, agent_args, bin_dir)
}

/// A two-node lab of `mode` under namespace prefix tag `tag`, its agents
/// with `agent_args` too, from `bin_dir` when given.
pub fn podnet_lab(
    tag: &str,
    mode: &str,
    agent_args: &[&str],
    bin_dir: Option<&Path>,
) -> anyhow::Result<(LabGuard, Pair)> {
    let options = crate::lab::LabOptions {
        bin_dir: bin_dir.map(Path::to_path_buf),
        agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        ..crate::lab::LabOptions::default()
    };
    let guard = LabGuard::up_with(tag, 2, 1, mode, LabDatastore::File, options)?;
    let pair = Pair {
        client_ns: guard.layout.pods[0].netns.clone(),
        server_ns: guard.layout.pods[1].netns.clone(),
        server_ip: guard.layout.pods[1].ip,
        dial: None,
    };
    Ok((guard, pair))
}
