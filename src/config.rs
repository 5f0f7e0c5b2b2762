//! Configuration, a leaf of the crate: TOML with unknown keys refused, defaults
//! in code, environment overrides (`OUTBOX_RELAY_<SECTION>_<KEY>`), validated
//! once at start-up into typed values (a parsed Postgres target, table names, the
//! column mapping) with messages that name the key. Everything else takes these
//! typed values; nothing parses a setting again.

mod inbox;

pub use inbox::{InboxConfig, OnInvalid, QueueType};

use crate::pg::names::{check_identifier, TableName};
use crate::pg::target::PgTarget;
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
}

/// `[amqp]`, validated.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// AMQP 0-9-1 URL (the password never shows in `Debug`).
    pub url: AmqpUrl,
    /// Topic exchange the messages go to.
    pub exchange: String,
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

/// Which columns hold the outbox fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// Event-Forge `outbox_messages`: id, aggregate_type, aggregate_id, event_type,
    /// payload, metadata, created_at, status, retry_count, max_retries, scheduled_at, ...
    EventForge,
    /// Debezium-style outbox: id, aggregatetype, aggregateid, type, payload.
    Debezium,
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

/// Column names of one table layout (Event-Forge by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub id: &'static str,
    pub aggregate_type: &'static str,
    pub aggregate_id: &'static str,
    pub event_type: &'static str,
    pub payload: &'static str,
    pub metadata: Option<&'static str>,
    pub created_at: Option<&'static str>,
    pub scheduled_at: Option<&'static str>,
    pub max_retries: Option<&'static str>,
    /// The Event-Forge status column, when the layout has one.
    pub status: Option<&'static str>,
}

impl ColumnMapping {
    /// The Event-Forge `outbox_messages` layout.
    pub const EVENT_FORGE: ColumnMapping = ColumnMapping {
        id: "id",
        aggregate_type: "aggregate_type",
        aggregate_id: "aggregate_id",
        event_type: "event_type",
        payload: "payload",
        metadata: Some("metadata"),
        created_at: Some("created_at"),
        scheduled_at: Some("scheduled_at"),
        max_retries: Some("max_retries"),
        status: Some("status"),
    };

    /// A Debezium-style outbox: id, aggregatetype, aggregateid, type, payload.
    pub const DEBEZIUM: ColumnMapping = ColumnMapping {
        id: "id",
        aggregate_type: "aggregatetype",
        aggregate_id: "aggregateid",
        event_type: "type",
        payload: "payload",
        metadata: None,
        created_at: None,
        scheduled_at: None,
        max_retries: None,
        status: None,
    };

    pub fn of(mapping: Mapping) -> ColumnMapping {
        match mapping {
            Mapping::EventForge => Self::EVENT_FORGE,
            Mapping::Debezium => Self::DEBEZIUM,
        }
    }

    /// The columns every row must have.
    pub fn required(&self) -> [&'static str; 5] {
        [
            self.id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.payload,
        ]
    }

    /// Required columns absent from `columns`.
    pub fn missing_required(&self, columns: &[String]) -> Vec<String> {
        self.required()
            .iter()
            .filter(|c| !columns.iter().any(|have| have == *c))
            .map(|c| c.to_string())
            .collect()
    }
}

impl Config {
    /// Reads the file, applies `OUTBOX_RELAY_*` overrides from the process
    /// environment and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses `text` (named `origin` in messages), applies the overrides in `env`, validates.
    pub fn from_toml_with_env(
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
mod raw {
    use super::*;

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Config {
        pub postgres: Postgres,
        pub amqp: Amqp,
        pub relay: Relay,
        pub retry: Retry,
        pub inbox: Option<super::inbox::RawInbox>,
        pub metrics: Metrics,
        pub log: LogConfig,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Postgres {
        pub url: String,
        pub table: String,
        pub slot: String,
        pub publication: String,
        pub create_missing: bool,
        #[serde(deserialize_with = "de_duration")]
        pub status_interval: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub reconnect_backoff_max: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub slot_wait: Duration,
        pub mapping: Mapping,
        pub on_success: Option<OnSuccess>,
        #[serde(deserialize_with = "de_duration")]
        pub retention: Duration,
        pub retry_table: String,
        #[serde(deserialize_with = "de_duration")]
        pub heartbeat_interval: Duration,
        pub standby: bool,
        #[serde(deserialize_with = "de_duration")]
        pub statement_timeout: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub lock_timeout: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub replication_timeout: Duration,
        pub password_file: String,
        pub allow_insecure_password: bool,
    }

    impl Default for Postgres {
        fn default() -> Self {
            Self {
                url: "postgresql://postgres@127.0.0.1:5432/test".into(),
                table: "public.outbox_messages".into(),
                slot: "outbox_relay".into(),
                publication: "outbox_relay".into(),
                create_missing: true,
                status_interval: Duration::from_millis(100),
                reconnect_backoff_max: Duration::from_secs(30),
                slot_wait: Duration::from_secs(10),
                mapping: Mapping::EventForge,
                on_success: None,
                retention: Duration::from_secs(7 * 86400),
                retry_table: "public.outbox_relay_parked".into(),
                heartbeat_interval: Duration::ZERO,
                standby: false,
                statement_timeout: Duration::from_secs(30),
                lock_timeout: Duration::from_secs(5),
                replication_timeout: Duration::from_secs(60),
                password_file: String::new(),
                allow_insecure_password: false,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Amqp {
        pub url: String,
        pub exchange: String,
        pub declare_exchange: bool,
        pub max_in_flight: usize,
        pub max_in_flight_bytes: usize,
        pub max_message_bytes: usize,
        pub dead_letter_exchange: String,
        #[serde(deserialize_with = "de_duration")]
        pub reconnect_backoff_max: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub connect_timeout: Duration,
        pub password_file: String,
        pub allow_insecure_password: bool,
        pub tls_ca_file: String,
        pub tls_cert_file: String,
        pub tls_key_file: String,
    }

    impl Default for Amqp {
        fn default() -> Self {
            Self {
                url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
                exchange: "events".into(),
                declare_exchange: true,
                max_in_flight: 2048,
                max_in_flight_bytes: 16 * 1024 * 1024,
                max_message_bytes: 8 * 1024 * 1024,
                dead_letter_exchange: String::new(),
                reconnect_backoff_max: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                password_file: String::new(),
                allow_insecure_password: false,
                tls_ca_file: String::new(),
                tls_cert_file: String::new(),
                tls_key_file: String::new(),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Relay {
        pub ordering: Ordering,
        #[serde(deserialize_with = "de_duration")]
        pub shutdown_timeout: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub stall_timeout: Duration,
    }

    impl Default for Relay {
        fn default() -> Self {
            Self {
                ordering: Ordering::Strict,
                shutdown_timeout: Duration::from_secs(10),
                stall_timeout: Duration::from_secs(120),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Retry {
        #[serde(deserialize_with = "de_duration")]
        pub backoff_base: Duration,
        #[serde(deserialize_with = "de_duration")]
        pub backoff_max: Duration,
        pub max_retries: i32,
        #[serde(deserialize_with = "de_duration")]
        pub publish_timeout: Duration,
        pub on_dead: OnDead,
        #[serde(deserialize_with = "de_duration")]
        pub dead_retention: Duration,
    }

    impl Default for Retry {
        fn default() -> Self {
            Self {
                backoff_base: Duration::from_secs(5),
                backoff_max: Duration::from_secs(3600),
                max_retries: 3,
                publish_timeout: Duration::from_secs(30),
                on_dead: OnDead::Skip,
                dead_retention: Duration::from_secs(30 * 86400),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Metrics {
        pub listen: String,
        pub token_file: String,
    }

    impl Default for Metrics {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:9187".into(),
                token_file: String::new(),
            }
        }
    }

    fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }

    fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn positive(key: &str, d: Duration, example: &str) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            return Err(invalid(
                key,
                format!("must be greater than 0 (e.g. \"{example}\")"),
            ));
        }
        Ok(d)
    }

    impl Config {
        /// Checks values that parse but cannot work, and returns the typed configuration.
        pub fn validate(self) -> Result<super::Config, ConfigError> {
            let Config {
                postgres: pg,
                amqp,
                relay,
                retry,
                inbox,
                metrics,
                log,
            } = self;
            let inbox = inbox.map(|i| i.validate()).transpose()?;
            let mut target = PgTarget::parse(&pg.url).map_err(|m| invalid("postgres.url", m))?;
            if !pg.password_file.is_empty() {
                if target.has_password() {
                    return Err(invalid(
                        "postgres.password_file",
                        "postgres.url holds a password too: keep only one of them",
                    ));
                }
                target = target
                    .with_password(read_password("postgres.password_file", &pg.password_file)?);
            }
            target.allow_insecure_password = pg.allow_insecure_password;
            let table = TableName::parse(&pg.table).map_err(|m| invalid("postgres.table", m))?;
            check_identifier(&pg.slot).map_err(|m| invalid("postgres.slot", m))?;
            check_identifier(&pg.publication).map_err(|m| invalid("postgres.publication", m))?;
            let status_interval =
                positive("postgres.status_interval", pg.status_interval, "100ms")?;
            let retry_table = TableName::parse(&pg.retry_table)
                .map_err(|m| invalid("postgres.retry_table", m))?;
            let statement_timeout =
                positive("postgres.statement_timeout", pg.statement_timeout, "30s")?;
            let lock_timeout = positive("postgres.lock_timeout", pg.lock_timeout, "5s")?;
            if pg.replication_timeout < Duration::from_secs(2) {
                return Err(invalid(
                    "postgres.replication_timeout",
                    "must be at least 2s (e.g. \"60s\"): half of it, the relay asks the server for a sign of life",
                ));
            }
            if pg.mapping == Mapping::Debezium && pg.on_success == Some(OnSuccess::MarkPublished) {
                return Err(invalid(
                    "postgres.on_success",
                    "mark_published needs a status column; Debezium-style tables use \"delete\" or \"keep\"",
                ));
            }
            let on_success = pg.on_success.unwrap_or(match pg.mapping {
                Mapping::EventForge => OnSuccess::MarkPublished,
                Mapping::Debezium => OnSuccess::Keep,
            });

            if !(amqp.url.starts_with("amqp://") || amqp.url.starts_with("amqps://")) {
                return Err(invalid(
                    "amqp.url",
                    "must start with amqp:// (e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\")",
                ));
            }
            let uri = lapin::uri::AMQPUri::from_str(&amqp.url)
                .map_err(|e| invalid("amqp.url", format!("cannot be parsed: {e}")))?;
            let mut amqp_url = amqp.url.clone();
            if !amqp.password_file.is_empty() {
                if url::Url::parse(&amqp.url).is_ok_and(|u| u.password().is_some()) {
                    return Err(invalid(
                        "amqp.password_file",
                        "amqp.url holds a password too: keep only one of them",
                    ));
                }
                let password = read_password("amqp.password_file", &amqp.password_file)?;
                amqp_url =
                    with_amqp_password(&amqp.url, &password).map_err(|m| invalid("amqp.url", m))?;
            }
            let tls_wanted = !(amqp.tls_ca_file.is_empty()
                && amqp.tls_cert_file.is_empty()
                && amqp.tls_key_file.is_empty());
            let amqps = amqp.url.starts_with("amqps://");
            if tls_wanted && !amqps {
                return Err(invalid(
                    "amqp.url",
                    "amqp.tls_* files are set but the URL is amqp://: use amqps:// (e.g. amqps://host:5671/%2f)",
                ));
            }
            let external = uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
            if external && amqp.tls_cert_file.is_empty() {
                return Err(invalid(
                    "amqp.url",
                    "auth_mechanism=external needs a client certificate: set amqp.tls_cert_file and amqp.tls_key_file",
                ));
            }
            if !amqps
                && !external
                && !amqp.allow_insecure_password
                && !is_loopback(&uri.authority.host)
                && (url::Url::parse(&amqp.url).is_ok_and(|u| u.password().is_some())
                    || !amqp.password_file.is_empty())
            {
                return Err(invalid(
                    "amqp.url",
                    format!("amqp:// to {} would send the password in clear text: use amqps:// (or set amqp.allow_insecure_password = true to accept the risk)", uri.authority.host),
                ));
            }
            let tls = amqp_tls(&amqp.tls_ca_file, &amqp.tls_cert_file, &amqp.tls_key_file)?;
            let connect_timeout = positive("amqp.connect_timeout", amqp.connect_timeout, "10s")?;
            if amqp.exchange.is_empty() {
                return Err(invalid(
                    "amqp.exchange",
                    "must name a topic exchange (the default exchange cannot route by topic)",
                ));
            }
            if amqp.max_in_flight == 0 {
                return Err(invalid("amqp.max_in_flight", "must be at least 1"));
            }
            if amqp.max_in_flight_bytes < 1024 {
                return Err(invalid("amqp.max_in_flight_bytes", "must be at least 1024"));
            }
            if amqp.max_message_bytes == 0 {
                return Err(invalid("amqp.max_message_bytes", "must be at least 1"));
            }

            let listen = match metrics.listen.as_str() {
                "" => None,
                s => Some(s.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "metrics.listen",
                        format!(
                            "{e}; use host:port like \"127.0.0.1:9187\", or \"\" to turn it off"
                        ),
                    )
                })?),
            };

            if retry.max_retries < 0 {
                return Err(invalid("retry.max_retries", "must be 0 or more"));
            }
            let publish_timeout = positive("retry.publish_timeout", retry.publish_timeout, "30s")?;
            let backoff_base = positive("retry.backoff_base", retry.backoff_base, "5s")?;
            if retry.backoff_max < backoff_base {
                return Err(invalid(
                    "retry.backoff_max",
                    "must not be smaller than retry.backoff_base",
                ));
            }

            Ok(super::Config {
                postgres: PostgresConfig {
                    target,
                    table,
                    slot: pg.slot,
                    publication: pg.publication,
                    create_missing: pg.create_missing,
                    status_interval,
                    reconnect_backoff_max: pg.reconnect_backoff_max,
                    slot_wait: pg.slot_wait,
                    mapping: pg.mapping,
                    columns: ColumnMapping::of(pg.mapping),
                    on_success,
                    retention: pg.retention,
                    retry_table,
                    heartbeat_interval: pg.heartbeat_interval,
                    standby: pg.standby,
                    statement_timeout,
                    lock_timeout,
                    replication_timeout: pg.replication_timeout,
                },
                amqp: AmqpConfig {
                    url: AmqpUrl(amqp_url),
                    exchange: amqp.exchange,
                    declare_exchange: amqp.declare_exchange,
                    max_in_flight: amqp.max_in_flight,
                    max_in_flight_bytes: amqp.max_in_flight_bytes,
                    max_message_bytes: amqp.max_message_bytes,
                    dead_letter_exchange: (!amqp.dead_letter_exchange.is_empty())
                        .then_some(amqp.dead_letter_exchange),
                    reconnect_backoff_max: amqp.reconnect_backoff_max,
                    connect_timeout,
                    tls,
                },
                relay: RelayConfig {
                    ordering: relay.ordering,
                    shutdown_timeout: relay.shutdown_timeout,
                    stall_timeout: positive("relay.stall_timeout", relay.stall_timeout, "2m")?,
                },
                retry: RetryConfig {
                    backoff_base,
                    backoff_max: retry.backoff_max,
                    max_retries: retry.max_retries,
                    publish_timeout,
                    on_dead: retry.on_dead,
                    dead_retention: (!retry.dead_retention.is_zero())
                        .then_some(retry.dead_retention),
                },
                inbox,
                metrics: MetricsConfig {
                    listen,
                    token: match metrics.token_file.as_str() {
                        "" => None,
                        path => Some(crate::redact::Secret::new(read_password(
                            "metrics.token_file",
                            path,
                        )?)),
                    },
                },
                log,
            })
        }
    }
}

/// A password from a file (a Kubernetes secret, say): its content without the
/// final line break.
fn read_password(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        message: format!(
            "{path} cannot be read ({e}): give a readable file that holds only the password"
        ),
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
        std::fs::read(path).map_err(|e| invalid(k, format!("{path} cannot be read ({e})")))
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
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(
            text,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_example_config_documents_the_defaults() {
        let example = load(include_str!("../config.example.toml"), &[]).unwrap();
        let defaults = load("", &[]).unwrap();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.postgres.table.to_string(), "public.outbox_messages");
        assert_eq!(c.postgres.status_interval, Duration::from_millis(100));
        assert_eq!(c.postgres.on_success, OnSuccess::MarkPublished);
        assert_eq!(c.amqp.exchange, "events");
        assert_eq!(c.amqp.dead_letter_exchange, None);
        assert_eq!(c.relay.ordering, Ordering::Strict);
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
    }

    #[test]
    fn typed_values_come_out_of_validation() {
        let c = load(
            "[postgres]\nurl = \"postgresql://relay@db:6543/app\"\ntable = \"app.out\"\nmapping = \"debezium\"\n[metrics]\nlisten = \"\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.postgres.target.port, 6543);
        assert_eq!(c.postgres.table.schema, "app");
        assert_eq!(c.postgres.columns, ColumnMapping::DEBEZIUM);
        assert_eq!(c.postgres.on_success, OnSuccess::Keep);
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("[postgres]\nslott = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("slott"), "{e}");
        let e = load("[nope]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            "[postgres]\nslot = \"a\"\n[amqp]\nmax_in_flight = 5\n",
            &[
                ("OUTBOX_RELAY_POSTGRES_SLOT", "b"),
                ("OUTBOX_RELAY_AMQP_MAX_IN_FLIGHT", "7"),
                ("OUTBOX_RELAY_RETRY_BACKOFF_BASE", "1s"),
                ("OUTBOX_RELAY_CONFIG", "ignored.toml"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.postgres.slot, "b");
        assert_eq!(c.amqp.max_in_flight, 7);
        assert_eq!(c.retry.backoff_base, Duration::from_secs(1));
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = load("", &[("OUTBOX_RELAY_POSTGRES_SLOTT", "b")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("slott"), "{e}");
        let e = load("", &[("OUTBOX_RELAY_NOPE", "b")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OUTBOX_RELAY_NOPE"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        for (text, key) in [
            ("[postgres]\nslot = \"Bad-Name\"\n", "postgres.slot"),
            ("[postgres]\ntable = \"a;b\"\n", "postgres.table"),
            ("[postgres]\nurl = \"postgresql://h/db\"\n", "postgres.url"),
            ("[amqp]\nmax_in_flight = 0\n", "amqp.max_in_flight"),
            ("[amqp]\nurl = \"http://x\"\n", "amqp.url"),
            ("[relay]\nshutdown_timeout = \"10\"\n", "shutdown_timeout"),
            ("[retry]\nbackoff_max = \"1s\"\n", "retry.backoff_max"),
            ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
            (
                "[postgres]\nmapping = \"debezium\"\non_success = \"mark_published\"\n",
                "postgres.on_success",
            ),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let c = load(
            "[postgres]\nurl = \"postgresql://u:hunter2@h/db\"\n[amqp]\nurl = \"amqp://u:hunter3@h:5672/%2f\"\nallow_insecure_password = true\n",
            &[],
        )
        .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("hunter3"), "{s}");
    }

    #[test]
    fn passwords_come_from_files_and_never_go_out_in_clear() {
        let dir = std::env::temp_dir().join(format!("outbox-relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = dir.join("pg");
        std::fs::write(&pg, "hunter4\n").unwrap();
        let mq = dir.join("mq");
        std::fs::write(&mq, "hunter5").unwrap();
        let c = load(
            &format!(
                "[postgres]\nurl = \"postgresql://u@h/db?sslmode=require\"\npassword_file = \"{}\"\n\
                 [amqp]\nurl = \"amqps://u@h:5671/%2f\"\npassword_file = \"{}\"\n",
                pg.display(),
                mq.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.postgres.target.password(), "hunter4");
        assert!(c.amqp.url.expose().contains(":hunter5@"));
        let s = format!("{c:?}");
        assert!(!s.contains("hunter4") && !s.contains("hunter5"), "{s}");
        // Both a URL password and a file: which one is meant?
        let e = load(
            &format!(
                "[postgres]\nurl = \"postgresql://u:x@h/db\"\npassword_file = \"{}\"\n",
                pg.display()
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("postgres.password_file"), "{e}");
        let e = load("[postgres]\npassword_file = \"/nonexistent/pw\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("postgres.password_file") && e.contains("/nonexistent/pw"),
            "{e}"
        );
        // amqp:// with a password to another host is clear text: refused unless allowed.
        let e = load(
            "[amqp]\nurl = \"amqp://u:hunter6@broker.example:5672/%2f\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("amqp.url") && e.contains("amqps://"), "{e}");
        assert!(!e.contains("hunter6"), "{e}");
        // TLS files are read at start-up, errors name the key.
        let e = load(
            "[amqp]\nurl = \"amqps://u:p@h:5671/%2f\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("amqp.tls_ca_file"), "{e}");
        let e = load(
            "[amqp]\nurl = \"amqps://u@h:5671/%2f?auth_mechanism=external\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls_cert_file"), "{e}");
        let e = load("[metrics]\ntoken_file = \"/nonexistent/token\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.token_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_syntax_error_never_prints_the_line_that_holds_the_password() {
        let e = load(
            "[postgres]\nurl = \"postgresql://u:hunter2@h/db\" oops\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = load("[amqp]\nurl = 'amqp://u:hunter3@h:5672\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter3"), "{e}");
    }
}
