//! outbox-relay: transactional outbox rows from a PostgreSQL logical
//! replication slot to RabbitMQ, with publisher confirms and the slot's LSN
//! advanced only behind broker acks.
//!
//! The path of one row through the files:
//!
//! 1. [`source`] — the replication connection delivers the row's pgoutput Insert
//!    (`source/mod.rs`), and [`source::decode`] matches its columns by name;
//! 2. [`event`] — it becomes an [`event::OutboxEvent`] (or a malformed row, kept
//!    with its reason) through the column mapping [`config`] validated;
//! 3. [`sink::format`] — the Event-Forge body, properties and headers;
//! 4. [`relay`] — the loop admits it into the in-flight window
//!    (`relay/window.rs`), which keeps per-aggregate order, and hands it to
//! 5. [`sink`] — the task that owns the broker connection publishes it in
//!    confirm mode and reports the broker's answer;
//! 6. [`progress`] — the ack resolves it; once its transaction and all earlier
//!    ones are resolved, the commit's end LSN is reported and the slot moves.
//!
//! When the broker refuses it, [`relay`] parks it (and its aggregate's later
//! messages) through the [`retry`] store task in Postgres; `relay/parked.rs`
//! schedules its retries. [`admin`] holds the operator commands; [`pg`] the
//! Postgres names, targets, connections and catalog queries; [`metrics`] the
//! Prometheus metrics and health endpoint; [`time`] and [`redact`] small leaves.
//!
//! The inbox half ([`inbox`], `outbox-relay inbox`) goes the other way: a queue
//! into Event-Forge's `inbox_messages` table, each message recorded once.

pub mod admin;
pub mod amqp;
pub mod config;
pub mod error;
pub mod event;
pub mod failure;
pub mod inbox;
pub mod metrics;
pub mod outbox_table;
pub mod pg;
pub mod progress;
pub mod redact;
pub mod relay;
pub mod retry;
pub mod sink;
pub mod source;
pub mod task;
pub mod time;

/// `enqueue` and the Event-Forge outbox row it writes: the client crate's.
pub use outbox_relay_client::outbox;

pub use config::Config;
pub use error::Error;
pub use relay::run;
