//! Delegation to another IPAM plugin (`host-local`, ...) per the CNI spec:
//! the plugin binary is found in `CNI_PATH` and run with the same
//! environment and network configuration on stdin.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error("IPAM plugin {plugin} not found in CNI_PATH ({cni_path})")]
    NotFound { plugin: String, cni_path: String },
    #[error("running IPAM plugin {plugin}")]
    Spawn {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    /// The delegate failed and printed a CNI error: passed on as is.
    #[error("IPAM plugin {plugin} failed: {msg}")]
    Failed {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
}

/// Finds `plugin` in the colon-separated `cni_path`.
pub fn find_plugin(plugin: &str, cni_path: &str) -> Result<PathBuf, DelegateError> {
    // A plugin name is a file name, never a path.
    if !plugin.contains('/') {
        for dir in cni_path.split(':').filter(|d| !d.is_empty()) {
            let candidate = Path::new(dir).join(plugin);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(DelegateError::NotFound {
        plugin: plugin.to_owned(),
        cni_path: cni_path.to_owned(),
    })
}

/// Runs `plugin` with `command` (ADD, DEL, CHECK, GC, ...) and the network
/// configuration `config` on stdin; the rest of the CNI environment is
/// inherited. Returns its stdout (the result JSON for ADD).
pub fn exec(
    plugin: &str,
    cni_path: &str,
    command: &str,
    config: &[u8],
) -> Result<Vec<u8>, DelegateError> {
    let path = find_plugin(plugin, cni_path)?;
    let spawn_err = |source| DelegateError::Spawn {
        plugin: plugin.to_owned(),
        source,
    };
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(config).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Err(DelegateError::Failed {
        plugin: plugin.to_owned(),
        code: error["code"]
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(999),
        msg: error["msg"]
            .as_str()
            .map_or_else(|| format!("exit status {}", out.status), str::to_owned),
        details: error["details"].as_str().unwrap_or_default().to_owned(),
    })
}
