//! The Event-Forge wire format: body, properties, headers and routing key of
//! one outbox row (see `reference/event-forge.md`).

use crate::event::OutboxEvent;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::hash::{Hash, Hasher};

/// Identity of an aggregate for ordering: a hash of (aggregate_type, aggregate_id).
/// Two aggregates that collide are merely ordered together, which is always safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateKey(pub u64);

impl AggregateKey {
    pub fn of(aggregate_type: &str, aggregate_id: &str) -> Self {
        // SipHash with fixed keys: stable within and across runs.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        aggregate_type.hash(&mut h);
        aggregate_id.hash(&mut h);
        AggregateKey(h.finish())
    }
}

/// A message ready for `basic.publish`.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Exchange override (the dead-letter exchange); `None`: the configured exchange.
    pub exchange: Option<ShortString>,
    /// The outbox row id, also the AMQP `message_id`.
    pub id: String,
    pub aggregate: AggregateKey,
    pub routing_key: ShortString,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl OutboundMessage {
    /// Bytes this message holds in memory, for the in-flight window.
    pub fn weight(&self) -> usize {
        self.body.len() + self.id.len() + self.routing_key.as_str().len() + 256
    }
}

/// Why a row cannot be sent in this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

/// Postgres epoch (2000-01-01) minus Unix epoch, in microseconds.
pub(crate) const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Encodes an event. `commit_time_micros` (Postgres epoch) stands in for `created_at`
/// when the table has no such column.
pub fn encode(
    event: &OutboxEvent,
    commit_time_micros: i64,
) -> Result<OutboundMessage, FormatError> {
    let routing_key =
        ShortString::try_new(format!("{}.{}", event.aggregate_type, event.event_type)).map_err(
            |e| {
                FormatError(format!(
                    "routing key aggregate_type.event_type is too long for AMQP: {e}"
                ))
            },
        )?;
    let message_id = ShortString::try_new(event.id.as_str())
        .map_err(|e| FormatError(format!("id is too long for an AMQP message_id: {e}")))?;

    let (created_iso, created_unix) =
        match event.created_at.as_deref().and_then(pg_timestamp_to_iso) {
            Some(v) => v,
            None => {
                let unix_micros = commit_time_micros + PG_EPOCH_OFFSET_MICROS;
                (
                    unix_micros_to_iso(unix_micros),
                    unix_micros.div_euclid(1_000_000),
                )
            }
        };

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
    write_json_str(&mut body, &created_iso);
    body.push(b'}');

    let mut headers = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    headers.insert("x-aggregate-type".into(), long(&event.aggregate_type));
    headers.insert("x-aggregate-id".into(), long(&event.aggregate_id));
    headers.insert("x-event-type".into(), long(&event.event_type));
    if let Some(tp) = event.metadata.as_deref().and_then(traceparent) {
        headers.insert("traceparent".into(), long(&tp));
    }

    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id)
        .with_headers(headers);
    if created_unix >= 0 {
        properties = properties.with_timestamp(created_unix as u64);
    }

    Ok(OutboundMessage {
        exchange: None,
        id: event.id.clone(),
        aggregate: crate::sink::format::AggregateKey::of(
            &event.aggregate_type,
            &event.aggregate_id,
        ),
        routing_key,
        body,
        properties,
    })
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a str to a Vec cannot fail");
}

/// `00-{traceId}-{spanId}-01` when metadata is an object with string `traceId` and `spanId`.
fn traceparent(metadata: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Trace<'a> {
        #[serde(rename = "traceId", borrow, default)]
        trace_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "spanId", borrow, default)]
        span_id: Option<std::borrow::Cow<'a, str>>,
    }
    let t: Trace = serde_json::from_slice(metadata).ok()?;
    Some(format!("00-{}-{}-01", t.trace_id?, t.span_id?))
}

/// Postgres ISO text to Unix microseconds.
pub fn pg_timestamp_to_unix_micros(s: &str) -> Option<i64> {
    let (iso, secs) = pg_timestamp_to_iso(s)?;
    let micros = iso
        .get(19..)
        .and_then(|r| r.strip_prefix('.'))
        .map(|f| f[..6].parse::<i64>().unwrap_or(0))
        .unwrap_or(0);
    Some(secs * 1_000_000 + micros)
}

/// Postgres ISO text (`2026-11-27 06:00:00.5+00`) to Python-style ISO-8601
/// (`2026-11-27T06:00:00.500000+00:00`) and Unix seconds.
pub fn pg_timestamp_to_iso(s: &str) -> Option<(String, i64)> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b' ' && b[10] != b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 6 {
            return None;
        }
        micros = frac[..digits].parse::<i64>().ok()? * 10i64.pow(6 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_secs = if rest.is_empty() {
        None
    } else {
        let sign = match rest.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let parts: Vec<&str> = rest[1..].split(':').collect();
        if parts.is_empty()
            || parts.len() > 3
            || parts
                .iter()
                .any(|p| p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit()))
        {
            return None;
        }
        let v: Vec<i64> = parts.iter().map(|p| p.parse().unwrap_or(0)).collect();
        Some(sign * (v[0] * 3600 + v.get(1).unwrap_or(&0) * 60 + v.get(2).unwrap_or(&0)))
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let unix = days * 86400 + hour * 3600 + minute * 60 + second - offset_secs.unwrap_or(0);
    let mut iso = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if micros != 0 {
        iso.push_str(&format!(".{micros:06}"));
    }
    if let Some(off) = offset_secs {
        let sign = if off < 0 { '-' } else { '+' };
        let a = off.abs();
        iso.push_str(&format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60));
    }
    Some((iso, unix))
}

/// Unix microseconds to `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`.
pub fn unix_micros_to_iso(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    );
    if micros != 0 {
        s.push_str(&format!(".{micros:06}"));
    }
    s.push_str("+00:00");
    s
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
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

    #[test]
    fn too_long_routing_key_is_refused() {
        let mut e = event();
        e.event_type = "x".repeat(300);
        assert!(encode(&e, 0).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            pg_timestamp_to_iso("2026-11-27 06:00:00+00"),
            Some(("2026-11-27T06:00:00+00:00".into(), 1_795_759_200))
        );
        assert_eq!(
            pg_timestamp_to_iso("2026-11-27 08:30:00.000001+02:30").unwrap(),
            ("2026-11-27T08:30:00.000001+02:30".into(), 1_795_759_200)
        );
        assert_eq!(pg_timestamp_to_iso("1970-01-01 00:00:00").unwrap().1, 0);
        assert_eq!(pg_timestamp_to_iso("infinity"), None);
        assert_eq!(
            pg_timestamp_to_unix_micros("2026-11-27 06:00:00.25+00"),
            Some(1_795_759_200_250_000)
        );
        assert_eq!(
            unix_micros_to_iso(1_795_759_200_000_000),
            "2026-11-27T06:00:00+00:00"
        );
        assert_eq!(
            unix_micros_to_iso(1_500_000),
            "1970-01-01T00:00:01.500000+00:00"
        );
    }
}
