//! A delivery to an inbox row, the way Event-Forge's own consumer maps it:
//! `message_id` from the AMQP property, else the body's `id`; `event_type` from
//! the `x-event-type` header, else the body's `eventType`, else the `type`
//! property, else the routing key; `payload` the body's `payload`, else the whole
//! body; `metadata` the body's `metadata`. A leaf: no I/O.

use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;

/// Longest `message_id` and `event_type` the table takes (varchar(255)).
pub const MAX_FIELD_CHARS: usize = 255;

/// The fields of one inbox row taken from a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub message_id: String,
    pub event_type: String,
    /// JSON text.
    pub payload: String,
    /// JSON text, when the body has `metadata`.
    pub metadata: Option<String>,
}

/// Why a delivery cannot be recorded; `reason()` is the metric label and the
/// value of the dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// The body is larger than `inbox.max_message_bytes`.
    TooLarge { bytes: usize, max: usize },
    /// The body is not JSON.
    NotJson(String),
    /// Neither the `message_id` property nor the body's `id`.
    MissingId,
    /// `message_id` or `event_type` longer than the table takes, or holding a NUL.
    BadField(&'static str),
    /// The table refused the row on its own (a constraint or trigger of the table).
    RefusedByTable(String),
}

impl Invalid {
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::TooLarge { .. } => "too_large",
            Invalid::NotJson(_) => "not_json",
            Invalid::MissingId => "missing_id",
            Invalid::BadField(_) => "bad_field",
            Invalid::RefusedByTable(_) => "refused_by_table",
        }
    }

    /// A one-line description for the dead-letter header and the log.
    pub fn detail(&self) -> String {
        match self {
            Invalid::TooLarge { bytes, max } => {
                format!("body of {bytes} bytes is over inbox.max_message_bytes = {max}")
            }
            Invalid::NotJson(e) => format!("body is not JSON: {e}"),
            Invalid::MissingId => "no message_id property and no \"id\" in the body".to_string(),
            Invalid::BadField(field) => format!(
                "{field} is longer than {MAX_FIELD_CHARS} characters or holds a NUL character"
            ),
            Invalid::RefusedByTable(e) => format!("the inbox table refused the row: {e}"),
        }
    }
}

/// Maps one delivery (body, properties, routing key) to its row fields.
pub fn map(
    body: &[u8],
    properties: &BasicProperties,
    routing_key: &str,
    max_bytes: usize,
) -> Result<Record, Invalid> {
    if body.len() > max_bytes {
        return Err(Invalid::TooLarge {
            bytes: body.len(),
            max: max_bytes,
        });
    }
    // Fields are taken as raw JSON text: the row keeps the producer's exact
    // numbers and key order (a `Value` would round big numbers through f64).
    let text = std::str::from_utf8(body).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let whole: &RawValue =
        serde_json::from_str(text).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let object: Option<HashMap<String, &RawValue>> = if whole.get().trim_start().starts_with('{') {
        Some(serde_json::from_str(whole.get()).map_err(|e| Invalid::NotJson(e.to_string()))?)
    } else {
        None
    };
    let field = |key: &str| -> Option<Value> {
        serde_json::from_str(object.as_ref()?.get(key)?.get()).ok()
    };
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| match field("id")? {
            Value::String(s) if !s.is_empty() => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .ok_or(Invalid::MissingId)?;
    let event_type = header_string(properties, "x-event-type")
        .or_else(|| match field("eventType")? {
            Value::String(s) => Some(s),
            _ => None,
        })
        .or_else(|| properties.kind().as_ref().map(|k| k.as_str().to_string()))
        .unwrap_or_else(|| routing_key.to_string());
    check_field("message_id", &message_id)?;
    check_field("event_type", &event_type)?;
    let raw = |key: &str| object.as_ref()?.get(key).map(|v| v.get().to_string());
    let payload = raw("payload").unwrap_or_else(|| whole.get().to_string());
    let metadata = raw("metadata").filter(|m| m.trim() != "null");
    Ok(Record {
        message_id,
        event_type,
        payload,
        metadata,
    })
}

fn check_field(name: &'static str, value: &str) -> Result<(), Invalid> {
    if value.chars().count() > MAX_FIELD_CHARS || value.contains('\0') {
        return Err(Invalid::BadField(name));
    }
    Ok(())
}

/// A header's value as text (short or long string).
fn header_string(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, LongString};

    fn props() -> BasicProperties {
        BasicProperties::default()
    }

    fn with_header(key: &str, value: &str) -> BasicProperties {
        let mut t = FieldTable::default();
        t.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        BasicProperties::default().with_headers(t)
    }

    #[test]
    fn every_reason_is_a_registered_metric_label() {
        let all = [
            Invalid::TooLarge { bytes: 2, max: 1 },
            Invalid::NotJson("x".into()),
            Invalid::MissingId,
            Invalid::BadField("message_id"),
            Invalid::RefusedByTable("x".into()),
        ];
        let labels: Vec<&str> = all.iter().map(Invalid::reason).collect();
        assert_eq!(labels, crate::metrics::INBOX_INVALID_REASONS.to_vec());
    }

    #[test]
    fn event_forge_wire_format() {
        let body = br#"{"id":"m1","aggregateType":"Order","aggregateId":"7","eventType":"order.placed","payload":{"n":1},"metadata":{"traceId":"t"},"createdAt":"2026-01-01T00:00:00Z"}"#;
        let p = with_header("x-event-type", "order.placed").with_message_id("m1".into());
        let r = map(body, &p, "Order.order.placed", 1000).unwrap();
        assert_eq!(r.message_id, "m1");
        assert_eq!(r.event_type, "order.placed");
        assert_eq!(r.payload, r#"{"n":1}"#);
        assert_eq!(r.metadata.as_deref(), Some(r#"{"traceId":"t"}"#));
    }

    #[test]
    fn property_wins_over_body_id_and_header_over_body_event_type() {
        let body = br#"{"id":"body-id","eventType":"body.type","payload":1}"#;
        let p = with_header("x-event-type", "header.type").with_message_id("prop-id".into());
        let r = map(body, &p, "rk", 1000).unwrap();
        assert_eq!(
            (r.message_id.as_str(), r.event_type.as_str()),
            ("prop-id", "header.type")
        );
    }

    #[test]
    fn fallbacks() {
        let r = map(br#"{"id":"b","eventType":"e"}"#, &props(), "rk", 1000).unwrap();
        assert_eq!(r.message_id, "b");
        assert_eq!(r.event_type, "e");
        // No payload key: the whole body, as it came.
        assert_eq!(r.payload, r#"{"id":"b","eventType":"e"}"#);
        let r = map(
            br#"{"id":"n","payload":{"big":123456789012345678901234567890}}"#,
            &props(),
            "",
            1000,
        )
        .unwrap();
        assert_eq!(r.payload, r#"{"big":123456789012345678901234567890}"#);
        assert_eq!(r.metadata, None);
        let p = props().with_type("the.type".into());
        let r = map(br#"{"id":42}"#, &p, "rk", 1000).unwrap();
        assert_eq!(r.message_id, "42");
        assert_eq!(r.event_type, "the.type");
        let r = map(br#"{"id":"x"}"#, &props(), "Order.created", 1000).unwrap();
        assert_eq!(r.event_type, "Order.created");
        // A body that is JSON but not an object needs the property.
        let p = props().with_message_id("p".into());
        let r = map(b"[1,2]", &p, "rk", 1000).unwrap();
        assert_eq!(r.payload, "[1,2]");
    }

    #[test]
    fn invalid_inputs() {
        assert_eq!(
            map(b"not json", &props(), "", 1000).unwrap_err().reason(),
            "not_json"
        );
        assert_eq!(
            map(b"{}", &props(), "", 1000).unwrap_err(),
            Invalid::MissingId
        );
        assert_eq!(
            map(br#"{"id":""}"#, &props(), "", 1000).unwrap_err(),
            Invalid::MissingId
        );
        assert_eq!(
            map(br#"{"id":null}"#, &props(), "", 1000).unwrap_err(),
            Invalid::MissingId
        );
        assert_eq!(
            map(br#"{"id":"a"}"#, &props(), "", 3).unwrap_err(),
            Invalid::TooLarge { bytes: 10, max: 3 }
        );
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(256));
        assert_eq!(
            map(long.as_bytes(), &props(), "", 10_000).unwrap_err(),
            Invalid::BadField("message_id")
        );
        assert_eq!(
            map(br#"{"id":"a\u0000b"}"#, &props(), "", 1000).unwrap_err(),
            Invalid::BadField("message_id")
        );
        let p = with_header("x-event-type", &"e".repeat(256));
        assert_eq!(
            map(br#"{"id":"a"}"#, &p, "", 1000).unwrap_err(),
            Invalid::BadField("event_type")
        );
    }
}
