//! How a row becomes a message on the wire (`[amqp]` `exchange`, `routing_key`,
//! `body`, `[amqp.headers]`, `[amqp.properties]`): templates over the row,
//! parsed and validated once.

use super::ConfigError;
use crate::template::{Columns, Template};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The default routing key: Event-Forge's.
pub const DEFAULT_ROUTING_KEY: &str = "{aggregate_type}.{event_type}";

/// Headers the relay sets itself: a template may not replace them (nor any
/// `x-outbox-*` header: the dead-letter copy's).
pub const OWN_HEADERS: [&str; 5] = [
    "x-aggregate-type",
    "x-aggregate-id",
    "x-event-type",
    "x-created-at",
    "x-metadata",
];

/// Whether the relay sets header `name` itself.
fn own_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    OWN_HEADERS.contains(&lower.as_str())
        || lower == "traceparent"
        || lower.starts_with("x-outbox-")
        // RabbitMQ reads these as sender-selected routing (arrays of keys).
        || lower == "cc"
        || lower == "bcc"
}

/// What the body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BodyShape {
    /// Event-Forge's JSON envelope (id, aggregateType, aggregateId, eventType,
    /// payload, metadata, createdAt).
    #[default]
    Envelope,
    /// The payload column's JSON as it is; the envelope's fields go in headers.
    Payload,
}

/// The raw `[amqp.properties]` table: AMQP properties from templates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProperties {
    #[serde(rename = "type")]
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub app_id: Option<String>,
}

/// The wire shape, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireShape {
    pub exchange: Template,
    pub routing_key: Template,
    pub headers: Vec<(String, Template)>,
    pub message_type: Option<Template>,
    pub correlation_id: Option<Template>,
    pub app_id: Option<Template>,
    pub body: BodyShape,
    /// The table's columns the templates name beyond the row's fields: the
    /// decoder reads them, in this order.
    pub columns: Columns,
}

impl WireShape {
    /// Event-Forge's shape to `exchange` (the defaults).
    pub fn event_forge(exchange: &str) -> WireShape {
        let mut columns = Columns::default();
        WireShape {
            exchange: Template::parse(
                &exchange.replace('{', "{{").replace('}', "}}"),
                &mut columns,
            )
            .expect("a literal parses"),
            routing_key: Template::parse(DEFAULT_ROUTING_KEY, &mut columns)
                .expect("the default parses"),
            headers: Vec::new(),
            message_type: None,
            correlation_id: None,
            app_id: None,
            body: BodyShape::Envelope,
            columns,
        }
    }

    /// Parses the templates of `[amqp]`; errors name the key.
    pub fn parse(
        exchange: &str,
        routing_key: &str,
        headers: &BTreeMap<String, String>,
        properties: &RawProperties,
        body: BodyShape,
    ) -> Result<WireShape, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid { key, message };
        let mut columns = Columns::default();
        let mut parse = |key: &str, text: &str| {
            Template::parse(text, &mut columns).map_err(|m| invalid(key.to_string(), m))
        };
        let exchange = parse("amqp.exchange", exchange)?;
        let routing_key = parse("amqp.routing_key", routing_key)?;
        let mut parsed_headers = Vec::new();
        for (name, text) in headers {
            let key = format!("amqp.headers.{name}");
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(key, "a header name is 1 to 255 bytes".into()));
            }
            if own_header(name) {
                return Err(invalid(
                    key,
                    format!("{name} is a header the relay sets itself: choose another name"),
                ));
            }
            parsed_headers.push((name.clone(), parse(&key, text)?));
        }
        let mut property = |key: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| parse(&format!("amqp.properties.{key}"), t))
                .transpose()
        };
        let message_type = property("type", &properties.message_type)?;
        let correlation_id = property("correlation_id", &properties.correlation_id)?;
        let app_id = property("app_id", &properties.app_id)?;
        if let Some(name) = exchange.literal() {
            if name.len() > 255 {
                return Err(invalid(
                    "amqp.exchange".into(),
                    format!("is {} bytes; AMQP allows 255", name.len()),
                ));
            }
            if name.is_empty() {
                return Err(invalid(
                    "amqp.exchange".into(),
                    "must name the exchange (e.g. \"events\"), or be a template (\"{aggregate_type}-events\")".into(),
                ));
            }
        }
        Ok(WireShape {
            exchange,
            routing_key,
            headers: parsed_headers,
            message_type,
            correlation_id,
            app_id,
            body,
            columns,
        })
    }

    /// The exchange, when every message goes to the same one.
    pub fn fixed_exchange(&self) -> Option<String> {
        self.exchange.literal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(exchange: &str, key: &str, headers: &[(&str, &str)]) -> Result<WireShape, String> {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WireShape::parse(
            exchange,
            key,
            &headers,
            &RawProperties::default(),
            BodyShape::Envelope,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_columns_named_are_collected_once() {
        let s = shape(
            "{tenant}-events",
            "{tenant}.{event_type}",
            &[("x-region", "{region}")],
        )
        .unwrap();
        assert_eq!(s.columns.names(), ["tenant", "region"]);
        assert_eq!(s.fixed_exchange(), None);
        let plain = shape("events", DEFAULT_ROUTING_KEY, &[]).unwrap();
        assert!(plain.columns.names().is_empty());
        assert_eq!(plain.fixed_exchange().as_deref(), Some("events"));
        assert_eq!(plain, WireShape::event_forge("events"));
    }

    #[test]
    fn bad_templates_and_headers_name_the_key() {
        for (exchange, key, headers, words) in [
            ("events", "{tenant", vec![], "amqp.routing_key"),
            ("{}", DEFAULT_ROUTING_KEY, vec![], "amqp.exchange"),
            ("", DEFAULT_ROUTING_KEY, vec![], "amqp.exchange"),
            (
                "events",
                DEFAULT_ROUTING_KEY,
                vec![("x-event-type", "x")],
                "sets itself",
            ),
            (
                "events",
                DEFAULT_ROUTING_KEY,
                vec![("X-Outbox-Error", "x")],
                "sets itself",
            ),
            (
                "events",
                DEFAULT_ROUTING_KEY,
                vec![("traceparent", "x")],
                "sets itself",
            ),
            (
                "events",
                DEFAULT_ROUTING_KEY,
                vec![("CC", "{tenant}")],
                "sets itself",
            ),
            (
                "events",
                DEFAULT_ROUTING_KEY,
                vec![("x-t", "{a b}")],
                "amqp.headers.x-t",
            ),
        ] {
            let e = shape(exchange, key, &headers).unwrap_err();
            assert!(e.contains(words), "{exchange} {key} {headers:?}: {e}");
        }
    }
}
