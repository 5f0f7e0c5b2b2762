//! Library errors. Each message says what went wrong and what to do about it.

use crate::config::ConfigError;
use crate::metrics::SlotLoss;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("{detail}")]
    ShardLayout { detail: String },

    #[error("postgres.shards = {count}: say which shard this {what} is for (postgres.shard = 0 to {last}, or --shard I)")]
    ShardNotChosen {
        count: u32,
        last: u32,
        what: &'static str,
    },

    #[error("none of the Postgres hosts of {url} takes writes now ({failures}): a fail-over in progress, or check [postgres] url")]
    PostgresNoPrimary {
        url: String,
        failures: String,
        transient: bool,
    },

    #[error("cannot connect to Postgres at {url}: {} (check [postgres] url and that the server is running)", pg_message(.source))]
    PostgresConnect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("postgres.url {key}: {message} (connecting to {url})")]
    PostgresTls {
        url: String,
        key: String,
        message: String,
    },

    #[error("the Postgres server at {url} asks for the password in {method} over an unencrypted connection, where anyone on the way can read it: use sslmode=require or stricter in postgres.url, or switch the server to scram-sha-256 in pg_hba.conf (or set postgres.allow_insecure_password = true to accept the risk)")]
    InsecurePassword { url: String, method: &'static str },

    #[error("Postgres error while {context}: {}", pg_message(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("unexpected value in column {column} while {context}: {source} (was the table altered? compare it with the DDL in sql/)")]
    Column {
        context: &'static str,
        column: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("wal_level is '{actual}', logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; then restart Postgres (or run scripts/setup-services.sh)")]
    WalLevel { actual: String },

    #[error("outbox table {table} does not exist, and [mapping] renames Event-Forge's columns: init creates only Event-Forge's own table (sql/outbox_messages.sql); create yours with the columns [mapping] names, then run init again")]
    TableRenamed { table: String },

    #[error("outbox table {table} does not exist: run `outbox-relay init --config FILE` or apply sql/outbox_messages.sql")]
    TableMissing { table: String },

    #[error("outbox table {table} lacks required column(s) {}: add them (see sql/outbox_messages.sql), or name the table's own columns in [mapping]; a column an [amqp] template names must exist too", .missing.join(", "))]
    ColumnsMissing { table: String, missing: Vec<String> },

    #[error("column {column} of {table} holds {field} but is of type {found}: it must be {expected} (change the column's type, or map {field} to another column in [mapping])")]
    ColumnType {
        table: String,
        column: String,
        field: &'static str,
        found: String,
        expected: &'static str,
    },

    #[error("role cannot replicate: run ALTER ROLE <role> WITH REPLICATION (or connect as a role that has it)")]
    NoReplicationPrivilege,

    #[error("publication {publication} does not exist: run `outbox-relay init`, set [postgres] create_missing = true, or CREATE PUBLICATION {publication} FOR TABLE {table} WITH (publish = 'insert')")]
    PublicationMissing { publication: String, table: String },

    #[error("publication {publication} does not exist (the messages source streams through one; it needs no table): run `outbox-relay init`, set [postgres] create_missing = true, or CREATE PUBLICATION {publication}")]
    MessagePublicationMissing { publication: String },

    #[error("publication {publication} does not cover {table}: run ALTER PUBLICATION {publication} ADD TABLE {table}")]
    PublicationMismatch { publication: String, table: String },

    #[error("publication {publication} publishes the partitions of the partitioned table {table} under their own names, which the relay does not read: run ALTER PUBLICATION {publication} SET (publish = 'insert', publish_via_partition_root = true)")]
    PublicationNotViaRoot { publication: String, table: String },

    #[error("publication {publication} does not publish inserts: run ALTER PUBLICATION {publication} SET (publish = 'insert')")]
    PublicationNoInsert { publication: String },

    #[error("replication slot {slot} does not exist: run `outbox-relay init` or set [postgres] create_missing = true")]
    SlotMissing { slot: String },

    #[error("{}", slot_lost(*.how, .slot, .detail, .seen_at, .seen_lsn, .pending))]
    SlotLost {
        how: SlotLoss,
        slot: String,
        /// What tells how it was lost (the server's reason, the timelines).
        detail: String,
        seen_at: String,
        seen_lsn: String,
        /// What the outbox still holds: rows still 'pending' and the oldest's age.
        pending: String,
    },

    #[error("a `replay --pending` of replication slot {slot} started at {since} and has not finished (or was interrupted): run `outbox-relay replay --pending --config FILE` again to the end; then `run` streams (a waiting relay starts by itself)")]
    SlotReplaying { slot: String, since: String },

    #[error("replication slot {slot} uses plugin '{plugin}' in database '{database}', the relay needs a pgoutput slot in '{expected_database}': drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another [postgres] slot")]
    SlotMismatch {
        slot: String,
        plugin: String,
        database: String,
        expected_database: String,
    },

    #[error("replication slot {slot} is held by another process (pid {pid}): stop that relay or consumer, or SELECT pg_terminate_backend({pid}) if it is stale")]
    SlotBusy { slot: String, pid: i32 },

    #[error("replication stream failed while {context}: {source}")]
    Replication {
        context: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },

    #[error("cannot connect to RabbitMQ at {url}: {source} (check [amqp] url and that the broker is running)")]
    AmqpConnect {
        url: String,
        #[source]
        source: lapin::Error,
    },

    #[error("amqp.{key}: {message} (connecting to {url})")]
    AmqpTls {
        url: String,
        key: String,
        message: String,
    },

    #[error("RabbitMQ at {url} accepted the connection but did not get it ready within {timeout:?} (amqp.connect_timeout): check that the broker has finished starting and is not overloaded, or raise the timeout")]
    AmqpConnectTimeout { url: String, timeout: Duration },

    #[error("no RabbitMQ node answered ({failures}): check [amqp] url and that the broker's nodes are running")]
    AmqpNodes { failures: String, transient: bool },

    #[error("{key} = {exchange:?} cannot be used: {source}; {hint}")]
    ExchangeUnusable {
        key: &'static str,
        exchange: String,
        hint: &'static str,
        #[source]
        source: Box<lapin::Error>,
    },

    #[error("RabbitMQ refused {context}: {source}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },

    #[error("cannot decode the replication stream: {0} (is the slot's plugin pgoutput?)")]
    Decode(String),

    #[error("cannot listen on {addr} for metrics: {message} (change [metrics] listen, or set it to \"\" to turn the endpoint off)")]
    Listen { addr: String, message: String },

    #[error("cannot replay: {0}")]
    Replay(String),

    #[error("cannot requeue: {0}")]
    Requeue(String),

    #[error("the relay's {0} task ended unexpectedly (see the log line before this one); restart the relay")]
    TaskEnded(&'static str),

    #[error("the configuration has no [inbox] section: add one naming at least the queue (see config.example.toml) to run `outbox-relay inbox`")]
    InboxNotConfigured,

    #[error("inbox table {table} does not exist: run `outbox-relay init --inbox-only --config FILE` or apply sql/inbox_messages.sql")]
    InboxTableMissing { table: String },

    #[error("inbox table {table} cannot be written: {message} (compare it with sql/inbox_messages.sql: it needs UNIQUE (message_id, source))")]
    InboxTableUnusable { table: String, message: String },

    #[error("inbox queue {queue:?} cannot be used: {source}; {hint}")]
    InboxQueue {
        queue: String,
        hint: &'static str,
        #[source]
        source: Box<lapin::Error>,
    },

    #[error("inbox broker session: {0}")]
    InboxBroker(String),

    #[error(
        "the inbox store task stopped: the receiver shuts down (see the log line before this one)"
    )]
    InboxStoreGone,
}

/// The one line that says how a slot was lost, what may be missing and how to recover.
fn slot_lost(
    how: SlotLoss,
    slot: &str,
    detail: &str,
    seen_at: &str,
    seen_lsn: &str,
    pending: &str,
) -> String {
    const RECOVER: &str = "To recover: run `outbox-relay replay --pending --config FILE`";
    const THEN: &str = "then re-publishes the rows still pending, oldest first (consumers deduplicate by message_id); then `run` streams (a waiting relay starts by itself)";
    match how {
        SlotLoss::Dropped => format!(
            "replication slot {slot} was dropped{}, but a relay held it before (last seen {seen_at}, at {seen_lsn}): rows committed since then were never read, and a new slot would skip them silently; {pending}. {RECOVER} (it creates a new slot, {THEN})",
            if detail.is_empty() { String::new() } else { format!(" {detail}") }
        ),
        SlotLoss::Invalidated => format!(
            "replication slot {slot} was invalidated by the server ({detail}): it can no longer be read, so rows committed since the relay last held it ({seen_at}, at {seen_lsn}) were never read; {pending}. {RECOVER} (it drops the invalidated slot, creates a new one, {THEN}); to keep it from recurring, raise max_slot_wal_keep_size or keep the relay from falling that far behind"
        ),
        SlotLoss::Failover => format!(
            "Postgres failed over to a server without replication slot {slot} ({detail}): rows committed since the relay last held it ({seen_at}, at {seen_lsn}) were never read; {pending}. {RECOVER} against the new primary (it creates a new slot, {THEN}); PostgreSQL 17 keeps a slot across fail-overs when it is created with failover = true and the standby is in synchronized_standby_slots"
        ),
    }
}

use outbox_relay_client::server_message as pg_message;
pub use outbox_relay_client::SqlTrouble;

impl Error {
    /// How a statement's failure should be handled (`None`: not an SQL failure).
    pub fn sql_trouble(&self) -> Option<SqlTrouble> {
        let source = match self {
            Error::Postgres { source, .. } | Error::PostgresConnect { source, .. } => source,
            Error::Column { .. } => return Some(SqlTrouble::SchemaDrift),
            _ => return None,
        };
        Some(SqlTrouble::of(source))
    }

    /// Postgres is shutting down, or ended this session (SQLSTATE 57P01
    /// admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now).
    pub fn server_stopping(&self) -> bool {
        match self {
            Error::Postgres { source, .. } | Error::PostgresConnect { source, .. } => source
                .as_db_error()
                .is_some_and(|db| matches!(db.code().code(), "57P01" | "57P02" | "57P03")),
            _ => false,
        }
    }

    /// How the slot was lost, when this is the refusal of a lost slot.
    pub fn slot_loss(&self) -> Option<SlotLoss> {
        match self {
            Error::SlotLost { how, .. } => Some(*how),
            _ => None,
        }
    }

    /// The relay cannot stream until an operator recovers the slot (`replay
    /// --pending`): it waits, and starts once that is done.
    pub fn waits_for_recovery(&self) -> bool {
        matches!(self, Error::SlotLost { .. } | Error::SlotReplaying { .. })
    }

    /// Errors worth retrying when they happen mid-run (a connection went away).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::PostgresConnect { .. }
            | Error::AmqpConnect { .. }
            | Error::AmqpConnectTimeout { .. }
            | Error::SlotBusy { .. } => true,
            Error::AmqpNodes { transient, .. } | Error::PostgresNoPrimary { transient, .. } => {
                *transient
            }
            Error::Postgres { source, .. } => source.as_db_error().is_none() || source.is_closed(),
            Error::Replication { source, .. } => source.is_transient() || source.is_server(),
            _ => false,
        }
    }
}
