//! SQL sessions to the configured Postgres; each connection runs on a task of its own.

use super::target::PgTarget;
use crate::error::Error;
use tokio_postgres::{Client, NoTls};

impl PgTarget {
    /// Opens an SQL session named `outbox-relay` in pg_stat_activity.
    pub async fn connect(&self) -> Result<Client, Error> {
        self.connect_as("outbox-relay").await
    }

    /// Like `connect`, with this `application_name` (shown in pg_stat_activity).
    pub async fn connect_as(&self, application_name: &str) -> Result<Client, Error> {
        let (client, connection) = self.connect_raw(application_name, "").await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres sql connection ended");
            }
        });
        Ok(client)
    }

    /// Like `connect_as`, with session settings (`options`, e.g.
    /// `-c statement_timeout=30000`).
    pub async fn connect_with(
        &self,
        application_name: &str,
        options: &str,
    ) -> Result<Client, Error> {
        let (client, connection) = self.connect_raw(application_name, options).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres sql connection ended");
            }
        });
        Ok(client)
    }

    /// Connects and hands back the connection future too, for a caller that
    /// polls it itself (to receive notifications).
    pub async fn connect_raw(
        &self,
        application_name: &str,
        options: &str,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        Error,
    > {
        let mut config: tokio_postgres::Config =
            self.url()
                .parse()
                .map_err(|source| Error::PostgresConnect {
                    url: self.redacted(),
                    source,
                })?;
        config.application_name(application_name);
        if !options.is_empty() {
            config.options(options);
        }
        config
            .connect(NoTls)
            .await
            .map_err(|source| Error::PostgresConnect {
                url: self.redacted(),
                source,
            })
    }
}

/// `application_name` for a relay session of `role` on `slot` (at most 63 bytes).
pub fn application_name(role: &str, slot: &str) -> String {
    let mut name = format!("outbox-relay {role} {slot}");
    name.truncate(63);
    name
}

/// Session settings that keep one of the relay's own statements from waiting
/// forever: `statement_timeout` and `lock_timeout`, in milliseconds.
pub fn session_timeouts(statement: std::time::Duration, lock: std::time::Duration) -> String {
    format!(
        "-c statement_timeout={} -c lock_timeout={}",
        statement.as_millis().max(1),
        lock.as_millis().max(1)
    )
}
