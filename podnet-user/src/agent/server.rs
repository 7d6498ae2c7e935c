//! The agent's unix socket server (protocol in [`crate::api`]).

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{
    Agent,
    metrics::{CniOp, CniOps, OpSubject},
    monitor::MonitorHub,
};
use crate::api::{MonitorMessage, Request, Response};

/// The largest request the agent reads (a GC listing thousands of owners
/// fits); a client sending more gets an error and is hung up on.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// How long a client may take to send its request line; a connection that
/// sends nothing must not hold a task (and a file descriptor) forever.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// podnetctl's requests (listings, counters, checks: some walk maps under
/// the agent's lock) handled at once, at most. CNI operations do not wait
/// for these: they take no turn (see [`handle`]).
pub const OPERATOR_REQUESTS: usize = 4;

static OPERATOR_LANE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(OPERATOR_REQUESTS);

/// Binds `socket` with mode 0600 from the first moment it is reachable:
/// bound inside a fresh 0700 directory beside it, made 0600 there and only
/// then renamed into place (a chmod after a bind in place leaves a window
/// in which anyone may connect).
fn bind_private(socket: &Path) -> anyhow::Result<UnixListener> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = socket.file_name().map_or_else(
        || "podnetd.sock".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let staging = dir.join(format!(".{name}.{}.new", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    let staged = staging.join(&name);
    let bound = (|| {
        let listener =
            UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of {}", staged.display()))?;
        // Replaces a socket file left by a previous agent (crash).
        std::fs::rename(&staged, socket)
            .with_context(|| format!("moving the socket to {}", socket.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Serves `socket` until the task is dropped. The socket is mode 0600: only
/// root (the runtime calling the plugin, the operator) may change endpoints.
/// Every CNI operation is logged and counted in `ops`.
pub async fn serve(
    socket: &Path,
    registry: Arc<Mutex<Agent>>,
    ops: CniOps,
    monitor: MonitorHub,
) -> anyhow::Result<()> {
    let listener = bind_private(socket)?;
    let node = registry
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
        .node_info();
    let info_path = crate::api::node_info_path(socket);
    std::fs::write(&info_path, serde_json::to_vec_pretty(&node)?)
        .with_context(|| format!("writing {}", info_path.display()))?;
    // Running out of descriptors (or a connection failing before it is
    // accepted) must not end the agent: new pods would get no network
    // until it is restarted.
    let mut errors = super::accept::AcceptErrors::new("agent socket");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                errors
                    .failed(e)
                    .await
                    .context("accepting a connection: the socket is unusable")?;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        let ops = ops.clone();
        let monitor = monitor.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, registry, ops, monitor).await {
                warn!(error = %format!("{e:#}"), "request failed");
            }
        });
    }
}

/// The answer line, and the error it reports if it is one.
fn encode<T: Serialize>(result: anyhow::Result<T>) -> (Vec<u8>, Option<String>) {
    let (response, error) = match result {
        Ok(value) => (Response::Ok(value), None),
        Err(e) => {
            let message = format!("{e:#}");
            (Response::Error(message.clone()), Some(message))
        }
    };
    let mut line = serde_json::to_vec(&response)
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}").into_bytes());
    line.push(b'\n');
    (line, error)
}

/// Decodes one request line as the agent read it from a client (up to and
/// including its newline, at most `MAX_REQUEST_BYTES + 1` bytes); the error
/// is the message the client gets. Pure, so that it can be fuzzed; what an
/// `AddEndpoint` asks for is checked by [`super::validate_endpoint`] before
/// anything is touched.
pub fn decode_request(line: &str) -> Result<Request, String> {
    if line.len() as u64 > MAX_REQUEST_BYTES {
        return Err(format!("request larger than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_str::<Request>(line).map_err(|e| format!("malformed request: {e}"))
}

async fn handle(
    stream: UnixStream,
    registry: Arc<Mutex<Agent>>,
    ops: CniOps,
    monitor: MonitorHub,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One byte past the limit tells a request that is too large from one
    // that is exactly as large as allowed.
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES + 1));
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await;
    let decoded = match read {
        Err(_) => Err(format!(
            "no complete request within {} s",
            REQUEST_READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => decode_request(&line),
    };
    let answer = match decoded {
        Err(e) => encode::<()>(Err(anyhow::anyhow!(e))).0,
        Ok(Request::Monitor { drops_only: _ }) => {
            // Drops are the only events today: with or without the filter
            // the stream is the same.
            return stream_monitor(reader, write, &monitor).await;
        }
        Ok(request) => {
            debug!(?request, "request");
            // CNI operations take no turn: this runtime's blocking pool
            // (512 threads) is theirs, as nothing else may hold more than
            // a few of its threads (podnetctl's requests, one explain);
            // the metrics port has a runtime of its own (`http::start`).
            let _turn = match &request {
                _ if CniOp::of(&request).is_some() => None,
                Request::Explain { .. } => {
                    match super::explain::scratch_turn(super::explain::SCRATCH_WAIT).await {
                        Ok(turn) => Some(turn),
                        Err(e) => return write_answer(&mut write, &encode::<()>(Err(e)).0).await,
                    }
                }
                _ => Some(
                    OPERATOR_LANE
                        .acquire()
                        .await
                        .context("waiting for a turn")?,
                ),
            };
            // Datapath and netlink calls block: keep them off the reactor.
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let op = CniOp::of(&request).map(|op| (op, OpSubject::of(&request)));
                let (answer, error) = match request {
                    // Loads a scratch datapath: not under the registry's lock.
                    Request::Explain { request } => {
                        encode(super::explain::explain(&registry, request))
                    }
                    request => dispatch(&registry, request),
                };
                if let Some((op, subject)) = op {
                    ops.record(op, &subject, error.as_deref(), started.elapsed());
                }
                answer
            })
            .await
            .context("request handler panicked")?
        }
    };
    write_answer(&mut write, &answer).await
}

async fn write_answer(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    answer: &[u8],
) -> anyhow::Result<()> {
    write.write_all(answer).await.context("writing the answer")
}

/// Streams monitor messages to one client until it hangs up. Never holds
/// up the publisher: a client that falls more than the channel's backlog
/// behind loses the oldest messages, and is told how many.
async fn stream_monitor(
    mut reader: BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    monitor: &MonitorHub,
) -> anyhow::Result<()> {
    let mut events = monitor.subscribe();
    write
        .write_all(&encode(Ok(monitor.hello())).0)
        .await
        .context("writing the answer")?;
    let mut ignored = Vec::new();
    loop {
        let message = tokio::select! {
            received = events.recv() => match received {
                Ok(message) => message,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(count)) => {
                    Arc::new(MonitorMessage::Lost { count })
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            // Anything the client sends is ignored; end of input: it left.
            read = reader.read_until(b'\n', &mut ignored) => {
                ignored.clear();
                match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                }
            }
        };
        let mut line = serde_json::to_vec(&*message).context("encoding a monitor message")?;
        line.push(b'\n');
        if write.write_all(&line).await.is_err() {
            // The client went away.
            return Ok(());
        }
    }
}

fn dispatch(registry: &Mutex<Agent>, request: Request) -> (Vec<u8>, Option<String>) {
    let Ok(mut reg) = registry.lock() else {
        return encode::<()>(Err(anyhow::anyhow!(
            "agent state poisoned by an earlier panic"
        )));
    };
    match request {
        Request::Node => encode(Ok(reg.node_info())),
        Request::Status => {
            let status = reg.status();
            let pin_dir = reg.config().bpffs_dir.clone();
            // Counting the tables walks up to a few hundred thousand keys:
            // not under the lock a CNI ADD waits for.
            drop(reg);
            encode(status.map(|s| super::report::with_table_fill(s, &pin_dir)))
        }
        Request::AddEndpoint { endpoint } => encode(reg.add(endpoint)),
        Request::RemoveEndpoint { owner } => encode(reg.remove(&owner)),
        Request::GetEndpoint { owner } => encode(Ok(reg.get(&owner).cloned())),
        Request::ListEndpoints => encode(reg.list()),
        Request::Gc { valid, network } => encode(reg.gc(network.as_deref(), &valid)),
        Request::Counters => encode(reg.counters()),
        Request::Ipam => encode(reg.ipam()),
        Request::Nodes => encode(Ok(reg.remote_nodes())),
        Request::Datastore => encode(Ok(reg.datastore_status())),
        Request::StackFlows => {
            encode(super::stack_flows(reg.datapath_mut()).map_err(anyhow::Error::from))
        }
        Request::FlowShares => {
            let limit = reg.datapath_mut().config().map(|c| c.stack_flows_limit());
            let pin_dir = reg.config().bpffs_dir.clone();
            // The walk reads pins, not the agent's state.
            drop(reg);
            encode(
                limit
                    .and_then(|limit| super::report::flow_shares(&pin_dir, limit))
                    .map_err(anyhow::Error::from),
            )
        }
        Request::Check => encode(reg.check()),
        Request::Explain { request } => {
            drop(reg);
            encode(super::explain::explain(registry, request))
        }
        Request::Policy { namespace, name } => {
            let view = reg
                .cluster_objects()
                .map(super::cluster_objects::ClusterObjects::view);
            let local = super::policy::local_endpoints(&reg);
            drop(reg);
            encode(pod_policies(view.as_deref(), &local, &namespace, &name))
        }
        Request::Services => encode(Ok(reg.services_answer())),
        Request::Monitor { .. } => {
            encode::<()>(Err(anyhow::anyhow!("monitor is a streaming request")))
        }
    }
}

/// [`Request::Policy`]: from the view, without the agent's lock.
fn pod_policies(
    view: Option<&Mutex<super::cluster_objects::AgentView>>,
    local: &[crate::policy::LocalEndpoint],
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<crate::policy::PodPolicies>> {
    let view = view
        .context("this agent has no datastore, so no cluster objects and no policies")?
        .lock()
        .map_err(|_| anyhow::anyhow!("the cluster view is poisoned by an earlier panic"))?;
    let hosts = super::policy::host_addresses();
    let input = crate::policy::PolicyInput {
        model: view.model(),
        pods: view.pod_records().collect(),
        local,
        host_addresses: &hosts,
    };
    Ok(crate::policy::pod_policies(&input, namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_and_bad_ones_are_refused() {
        assert!(matches!(
            decode_request("{\"op\":\"node\"}\n"),
            Ok(Request::Node)
        ));
        assert!(matches!(
            decode_request("{\"op\":\"services\"}\n"),
            Ok(Request::Services)
        ));
        assert!(matches!(
            decode_request(r#"{"op":"gc","valid":[{"container_id":"a","ifname":"eth0"}]}"#),
            Ok(Request::Gc { network: None, valid }) if valid.len() == 1
        ));
        for bad in [
            "",
            "\n",
            "{",
            r#"{"op":"frob"}"#,
            r#"{"op":"remove_endpoint"}"#,
        ] {
            let err = decode_request(bad).expect_err(bad);
            assert!(err.starts_with("malformed request"), "{bad:?}: {err}");
        }
        let mut big = String::from(r#"{"op":"node","pad":""#);
        big.extend(std::iter::repeat_n(
            'x',
            usize::try_from(MAX_REQUEST_BYTES).unwrap(),
        ));
        big.push_str("\"}\n");
        assert!(
            decode_request(&big)
                .unwrap_err()
                .starts_with("request larger")
        );
    }
}

#[cfg(test)]
mod monitor_tests {
    use tokio::{
        io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
        net::UnixStream,
    };

    use super::{MAX_REQUEST_BYTES, stream_monitor};
    use crate::{
        agent::monitor::{CLIENT_BACKLOG, MonitorHub},
        api::{MonitorHello, MonitorMessage, Response},
    };

    /// A monitor client on one end of a socket pair, served by
    /// `stream_monitor` on the other.
    async fn client(hub: &MonitorHub) -> (BufReader<UnixStream>, tokio::task::JoinHandle<()>) {
        let (agent, client) = UnixStream::pair().expect("socket pair");
        let (read, write) = agent.into_split();
        let hub = hub.clone();
        let served = tokio::spawn(async move {
            let reader = BufReader::new(read.take(MAX_REQUEST_BYTES + 1));
            stream_monitor(reader, write, &hub).await.expect("stream");
        });
        let mut client = BufReader::new(client);
        let mut hello = String::new();
        client.read_line(&mut hello).await.expect("hello");
        let hello: Response<MonitorHello> = serde_json::from_str(&hello).expect("hello JSON");
        assert!(matches!(hello, Response::Ok(h) if h.drop_events_per_sec_per_cpu > 0));
        (client, served)
    }

    async fn next(client: &mut BufReader<UnixStream>) -> MonitorMessage {
        let mut line = String::new();
        client.read_line(&mut line).await.expect("a line");
        serde_json::from_str(&line).expect("a monitor message")
    }

    fn suppressed(count: u64) -> MonitorMessage {
        MonitorMessage::Suppressed {
            time_unix_ns: 0,
            reason: "spoofed_source_ip".into(),
            count,
        }
    }

    // The default test runtime has one thread: the serving tasks run only
    // when the test awaits, so "a client that does not keep up" is exact.
    #[tokio::test]
    async fn publishing_never_waits_and_a_client_behind_is_told_what_it_lost() {
        let hub = MonitorHub::new();
        let (mut a, _) = client(&hub).await;
        let (mut b, _) = client(&hub).await;
        hub.publish(suppressed(1));
        assert_eq!(next(&mut a).await, suppressed(1));
        assert_eq!(next(&mut b).await, suppressed(1));

        // Far more than a client's backlog while neither is served.
        let extra = 100;
        let total = CLIENT_BACKLOG as u64 + extra;
        for i in 0..total {
            hub.publish(suppressed(i + 2));
        }
        for client in [&mut a, &mut b] {
            assert_eq!(next(client).await, MonitorMessage::Lost { count: extra });
            // Then the newest, in order, none twice.
            for i in extra..total {
                assert_eq!(next(client).await, suppressed(i + 2));
            }
        }
        hub.publish(suppressed(0));
        assert_eq!(next(&mut a).await, suppressed(0));
        assert_eq!(next(&mut b).await, suppressed(0));
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_client_leaves() {
        let hub = MonitorHub::new();
        let (client, served) = client(&hub).await;
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the agent noticed the client left")
            .expect("the stream task");
    }
}
