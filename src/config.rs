//! Configuration, a leaf of the crate: TOML with unknown keys refused, defaults
//! in code, environment overrides (`OUTBOX_RELAY_<SECTION>_<KEY>`), validated
//! once at start-up into typed values (a parsed Postgres target, table names, the
//! column mapping) with messages that name the key. Everything else takes these
//! typed values; nothing parses a setting again.

mod inbox;

pub use inbox::{InboxConfig, OnInvalid, QueueType};

use crate::pg::target::PgTarget;
use outbox_relay_client::table::{check_identifier, TableName};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Sections of the configuration file, in the order they are documented.
pub const SECTIONS: &[&str] = &[
    "postgres", "amqp", "relay", "retry", "inbox", "metrics", "log",
];

/// Environment variables with the prefix that are not configuration keys
/// (read by the command line parser).
const RESERVED_ENV: &[&str] = &["OUTBOX_RELAY_CONFIG"];

/// Problems with the configuration; each message names the key or file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass an existing file with --config)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// The error with every password of a URL it quotes removed: a refusal may
    /// echo a value, and a URL typed into the wrong key is still a secret.
    fn without_passwords(self) -> Self {
        use crate::redact::scrub_urls;
        match self {
            ConfigError::Parse { path, message } => ConfigError::Parse {
                path,
                message: scrub_urls(&message),
            },
            ConfigError::Env { var, message } => ConfigError::Env {
                var: scrub_urls(&var),
                message: scrub_urls(&message),
            },
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key: scrub_urls(&key),
                message: scrub_urls(&message),
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

/// The whole configuration of one relay, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub amqp: AmqpConfig,
    pub relay: RelayConfig,
    pub retry: RetryConfig,
    /// `[inbox]`, when the file has the section (the `inbox` mode needs it).
    pub inbox: Option<InboxConfig>,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// `[postgres]`, validated.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Where and as whom to connect (the password never shows in `Debug`).
    pub target: PgTarget,
    /// The outbox table.
    pub table: TableName,
    /// Logical replication slot (pgoutput) the relay consumes.
    pub slot: String,
    /// Publication that covers the outbox table (inserts only).
    pub publication: String,
    /// `run` creates a missing publication and slot.
    pub create_missing: bool,
    /// How often the applied LSN is reported to the server.
    pub status_interval: Duration,
    /// Longest wait between reconnect attempts to Postgres.
    pub reconnect_backoff_max: Duration,
    /// At start-up, how long to wait for a slot held by another process.
    pub slot_wait: Duration,
    /// Column layout of the outbox table, by name.
    pub mapping: Mapping,
    /// The column names of `mapping`.
    pub columns: ColumnMapping,
    /// What happens to a row after its message is acked (mapping default applied).
    pub on_success: OnSuccess,
    /// Published rows older than this are deleted in the background (`mark_published` only).
    pub retention: Duration,
    /// The relay-owned table that keeps failed and parked messages in commit order.
    pub retry_table: TableName,
    /// Emit a non-transactional logical message this often; zero: off.
    pub heartbeat_interval: Duration,
    /// When another process holds the slot: wait as a hot standby (true) or give up.
    pub standby: bool,
    /// Longest a statement of the relay's SQL sessions (retry store, housekeeping) may run.
    pub statement_timeout: Duration,
    /// Longest such a statement waits for a lock.
    pub lock_timeout: Duration,
    /// Longest the replication connection may stay silent while the relay reads it;
    /// half of it, the relay asks the server for a sign of life.
    pub replication_timeout: Duration,
    /// The outbox split over several relays (`slot` and `publication` above are
    /// this process's shard's when it names one).
    pub sharding: Sharding,
    /// Rows of the table, or logical decoding messages.
    pub source: Source,
    /// The prefix of the messages the relay publishes (`source = "messages"`).
    pub message_prefix: String,
}

/// `[amqp]`, validated.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// AMQP 0-9-1 URLs, one per node of the broker (passwords never show in
    /// `Debug`): the first that answers is used; when its connection is lost, the
    /// next.
    pub nodes: Vec<AmqpUrl>,
    /// Topic exchange the messages go to, as configured (a name, or a template).
    pub exchange: String,
    /// Where each message goes and what it carries: exchange, routing key,
    /// headers, properties, body.
    pub wire: wire::WireShape,
    /// Declare the exchange (topic, durable) at start-up.
    pub declare_exchange: bool,
    /// Most messages held in memory at once (backpressure on the WAL stream).
    pub max_in_flight: usize,
    /// Most message bytes held in memory at once.
    pub max_in_flight_bytes: usize,
    /// A message body larger than this is not published; it goes to retry state.
    pub max_message_bytes: usize,
    /// Exchange that dead messages are published to, if any.
    pub dead_letter_exchange: Option<String>,
    /// Longest wait between reconnect attempts to the broker.
    pub reconnect_backoff_max: Duration,
    /// Longest wait for a connection to be ready.
    pub connect_timeout: Duration,
    /// TLS for `amqps://`: the CA and the client certificate, read at start-up.
    pub tls: AmqpTls,
}

/// TLS settings of an `amqps://` connection; `Debug` never shows the key.
#[derive(Clone, Default)]
pub struct AmqpTls(pub lapin::tcp::OwnedTLSConfig);

impl fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTls")
            .field("ca", &self.0.cert_chain.is_some())
            .field("client_certificate", &self.0.identity.is_some())
            .finish()
    }
}

/// An AMQP URL; `Debug` shows it without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        crate::redact::amqp_url(&self.0)
    }

    /// `host:port`: the node's name in logs, metric labels and `/readyz`.
    pub fn node(&self) -> String {
        crate::redact::amqp_node(&self.0)
    }
}

impl AmqpConfig {
    /// The nodes' URLs without passwords, comma-separated, for logs.
    pub fn redacted(&self) -> String {
        self.nodes
            .iter()
            .map(AmqpUrl::redacted)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How strictly per-aggregate order is kept while messages are unconfirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// At most one unconfirmed message per aggregate: order holds under failures.
    Strict,
    /// An aggregate may pipeline: faster for one hot aggregate, order holds unless a message fails.
    Relaxed,
}

/// `[relay]`, validated.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub ordering: Ordering,
    /// On SIGTERM/SIGINT, how long to wait for outstanding confirms.
    pub shutdown_timeout: Duration,
    /// `/readyz` turns 503 when work is pending and the applied LSN has not moved
    /// for this long.
    pub stall_timeout: Duration,
}

/// `[retry]`, validated.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// First wait before re-publishing a failed message.
    pub backoff_base: Duration,
    /// Longest wait between re-publish attempts.
    pub backoff_max: Duration,
    /// Retries before a message is dead, when the row has no max_retries of its own.
    pub max_retries: i32,
    /// A publish without a confirm after this long is a failure.
    pub publish_timeout: Duration,
    /// When the head of an aggregate's retry queue goes dead: release the rest or hold them.
    pub on_dead: OnDead,
    /// Dead rows older than this are deleted from the retry table; `None`: kept.
    pub dead_retention: Option<Duration>,
}

/// `[metrics]`, validated.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint; `None`: off.
    pub listen: Option<SocketAddr>,
    /// Bearer token `/metrics` and `/readyz` require (`metrics.token_file`).
    pub token: Option<crate::redact::Secret>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `outbox_relay=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// What happens to an aggregate's later messages when its head goes dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDead {
    /// Release the rest of the aggregate's queue.
    Skip,
    /// Hold the aggregate until an operator requeues or removes the dead message.
    Block,
}

/// The prefix of the relay's own heartbeat messages (non-transactional).
pub const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// Where the outbox messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Rows inserted into the outbox table (`postgres.table`).
    #[default]
    Table,
    /// Transactional logical decoding messages
    /// (`pg_logical_emit_message(true, prefix, content)`): no table at all.
    Messages,
}

/// What the relay does to an outbox row once its message is acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSuccess {
    /// `status = 'published'` (batched, off the publish path); needs a status column.
    MarkPublished,
    /// Delete the row (batched).
    Delete,
    /// Leave the row alone.
    Keep,
}

impl OnSuccess {
    /// The value as `postgres.on_success` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnSuccess::MarkPublished => "mark_published",
            OnSuccess::Delete => "delete",
            OnSuccess::Keep => "keep",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Reads the file, applies `OUTBOX_RELAY_*` overrides from the process
    /// environment and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::files::read_small_text(&path.display().to_string()).map_err(|m| {
            ConfigError::Read {
                path: path.display().to_string(),
                source: std::io::Error::other(m),
            }
        })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses `text` (named `origin` in messages), applies the overrides in `env`, validates.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::from_toml_unscrubbed(text, origin, env).map_err(ConfigError::without_passwords)
    }

    fn from_toml_unscrubbed(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin.to_string(),
                    message: describe_toml_error(&e, text),
                })?;
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !RESERVED_ENV.contains(&k.as_str()))
            .collect();
        overrides.sort();
        for (var, value) in overrides {
            apply_env(&mut table, &var, &value)?;
        }
        // Deserializing the parsed table: the error names the key (`in relay.x`) and
        // carries no source text, so no line of the file is echoed.
        let raw = raw::Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Parse {
                path: origin.to_string(),
                message: one_line(&e.to_string()),
            }
        })?;
        raw.validate()
    }
}

/// The raw file as it deserializes, before validation: strings where the typed
/// configuration has parsed values.
pub mod mapping;
mod raw;
pub mod sharding;
pub mod wire;

pub use mapping::{ColumnMapping, Mapping};
pub use sharding::Sharding;

/// A password from a file (a Kubernetes secret, say): its content without the
/// final line break.
fn read_password(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = crate::files::read_small_text(path).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        message: format!("{path} {e}: give a readable file that holds only the password"),
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(ConfigError::Invalid {
            key: key.to_string(),
            message: format!("{path} is empty: it must hold the password"),
        });
    }
    Ok(password.to_string())
}

/// `url` with `password` set (percent-encoded).
fn with_amqp_password(url: &str, password: &str) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("cannot be parsed: {e}"))?;
    if u.username().is_empty() {
        return Err("names no user: use amqps://user@host:5671/%2f with amqp.password_file".into());
    }
    u.set_password(Some(password))
        .map_err(|_| "cannot hold a password".to_string())?;
    Ok(u.to_string())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The CA and client certificate for `amqps://`, read and checked now so that
/// a wrong file is an error naming its key.
fn amqp_tls(ca: &str, cert: &str, key: &str) -> Result<AmqpTls, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |k: &str, m: String| ConfigError::Invalid {
        key: k.to_string(),
        message: m,
    };
    let read = |k: &str, path: &str| {
        crate::files::read_small(path).map_err(|e| invalid(k, format!("{path} {e}")))
    };
    let certs = |k: &str, path: &str, bytes: &[u8]| -> Result<(), ConfigError> {
        let n = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(k, format!("{path} is not a PEM certificate file ({e})")))?
            .len();
        if n == 0 {
            return Err(invalid(k, format!("{path} holds no PEM certificate")));
        }
        Ok(())
    };
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    if !ca.is_empty() {
        let bytes = read("amqp.tls_ca_file", ca)?;
        certs("amqp.tls_ca_file", ca, &bytes)?;
        tls.cert_chain = Some(String::from_utf8_lossy(&bytes).into_owned());
    }
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => {}
        (false, true) => {
            return Err(invalid(
                "amqp.tls_key_file",
                "is empty while amqp.tls_cert_file is set: give both, or neither".into(),
            ))
        }
        (true, false) => {
            return Err(invalid(
                "amqp.tls_cert_file",
                "is empty while amqp.tls_key_file is set: give both, or neither".into(),
            ))
        }
        (false, false) => {
            let pem = read("amqp.tls_cert_file", cert)?;
            certs("amqp.tls_cert_file", cert, &pem)?;
            let key_pem = read("amqp.tls_key_file", key)?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                invalid(
                    "amqp.tls_key_file",
                    format!("{key} is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
                )
            })?;
            tls.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key: key_pem });
        }
    }
    Ok(AmqpTls(tls))
}

fn apply_env(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let rest = &var[ENV_PREFIX.len()..];
    let lower = rest.to_ascii_lowercase();
    let Some(section) = SECTIONS
        .iter()
        .find(|s| lower.starts_with(&format!("{s}_")))
    else {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: format!(
                "not a configuration key: expected {ENV_PREFIX}<SECTION>_<KEY> with SECTION one of {} (unset it or fix the name)",
                SECTIONS.join(", ").to_ascii_uppercase()
            ),
        });
    };
    let key = &lower[section.len() + 1..];
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: format!("[{section}] in the config file is not a table"),
        });
    };
    section_table.insert(key.to_string(), parsed);
    Ok(())
}

/// A TOML syntax error as line, column and message — never the offending line
/// itself, which may hold a URL with a password.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = one_line(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses "200ms", "5s", "10m", "1h", "7d", "0s", or combinations like "1m30s" (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. \"200ms\", \"5s\", \"1h\""))
}

#[cfg(test)]
mod tests;
