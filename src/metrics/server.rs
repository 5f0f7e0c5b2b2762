//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, served by hyper.
//!
//! Hardened for a port anyone on the network may reach: at most
//! `MAX_CONNECTIONS` connections at once (more wait in the kernel's backlog),
//! request headers capped at `MAX_HEADER_BYTES` (larger: 431), a client must
//! send its headers within `HEADER_TIMEOUT` and is cut off after
//! `CONNECTION_LIFETIME`, an accept error backs off instead of spinning, and the
//! slot's lag is read from one kept connection at most once per
//! `LAG_INTERVAL`, whatever the number of scrapes. An optional bearer token
//! guards `/metrics` and `/readyz` (`/healthz` stays open for liveness probes).

use super::{metrics, Health};
use crate::pg::PgTarget;
use crate::time::Backoff;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head read (hyper's minimum buffer; larger heads get 431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A client must have sent its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// `slot_lag_bytes` is read at most this often.
pub const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Reads the slot's lag for `/metrics`: one kept connection, one query per
/// `LAG_INTERVAL` at most (concurrent scrapes share it).
pub struct LagSource {
    target: PgTarget,
    slot: String,
    state: Mutex<LagState>,
}

struct LagState {
    client: Option<tokio_postgres::Client>,
    sampled: Option<Instant>,
}

impl LagSource {
    pub fn new(target: PgTarget, slot: String) -> Self {
        Self {
            target,
            slot,
            state: Mutex::new(LagState {
                client: None,
                sampled: None,
            }),
        }
    }

    /// Samples the lag into `slot_lag_bytes` unless it was sampled within the interval.
    async fn refresh(&self) {
        let mut state = self.state.lock().await;
        if state.sampled.is_some_and(|t| t.elapsed() < LAG_INTERVAL) {
            return;
        }
        state.sampled = Some(Instant::now());
        let fut = async {
            if state.client.as_ref().is_none_or(|c| c.is_closed()) {
                state.client = self
                    .target
                    .connect_as("outbox-relay metrics")
                    .await
                    .map_err(
                        |e| tracing::debug!(error = %e, "metrics: no connection for the slot lag"),
                    )
                    .ok();
            }
            let client = state.client.as_ref()?;
            match crate::pg::catalog::slot_state(client, &self.slot).await {
                Ok(s) => s?.lag_bytes,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: reading the slot lag failed");
                    None
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), fut).await {
            Ok(Some(bytes)) => metrics().slot_lag_bytes.set(bytes),
            Ok(None) => {}
            // A hung connection is replaced next time.
            Err(_) => state.client = None,
        }
    }
}

/// Binds the listener (so a bad address fails at start-up).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::Listen {
            addr: listen.to_string(),
            message: e.to_string(),
        })
}

/// What the handlers share.
struct Shared {
    health: Arc<Health>,
    lag: LagSource,
    /// `Bearer <token>`, when a token is configured.
    auth: Option<String>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    lag: LagSource,
    token: Option<String>,
) {
    let shared = Arc::new(Shared {
        health,
        lag,
        auth: token.map(|t| format!("Bearer {t}")),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                // Out of file descriptors, say: wait, do not spin.
                let wait = backoff.fail();
                tracing::warn!(error = %e, "metrics: accept failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Constant-time comparison (a token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let guarded = matches!(path, "/metrics" | "/readyz");
    if let (true, Some(expected)) = (guarded, &shared.auth) {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !same(given, expected.as_bytes()) {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "unauthorized: send Authorization: Bearer <metrics.token_file's token>\n".into(),
            );
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    match path {
        "/metrics" => {
            shared.lag.refresh().await;
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics().render(),
            )
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match shared.health.ready() {
            Ok(ready) => reply(StatusCode::OK, "text/plain", format!("{ready}\n")),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// Starts the `/metrics`, `/healthz`, `/readyz` endpoint when configured.
pub async fn spawn(
    config: &crate::config::Config,
    health: &Arc<Health>,
) -> Result<Option<crate::task::AbortOnDrop>, crate::error::Error> {
    let Some(addr) = config.metrics.listen else {
        return Ok(None);
    };
    super::metrics().broker_nodes(
        &config
            .amqp
            .nodes
            .iter()
            .map(crate::config::AmqpUrl::node)
            .collect::<Vec<_>>(),
    );
    let listener = bind(addr).await?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %local, "metrics listening on {local}: /metrics /healthz /readyz");
    let token = config
        .metrics
        .token
        .as_ref()
        .map(|t| t.expose().to_string());
    if token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %local,
            "the metrics endpoint is reachable beyond this host without a token: set metrics.token_file, or bind it to 127.0.0.1"
        );
    }
    let lag = LagSource::new(config.postgres.target.clone(), config.postgres.slot.clone());
    Ok(Some(crate::task::AbortOnDrop(tokio::spawn(serve(
        listener,
        health.clone(),
        lag,
        token,
    )))))
}
