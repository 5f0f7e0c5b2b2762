//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use super::{metrics, Health};
use crate::pg::PgTarget;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads the slot's lag from the server, for `/metrics`.
#[derive(Clone)]
pub struct LagSource {
    pub target: PgTarget,
    pub slot: String,
}

impl LagSource {
    async fn read(&self) -> Option<i64> {
        let fut = async {
            let client = self.target.connect().await.ok()?;
            crate::pg::catalog::slot_state(&client, &self.slot)
                .await
                .ok()
                .flatten()?
                .lag_bytes
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .ok()
            .flatten()
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

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>, lag: LagSource) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        let lag = lag.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => {
                    if let Some(bytes) = lag.read().await {
                        metrics().slot_lag_bytes.set(bytes);
                    }
                    ("200 OK", "text/plain; version=0.0.4", metrics().render())
                }
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" => match health.ready() {
                    Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
                    Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
                },
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics, /healthz, /readyz\n".to_string(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
