//! The light half of outbox-relay, for Rust services that write outbox rows and
//! process inbox rows; it needs only tokio-postgres (no broker client, no TLS
//! stack, no allocator of its own).
//!
//! - [`outbox::enqueue`] writes an Event-Forge outbox row in the caller's
//!   transaction, so the event commits (or rolls back) with the business change;
//!   `outbox-relay run` delivers it after the commit.
//! - [`Processor`] runs handlers on the rows `outbox-relay inbox` recorded, each
//!   in the transaction that marks its row `processed`, so a handler's writes
//!   take effect once.
//!
//! What both halves of outbox-relay share lives here too: table names
//! ([`table`]), what a failed statement means ([`SqlTrouble`]), and the
//! Processor's claim and retry rules ([`claim`]).

pub mod backoff;
pub mod claim;
pub mod connect;
mod error;
pub mod outbox;
mod processor;
pub mod table;

pub use connect::{Connect, Session};
pub use error::{server_message, Error, SqlTrouble};
pub use processor::{
    Handler, HandlerError, HandlerFuture, InboxMessage, Processor, ProcessorObserver,
    ProcessorOptions,
};
