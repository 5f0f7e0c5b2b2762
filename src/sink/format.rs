//! The Event-Forge wire format: body, properties, headers and routing key of
//! one outbox row (docs/event-forge.md, "Wire format").

use crate::config::wire::{BodyShape, WireShape};
use crate::event::{AggregateKey, OutboxEvent, Row};
use crate::time::{pg_timestamp_to_iso, unix_micros_to_iso, PG_EPOCH_OFFSET_MICROS};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::sync::LazyLock;

/// Where a message is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The exchange `amqp.exchange` names (declared or checked at start-up).
    Configured,
    /// An exchange a template rendered for this message: declared (or
    /// checked) the first time a connection publishes to it.
    Rendered(ShortString),
    /// The dead-letter exchange: published on the isolated channel.
    DeadLetter(ShortString),
}

/// A message ready for `basic.publish`.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub destination: Destination,
    /// The outbox row id, also the AMQP `message_id`.
    pub id: String,
    pub aggregate: AggregateKey,
    pub routing_key: ShortString,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Bytes of its content header frame (properties and headers): the broker
    /// closes the connection when this exceeds the negotiated `frame_max`.
    pub header_len: usize,
}

impl OutboundMessage {
    /// The exchange it goes to, `configured` being `amqp.exchange`'s.
    pub fn exchange<'a>(&'a self, configured: &'a ShortString) -> &'a ShortString {
        match &self.destination {
            Destination::Configured => configured,
            Destination::Rendered(e) | Destination::DeadLetter(e) => e,
        }
    }

    /// What tells this message's routing apart for the routing watch: its
    /// exchange when a template named it (a fault of one exchange is not the
    /// whole topology's), else its routing key.
    pub fn routing_identity(&self) -> String {
        match &self.destination {
            Destination::Rendered(e) => format!("exchange {}", e.as_str()),
            _ => self.routing_key.to_string(),
        }
    }

    /// Bytes this message holds in memory, for the in-flight window.
    pub fn weight(&self) -> usize {
        self.body.len() + self.id.len() + self.routing_key.as_str().len() + 256
    }
}

/// Bytes of the AMQP content header frame carrying `properties`: frame header (7),
/// class and weight (4), body size (8), the serialized properties, frame end (1).
pub fn header_frame_len(properties: &BasicProperties) -> usize {
    let props = cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::with_capacity(256),
    )
    .map(|v| v.len())
    // Serializing into a Vec cannot fail; if it ever did, the message is refused.
    .unwrap_or(usize::MAX - 20);
    props + 20
}

/// A lower bound of the encoded body's size, known before encoding it: a row
/// whose bound already exceeds the limit is refused without copying it.
pub fn body_len_at_least(event: &OutboxEvent, body: BodyShape) -> usize {
    if body == BodyShape::Payload {
        return event.payload.len();
    }
    96 + event.id.len()
        + event.aggregate_type.len()
        + event.aggregate_id.len()
        + event.event_type.len()
        + event.payload.len()
        + event.metadata.as_ref().map_or(4, |m| m.len())
}

/// Why a row cannot be sent in this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

/// Event-Forge's wire shape: the configured exchange, routing key
/// `{aggregate_type}.{event_type}`, the JSON envelope.
static EVENT_FORGE: LazyLock<WireShape> = LazyLock::new(|| WireShape::event_forge("events"));

/// Encodes an event in Event-Forge's wire shape (see [`encode_with`]).
pub fn encode(
    event: &OutboxEvent,
    commit_time_micros: i64,
) -> Result<OutboundMessage, FormatError> {
    encode_with(event, commit_time_micros, &EVENT_FORGE)
}

/// Encodes an event in `wire`'s shape. `commit_time_micros` (Postgres epoch)
/// stands in for `created_at` when the table has no such column. A value that
/// cannot be sent (a rendered routing key or exchange name over 255 bytes, an
/// id too long for a message_id) is this message's `FormatError` alone.
pub fn encode_with(
    event: &OutboxEvent,
    commit_time_micros: i64,
    wire: &WireShape,
) -> Result<OutboundMessage, FormatError> {
    let render =
        |t: &crate::template::Template| t.render(event, &wire.columns).map_err(FormatError);
    let short = |what: &str, template: &crate::template::Template, value: String| {
        let len = value.len();
        ShortString::try_new(value).map_err(|_| {
            FormatError(format!(
                "{what} rendered from {:?} is {len} bytes; AMQP allows 255",
                template.source()
            ))
        })
    };
    let routing_key = short(
        "the routing key",
        &wire.routing_key,
        render(&wire.routing_key)?,
    )?;
    let destination = match wire.fixed_exchange() {
        Some(_) => Destination::Configured,
        None => {
            // Every value must be there: a NULL must not turn "{tenant}-events"
            // into another exchange ("-events").
            let name = wire
                .exchange
                .render_all(event, &wire.columns)
                .map_err(|e| FormatError(format!("the exchange cannot be named: {e}")))?;
            Destination::Rendered(short("the exchange", &wire.exchange, name)?)
        }
    };
    let message_id = ShortString::try_new(event.id.as_str())
        .map_err(|e| FormatError(format!("id is too long for an AMQP message_id: {e}")))?;

    let (created_iso, created_unix) =
        match event.created_at.as_deref().and_then(pg_timestamp_to_iso) {
            Some(v) => v,
            None => {
                // Saturating: the commit time is the walsender's word (fuzzed).
                let unix_micros = commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
                (
                    unix_micros_to_iso(unix_micros),
                    unix_micros.div_euclid(1_000_000),
                )
            }
        };

    let body = match wire.body {
        BodyShape::Envelope => envelope(event, &created_iso),
        BodyShape::Payload => event.payload.to_vec(),
    };

    let mut headers = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    headers.insert("x-aggregate-type".into(), long(&event.aggregate_type));
    headers.insert("x-aggregate-id".into(), long(&event.aggregate_id));
    headers.insert("x-event-type".into(), long(&event.event_type));
    if let Some(tp) = event.metadata.as_deref().and_then(traceparent) {
        headers.insert("traceparent".into(), long(&tp));
    }
    if wire.body == BodyShape::Payload {
        // The envelope's other fields, for consumers that read them.
        headers.insert("x-created-at".into(), long(&created_iso));
        if let Some(m) = &event.metadata {
            headers.insert(
                "x-metadata".into(),
                AMQPValue::LongString(LongString::from(m.to_vec())),
            );
        }
    }
    for (name, template) in &wire.headers {
        headers.insert(name.as_str().into(), long(&render(template)?));
    }

    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id)
        .with_headers(headers);
    if created_unix >= 0 {
        properties = properties.with_timestamp(created_unix as u64);
    }
    if let Some(t) = &wire.message_type {
        properties = properties.with_type(short("the type property", t, render(t)?)?);
    }
    if let Some(t) = &wire.correlation_id {
        properties =
            properties.with_correlation_id(short("the correlation_id property", t, render(t)?)?);
    }
    if let Some(t) = &wire.app_id {
        properties = properties.with_app_id(short("the app_id property", t, render(t)?)?);
    }

    Ok(OutboundMessage {
        destination,
        id: event.id.clone(),
        aggregate: event.key(),
        routing_key,
        body,
        header_len: header_frame_len(&properties),
        properties,
    })
}

/// Event-Forge's JSON envelope of `event`.
fn envelope(event: &OutboxEvent, created_iso: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        96 + event.id.len()
            + event.aggregate_type.len()
            + event.aggregate_id.len()
            + event.event_type.len()
            + event.payload.len()
            + event.metadata.as_ref().map_or(4, |m| m.len())
            + created_iso.len(),
    );
    body.extend_from_slice(b"{\"id\":");
    write_json_str(&mut body, &event.id);
    body.extend_from_slice(b",\"aggregateType\":");
    write_json_str(&mut body, &event.aggregate_type);
    body.extend_from_slice(b",\"aggregateId\":");
    write_json_str(&mut body, &event.aggregate_id);
    body.extend_from_slice(b",\"eventType\":");
    write_json_str(&mut body, &event.event_type);
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(&event.payload);
    body.extend_from_slice(b",\"metadata\":");
    match &event.metadata {
        Some(m) => body.extend_from_slice(m),
        None => body.extend_from_slice(b"null"),
    }
    body.extend_from_slice(b",\"createdAt\":");
    write_json_str(&mut body, created_iso);
    body.push(b'}');
    body
}

/// The copy of a dead message published to the dead-letter exchange `dlx`: the
/// original message when it could be encoded (else a JSON document with what could
/// be read of the row), plus headers that say why.
pub fn dead_letter(
    dlx: &ShortString,
    exchange: &ShortString,
    row: &Row,
    original: Option<&OutboundMessage>,
    attempts: i32,
    reason: &str,
) -> OutboundMessage {
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let (routing_key, payload, mut properties) = match original {
        Some(m) => (m.routing_key.clone(), m.body.clone(), m.properties.clone()),
        None => {
            let (kind, id, agg_type, agg_id, event_type, raw) = match row {
                Row::Event(e) => (
                    "event",
                    e.id.clone(),
                    Some(e.aggregate_type.clone()),
                    Some(e.aggregate_id.clone()),
                    Some(e.event_type.clone()),
                    Some(String::from_utf8_lossy(&e.payload).into_owned()),
                ),
                Row::Malformed(m) => (
                    "malformed",
                    m.id.clone(),
                    m.aggregate_type.clone(),
                    m.aggregate_id.clone(),
                    m.event_type.clone(),
                    m.payload
                        .as_ref()
                        .map(|p| String::from_utf8_lossy(p).into_owned()),
                ),
            };
            let doc = serde_json::json!({
                "id": id, "aggregateType": agg_type, "aggregateId": agg_id, "eventType": event_type,
                "rawPayload": raw, "kind": kind,
            });
            let rk = format!(
                "{}.{}",
                agg_type.unwrap_or_default(),
                event_type.unwrap_or_default()
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(ShortString::try_new(id).unwrap_or_default());
            (
                ShortString::try_new(rk).unwrap_or_else(|_| "dead".into()),
                serde_json::to_vec(&doc).unwrap_or_default(),
                props,
            )
        }
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-outbox-error".into(), long(reason));
    headers.insert("x-outbox-attempts".into(), AMQPValue::LongInt(attempts));
    let exchange = original.map_or(exchange, |m| m.exchange(exchange));
    headers.insert("x-outbox-original-exchange".into(), long(exchange.as_str()));
    headers.insert(
        "x-outbox-original-routing-key".into(),
        long(routing_key.as_str()),
    );
    properties = properties.with_headers(headers);
    OutboundMessage {
        destination: Destination::DeadLetter(dlx.clone()),
        id: row.id().to_string(),
        aggregate: row.key(),
        routing_key,
        body: payload,
        header_len: header_frame_len(&properties),
        properties,
    }
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a str to a Vec cannot fail");
}

/// `00-{traceId}-{spanId}-01` when metadata is an object with string `traceId` and
/// `spanId` that are valid W3C trace context ids: 32 and 16 hex digits, not all
/// zero (written lower-case). Anything else builds no header: a malformed or huge
/// id must not become a header the broker refuses.
fn traceparent(metadata: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Trace<'a> {
        #[serde(rename = "traceId", borrow, default)]
        trace_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "spanId", borrow, default)]
        span_id: Option<std::borrow::Cow<'a, str>>,
    }
    let t: Trace = serde_json::from_slice(metadata).ok()?;
    let (trace_id, span_id) = (t.trace_id?, t.span_id?);
    if !is_w3c_id(&trace_id, 32) || !is_w3c_id(&span_id, 16) {
        return None;
    }
    Some(format!(
        "00-{}-{}-01",
        trace_id.to_ascii_lowercase(),
        span_id.to_ascii_lowercase()
    ))
}

fn is_w3c_id(id: &str, len: usize) -> bool {
    id.len() == len && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event() -> OutboxEvent {
        OutboxEvent {
            id: "0b6f1c2e-0000-4000-8000-000000000001".into(),
            aggregate_type: "Order".into(),
            aggregate_id: "o-\"1\"".into(),
            event_type: "order.placed".into(),
            payload: Bytes::from_static(b"{\"total\": 12.5}"),
            metadata: Some(Bytes::from_static(b"{\"traceId\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"spanId\":\"00f067aa0ba902b7\"}")),
            created_at: Some("2026-11-27 06:00:00.25+00".into()),
            scheduled_at: None,
            max_retries: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn body_properties_headers() {
        let m = encode(&event(), 0).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "0b6f1c2e-0000-4000-8000-000000000001",
                "aggregateType": "Order",
                "aggregateId": "o-\"1\"",
                "eventType": "order.placed",
                "payload": {"total": 12.5},
                "metadata": {"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7"},
                "createdAt": "2026-11-27T06:00:00.250000+00:00",
            })
        );
        assert_eq!(m.routing_key.as_str(), "Order.order.placed");
        let p = &m.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            "0b6f1c2e-0000-4000-8000-000000000001"
        );
        assert_eq!(*p.timestamp(), Some(1_795_759_200));
        let h = p.headers().as_ref().unwrap().inner();
        let get = |k: &str| match h.get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("x-aggregate-type"), "Order");
        assert_eq!(get("x-aggregate-id"), "o-\"1\"");
        assert_eq!(get("x-event-type"), "order.placed");
        assert_eq!(
            get("traceparent"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn no_traceparent_without_both_ids_and_commit_time_fallback() {
        let mut e = event();
        e.metadata = Some(Bytes::from_static(b"{\"traceId\":\"abc\"}"));
        e.created_at = None;
        // 2026-11-27T06:00:00Z in Postgres-epoch microseconds.
        let pg_micros = (1_795_759_200 - 946_684_800) * 1_000_000;
        let m = encode(&e, pg_micros).unwrap();
        assert!(!m
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .contains_key("traceparent"));
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body["createdAt"], "2026-11-27T06:00:00+00:00");
        e.metadata = None;
        let m = encode(&e, pg_micros).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body["metadata"], serde_json::Value::Null);
    }

    fn wire(exchange: &str, routing_key: &str, body: BodyShape) -> WireShape {
        let headers = [("x-tenant".to_string(), "{tenant}".to_string())].into();
        let properties = crate::config::wire::RawProperties {
            message_type: Some("{event_type}".into()),
            correlation_id: None,
            app_id: Some("app-{tenant}".into()),
        };
        WireShape::parse(exchange, routing_key, &headers, &properties, body).unwrap()
    }

    #[test]
    fn templates_render_exchange_key_headers_and_properties() {
        let w = wire(
            "{tenant}-events",
            "{tenant}.{event_type}",
            BodyShape::Payload,
        );
        let mut e = event();
        e.extra = vec![Some("acme".into())];
        let m = encode_with(&e, 0, &w).unwrap();
        assert_eq!(m.destination, Destination::Rendered("acme-events".into()));
        assert_eq!(m.routing_key.as_str(), "acme.order.placed");
        assert_eq!(m.body, e.payload.to_vec(), "the payload as it is");
        let h = m.properties.headers().as_ref().unwrap().inner();
        let text = |k: &str| match h.get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("x-tenant"), "acme");
        assert_eq!(text("x-created-at"), "2026-11-27T06:00:00.250000+00:00");
        assert_eq!(
            text("x-metadata"),
            String::from_utf8_lossy(e.metadata.as_ref().unwrap())
        );
        assert_eq!(
            m.properties.kind().as_ref().unwrap().as_str(),
            "order.placed"
        );
        assert_eq!(m.properties.app_id().as_ref().unwrap().as_str(), "app-acme");
        assert!(body_len_at_least(&e, BodyShape::Payload) <= m.body.len());
        // The envelope shape keeps the envelope and adds no envelope headers.
        let env = encode_with(
            &e,
            0,
            &wire("events", "{tenant}.{event_type}", BodyShape::Envelope),
        )
        .unwrap();
        assert_eq!(env.destination, Destination::Configured);
        assert_eq!(env.body, encode(&e, 0).unwrap().body);
        assert!(!env
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .contains_key("x-created-at"));
    }

    #[test]
    fn a_rendered_value_that_cannot_be_sent_fails_that_message_with_why() {
        let w = wire(
            "{tenant}-events",
            "{tenant}.{event_type}",
            BodyShape::Envelope,
        );
        let mut e = event();
        e.extra = vec![Some("t".repeat(300))];
        let err = encode_with(&e, 0, &w).unwrap_err().0;
        assert!(err.contains("routing key") && err.contains("255"), "{err}");
        let w = wire("{tenant}-events", "{event_type}", BodyShape::Envelope);
        let err = encode_with(&e, 0, &w).unwrap_err().0;
        assert!(err.contains("exchange") && err.contains("255"), "{err}");
        let w = wire("{tenant}-events", "{event_type}", BodyShape::Envelope);
        e.extra = vec![None];
        let err = encode_with(&e, 0, &w).unwrap_err().0;
        assert!(err.contains("tenant") && err.contains("NULL"), "{err}");
        // A copy of the row that does not carry the column (the outbox row is gone).
        e.extra = Vec::new();
        let err = encode_with(&e, 0, &w).unwrap_err().0;
        assert!(
            err.contains("tenant") && err.contains("does not carry"),
            "{err}"
        );
    }

    #[test]
    fn dead_letter_copy_keeps_the_message_and_says_why() {
        let e = std::sync::Arc::new(event());
        let original = encode(&e, 0).unwrap();
        let dlx: ShortString = "dlx".into();
        let m = dead_letter(
            &dlx,
            &"events".into(),
            &Row::Event(e.clone()),
            Some(&original),
            4,
            "nacked",
        );
        assert_eq!(m.destination, Destination::DeadLetter("dlx".into()));
        assert_eq!(m.body, original.body);
        assert_eq!(m.routing_key, original.routing_key);
        let h = m.properties.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-outbox-attempts"), Some(&AMQPValue::LongInt(4)));
        assert!(h.contains_key("x-outbox-error") && h.contains_key("x-aggregate-id"));
        let bad = crate::event::MalformedRow {
            id: "m-1".into(),
            reason: "payload is not valid JSON".into(),
            aggregate_type: Some("Order".into()),
            aggregate_id: None,
            event_type: Some("placed".into()),
            payload: Some(bytes::Bytes::from_static(b"{nope")),
        };
        let m = dead_letter(
            &dlx,
            &"events".into(),
            &Row::Malformed(bad),
            None,
            1,
            "malformed row",
        );
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body["kind"], "malformed");
        assert_eq!(body["rawPayload"], "{nope");
        assert_eq!(m.routing_key.as_str(), "Order.placed");
    }

    #[test]
    fn traceparent_is_built_only_from_valid_w3c_ids() {
        let header = |metadata: &str| {
            let mut e = event();
            e.metadata = Some(Bytes::from(metadata.to_string()));
            let m = encode(&e, 0).unwrap();
            let h = m.properties.headers().as_ref().unwrap().inner().clone();
            h.get("traceparent").map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            })
        };
        let ok = r#"{"traceId":"4BF92F3577B34DA6A3CE929D0E0E4736","spanId":"00f067aa0ba902b7"}"#;
        assert_eq!(
            header(ok).as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let huge = format!(
            r#"{{"traceId":"{}","spanId":"00f067aa0ba902b7"}}"#,
            "a".repeat(200_000)
        );
        assert_eq!(header(&huge), None, "a 200 KB trace id builds no header");
        for bad in [
            r#"{"traceId":"00000000000000000000000000000000","spanId":"00f067aa0ba902b7"}"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e473","spanId":"00f067aa0ba902b7"}"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e473g","spanId":"00f067aa0ba902b7"}"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"0000000000000000"}"#,
            r#"{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":7}"#,
        ] {
            assert_eq!(header(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_header_frame_length_is_what_goes_on_the_wire() {
        let m = encode(&event(), 0).unwrap();
        let props = cookie_factory::gen_simple(
            lapin::protocol::basic::gen_properties(&m.properties),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(m.header_len, props.len() + 20);
        let mut big = event();
        big.aggregate_id = "x".repeat(200_000);
        let m = encode(&big, 0).unwrap();
        assert!(
            m.header_len > 200_000,
            "x-aggregate-id carries it: {}",
            m.header_len
        );
        assert!(body_len_at_least(&big, BodyShape::Envelope) <= m.body.len());
    }

    #[test]
    fn too_long_routing_key_is_refused() {
        let mut e = event();
        e.event_type = "x".repeat(300);
        assert!(encode(&e, 0).is_err());
    }
}
