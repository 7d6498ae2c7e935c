//! podnetd's HTTP endpoint (`--metrics-addr`) for Prometheus and probes:
//! `/metrics` (OpenMetrics text), `/healthz` (the process serves) and
//! `/readyz` (the agent is ready, see [`AgentMetrics::readiness`]). Plain
//! HTTP/1 on the agent's tokio runtime; what blocks (the lock, the map
//! reads) runs on the blocking pool.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use super::metrics::AgentMetrics;

/// The content type of the exposition prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// Binds `addr` (so that a wrong address fails the agent's start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) -> Result<(), HttpError> {
    loop {
        let (stream, peer) = listener.accept().await.map_err(HttpError::Accept)?;
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, Arc::clone(&metrics)));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "metrics connection");
            }
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
/// kernel's maps); a 500 answer if it panicked.
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

async fn respond(
    request: Request<Incoming>,
    metrics: Arc<AgentMetrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n"));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match blocking(move || metrics.readiness()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
            Ok(Err(reason)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
            Err(failed) => failed,
        },
        "/metrics" => match blocking(move || metrics.encode()).await {
            Ok(Ok(body)) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                );
                response
            }
            Ok(Err(e)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the metrics: {e}\n"),
            ),
            Err(failed) => failed,
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n",
        ),
    };
    Ok(response)
}
