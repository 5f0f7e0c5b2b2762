//! `[inbox]`: what `outbox-relay inbox` consumes and where it records it. The
//! section is optional; without it the inbox mode refuses to start.

use super::ConfigError;
use outbox_relay_client::table::{check_identifier, TableName};
use serde::Deserialize;

/// The queue type declared with `declare = true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// What happens to a delivery that cannot be recorded (not JSON, no id, too big).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    /// Publish it to `dead_letter_exchange` with the reason in the
    /// `x-inbox-invalid-reason` header, then ack it; refuses to start without a
    /// dead-letter exchange.
    DeadLetter,
    /// Reject it without requeue: the broker dead-letters it when the queue has a
    /// dead-letter exchange of its own, and drops it otherwise.
    Reject,
}

/// `[inbox]`, validated.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The queue consumed.
    pub queue: String,
    /// `inbox_messages.source` for what this queue brings.
    pub source: String,
    /// The Event-Forge inbox table.
    pub table: TableName,
    /// Declare the queue (durable) and its bindings at start-up; otherwise check it exists.
    pub declare: bool,
    /// Queue type when declaring.
    pub queue_type: QueueType,
    /// Declare the queue with single active consumer: of several receivers on
    /// it, one at a time gets deliveries (the others take over when it goes),
    /// so the table records them in queue order.
    pub single_active_consumer: bool,
    /// With `declare`: bind the queue to this exchange (topic, durable; declared too).
    pub bind_exchange: Option<String>,
    /// ... with these routing keys.
    pub bind_keys: Vec<String>,
    /// The queue's dead-letter exchange (`x-dead-letter-exchange` when declaring),
    /// where invalid deliveries go.
    pub dead_letter_exchange: Option<String>,
    pub on_invalid: OnInvalid,
    /// Unacked deliveries the broker may send at once (the receiver holds up to
    /// this many bodies in memory).
    pub prefetch: u16,
    /// Most deliveries recorded in one transaction.
    pub batch_size: usize,
    /// `NOTIFY` channel after each commit; `None`: off.
    pub notify_channel: Option<String>,
    /// A body larger than this is invalid.
    pub max_message_bytes: usize,
    /// `max_retries` of the rows recorded (Event-Forge default 3).
    pub max_retries: i32,
}

impl InboxConfig {
    /// `prefetch` when the config does not set it.
    pub const DEFAULT_PREFETCH: u16 = 2000;
}

/// The raw `[inbox]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInbox {
    pub queue: String,
    pub source: String,
    pub table: String,
    pub declare: bool,
    pub queue_type: QueueType,
    pub single_active_consumer: bool,
    pub bind_exchange: String,
    pub bind_keys: Vec<String>,
    pub dead_letter_exchange: String,
    pub on_invalid: OnInvalid,
    pub prefetch: u16,
    pub batch_size: usize,
    pub notify_channel: String,
    pub max_message_bytes: usize,
    pub max_retries: i32,
}

impl Default for RawInbox {
    fn default() -> Self {
        Self {
            queue: String::new(),
            source: "rabbitmq".into(),
            table: "public.inbox_messages".into(),
            declare: true,
            queue_type: QueueType::Classic,
            single_active_consumer: false,
            bind_exchange: String::new(),
            bind_keys: vec!["#".into()],
            dead_letter_exchange: String::new(),
            on_invalid: OnInvalid::DeadLetter,
            prefetch: InboxConfig::DEFAULT_PREFETCH,
            batch_size: 500,
            notify_channel: "inbox_messages".into(),
            max_message_bytes: 8 * 1024 * 1024,
            max_retries: 3,
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("inbox.{key}"),
        message: message.into(),
    }
}

impl RawInbox {
    pub fn validate(self) -> Result<InboxConfig, ConfigError> {
        if self.queue.is_empty() {
            return Err(invalid(
                "queue",
                "must name the queue to consume (e.g. \"orders-service.inbox\")",
            ));
        }
        if self.queue.len() > 255 {
            return Err(invalid("queue", "is longer than 255 bytes"));
        }
        if self.source.is_empty() || self.source.len() > 255 {
            return Err(invalid(
                "source",
                "must be 1 to 255 characters (Event-Forge uses \"rabbitmq\")",
            ));
        }
        let table = TableName::parse(&self.table).map_err(|m| invalid("table", m))?;
        if self.prefetch == 0 {
            return Err(invalid(
                "prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.max_message_bytes == 0 {
            return Err(invalid("max_message_bytes", "must be at least 1"));
        }
        if self.max_retries < 0 {
            return Err(invalid("max_retries", "must be 0 or more"));
        }
        if !self.notify_channel.is_empty() {
            check_identifier(&self.notify_channel).map_err(|m| invalid("notify_channel", m))?;
        }
        if self.single_active_consumer && !self.declare {
            return Err(invalid(
                "single_active_consumer",
                "needs declare = true (it is an argument of the queue's declaration); without it, declare the queue with x-single-active-consumer yourself",
            ));
        }
        if !self.bind_exchange.is_empty() && !self.declare {
            return Err(invalid(
                "bind_exchange",
                "needs declare = true (bindings are made when the queue is declared)",
            ));
        }
        if !self.bind_exchange.is_empty() && self.bind_keys.is_empty() {
            return Err(invalid(
                "bind_keys",
                "must hold at least one routing key when bind_exchange is set (e.g. [\"#\"])",
            ));
        }
        let dead_letter_exchange =
            (!self.dead_letter_exchange.is_empty()).then_some(self.dead_letter_exchange);
        if self.on_invalid == OnInvalid::DeadLetter && dead_letter_exchange.is_none() {
            return Err(invalid(
                "on_invalid",
                "is \"dead_letter\" but inbox.dead_letter_exchange is not set: name the queue's dead-letter exchange, or set on_invalid = \"reject\" (invalid deliveries are then rejected without requeue and dropped unless the queue dead-letters them itself)",
            ));
        }
        Ok(InboxConfig {
            queue: self.queue,
            source: self.source,
            table,
            declare: self.declare,
            queue_type: self.queue_type,
            single_active_consumer: self.single_active_consumer,
            bind_exchange: (!self.bind_exchange.is_empty()).then_some(self.bind_exchange),
            bind_keys: self.bind_keys,
            dead_letter_exchange,
            on_invalid: self.on_invalid,
            prefetch: self.prefetch,
            batch_size: self.batch_size,
            notify_channel: (!self.notify_channel.is_empty()).then_some(self.notify_channel),
            max_message_bytes: self.max_message_bytes,
            max_retries: self.max_retries,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(
            text,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    const MINIMAL: &str = "[inbox]\nqueue = \"q\"\ndead_letter_exchange = \"dlx\"\n";

    #[test]
    fn no_section_means_no_inbox() {
        assert!(load("", &[]).unwrap().inbox.is_none());
    }

    #[test]
    fn defaults_apply() {
        let c = load(MINIMAL, &[]).unwrap().inbox.unwrap();
        assert_eq!(c.source, "rabbitmq");
        assert_eq!(c.table.to_string(), "public.inbox_messages");
        assert_eq!(c.prefetch, 2000);
        assert_eq!(c.notify_channel.as_deref(), Some("inbox_messages"));
        assert_eq!(c.max_message_bytes, 8 * 1024 * 1024);
        assert_eq!(c.bind_exchange, None);
        assert_eq!(c.dead_letter_exchange.as_deref(), Some("dlx"));
    }

    #[test]
    fn the_example_documents_the_inbox_defaults() {
        // The example keeps [inbox] commented out (it is optional); uncommented, it
        // must be what the defaults give, apart from the keys without a default.
        let example = include_str!("../../config.example.toml");
        let start = example
            .find("# [inbox]")
            .expect("example documents [inbox]");
        let section: String = example[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let documented = load(&section, &[]).unwrap().inbox.unwrap();
        let defaults = load(
            "[inbox]\nqueue = \"orders-service.inbox\"\ndead_letter_exchange = \"orders-service.dlx\"\nbind_exchange = \"events\"\nbind_keys = [\"Order.#\"]\n",
            &[],
        )
        .unwrap()
        .inbox
        .unwrap();
        assert_eq!(format!("{documented:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn env_overrides_reach_the_section() {
        let c = load(
            "",
            &[
                ("OUTBOX_RELAY_INBOX_QUEUE", "from-env"),
                ("OUTBOX_RELAY_INBOX_ON_INVALID", "reject"),
                ("OUTBOX_RELAY_INBOX_PREFETCH", "7"),
            ],
        )
        .unwrap()
        .inbox
        .unwrap();
        assert_eq!(c.queue, "from-env");
        assert_eq!(c.prefetch, 7);
    }

    #[test]
    fn validation_names_the_key() {
        for (text, key) in [
            ("[inbox]\n", "inbox.queue"),
            ("[inbox]\nqueue = \"q\"\n", "inbox.on_invalid"),
            (
                "[inbox]\nqueue = \"q\"\non_invalid = \"reject\"\nprefetch = 0\n",
                "inbox.prefetch",
            ),
            (
                "[inbox]\nqueue = \"q\"\non_invalid = \"reject\"\ntable = \"a;b\"\n",
                "inbox.table",
            ),
            (
                "[inbox]\nqueue = \"q\"\non_invalid = \"reject\"\nnotify_channel = \"Bad-Name\"\n",
                "inbox.notify_channel",
            ),
            (
                "[inbox]\nqueue = \"q\"\non_invalid = \"reject\"\ndeclare = false\nbind_exchange = \"x\"\n",
                "inbox.bind_exchange",
            ),
            (
                "[inbox]\nqueue = \"q\"\non_invalid = \"reject\"\nqueue_type = \"stream\"\n",
                "queue_type",
            ),
            ("[inbox]\nqueue = \"q\"\nnope = 1\n", "nope"),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
