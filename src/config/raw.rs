//! The raw file as it deserializes, before validation: strings where the typed
//! configuration has parsed values.

use super::*;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: Postgres,
    pub amqp: Amqp,
    pub relay: Relay,
    pub retry: Retry,
    pub inbox: Option<super::inbox::RawInbox>,
    pub mapping: Option<super::mapping::RawMapping>,
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
    pub shards: u32,
    pub shard: Option<u32>,
    pub source: super::Source,
    pub message_prefix: String,
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
            shards: 1,
            shard: None,
            source: super::Source::Table,
            message_prefix: "outbox".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Amqp {
    /// One URL, or one per node of a cluster: a TOML array, or a comma-separated
    /// string (as an environment variable gives it).
    #[serde(deserialize_with = "de_urls")]
    pub url: Vec<String>,
    pub exchange: String,
    pub routing_key: String,
    pub body: super::wire::BodyShape,
    pub headers: std::collections::BTreeMap<String, String>,
    pub properties: super::wire::RawProperties,
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
            url: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()],
            exchange: "events".into(),
            routing_key: super::wire::DEFAULT_ROUTING_KEY.into(),
            body: super::wire::BodyShape::Envelope,
            headers: Default::default(),
            properties: Default::default(),
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

/// A URL, a comma-separated string of them, or a list.
fn de_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    let urls = match Urls::deserialize(d)? {
        Urls::One(s) => s.split(',').map(str::to_string).collect::<Vec<_>>(),
        Urls::Many(v) => v,
    };
    Ok(urls
        .into_iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect())
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
            postgres,
            amqp,
            relay,
            retry,
            inbox,
            mapping,
            metrics,
            log,
        } = self;
        let mut postgres = postgres.validate(mapping)?;
        let amqp = amqp.validate()?;
        // The columns the wire templates name are read with every row.
        postgres.columns.extra = amqp.wire.columns.names().to_vec();
        if postgres.source == super::Source::Messages && !postgres.columns.extra.is_empty() {
            return Err(invalid(
                "amqp",
                format!(
                    "a template names {}: with postgres.source = \"messages\" templates may name id, aggregate_type, aggregate_id and event_type only (a parked message is retried from its own copy, which keeps those)",
                    postgres.columns.extra.join(", ")
                ),
            ));
        }
        Ok(super::Config {
            postgres,
            amqp,
            relay: relay.validate()?,
            retry: retry.validate()?,
            inbox: inbox.map(|i| i.validate()).transpose()?,
            metrics: metrics.validate()?,
            log,
        })
    }
}

impl Postgres {
    fn validate(
        self,
        mapping: Option<super::mapping::RawMapping>,
    ) -> Result<PostgresConfig, ConfigError> {
        let pg = self;
        if pg.source == super::Source::Messages {
            let table_only = |key: &str, what: &str| {
                Err(invalid(
                    key,
                    format!("{what}: with postgres.source = \"messages\" there is no outbox table (see docs/mapping.md#outbox-without-a-table)"),
                ))
            };
            if pg.shards != 1 {
                return table_only("postgres.shards", "messages cannot be split into shards (a publication's row filter does not apply to them)");
            }
            if pg.mapping != Mapping::EventForge || mapping.is_some() {
                return table_only(
                    "postgres.mapping",
                    "there are no columns to map ([mapping] and postgres.mapping apply to a table)",
                );
            }
            if pg.on_success.is_some_and(|o| o != OnSuccess::Keep) {
                return table_only(
                    "postgres.on_success",
                    "there is no row to mark or delete: leave it unset",
                );
            }
            if pg.message_prefix.is_empty() || pg.message_prefix == super::HEARTBEAT_PREFIX {
                return Err(invalid(
                    "postgres.message_prefix",
                    format!("must name the prefix the writers pass to pg_logical_emit_message (e.g. \"outbox\"), other than {:?}", super::HEARTBEAT_PREFIX),
                ));
            }
        }
        let columns = mapping.unwrap_or_default().resolve(pg.mapping)?;
        let mut target = PgTarget::parse(&pg.url).map_err(|m| invalid("postgres.url", m))?;
        if !pg.password_file.is_empty() {
            if target.has_password() {
                return Err(invalid(
                    "postgres.password_file",
                    "postgres.url holds a password too: keep only one of them",
                ));
            }
            target =
                target.with_password(read_password("postgres.password_file", &pg.password_file)?);
        }
        target.allow_insecure_password = pg.allow_insecure_password;
        let table = TableName::parse(&pg.table).map_err(|m| invalid("postgres.table", m))?;
        super::sharding::check_count(pg.shards)?;
        let mut sharding = super::Sharding::single(&pg.slot, &pg.publication);
        sharding.count = pg.shards;
        if let Some(i) = pg.shard {
            if i >= pg.shards {
                return Err(invalid(
                    "postgres.shard",
                    format!(
                        "is {i}, but postgres.shards = {}: shards are numbered 0 to {}",
                        pg.shards,
                        pg.shards - 1
                    ),
                ));
            }
        }
        // The longest names (the last shard's) must be valid ones too.
        let last = pg.shards - 1;
        check_identifier(&sharding.slot(last)).map_err(|m| invalid("postgres.slot", m))?;
        check_identifier(&sharding.publication(last))
            .map_err(|m| invalid("postgres.publication", m))?;
        let status_interval = positive("postgres.status_interval", pg.status_interval, "100ms")?;
        let retry_table =
            TableName::parse(&pg.retry_table).map_err(|m| invalid("postgres.retry_table", m))?;
        let statement_timeout =
            positive("postgres.statement_timeout", pg.statement_timeout, "30s")?;
        let lock_timeout = positive("postgres.lock_timeout", pg.lock_timeout, "5s")?;
        if pg.replication_timeout < Duration::from_secs(2) {
            return Err(invalid(
                "postgres.replication_timeout",
                "must be at least 2s (e.g. \"60s\"): half of it, the relay asks the server for a sign of life",
            ));
        }
        if pg.mapping != Mapping::EventForge && pg.on_success == Some(OnSuccess::MarkPublished) {
            return Err(invalid(
                "postgres.on_success",
                "mark_published needs Event-Forge's status column; other tables use \"delete\" or \"keep\"",
            ));
        }
        let on_success = pg.on_success.unwrap_or(match (pg.source, pg.mapping) {
            (super::Source::Messages, _) => OnSuccess::Keep,
            (_, Mapping::EventForge) => OnSuccess::MarkPublished,
            (_, Mapping::Debezium | Mapping::Custom) => OnSuccess::Keep,
        });

        sharding.index = pg.shard.filter(|_| sharding.is_sharded());
        let (slot, publication) = match sharding.index {
            Some(i) => (sharding.slot(i), sharding.publication(i)),
            None => (pg.slot, pg.publication),
        };
        Ok(PostgresConfig {
            sharding,
            target,
            table,
            slot,
            publication,
            create_missing: pg.create_missing,
            status_interval,
            reconnect_backoff_max: pg.reconnect_backoff_max,
            slot_wait: pg.slot_wait,
            mapping: pg.mapping,
            columns,
            on_success,
            retention: pg.retention,
            retry_table,
            heartbeat_interval: pg.heartbeat_interval,
            standby: pg.standby,
            statement_timeout,
            lock_timeout,
            replication_timeout: pg.replication_timeout,
            source: pg.source,
            message_prefix: pg.message_prefix,
        })
    }
}

impl Amqp {
    fn validate(self) -> Result<AmqpConfig, ConfigError> {
        let amqp = self;
        if amqp.url.is_empty() {
            return Err(invalid(
                "amqp.url",
                "names no broker: give one URL, or one per node of a cluster (a list)",
            ));
        }
        let password = match amqp.password_file.as_str() {
            "" => None,
            path => Some(read_password("amqp.password_file", path)?),
        };
        let several = amqp.url.len() > 1;
        let nodes = amqp
            .url
            .iter()
            .enumerate()
            .map(|(i, url)| {
                amqp.node(url, password.as_deref()).map_err(|e| match e {
                    // With several nodes, say which one.
                    ConfigError::Invalid { key, message } if several && key == "amqp.url" => {
                        invalid(&format!("amqp.url[{i}]"), message)
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        let wire = super::wire::WireShape::parse(
            &amqp.exchange,
            &amqp.routing_key,
            &amqp.headers,
            &amqp.properties,
            amqp.body,
        )?;

        Ok(AmqpConfig {
            nodes,
            wire,
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
        })
    }

    /// One node's URL, checked with the same rules as every other: scheme, TLS
    /// files only with `amqps://`, EXTERNAL only with a client certificate, no
    /// password in clear text beyond loopback; `password` (from
    /// `amqp.password_file`) set into it. A refusal never shows a password the
    /// URL holds.
    fn node(&self, url: &str, password: Option<&str>) -> Result<AmqpUrl, ConfigError> {
        self.node_unscrubbed(url, password).map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key,
                message: crate::redact::scrub(&message, url),
            },
            other => other,
        })
    }

    fn node_unscrubbed(&self, url: &str, password: Option<&str>) -> Result<AmqpUrl, ConfigError> {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid(
                "amqp.url",
                "must start with amqp:// (e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\")",
            ));
        }
        let uri = lapin::uri::AMQPUri::from_str(url)
            .map_err(|e| invalid("amqp.url", format!("cannot be parsed: {e}")))?;
        let has_password = url::Url::parse(url).is_ok_and(|u| u.password().is_some());
        let mut node = url.to_string();
        if let Some(password) = password {
            if has_password {
                return Err(invalid(
                    "amqp.password_file",
                    "amqp.url holds a password too: keep only one of them",
                ));
            }
            node = with_amqp_password(url, password).map_err(|m| invalid("amqp.url", m))?;
        }
        let tls_wanted = !(self.tls_ca_file.is_empty()
            && self.tls_cert_file.is_empty()
            && self.tls_key_file.is_empty());
        let amqps = url.starts_with("amqps://");
        if tls_wanted && !amqps {
            return Err(invalid(
                "amqp.url",
                "amqp.tls_* files are set but the URL is amqp://: use amqps:// (e.g. amqps://host:5671/%2f)",
            ));
        }
        let external = uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
        if external && self.tls_cert_file.is_empty() {
            return Err(invalid(
                "amqp.url",
                "auth_mechanism=external needs a client certificate: set amqp.tls_cert_file and amqp.tls_key_file",
            ));
        }
        if !amqps
            && !external
            && !self.allow_insecure_password
            && !is_loopback(&uri.authority.host)
            && (has_password || password.is_some())
        {
            return Err(invalid(
                "amqp.url",
                format!("amqp:// to {} would send the password in clear text: use amqps:// (or set amqp.allow_insecure_password = true to accept the risk)", uri.authority.host),
            ));
        }
        Ok(AmqpUrl(node))
    }
}

impl Relay {
    fn validate(self) -> Result<RelayConfig, ConfigError> {
        let relay = self;
        Ok(RelayConfig {
            ordering: relay.ordering,
            shutdown_timeout: relay.shutdown_timeout,
            stall_timeout: positive("relay.stall_timeout", relay.stall_timeout, "2m")?,
        })
    }
}

impl Retry {
    fn validate(self) -> Result<RetryConfig, ConfigError> {
        let retry = self;
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

        Ok(RetryConfig {
            backoff_base,
            backoff_max: retry.backoff_max,
            max_retries: retry.max_retries,
            publish_timeout,
            on_dead: retry.on_dead,
            dead_retention: (!retry.dead_retention.is_zero()).then_some(retry.dead_retention),
        })
    }
}

impl Metrics {
    fn validate(self) -> Result<MetricsConfig, ConfigError> {
        let metrics = self;
        let listen = match metrics.listen.as_str() {
            "" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "metrics.listen",
                    format!("{e}; use host:port like \"127.0.0.1:9187\", or \"\" to turn it off"),
                )
            })?),
        };

        Ok(MetricsConfig {
            listen,
            token: match metrics.token_file.as_str() {
                "" => None,
                path => Some(crate::redact::Secret::new(read_password(
                    "metrics.token_file",
                    path,
                )?)),
            },
        })
    }
}
