//! outbox-relay: transactional outbox rows from a PostgreSQL logical
//! replication slot to RabbitMQ, with publisher confirms and the slot's LSN
//! advanced only behind broker acks.
//!
//! Reading order for one row: [`source`] (replication stream, pgoutput decode)
//! → [`event`] (the row as an outbox event) → [`sink::format`] (Event-Forge wire
//! format) → [`relay`] (in-flight window, per-aggregate order) → [`sink`]
//! (publish, confirms) → [`progress`] (ack-gated LSN).

pub mod admin;
pub mod catalog;
pub mod config;
pub mod error;
pub mod event;
pub mod metrics;
pub mod progress;
pub mod relay;
pub mod retry;
pub mod sink;
pub mod source;

pub use config::Config;
pub use error::Error;
pub use relay::run;
