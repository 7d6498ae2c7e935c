//! The agent's unix socket server (protocol in [`crate::api`]).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::EndpointRegistry;
use crate::api::{Request, Response};

/// Serves `socket` until the task is dropped. The socket is mode 0600: only
/// root (the runtime calling the plugin, the operator) may change endpoints.
pub async fn serve(socket: &Path, registry: Arc<Mutex<EndpointRegistry>>) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a previous agent (crash) would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    let node = registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
        .node_info();
    let info_path = crate::api::node_info_path(socket);
    std::fs::write(&info_path, serde_json::to_vec_pretty(&node)?)
        .with_context(|| format!("writing {}", info_path.display()))?;
    loop {
        let (stream, _) = listener.accept().await.context("accepting a connection")?;
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, registry).await {
                warn!(error = %format!("{e:#}"), "request failed");
            }
        });
    }
}

fn encode<T: Serialize>(result: anyhow::Result<T>) -> Vec<u8> {
    let response = match result {
        Ok(value) => Response::Ok(value),
        Err(e) => Response::Error(format!("{e:#}")),
    };
    let mut line = serde_json::to_vec(&response)
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}").into_bytes());
    line.push(b'\n');
    line
}

async fn handle(stream: UnixStream, registry: Arc<Mutex<EndpointRegistry>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .context("reading the request")?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(e) => encode::<()>(Err(anyhow::anyhow!("malformed request: {e}"))),
        Ok(request) => {
            debug!(?request, "request");
            // Datapath and netlink calls block: keep them off the reactor.
            tokio::task::spawn_blocking(move || dispatch(&registry, request))
                .await
                .context("request handler panicked")?
        }
    };
    write
        .write_all(&answer)
        .await
        .context("writing the answer")?;
    Ok(())
}

fn dispatch(registry: &Mutex<EndpointRegistry>, request: Request) -> Vec<u8> {
    let Ok(mut reg) = registry.lock() else {
        return encode::<()>(Err(anyhow::anyhow!(
            "agent state poisoned by an earlier panic"
        )));
    };
    match request {
        Request::Node => encode(Ok(reg.node_info())),
        Request::Status => encode(reg.status()),
        Request::AddEndpoint { endpoint } => encode(reg.add(endpoint)),
        Request::RemoveEndpoint { owner } => encode(reg.remove(&owner)),
        Request::GetEndpoint { owner } => encode(Ok(reg.get(&owner).cloned())),
        Request::ListEndpoints => encode(reg.list()),
        Request::Gc { valid } => encode(reg.gc(&valid)),
        Request::Counters => encode(reg.counters()),
        Request::Ipam => encode(reg.ipam()),
        Request::Nodes => encode(Ok(reg.remote_nodes())),
        Request::StackFlows => encode(
            crate::api::StackFlowStatus::list(reg.datapath_mut()).map_err(anyhow::Error::from),
        ),
    }
}
