//! outbox-relay: transactional outbox rows from a PostgreSQL logical
//! replication slot to RabbitMQ, with publisher confirms and the slot's LSN
//! advanced only behind broker acks; and the way back, a queue recorded into an
//! inbox table once.
//!
//! The path of one row through the files:
//!
//! 1. [`source`] — the replication connection delivers the row's pgoutput Insert
//!    (`source/mod.rs`), and [`source::decode`] matches its columns by name (with
//!    `postgres.source = "messages"`: a logical decoding message, read by
//!    [`source::message`]);
//! 2. [`event`] — it becomes an [`event::OutboxEvent`] (or a malformed row, kept
//!    with its reason) through the column mapping [`config`] validated;
//! 3. [`sink::format`] — the body (Event-Forge's envelope or the payload), properties,
//!    headers, routing key and exchange, rendered from the `[amqp]` templates
//!    ([`template`], parsed once by `config::wire`);
//! 4. [`relay`] — the loop (`relay/main_loop.rs`, WAL in through
//!    `relay/wal.rs`) admits it into the in-flight window (`relay/window.rs`),
//!    which keeps per-aggregate order, and hands it to
//! 5. [`sink`] — the task that owns the broker connection (opened by [`amqp`])
//!    publishes it in confirm mode and reports the broker's answer
//!    (`relay/answers.rs` takes it);
//! 6. [`progress`] — the ack resolves it; once its transaction and all earlier
//!    ones are resolved, the commit's end LSN is reported and the slot moves.
//!
//! When the broker refuses it, `relay/retries.rs` parks it (and its aggregate's
//! later messages) through the [`retry`] store task in Postgres;
//! `relay/parked.rs` schedules its retries; [`outbox_table`] shows the state in
//! the row and applies `on_success`. When every publish fails the same way,
//! `relay/routing.rs` holds them instead (a fault that is not the messages').
//!
//! [`admin`] holds the operator commands; [`pg`] the Postgres targets, TLS,
//! sessions, catalog queries, slots and what a failed statement means
//! (`pg/trouble.rs`); [`metrics`] the Prometheus metrics, health and endpoint;
//! [`time`], [`redact`] and [`task`] small leaves.
//!
//! The inbox half ([`inbox`], `outbox-relay inbox`) goes the other way: a queue
//! into Event-Forge's `inbox_messages` table, each message recorded once. The
//! light client crate `outbox-relay-client` (re-exported as [`outbox`] and in
//! [`inbox`]) holds what a Rust service needs without the relay: `enqueue` and
//! the inbox `Processor`.

pub mod admin;
pub mod amqp;
pub mod config;
pub mod error;
pub mod event;
pub mod failure;
pub mod files;
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
pub mod template;
pub mod time;

/// `enqueue` and the Event-Forge outbox row it writes: the client crate's.
pub use outbox_relay_client::outbox;

pub use config::Config;
pub use error::Error;
pub use relay::run;
