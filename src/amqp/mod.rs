//! RabbitMQ, connecting only: every connection the binary makes — the relay's
//! sink, the inbox receiver, `check` and `replay` — goes through here, so each
//! has the same URLs, TLS settings, timeout and errors that name the key to fix.
//! With several nodes (`amqp.url` a list) it connects to the first that answers;
//! a caller whose connection was lost starts again from the next one.
//! What is published and consumed lives in `sink` and `inbox`.

pub mod connect;

pub use connect::{connect, connect_from, ensure_exchange, exchanges, open, open_as, Broker};

use crate::config::AmqpUrl;
use std::time::Duration;

/// How to reach the broker (`[amqp]`), and the exchanges the relay needs there.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// One URL per node of the broker, tried in order.
    pub nodes: Vec<AmqpUrl>,
    /// `amqp.exchange` when it names one exchange; `None` when it is a
    /// template (each rendered exchange is ensured when first used).
    pub exchange: Option<String>,
    pub dead_letter_exchange: Option<String>,
    pub declare_exchange: bool,
    pub reconnect_backoff_max: Duration,
    pub connect_timeout: Duration,
    pub tls: crate::config::AmqpTls,
}

impl AmqpSettings {
    /// The `[amqp]` section's connection settings.
    pub fn from_config(amqp: &crate::config::AmqpConfig) -> AmqpSettings {
        AmqpSettings {
            nodes: amqp.nodes.clone(),
            exchange: amqp.wire.fixed_exchange(),
            dead_letter_exchange: amqp.dead_letter_exchange.clone(),
            declare_exchange: amqp.declare_exchange,
            reconnect_backoff_max: amqp.reconnect_backoff_max,
            connect_timeout: amqp.connect_timeout,
            tls: amqp.tls.clone(),
        }
    }
}
