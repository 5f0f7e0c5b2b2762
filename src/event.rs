//! An outbox row as the relay sees it, and the mapping from the table's columns
//! (matched by name from the pgoutput Relation message) to its fields.

use bytes::Bytes;
use pg_walstream::{ColumnInfo, TupleData};

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
}

/// Column names of one table layout (Event-Forge by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub id: &'static str,
    pub aggregate_type: &'static str,
    pub aggregate_id: &'static str,
    pub event_type: &'static str,
    pub payload: &'static str,
    pub metadata: &'static str,
    pub created_at: &'static str,
}

impl ColumnMapping {
    /// The Event-Forge `outbox_messages` layout.
    pub const EVENT_FORGE: ColumnMapping = ColumnMapping {
        id: "id",
        aggregate_type: "aggregate_type",
        aggregate_id: "aggregate_id",
        event_type: "event_type",
        payload: "payload",
        metadata: "metadata",
        created_at: "created_at",
    };

    fn required(&self) -> [&'static str; 5] {
        [
            self.id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.payload,
        ]
    }

    /// Required columns absent from `columns`.
    pub fn missing_required(&self, columns: &[String]) -> Vec<String> {
        self.required()
            .iter()
            .filter(|c| !columns.iter().any(|have| have == *c))
            .map(|c| c.to_string())
            .collect()
    }

    /// Resolves column positions for one Relation message.
    pub fn resolve(&self, columns: &[ColumnInfo]) -> Result<ResolvedMapping, Vec<String>> {
        let pos = |name: &str| columns.iter().position(|c| &*c.name == name);
        let names: Vec<String> = columns.iter().map(|c| c.name.to_string()).collect();
        let missing = self.missing_required(&names);
        if !missing.is_empty() {
            return Err(missing);
        }
        let payload = pos(self.payload).expect("checked above");
        let metadata = pos(self.metadata);
        Ok(ResolvedMapping {
            id: pos(self.id).expect("checked above"),
            aggregate_type: pos(self.aggregate_type).expect("checked above"),
            aggregate_id: pos(self.aggregate_id).expect("checked above"),
            event_type: pos(self.event_type).expect("checked above"),
            payload,
            payload_is_json: is_json_type(columns[payload].type_id),
            metadata,
            metadata_is_json: metadata.is_some_and(|m| is_json_type(columns[m].type_id)),
            created_at: pos(self.created_at),
        })
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
}

/// Why a row cannot become a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRow {
    /// The row's id, or a placeholder when even that is unreadable.
    pub id: String,
    pub reason: String,
}

impl ResolvedMapping {
    /// Builds the event from an Insert's new tuple.
    pub fn event(&self, tuple: &TupleData) -> Result<OutboxEvent, MalformedRow> {
        let text = |idx: usize, name: &str| -> Result<Option<Bytes>, String> {
            let col = tuple
                .get_column(idx)
                .ok_or_else(|| format!("column {name} is absent from the tuple"))?;
            if col.is_null() {
                return Ok(None);
            }
            if !col.is_text() {
                return Err(format!(
                    "column {name} did not arrive in text format (binary replication is not supported)"
                ));
            }
            Ok(Some(col.raw_bytes()))
        };
        let string = |b: Bytes, name: &str| -> Result<String, String> {
            String::from_utf8(b.to_vec()).map_err(|_| format!("column {name} is not valid UTF-8"))
        };
        let id = match text(self.id, "id") {
            Ok(Some(b)) => string(b, "id").map_err(|reason| MalformedRow {
                id: "<unreadable id>".into(),
                reason,
            })?,
            Ok(None) => {
                return Err(MalformedRow {
                    id: "<null id>".into(),
                    reason: "column id is NULL".into(),
                })
            }
            Err(reason) => {
                return Err(MalformedRow {
                    id: "<unreadable id>".into(),
                    reason,
                })
            }
        };
        let fail = |reason: String| MalformedRow {
            id: id.clone(),
            reason,
        };
        let required = |idx: usize, name: &str| -> Result<Bytes, MalformedRow> {
            text(idx, name)
                .map_err(fail)?
                .ok_or_else(|| fail(format!("required column {name} is NULL")))
        };
        let aggregate_type = string(
            required(self.aggregate_type, "aggregate_type")?,
            "aggregate_type",
        )
        .map_err(fail)?;
        let aggregate_id =
            string(required(self.aggregate_id, "aggregate_id")?, "aggregate_id").map_err(fail)?;
        let event_type =
            string(required(self.event_type, "event_type")?, "event_type").map_err(fail)?;
        let payload = required(self.payload, "payload")?;
        if !self.payload_is_json {
            validate_json(&payload).map_err(|e| fail(format!("payload is not valid JSON: {e}")))?;
        }
        let metadata = match self.metadata {
            Some(idx) => text(idx, "metadata").map_err(fail)?,
            None => None,
        };
        if let (Some(m), false) = (&metadata, self.metadata_is_json) {
            validate_json(m).map_err(|e| fail(format!("metadata is not valid JSON: {e}")))?;
        }
        let created_at = match self.created_at {
            Some(idx) => match text(idx, "created_at").map_err(fail)? {
                Some(b) => Some(string(b, "created_at").map_err(fail)?),
                None => None,
            },
            None => None,
        };
        Ok(OutboxEvent {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            metadata,
            created_at,
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
        let m = ColumnMapping::EVENT_FORGE.resolve(&relation()).unwrap();
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
        let missing = ColumnMapping::EVENT_FORGE.resolve(&cols).unwrap_err();
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
        let m = ColumnMapping::EVENT_FORGE.resolve(&cols).unwrap();
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
