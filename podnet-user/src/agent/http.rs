//! podnetd's HTTP endpoint (`--metrics-addr`) for Prometheus and probes:
//! `/metrics` (OpenMetrics text), `/healthz` (the process serves) and
//! `/readyz` (the agent is ready, see [`AgentMetrics::readiness`]). Plain
//! HTTP/1 on a thread and tokio runtime of its own ([`start`]).
//!
//! Anyone who reaches the port may use it (with `hostNetwork`, every pod
//! can reach its node's addresses), so nothing here may take more than a
//! bounded share of the agent, whose first job is answering the CNI
//! plugin:
//!
//! - connections: at most [`connection_limit`] are served at once (so the
//!   port never holds more than that many descriptors, plus the one being
//!   accepted); when all are taken, the oldest one waiting for a request
//!   is closed for the new one (see [`serve`]); each must send its request
//!   headers within [`HEADER_TIMEOUT`] (also between requests on a
//!   kept-alive connection) and ends after [`CONNECTION_LIFETIME`];
//! - scrapes: one walk of the maps at a time, on one blocking thread; a
//!   scrape arriving while one runs, or within [`SCRAPE_FRESH`] of the
//!   last, gets that exposition (Prometheus scrapes every 15 s or more);
//! - `/readyz`: one at a time (it takes the agent's lock briefly);
//! - `/healthz`: answered on the reactor without any lock or thread, so it
//!   answers while scrapes queue;
//! - `accept` failing (descriptors out) backs off and serves on
//!   ([`super::accept`]).

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Mutex, Notify, Semaphore},
};
use tracing::{debug, info, warn};

use super::{accept::AcceptErrors, metrics::AgentMetrics};

/// The content type of the exposition prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may be served (a client that reads its answer
/// slowly must not hold a connection slot forever); Prometheus reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once, at most; fewer when the agent's descriptor
/// limit is low (see [`connection_limit`]).
pub const MAX_CONNECTIONS: usize = 64;
/// A scrape this recent is served again instead of walking the maps.
pub const SCRAPE_FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding the metrics address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting a metrics connection")]
    Accept(#[source] std::io::Error),
    #[error("starting the metrics server's thread and runtime")]
    Runtime(#[source] std::io::Error),
}

/// Binds `addr` (so that a wrong address fails the agent's start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Blocking threads the metrics runtime may use: one map walk (scrapes
/// take turns) and one `/readyz`.
pub const BLOCKING_THREADS: usize = 2;

/// Serves `addr` on a thread and a runtime of its own (one reactor thread,
/// at most [`BLOCKING_THREADS`] blocking threads), apart from the runtime
/// and the blocking pool that serve the CNI plugin: a scrape flood costs
/// the agent's socket no reactor time and no blocking thread. Returns once
/// `addr` is bound (so that a wrong address fails the agent's start); the
/// thread runs for the life of the process and logs why if it stops.
pub fn start(addr: SocketAddr, metrics: Arc<AgentMetrics>) -> Result<(), HttpError> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("podnetd-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name("podnetd-metrics-blocking")
                .build()
            {
                Ok(runtime) => runtime,
                Err(source) => {
                    let _ = bound_tx.send(Err(HttpError::Runtime(source)));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match bind(addr).await {
                    Ok(listener) => {
                        let _ = bound_tx.send(Ok(()));
                        listener
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = serve(listener, metrics).await {
                    warn!(error = %format!("{:#}", anyhow::Error::from(e)), "the metrics server stopped");
                }
            });
        })
        .map_err(HttpError::Runtime)?;
    bound_rx.recv().unwrap_or_else(|_| {
        // The thread ended without a word: it panicked.
        let _ = spawned.join();
        Err(HttpError::Runtime(std::io::Error::other(
            "the metrics thread ended before binding",
        )))
    })
}

/// The agent's soft descriptor limit (`RLIMIT_NOFILE`), if it can be read.
fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct it is given, which lives
    // for the call.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    (read == 0).then_some(limit.rlim_cur)
}

/// How many metrics connections are served at once: [`MAX_CONNECTIONS`],
/// or a quarter of the descriptor limit `nofile` when that is less, so
/// that the metrics port can never take the descriptors the CNI socket,
/// netlink and the maps need (at least 2: a probe and a scrape).
#[must_use]
pub fn connection_limit(nofile: Option<u64>) -> usize {
    let quarter = nofile.map_or(MAX_CONNECTIONS, |n| {
        usize::try_from(n / 4).unwrap_or(MAX_CONNECTIONS)
    });
    quarter.clamp(2, MAX_CONNECTIONS)
}

/// The last exposition, and when it was encoded.
struct Scrape {
    at: Instant,
    body: Result<Bytes, String>,
}

/// What the connections share: the metrics, the last scrape (its lock is
/// the one-scrape-at-a-time gate) and the readiness gate.
struct Shared {
    metrics: Arc<AgentMetrics>,
    scrape: Arc<Mutex<Option<Scrape>>>,
    readiness: Semaphore,
}

/// One served connection, as the accept loop sees it.
struct Conn {
    id: u64,
    /// Inside a request (from its headers to its answer); else waiting
    /// for a request's headers.
    busy: AtomicBool,
    /// Asked to close to make room for a new connection.
    evicted: AtomicBool,
    close: Notify,
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Conns {
    list: std::sync::Mutex<VecDeque<Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Conns {
    fn add(&self) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            close: Notify::new(),
        });
        if let Ok(mut list) = self.list.lock() {
            list.push_back(Arc::clone(&conn));
        }
        conn
    }

    fn remove(&self, id: u64) {
        if let Ok(mut list) = self.list.lock() {
            list.retain(|c| c.id != id);
        }
    }

    /// Asks the oldest connection that is waiting for a request (it sent
    /// nothing yet, or idles between requests) to close; whether there was
    /// one. A connection inside a request is never cut.
    fn evict_oldest_idle(&self) -> bool {
        let Ok(list) = self.list.lock() else {
            return false;
        };
        let idle = list
            .iter()
            .find(|c| !c.busy.load(Ordering::Acquire) && !c.evicted.load(Ordering::Acquire));
        idle.is_some_and(|conn| {
            conn.evicted.store(true, Ordering::Release);
            // Stored when the task is not waiting yet: it closes as soon
            // as it does.
            conn.close.notify_one();
            true
        })
    }
}

/// Marks its connection busy while a request is handled.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.busy.store(true, Ordering::Release);
        Self(Arc::clone(conn))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// How long a new connection may wait for a slot while every served
/// connection is inside a request; then it is closed.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// Serves `listener` until the task is dropped.
///
/// Connections that send nothing are what exhausts a server's slots (or
/// descriptors): when every slot is taken, the oldest connection waiting
/// for a request is closed to make room for the new one, so that a flood
/// of idle connections churns through the slots while a probe or a scrape,
/// which sends its request at once, is served. Only while every slot is
/// inside a request does a new connection wait (up to [`SLOT_WAIT`], then
/// it is closed); the connections behind it wait in the kernel's accept
/// queue, which costs the agent nothing.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) -> Result<(), HttpError> {
    let shared = Arc::new(Shared {
        metrics,
        scrape: Arc::new(Mutex::new(None)),
        readiness: Semaphore::new(1),
    });
    let limit = connection_limit(descriptor_limit());
    info!(
        connections = limit,
        "metrics connections served at once, at most"
    );
    let slots = Arc::new(Semaphore::new(limit));
    let conns = Arc::new(Conns::default());
    let mut errors = AcceptErrors::new("metrics");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                errors.failed(e).await.map_err(HttpError::Accept)?;
                continue;
            }
        };
        let slot = if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            slot
        } else {
            conns.evict_oldest_idle();
            let waited = tokio::time::timeout(SLOT_WAIT, Arc::clone(&slots).acquire_owned()).await;
            let Ok(Ok(slot)) = waited else {
                debug!(%peer, "every metrics connection is inside a request; closed a new one");
                continue;
            };
            slot
        };
        let conn = conns.add();
        let (shared, conns) = (Arc::clone(&shared), Arc::clone(&conns));
        tokio::spawn(async move {
            let in_service = Arc::clone(&conn);
            let service = service_fn(move |request| {
                let busy = Busy::new(&in_service);
                let shared = Arc::clone(&shared);
                async move {
                    let response = respond(request, shared).await;
                    drop(busy);
                    response
                }
            });
            let serving = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = tokio::time::timeout(CONNECTION_LIFETIME, serving) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection"),
                    Err(_) => debug!(%peer, "metrics connection served for its whole lifetime; closed"),
                },
                () = conn.close.notified() => debug!(%peer, "idle metrics connection closed for a new one"),
            }
            conns.remove(conn.id);
            drop(slot);
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Runs `f` on the blocking pool (it takes the agent's lock or reads the
/// kernel's maps); a 500 answer if it panicked. Callers bound how many
/// run at once.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response<Full<Bytes>>> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the handler failed: {e}\n"),
        )
    })
}

/// The exposition: the last one if it is fresh, else a new one. One walk
/// of the maps at a time: the walk runs in a task of its own that holds
/// the scrape lock until the exposition is stored, so that a client
/// hanging up mid-scrape neither cancels it nor lets a second one start.
async fn exposition(shared: &Shared) -> Result<Bytes, String> {
    let mut last = Arc::clone(&shared.scrape).lock_owned().await;
    if let Some(scrape) = last.as_ref().filter(|s| s.at.elapsed() < SCRAPE_FRESH) {
        return scrape.body.clone();
    }
    let metrics = Arc::clone(&shared.metrics);
    let walk = tokio::spawn(async move {
        let body = match tokio::task::spawn_blocking(move || metrics.encode()).await {
            Ok(Ok(text)) => Ok(Bytes::from(text)),
            Ok(Err(e)) => Err(format!("encoding the metrics: {e}")),
            Err(e) => Err(format!("the scrape failed: {e}")),
        };
        *last = Some(Scrape {
            at: Instant::now(),
            body: body.clone(),
        });
        body
    });
    walk.await
        .unwrap_or_else(|e| Err(format!("the scrape failed: {e}")))
}

async fn respond(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n"));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // One at a time: a flood of /readyz must not start a blocking
            // thread (and a lock wait) each.
            let _turn = shared.readiness.acquire().await;
            let metrics = Arc::clone(&shared.metrics);
            match blocking(move || metrics.readiness()).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                Ok(Err(reason)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
                Err(failed) => failed,
            }
        }
        "/metrics" => match exposition(&shared).await {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                );
                response
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n",
        ),
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;
    use crate::agent::metrics::{AgentInfo, CniOp, CniOps, OpSubject};

    /// An HTTP/1.0 GET: the status and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .expect("request");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("answer");
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (status, body.unwrap_or_default())
    }

    /// A server on a free loopback port of its own; its CNI counters.
    async fn server() -> (SocketAddr, CniOps) {
        let cni = CniOps::default();
        let info = AgentInfo {
            version: "test".into(),
            mode: "local".into(),
            node: "n".into(),
            datastore: "none".into(),
        };
        let metrics = Arc::new(AgentMetrics::new(&info, &cni));
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, metrics));
        (addr, cni)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_that_send_nothing_do_not_lock_out_a_probe() {
        let (addr, _) = server().await;
        // Three times the connections the port serves at once, none
        // sending a request (each would hold its slot for HEADER_TIMEOUT).
        let mut idle = Vec::new();
        for _ in 0..3 * MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let started = Instant::now();
        let (status, body) = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz"))
            .await
            .expect("/healthz answered before any idle connection timed out");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        eprintln!(
            "/healthz behind {} idle connections: {:?}",
            idle.len(),
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recent_scrape_is_served_again() {
        let (addr, cni) = server().await;
        let add = |cni: &CniOps| {
            cni.record(
                CniOp::Add,
                &OpSubject::default(),
                None,
                Duration::from_millis(1),
            );
        };
        let (status, first) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        add(&cni);
        let (_, again) = get(addr, "/metrics").await;
        assert_eq!(first, again, "within SCRAPE_FRESH: the same exposition");
        tokio::time::sleep(SCRAPE_FRESH).await;
        let (_, later) = get(addr, "/metrics").await;
        assert_ne!(
            first, later,
            "the ADD is counted once the exposition is stale"
        );
        assert!(
            later.contains("podnet_cni_operations_total{verb=\"add\",result=\"ok\"} 1"),
            "{later}"
        );
    }

    #[test]
    fn the_connection_limit_leaves_most_descriptors_to_the_agent() {
        assert_eq!(connection_limit(None), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(1 << 20)), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(64)), 16);
        assert_eq!(connection_limit(Some(48)), 12);
        assert_eq!(connection_limit(Some(3)), 2);
    }
}
