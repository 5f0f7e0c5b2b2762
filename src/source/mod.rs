//! The Postgres side: a logical replication stream (pgwire-replication) on the
//! slot, and the pgoutput decoding of its changes into outbox events.
//!
//! The consumer/worker split: the relay sets the applied LSN on the client
//! (`update_applied_lsn`); the crate's worker task owns the connection and
//! reports that LSN to the server every `status_interval`, also while idle.

pub mod decode;
pub mod message;

pub use decode::{Decoded, Decoder};

use crate::error::Error;
use crate::pg::catalog::pid_from_slot_error;
use crate::pg::PgTarget;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig};
use std::time::Duration;

/// What the replication connection needs.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub target: PgTarget,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    /// Events buffered between the connection's worker and the relay.
    pub buffer_events: usize,
}

/// Starts streaming the slot from `start` (the slot's confirmed position, or the
/// relay's own applied LSN when that is newer), telling the server `ack` is
/// flushed (at most `start`: after a reconnect, the position the relay had
/// reported, not past rows delivered but not marked yet). Returns once the
/// server accepted `START_REPLICATION`, i.e. the slot is held by this session.
pub async fn start(
    settings: &SourceSettings,
    start: Lsn,
    ack: Lsn,
) -> Result<ReplicationClient, Error> {
    // With several hosts, the one that takes writes now (after a fail-over, the
    // promoted standby: where the slot must be).
    let t = &settings.target.primary().await?;
    if t.hosts().len() > 1 {
        tracing::info!(host = %t.host, port = t.port, "replication connects to the primary");
    }
    let cfg = ReplicationConfig::new(
        t.host.clone(),
        t.user.clone(),
        t.password().to_string(),
        t.dbname.clone(),
        settings.slot.clone(),
        settings.publication.clone(),
    )
    .with_port(t.port)
    .with_tls(replication_tls(t).await?)
    .with_start_lsn(start)
    .with_ack_lsn(ack.min(start))
    .with_status_interval(settings.status_interval)
    .with_wakeup_interval(Duration::from_secs(10))
    .with_buffer_size(settings.buffer_events)
    // Text values must render the same whatever the server's defaults are.
    .with_options(
        "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3",
    )
    .with_application_name("outbox-relay");
    t.refuse_clear_password(true).await?;
    let mut client = ReplicationClient::connect(cfg)
        .await
        .map_err(|e| map_start_error(settings, t, e))?;
    client
        .wait_started()
        .await
        .map_err(|e| map_start_error(settings, t, e))?;
    Ok(client)
}

/// The replication connection's TLS settings (see `PgTls::certificate_name`
/// for verify-ca).
async fn replication_tls(t: &PgTarget) -> Result<pgwire_replication::TlsConfig, Error> {
    let mut tls = t.tls.replication(&t.host);
    if t.tls.effective == crate::pg::tls::SslMode::VerifyCa {
        match t.tls.certificate_name(&t.host, t.port).await {
            Ok(Some(name)) => tls.sni_hostname = Some(name),
            Ok(None) => {}
            Err(text) => {
                let (key, message) = t
                    .tls
                    .explain(&text, &t.host)
                    .unwrap_or_else(|| (format!("sslmode={}", t.tls.mode.as_str()), text));
                return Err(t.tls_error(key, message));
            }
        }
    }
    Ok(tls)
}

fn map_start_error(settings: &SourceSettings, t: &PgTarget, e: PgWireError) -> Error {
    if let PgWireError::Tls(text) = &e {
        if let Some((key, message)) = t.tls.explain(text, &t.host) {
            return t.tls_error(key, message);
        }
    }
    if let PgWireError::Server(msg) = &e {
        if let Some(pid) = pid_from_slot_error(msg) {
            return Error::SlotBusy {
                slot: settings.slot.clone(),
                pid,
            };
        }
    }
    Error::Replication {
        context: format!(
            "starting replication on slot {} at {}",
            settings.slot,
            t.redacted()
        ),
        source: e,
    }
}
