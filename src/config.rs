//! Configuration: TOML with unknown keys refused, defaults in code, environment
//! overrides (`OUTBOX_RELAY_<SECTION>_<KEY>`), validated at start-up with messages
//! that name the key.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// Sections of the configuration file, in the order they are documented.
pub const SECTIONS: &[&str] = &["postgres", "amqp", "relay", "retry", "metrics", "log"];

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

/// The whole configuration of one relay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub amqp: AmqpConfig,
    pub relay: RelayConfig,
    pub retry: RetryConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint; empty: off.
    /// Port 0 picks a free port (logged at start-up).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (or key=value string). The role needs REPLICATION.
    pub url: Secret,
    /// Outbox table, `schema.table` or `table` (schema `public`).
    pub table: String,
    /// Logical replication slot (pgoutput) the relay consumes.
    pub slot: String,
    /// Publication that covers the outbox table (inserts only).
    pub publication: String,
    /// `run` creates a missing publication and slot.
    pub create_missing: bool,
    /// How often the applied LSN is reported to the server.
    #[serde(deserialize_with = "de_duration")]
    pub status_interval: Duration,
    /// Longest wait between reconnect attempts to Postgres.
    #[serde(deserialize_with = "de_duration")]
    pub reconnect_backoff_max: Duration,
    /// At start-up, how long to wait for a slot held by another process
    /// (e.g. the walsender of a relay that was just killed) before giving up.
    #[serde(deserialize_with = "de_duration")]
    pub slot_wait: Duration,
    /// Column layout of the outbox table.
    pub mapping: Mapping,
    /// What happens to a row after its message is acked; default: `mark_published`
    /// for Event-Forge tables, `keep` otherwise.
    pub on_success: Option<OnSuccess>,
    /// Published rows older than this are deleted in the background (`mark_published` only).
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
    /// The relay-owned table that keeps failed and parked messages in commit order.
    pub retry_table: String,
    /// Emit a non-transactional logical message this often so an otherwise idle
    /// slot keeps moving; "0s": off.
    #[serde(deserialize_with = "de_duration")]
    pub heartbeat_interval: Duration,
    /// When another process holds the slot: wait as a hot standby and take over
    /// when it is released (true), or give up after `slot_wait` (false).
    pub standby: bool,
}

impl PostgresConfig {
    /// `on_success` with its mapping-dependent default applied.
    pub fn on_success(&self) -> OnSuccess {
        self.on_success.unwrap_or(match self.mapping {
            Mapping::EventForge => OnSuccess::MarkPublished,
            Mapping::Debezium => OnSuccess::Keep,
        })
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret("postgresql://postgres@127.0.0.1:5432/test".into()),
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
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &crate::catalog::redact_pg_url(self.url.expose()))
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_missing", &self.create_missing)
            .field("status_interval", &self.status_interval)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("slot_wait", &self.slot_wait)
            .field("mapping", &self.mapping)
            .field("on_success", &self.on_success)
            .field("retention", &self.retention)
            .field("retry_table", &self.retry_table)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("standby", &self.standby)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// AMQP 0-9-1 URL, e.g. `amqp://user:pass@host:5672/%2f`.
    pub url: Secret,
    /// Topic exchange the messages go to.
    pub exchange: String,
    /// Declare the exchange (topic, durable) at start-up.
    pub declare_exchange: bool,
    /// Most messages held in memory at once (published and unconfirmed, or
    /// waiting behind their aggregate). Backpressure on the WAL stream.
    pub max_in_flight: usize,
    /// Most message body bytes held in memory at once.
    pub max_in_flight_bytes: usize,
    /// A message body larger than this is not published; it goes to retry state.
    pub max_message_bytes: usize,
    /// Exchange that dead messages are published to (with headers that say why);
    /// empty: none.
    pub dead_letter_exchange: String,
    /// Longest wait between reconnect attempts to the broker.
    #[serde(deserialize_with = "de_duration")]
    pub reconnect_backoff_max: Duration,
    /// Longest wait for a connection to be ready (TCP, handshake, channel,
    /// exchange, confirm mode); a broker that accepts but never answers is retried.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            exchange: "events".into(),
            declare_exchange: true,
            max_in_flight: 2048,
            max_in_flight_bytes: 16 * 1024 * 1024,
            max_message_bytes: 8 * 1024 * 1024,
            dead_letter_exchange: String::new(),
            reconnect_backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &crate::sink::redact_amqp_url(self.url.expose()))
            .field("exchange", &self.exchange)
            .field("declare_exchange", &self.declare_exchange)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub ordering: Ordering,
    /// On SIGTERM/SIGINT, how long to wait for outstanding confirms.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            ordering: Ordering::Strict,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait before re-publishing a failed message.
    #[serde(deserialize_with = "de_duration")]
    pub backoff_base: Duration,
    /// Longest wait between re-publish attempts.
    #[serde(deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// Retries before a message is dead, when the table has no max_retries column.
    pub max_retries: i32,
    /// A publish without a confirm after this long is a failure.
    #[serde(deserialize_with = "de_duration")]
    pub publish_timeout: Duration,
    /// When the head of an aggregate's retry queue goes dead: release the rest or hold them.
    pub on_dead: OnDead,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            max_retries: 3,
            publish_timeout: Duration::from_secs(30),
            on_dead: OnDead::Skip,
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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

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

/// A string that never shows in `Debug` output (connection URLs carry passwords).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
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
                    message: one_line(&e.to_string()),
                })?;
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !RESERVED_ENV.contains(&k.as_str()))
            .collect();
        overrides.sort();
        for (var, value) in overrides {
            apply_env(&mut table, &var, &value)?;
        }
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: one_line(&e.to_string()),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            message,
        };
        crate::catalog::PgTarget::parse(self.postgres.url.expose())
            .map_err(|m| invalid("postgres.url", m))?;
        crate::catalog::TableName::parse(&self.postgres.table)
            .map_err(|m| invalid("postgres.table", m))?;
        check_identifier(&self.postgres.slot).map_err(|m| invalid("postgres.slot", m))?;
        check_identifier(&self.postgres.publication)
            .map_err(|m| invalid("postgres.publication", m))?;
        if self.postgres.status_interval.is_zero() {
            return Err(invalid(
                "postgres.status_interval",
                "must be greater than 0 (e.g. \"1s\")".into(),
            ));
        }
        if !(self.amqp.url.expose().starts_with("amqp://")
            || self.amqp.url.expose().starts_with("amqps://"))
        {
            return Err(invalid(
                "amqp.url",
                "must start with amqp:// (e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\")".into(),
            ));
        }
        lapin::uri::AMQPUri::from_str(self.amqp.url.expose())
            .map_err(|e| invalid("amqp.url", format!("cannot be parsed: {e}")))?;
        if self.amqp.connect_timeout.is_zero() {
            return Err(invalid(
                "amqp.connect_timeout",
                "must be greater than 0 (e.g. \"10s\")".into(),
            ));
        }
        if self.amqp.exchange.is_empty() {
            return Err(invalid(
                "amqp.exchange",
                "must name a topic exchange (the default exchange cannot route by topic)".into(),
            ));
        }
        if self.amqp.max_in_flight == 0 {
            return Err(invalid("amqp.max_in_flight", "must be at least 1".into()));
        }
        if self.amqp.max_in_flight_bytes < 1024 {
            return Err(invalid(
                "amqp.max_in_flight_bytes",
                "must be at least 1024".into(),
            ));
        }
        crate::catalog::TableName::parse(&self.postgres.retry_table)
            .map_err(|m| invalid("postgres.retry_table", m))?;
        if self.postgres.mapping == Mapping::Debezium
            && self.postgres.on_success == Some(OnSuccess::MarkPublished)
        {
            return Err(invalid(
                "postgres.on_success",
                "mark_published needs a status column; Debezium-style tables use \"delete\" or \"keep\"".into(),
            ));
        }
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    invalid(
                        "metrics.listen",
                        format!(
                            "{e}; use host:port like \"127.0.0.1:9187\", or \"\" to turn it off"
                        ),
                    )
                })?;
        }
        if self.amqp.max_message_bytes == 0 {
            return Err(invalid(
                "amqp.max_message_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.retry.max_retries < 0 {
            return Err(invalid("retry.max_retries", "must be 0 or more".into()));
        }
        if self.retry.publish_timeout.is_zero() {
            return Err(invalid(
                "retry.publish_timeout",
                "must be greater than 0 (e.g. \"30s\")".into(),
            ));
        }
        if self.retry.backoff_base.is_zero() {
            return Err(invalid(
                "retry.backoff_base",
                "must be greater than 0 (e.g. \"5s\")".into(),
            ));
        }
        if self.retry.backoff_max < self.retry.backoff_base {
            return Err(invalid(
                "retry.backoff_max",
                "must not be smaller than retry.backoff_base".into(),
            ));
        }
        Ok(())
    }
}

/// A slot or publication name: what Postgres accepts unquoted for slots.
fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "{name:?} may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
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

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses "200ms", "5s", "10m", "1h", "0s", or combinations like "1m30s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{s:?} is not a duration (use e.g. \"200ms\", \"5s\", \"1h\")"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d, e.g. \"5s\")"
                ))
            }
        };
        total += d;
    }
    Ok(total)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
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
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.postgres.table, "public.outbox_messages");
        assert_eq!(c.postgres.status_interval, Duration::from_millis(100));
        assert_eq!(c.amqp.exchange, "events");
        assert_eq!(c.relay.ordering, Ordering::Strict);
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
        let e = load("[postgres]\nslot = \"Bad-Name\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("postgres.slot"), "{e}");
        let e = load("[amqp]\nmax_in_flight = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.max_in_flight"), "{e}");
        let e = load("[relay]\nshutdown_timeout = \"10\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("shutdown_timeout"), "{e}");
    }

    #[test]
    fn debug_hides_passwords() {
        let c = load(
            "[postgres]\nurl = \"postgresql://u:hunter2@h/db\"\n[amqp]\nurl = \"amqp://u:hunter3@h:5672/%2f\"\n",
            &[],
        )
        .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("hunter3"), "{s}");
    }
}
