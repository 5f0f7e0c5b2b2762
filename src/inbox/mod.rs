//! The inbox half: `outbox-relay inbox` records a queue into Event-Forge's
//! `inbox_messages` table exactly once.
//!
//! The path of one delivery through the files:
//!
//! 1. [`broker`] — the task that owns the RabbitMQ connection consumes the queue
//!    (manual acks, `inbox.prefetch`) and maps the delivery ([`mapping`]); an
//!    invalid one (not JSON, no id, too big) goes to the dead-letter exchange with
//!    the reason in a header;
//! 2. [`store`] — the task that owns the Postgres connection inserts it with the
//!    others waiting (one transaction, `ON CONFLICT (message_id, source) DO
//!    NOTHING`, [`queries`]), `NOTIFY`s the new ids and commits;
//! 3. back in [`broker`], [`acks::AckTracker`] turns the committed tags into one
//!    multiple ack. A duplicate is acked and counted like a new row.
//!
//! [`receiver::receive`] starts both tasks. Both reconnect with backoff; nothing is acked before its commit, so a
//! crash anywhere means a redelivery, which the unique key turns into a duplicate.
//!
//! Then [`Processor`] (the client crate's, re-exported) runs handlers on the
//! recorded rows, each in the transaction that marks its row processed.

pub mod acks;
pub mod broker;
pub mod mapping;
pub mod queries;
pub mod receiver;
pub mod store;
pub mod table_fault;

pub use mapping::{Invalid, Record};
/// The Processor lives in the light client crate (tokio-postgres only); it is
/// re-exported here for the relay's library users.
pub use outbox_relay_client::{
    claim, Connect, Handler, HandlerError, HandlerFuture, InboxMessage, Processor,
    ProcessorObserver, ProcessorOptions,
};

use std::time::Instant;

/// A delivery as it came, kept to dead-letter it.
#[derive(Debug, Clone)]
pub struct Raw {
    pub body: Vec<u8>,
    pub properties: lapin::BasicProperties,
    pub routing_key: String,
}

/// A delivery mapped to its row, on its way from the broker task to the store.
pub struct Pending {
    /// The broker connection it came on (tags are per channel).
    pub epoch: u64,
    pub tag: u64,
    pub record: Record,
    pub arrived: Instant,
    /// Kept to dead-letter it should the table refuse the row.
    pub delivery: Raw,
}

/// What the store did with one batch, after its commit, for the broker task.
pub struct Committed {
    /// Recorded, new or duplicate: (epoch, tag) to be acked.
    pub settled: Vec<(u64, u64)>,
    /// Refused by the table for their own sake: (epoch, tag, why, delivery) to be
    /// dead-lettered.
    pub refused: Vec<(u64, u64, Invalid, Raw)>,
}
