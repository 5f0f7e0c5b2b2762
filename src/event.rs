//! An outbox row as the relay sees it, and the mapping from the table's columns
//! (matched by name from the pgoutput Relation message) to its fields.

use crate::config::ColumnMapping;
use bytes::Bytes;
use pg_walstream::{ColumnInfo, TupleData};
use std::hash::{Hash, Hasher};

/// Postgres type oids whose text form is always valid JSON.
const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// One committed outbox row. Text fields borrow nothing: they are the row's own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload column's JSON text, spliced into the body as-is.
    pub payload: Bytes,
    /// The metadata column's JSON text, when present and not NULL.
    pub metadata: Option<Bytes>,
    /// `created_at` as Postgres printed it (ISO DateStyle, UTC), when the table has it.
    pub created_at: Option<String>,
    /// `scheduled_at` as Postgres printed it: not to be published before then.
    pub scheduled_at: Option<String>,
    /// The row's own retry budget, when the table has a `max_retries` column.
    pub max_retries: Option<i32>,
    /// The values of the columns the wire templates name (`ColumnMapping::extra`,
    /// in that order; `None` for NULL).
    pub extra: Vec<Option<String>>,
}

impl crate::template::Values for OutboxEvent {
    fn field(&self, slot: crate::template::Slot) -> Option<&str> {
        use crate::template::Slot;
        Some(match slot {
            Slot::Id => &self.id,
            Slot::AggregateType => &self.aggregate_type,
            Slot::AggregateId => &self.aggregate_id,
            Slot::EventType => &self.event_type,
            Slot::Extra(i) => return self.extra.get(i).map(|v| v.as_deref().unwrap_or("")),
        })
    }
}

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

impl OutboxEvent {
    pub fn key(&self) -> AggregateKey {
        AggregateKey::of(&self.aggregate_type, &self.aggregate_id)
    }
}

/// An outbox row as the relay carries it: an event, or what could be read of a
/// row that cannot become one (kept so it can be parked and dead-lettered).
#[derive(Debug, Clone)]
pub enum Row {
    Event(std::sync::Arc<OutboxEvent>),
    Malformed(MalformedRow),
}

impl Row {
    pub fn key(&self) -> AggregateKey {
        match self {
            Row::Event(e) => e.key(),
            Row::Malformed(m) => AggregateKey::of(
                m.aggregate_type.as_deref().unwrap_or_default(),
                m.aggregate_id.as_deref().unwrap_or_default(),
            ),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Row::Event(e) => &e.id,
            Row::Malformed(m) => &m.id,
        }
    }

    /// Bytes this row holds in memory when it has no encoded message.
    pub fn weight(&self) -> usize {
        256 + match self {
            Row::Event(e) => e.payload.len() + e.metadata.as_ref().map_or(0, |m| m.len()),
            Row::Malformed(m) => m.payload.as_ref().map_or(0, |p| p.len()),
        }
    }
}

fn is_json_type(oid: u32) -> bool {
    oid == JSON_OID || oid == JSONB_OID
}

/// Column positions in the tuples of one relation version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMapping {
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_is_json: bool,
    metadata: Option<usize>,
    metadata_is_json: bool,
    created_at: Option<usize>,
    scheduled_at: Option<usize>,
    max_retries: Option<usize>,
    /// Positions of `ColumnMapping::extra`.
    extra: Vec<usize>,
}

/// A row read as an event, or what could be read of it (boxed: the rare path).
pub type RowRead = Result<OutboxEvent, Box<MalformedRow>>;

/// Why a row cannot become a message, with what could be read of it (kept in retry state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRow {
    /// The row's id, or a placeholder when even that is unreadable.
    pub id: String,
    pub reason: String,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub payload: Option<Bytes>,
}

impl ResolvedMapping {
    /// Resolves column positions of `mapping` for one Relation message; the
    /// error lists the required columns that are missing.
    pub fn resolve(mapping: &ColumnMapping, columns: &[ColumnInfo]) -> Result<Self, Vec<String>> {
        let pos = |name: &str| columns.iter().position(|c| &*c.name == name);
        let names: Vec<String> = columns.iter().map(|c| c.name.to_string()).collect();
        let missing = mapping.missing_required(&names);
        if !missing.is_empty() {
            return Err(missing);
        }
        let required = |name: &str| pos(name).ok_or_else(|| vec![name.to_string()]);
        let payload = required(&mapping.payload)?;
        let opt = |c: Option<&str>| c.and_then(pos);
        let metadata = opt(mapping.metadata.as_deref());
        Ok(ResolvedMapping {
            id: required(&mapping.id)?,
            aggregate_type: required(&mapping.aggregate_type)?,
            aggregate_id: required(&mapping.aggregate_id)?,
            event_type: required(&mapping.event_type)?,
            payload,
            payload_is_json: is_json_type(columns[payload].type_id),
            metadata,
            metadata_is_json: metadata.is_some_and(|m| is_json_type(columns[m].type_id)),
            created_at: opt(mapping.created_at.as_deref()),
            scheduled_at: opt(mapping.scheduled_at.as_deref()),
            max_retries: opt(mapping.max_retries.as_deref()),
            extra: mapping
                .extra
                .iter()
                .map(|c| required(c))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Builds the event from an Insert's new tuple; the error keeps what could be
    /// read of the row (it is parked as-is).
    pub fn event(&self, tuple: &TupleData) -> RowRead {
        let cell = |idx: usize| -> Result<Option<Bytes>, String> {
            let col = tuple
                .get_column(idx)
                .ok_or_else(|| "a column is absent from the tuple".to_string())?;
            if col.is_null() {
                return Ok(None);
            }
            if !col.is_text() {
                return Err(
                    "a column did not arrive in text format (binary replication is not supported)"
                        .into(),
                );
            }
            Ok(Some(col.raw_bytes()))
        };
        self.build(cell)
    }

    /// Builds the event from cells fetched by position (a tuple, or a re-read row).
    pub fn build(&self, cell: impl Fn(usize) -> Result<Option<Bytes>, String>) -> RowRead {
        let text = |idx: usize| -> Option<String> {
            cell(idx)
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
        };
        let mut bad = MalformedRow {
            id: text(self.id).unwrap_or_else(|| "<unreadable id>".into()),
            reason: String::new(),
            aggregate_type: text(self.aggregate_type),
            aggregate_id: text(self.aggregate_id),
            event_type: text(self.event_type),
            payload: cell(self.payload).ok().flatten(),
        };
        let required = |idx: usize, name: &str| -> Result<String, String> {
            let b = cell(idx).map_err(|e| format!("column {name}: {e}"))?;
            let b = b.ok_or_else(|| format!("required column {name} is NULL"))?;
            String::from_utf8(b.to_vec()).map_err(|_| format!("column {name} is not valid UTF-8"))
        };
        let result = (|| -> Result<OutboxEvent, String> {
            let id = required(self.id, "id")?;
            let aggregate_type = required(self.aggregate_type, "aggregate_type")?;
            let aggregate_id = required(self.aggregate_id, "aggregate_id")?;
            let event_type = required(self.event_type, "event_type")?;
            let payload = cell(self.payload)?.ok_or("required column payload is NULL")?;
            if !self.payload_is_json {
                validate_json(&payload).map_err(|e| format!("payload is not valid JSON: {e}"))?;
            }
            let metadata = match self.metadata {
                Some(idx) => cell(idx)?,
                None => None,
            };
            if let (Some(m), false) = (&metadata, self.metadata_is_json) {
                validate_json(m).map_err(|e| format!("metadata is not valid JSON: {e}"))?;
            }
            let opt_text = |c: Option<usize>| c.and_then(text);
            let max_retries = match opt_text(self.max_retries) {
                Some(v) => Some(
                    v.trim()
                        .parse::<i32>()
                        .map_err(|_| format!("max_retries {v:?} is not an integer"))?,
                ),
                None => None,
            };
            Ok(OutboxEvent {
                id,
                aggregate_type,
                aggregate_id,
                event_type,
                payload,
                metadata,
                created_at: opt_text(self.created_at),
                scheduled_at: opt_text(self.scheduled_at),
                max_retries,
                extra: self.extra.iter().map(|&i| text(i)).collect(),
            })
        })();
        result.map_err(|reason| {
            bad.reason = reason;
            Box::new(bad)
        })
    }
}

fn validate_json(b: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(b)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_walstream::ColumnData;

    fn col(name: &str, oid: u32) -> ColumnInfo {
        ColumnInfo::new(0, name.to_string(), oid, -1)
    }

    fn relation() -> Vec<ColumnInfo> {
        vec![
            col("extra", 25),
            col("payload", 114),
            col("id", 1043),
            col("aggregate_type", 1043),
            col("aggregate_id", 1043),
            col("event_type", 1043),
            col("created_at", 1184),
        ]
    }

    fn t(s: &str) -> ColumnData {
        ColumnData::text(s.as_bytes().to_vec())
    }

    #[test]
    fn columns_are_matched_by_name() {
        let m = ResolvedMapping::resolve(&ColumnMapping::event_forge(), &relation()).unwrap();
        let tuple = TupleData::new(vec![
            t("x"),
            t("{\"a\":1}"),
            t("id-1"),
            t("Order"),
            t("o-1"),
            t("order.placed"),
            t("2026-11-27 06:00:00.5+00"),
        ]);
        let e = m.event(&tuple).unwrap();
        assert_eq!(e.id, "id-1");
        assert_eq!(e.aggregate_type, "Order");
        assert_eq!(e.aggregate_id, "o-1");
        assert_eq!(e.event_type, "order.placed");
        assert_eq!(&e.payload[..], b"{\"a\":1}");
        assert_eq!(e.metadata, None);
        assert_eq!(e.created_at.as_deref(), Some("2026-11-27 06:00:00.5+00"));
    }

    #[test]
    fn missing_columns_are_named() {
        let cols = vec![col("id", 25), col("payload", 114)];
        let missing = ResolvedMapping::resolve(&ColumnMapping::event_forge(), &cols).unwrap_err();
        assert_eq!(
            ColumnMapping::debezium().missing_required(&["id".into(), "payload".into()]),
            vec!["aggregatetype", "aggregateid", "type"]
        );
        assert_eq!(
            missing,
            vec!["aggregate_type", "aggregate_id", "event_type"]
        );
    }

    #[test]
    fn text_payload_must_be_json_and_required_not_null() {
        let cols = vec![
            col("id", 25),
            col("aggregate_type", 25),
            col("aggregate_id", 25),
            col("event_type", 25),
            col("payload", 25),
        ];
        let m = ResolvedMapping::resolve(&ColumnMapping::event_forge(), &cols).unwrap();
        let bad = TupleData::new(vec![t("i"), t("A"), t("1"), t("e"), t("{nope")]);
        let e = m.event(&bad).unwrap_err();
        assert_eq!(e.id, "i");
        assert!(
            e.reason.contains("payload is not valid JSON"),
            "{}",
            e.reason
        );
        let null = TupleData::new(vec![t("i"), t("A"), ColumnData::null(), t("e"), t("{}")]);
        let e = m.event(&null).unwrap_err();
        assert!(e.reason.contains("aggregate_id is NULL"), "{}", e.reason);
    }
}
