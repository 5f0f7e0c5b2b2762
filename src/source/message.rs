//! The messages source (`postgres.source = "messages"`): the content of a
//! transactional logical decoding message (`pg_logical_emit_message(true,
//! prefix, content)`) as an outbox event. The content is a JSON object with the
//! fields of a row: `id`, `aggregate_type`, `aggregate_id`, `event_type`
//! (strings), `payload` (any JSON) and optionally `metadata` (an object, or
//! null). Anything else is a malformed message, parked with its reason.

use crate::event::{MalformedRow, OutboxEvent, RowRead};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    aggregate_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    aggregate_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    /// Present (`null` included, as a table's JSON column may hold) or absent.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// A field that is there, whatever its JSON value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The event a message carries, or why it cannot be one. `lsn` names a message
/// whose content has no readable id (`lsn:0/16B3748`).
pub fn decode(content: &[u8], lsn: &str) -> RowRead {
    let malformed = |id: Option<String>, reason: String, c: Option<&Content>| {
        Box::new(MalformedRow {
            id: id.unwrap_or_else(|| format!("lsn:{lsn}")),
            reason,
            aggregate_type: c.and_then(|c| c.aggregate_type.as_deref().map(String::from)),
            aggregate_id: c.and_then(|c| c.aggregate_id.as_deref().map(String::from)),
            event_type: c.and_then(|c| c.event_type.as_deref().map(String::from)),
            payload: c.and_then(|c| {
                c.payload
                    .map(|p| Bytes::copy_from_slice(p.get().as_bytes()))
            }),
        })
    };
    let c: Content = match serde_json::from_slice(content) {
        Ok(c) => c,
        Err(e) => {
            return Err(malformed(
                None,
                format!("the message content is not a JSON object with string id, aggregate_type, aggregate_id, event_type and a payload: {e}"),
                None,
            ))
        }
    };
    let id = c.id.as_deref().filter(|s| !s.is_empty()).map(String::from);
    let missing: Vec<&str> = [
        ("id", id.is_none()),
        ("aggregate_type", c.aggregate_type.is_none()),
        ("aggregate_id", c.aggregate_id.is_none()),
        // An event type is what consumers route and dispatch on: never empty.
        (
            "event_type",
            c.event_type.as_deref().is_none_or(str::is_empty),
        ),
        ("payload", c.payload.is_none()),
    ]
    .iter()
    .filter(|(_, m)| *m)
    .map(|(k, _)| *k)
    .collect();
    if !missing.is_empty() {
        return Err(malformed(
            id,
            format!(
                "the message content lacks {} (id and event_type must not be empty either)",
                missing.join(", ")
            ),
            Some(&c),
        ));
    }
    let metadata = c.metadata.filter(|m| m.get() != "null");
    if let Some(m) = metadata {
        if !m.get().starts_with('{') {
            return Err(malformed(
                id,
                "the message's metadata is not a JSON object".into(),
                Some(&c),
            ));
        }
    }
    let text = |v: &Option<std::borrow::Cow<str>>| v.as_deref().unwrap_or_default().to_string();
    Ok(OutboxEvent {
        id: id.unwrap_or_default(),
        aggregate_type: text(&c.aggregate_type),
        aggregate_id: text(&c.aggregate_id),
        event_type: text(&c.event_type),
        payload: Bytes::copy_from_slice(c.payload.map_or("null", |p| p.get()).as_bytes()),
        metadata: metadata.map(|m| Bytes::copy_from_slice(m.get().as_bytes())),
        created_at: None,
        scheduled_at: None,
        max_retries: None,
        extra: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_message_becomes_the_event_it_carries() {
        let e = decode(
            br#"{"id":"m-1","aggregate_type":"Order","aggregate_id":"o-\"7\"","event_type":"placed","payload":{"total": 12.5},"metadata":{"traceId":"x"}}"#,
            "0/10",
        )
        .unwrap();
        assert_eq!(
            (
                e.id.as_str(),
                e.aggregate_type.as_str(),
                e.aggregate_id.as_str(),
                e.event_type.as_str()
            ),
            ("m-1", "Order", "o-\"7\"", "placed")
        );
        assert_eq!(
            &e.payload[..],
            br#"{"total": 12.5}"#,
            "the payload as written"
        );
        assert_eq!(e.metadata.as_deref(), Some(&br#"{"traceId":"x"}"#[..]));
        let no_meta = decode(
            br#"{"id":"m-2","aggregate_type":"A","aggregate_id":"1","event_type":"e","payload":[1],"metadata":null}"#,
            "0/10",
        )
        .unwrap();
        assert_eq!(no_meta.metadata, None);
        let null_payload = decode(
            br#"{"id":"m-5","aggregate_type":"A","aggregate_id":"1","event_type":"e","payload":null}"#,
            "0/10",
        )
        .unwrap();
        assert_eq!(
            &null_payload.payload[..],
            b"null",
            "a null payload is a payload"
        );
    }

    #[test]
    fn a_message_that_is_not_an_event_says_why() {
        for (content, id, words) in [
            (&b"not json"[..], "lsn:0/AB", "not a JSON object"),
            (br#"{"id":"m-3","aggregate_type":"A"}"#, "m-3", "lacks aggregate_id, event_type, payload"),
            (br#"{"aggregate_type":"A","aggregate_id":"1","event_type":"e","payload":1}"#, "lsn:0/AB", "lacks id"),
            (br#"{"id":"m-4","aggregate_type":"A","aggregate_id":"1","event_type":"e","payload":1,"metadata":[1]}"#, "m-4", "metadata"),
            (br#"{"id":"m-6","aggregate_type":"A","aggregate_id":"1","event_type":"","payload":1}"#, "m-6", "lacks event_type"),
            (br#"{"id":7,"aggregate_type":"A","aggregate_id":"1","event_type":"e","payload":1}"#, "lsn:0/AB", "not a JSON object"),
        ] {
            let m = decode(content, "0/AB").unwrap_err();
            assert_eq!(m.id, id);
            assert!(m.reason.contains(words), "{}: {}", String::from_utf8_lossy(content), m.reason);
        }
    }

    proptest! {
        /// Whatever the content, decoding answers (an event or a reason), and an
        /// event built from fields round-trips them.
        #[test]
        fn any_content_is_answered(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, "0/1");
        }

        #[test]
        fn fields_round_trip(id in "[a-z0-9-]{1,20}", t in "\\PC{0,20}", a in "\\PC{0,20}", e in "\\PC{1,20}", n in any::<i64>()) {
            let content = serde_json::json!({
                "id": id, "aggregate_type": t, "aggregate_id": a, "event_type": e, "payload": {"n": n},
            });
            let ev = decode(content.to_string().as_bytes(), "0/1").unwrap();
            prop_assert_eq!((ev.id, ev.aggregate_type, ev.aggregate_id, ev.event_type), (id, t, a, e));
            let payload: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap();
            prop_assert_eq!(payload, serde_json::json!({"n": n}));
        }
    }
}
