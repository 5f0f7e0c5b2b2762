//! SQL sessions to the configured Postgres; each connection runs on a task of
//! its own. TLS follows `postgres.url`'s sslmode (see `pg::tls`), and a password
//! is never sent in clear text over an unencrypted connection.

use super::target::PgTarget;
use super::tls::{RustlsStream, SslMode};
use crate::error::Error;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::{Client, Socket};

/// An SQL connection's driving future, plain or encrypted.
pub type PgConnection = tokio_postgres::Connection<Socket, RustlsStream<Socket>>;

impl PgTarget {
    /// Opens an SQL session named `outbox-relay` in pg_stat_activity.
    pub async fn connect(&self) -> Result<Client, Error> {
        self.connect_as("outbox-relay").await
    }

    /// Like `connect`, with this `application_name` (shown in pg_stat_activity).
    pub async fn connect_as(&self, application_name: &str) -> Result<Client, Error> {
        self.connect_with(application_name, "").await
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
    ) -> Result<(Client, PgConnection), Error> {
        let mut config: tokio_postgres::Config =
            self.url()
                .parse()
                .map_err(|source| Error::PostgresConnect {
                    url: self.redacted(),
                    source,
                })?;
        if self.is_pinned() {
            config = one_host(&config, &self.host, self.port);
        }
        if self.wants_read_write() {
            config.target_session_attrs(TargetSessionAttrs::ReadWrite);
            if config.get_connect_timeout().is_none() {
                // A host that does not answer must not hold the others up.
                config.connect_timeout(MULTI_HOST_CONNECT_TIMEOUT);
            }
        }
        config.application_name(application_name);
        if !options.is_empty() {
            config.options(options);
        }
        if !self.password().is_empty() {
            config.password(self.password());
        }
        config.ssl_mode(self.tls.tokio_postgres_mode());
        self.refuse_clear_password(false).await?;
        config
            .connect(self.tls.connector())
            .await
            .map_err(|source| self.connect_error(source))
    }

    /// The host that takes writes now, as a target pinned to it (for the
    /// replication connection, which cannot try hosts itself): the target itself
    /// when it names one host, else the first of its hosts that accepts a
    /// read-write session — after a fail-over, the promoted standby.
    pub async fn primary(&self) -> Result<PgTarget, Error> {
        if self.hosts().len() < 2 || self.is_pinned() {
            return Ok(self.clone());
        }
        let mut failures = Vec::new();
        let mut transient = false;
        for i in 0..self.hosts().len() {
            let one = self.pinned_to(i);
            match one.connect_raw("outbox-relay primary check", "").await {
                // Dropping the session ends it.
                Ok(_) => return Ok(one),
                Err(e) => {
                    transient |= e.is_transient();
                    failures.push(format!("{}:{}: {e}", one.host, one.port));
                }
            }
        }
        Err(Error::PostgresNoPrimary {
            url: self.redacted(),
            failures: failures.join("; "),
            transient,
        })
    }

    /// The error for a failed connection: one naming the TLS key at fault when
    /// the TLS negotiation failed.
    fn connect_error(&self, source: tokio_postgres::Error) -> Error {
        let text = crate::redact::error_chain(&source);
        if text.contains("TLS") || text.contains("certificate") {
            if let Some((key, message)) = self.tls.explain(&text, &self.host) {
                return self.tls_error(key, message);
            }
        }
        Error::PostgresConnect {
            url: self.redacted(),
            source,
        }
    }

    pub(crate) fn tls_error(&self, key: String, message: String) -> Error {
        Error::PostgresTls {
            url: self.redacted(),
            key,
            message,
        }
    }

    /// Refuses to go on when the server would have the password in clear text
    /// or MD5 over an unencrypted connection (unless
    /// `postgres.allow_insecure_password`). It asks the server first, on a
    /// connection of its own that sends no password: the same start-up message
    /// (so the same pg_hba.conf line applies) and, under `sslmode=prefer`, the
    /// same TLS request. Nothing to ask without a password, over a Unix socket,
    /// or when TLS is required anyway.
    pub async fn refuse_clear_password(&self, replication: bool) -> Result<(), Error> {
        if self.allow_insecure_password
            || self.password().is_empty()
            || self.is_unix_socket()
            || self.tls.effective.requires_tls()
        {
            return Ok(());
        }
        let hosts = match self.is_pinned() {
            true => vec![(self.host.clone(), self.port)],
            false => self.hosts().to_vec(),
        };
        for (host, port) in &hosts {
            self.refuse_clear_password_at(host, *port, replication)
                .await?;
        }
        Ok(())
    }

    async fn refuse_clear_password_at(
        &self,
        host: &str,
        port: u16,
        replication: bool,
    ) -> Result<(), Error> {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect((host, port)).await?;
            if self.tls.effective == SslMode::Prefer {
                s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
                if s.read_u8().await? == b'S' {
                    return Ok::<_, std::io::Error>(None);
                }
            }
            let mut body = Vec::new();
            body.extend_from_slice(&196608i32.to_be_bytes());
            let mut param = |k: &str, v: &str| {
                body.extend_from_slice(k.as_bytes());
                body.push(0);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            };
            param("user", &self.user);
            param("database", &self.dbname);
            if replication {
                param("replication", "database");
            }
            body.push(0);
            let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
            msg.extend_from_slice(&body);
            s.write_all(&msg).await?;
            let tag = s.read_u8().await?;
            let len = s.read_i32().await?;
            if tag != b'R' || len < 8 {
                return Ok(None);
            }
            Ok(match s.read_i32().await? {
                3 => Some("clear text"),
                5 => Some("MD5"),
                _ => None,
            })
        };
        match tokio::time::timeout(Duration::from_secs(10), probe).await {
            Ok(Ok(Some(method))) => Err(Error::InsecurePassword {
                url: self.pinned_to_host(host, port).redacted(),
                method,
            }),
            // Unreachable or slow: the real connection says why.
            _ => Ok(()),
        }
    }
}

/// Each host's connection attempt, with several hosts, when the URL sets no
/// `connect_timeout`.
pub const MULTI_HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `config` with `host:port` as its only host (the driver cannot drop hosts
/// from a parsed config, so every other setting is copied over).
fn one_host(config: &tokio_postgres::Config, host: &str, port: u16) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    one.host(host).port(port);
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    if let Some(t) = config.get_connect_timeout() {
        one.connect_timeout(*t);
    }
    if let Some(t) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*t);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(i) = config.get_keepalives_interval() {
        one.keepalives_interval(i);
    }
    if let Some(r) = config.get_keepalives_retries() {
        one.keepalives_retries(r);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .channel_binding(config.get_channel_binding())
        .target_session_attrs(config.get_target_session_attrs());
    one
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

/// The relay's own sessions (TLS by `sslmode`, `sslrootcert` and the other libpq
/// keys, no clear-text password) for the client crate's Processor:
/// `Processor::with_connect(Arc::new(target), table)`.
impl outbox_relay_client::Connect for PgTarget {
    fn connect<'a>(
        &'a self,
        application_name: &'a str,
    ) -> outbox_relay_client::connect::ConnectFuture<'a> {
        Box::pin(async move {
            let (client, connection) = self
                .connect_raw(application_name, "")
                .await
                .map_err(|e| outbox_relay_client::Error::Connect(e.to_string()))?;
            Ok(outbox_relay_client::Session {
                client,
                notifications: outbox_relay_client::connect::drive(connection),
            })
        })
    }
}
