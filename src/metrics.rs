//! Prometheus metrics (registered once, names `outbox_relay_*`), readiness state,
//! and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use crate::catalog::PgTarget;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Every metric the relay exports.
pub struct Metrics {
    pub registry: Registry,
    /// Messages acked by the broker (stream and retried).
    pub published: IntCounter,
    /// Publish failures by reason: nack, returned, timeout, too_large, malformed.
    pub failures: IntCounterVec,
    /// Messages in retry state (parked, not dead).
    pub retries_pending: IntGauge,
    /// Messages declared dead.
    pub dead_letters: IntCounter,
    /// Messages in the in-flight window.
    pub inflight: IntGauge,
    /// The LSN the relay last marked applied (reported to the server).
    pub confirmed_lsn: Gauge,
    /// WAL bytes between the server's current position and the slot's confirmed one.
    pub slot_lag_bytes: IntGauge,
    /// Commit time to broker ack.
    pub delivery_latency: Histogram,
    /// Reconnections by peer: postgres, amqp.
    pub reconnects: IntCounterVec,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let published = IntCounter::new(
            "outbox_relay_messages_published_total",
            "Messages acknowledged by the broker (first attempts and retries)",
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "outbox_relay_publish_failures_total",
                "Failed publishes, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let retries_pending = IntGauge::new(
            "outbox_relay_retries_pending",
            "Messages in retry state (parked, not dead)",
        )
        .expect("valid metric");
        let dead_letters = IntCounter::new(
            "outbox_relay_dead_letters_total",
            "Messages that ran out of retries (dead-lettered when configured)",
        )
        .expect("valid metric");
        let inflight = IntGauge::new(
            "outbox_relay_inflight_messages",
            "Messages in the in-flight window (unconfirmed, queued behind their aggregate, or being parked)",
        )
        .expect("valid metric");
        let confirmed_lsn = Gauge::new(
            "outbox_relay_confirmed_lsn",
            "LSN the relay marked applied and reports to the server (as a number)",
        )
        .expect("valid metric");
        let slot_lag_bytes = IntGauge::new(
            "outbox_relay_slot_lag_bytes",
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) of the slot, read at scrape time",
        )
        .expect("valid metric");
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_relay_delivery_latency_seconds",
                "Time from the transaction's commit to the broker's ack",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
        )
        .expect("valid metric");
        let reconnects = IntCounterVec::new(
            Opts::new(
                "outbox_relay_reconnects_total",
                "Reconnections after a lost connection, by peer",
            ),
            &["peer"],
        )
        .expect("valid metric");
        for reason in ["nack", "returned", "timeout", "too_large", "malformed"] {
            failures.with_label_values(&[reason]);
        }
        for peer in ["postgres", "amqp"] {
            reconnects.with_label_values(&[peer]);
        }
        for c in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(retries_pending.clone()),
            Box::new(dead_letters.clone()),
            Box::new(inflight.clone()),
            Box::new(confirmed_lsn.clone()),
            Box::new(slot_lag_bytes.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(reconnects.clone()),
        ] {
            registry.register(c).expect("each metric registered once");
        }
        Metrics {
            registry,
            published,
            failures,
            retries_pending,
            dead_letters,
            inflight,
            confirmed_lsn,
            slot_lag_bytes,
            delivery_latency,
            reconnects,
        }
    }

    pub fn failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub fn reconnect(&self, peer: &str) {
        self.reconnects.with_label_values(&[peer]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }
}

/// The process-wide metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    streaming: AtomicBool,
    broker: AtomicBool,
    /// Pid of the process holding the slot while this relay waits as a standby; 0 otherwise.
    standby_for: AtomicI32,
}

impl Health {
    pub fn set_streaming(&self, v: bool) {
        self.streaming.store(v, Ordering::Relaxed);
    }

    pub fn set_broker(&self, v: bool) {
        self.broker.store(v, Ordering::Relaxed);
    }

    pub fn set_standby(&self, holder_pid: Option<i32>) {
        self.standby_for
            .store(holder_pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// `Ok` when replication streams and the broker is connected; else why not.
    pub fn ready(&self) -> Result<(), String> {
        let standby = self.standby_for.load(Ordering::Relaxed);
        if standby != 0 {
            return Err(format!("standby: the slot is held by pid {standby}"));
        }
        match (
            self.streaming.load(Ordering::Relaxed),
            self.broker.load(Ordering::Relaxed),
        ) {
            (true, true) => Ok(()),
            (false, true) => Err("replication is not streaming (connecting to Postgres)".into()),
            (true, false) => Err("broker is not connected".into()),
            (false, false) => {
                Err("replication is not streaming and the broker is not connected".into())
            }
        }
    }
}

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
            crate::catalog::slot_state(&client, &self.slot)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_why() {
        let h = Health::default();
        assert!(h.ready().unwrap_err().contains("not streaming"));
        h.set_streaming(true);
        assert!(h.ready().unwrap_err().contains("broker"));
        h.set_broker(true);
        assert!(h.ready().is_ok());
        h.set_standby(Some(42));
        assert!(h.ready().unwrap_err().contains("pid 42"));
    }

    #[test]
    fn metric_names_are_exported() {
        let m = metrics();
        m.published.inc();
        let text = m.render();
        for name in [
            "outbox_relay_messages_published_total",
            "outbox_relay_publish_failures_total",
            "outbox_relay_retries_pending",
            "outbox_relay_dead_letters_total",
            "outbox_relay_inflight_messages",
            "outbox_relay_confirmed_lsn",
            "outbox_relay_slot_lag_bytes",
            "outbox_relay_delivery_latency_seconds",
            "outbox_relay_reconnects_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
