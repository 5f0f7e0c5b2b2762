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
    /// `scheduled_at` as Postgres printed it: not to be published before then.
    pub scheduled_at: Option<String>,
    /// The row's own retry budget, when the table has a `max_retries` column.
    pub max_retries: Option<i32>,
}

/// Column names of one table layout (Event-Forge by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub id: &'static str,
    pub aggregate_type: &'static str,
    pub aggregate_id: &'static str,
    pub event_type: &'static str,
    pub payload: &'static str,
    pub metadata: Option<&'static str>,
    pub created_at: Option<&'static str>,
    pub scheduled_at: Option<&'static str>,
    pub max_retries: Option<&'static str>,
}

impl ColumnMapping {
    /// The Event-Forge `outbox_messages` layout.
    pub const EVENT_FORGE: ColumnMapping = ColumnMapping {
        id: "id",
        aggregate_type: "aggregate_type",
        aggregate_id: "aggregate_id",
        event_type: "event_type",
        payload: "payload",
        metadata: Some("metadata"),
        created_at: Some("created_at"),
        scheduled_at: Some("scheduled_at"),
        max_retries: Some("max_retries"),
    };

    /// A Debezium-style outbox: id, aggregatetype, aggregateid, type, payload.
    pub const DEBEZIUM: ColumnMapping = ColumnMapping {
        id: "id",
        aggregate_type: "aggregatetype",
        aggregate_id: "aggregateid",
        event_type: "type",
        payload: "payload",
        metadata: None,
        created_at: None,
        scheduled_at: None,
        max_retries: None,
    };

    pub fn for_config(mapping: crate::config::Mapping) -> ColumnMapping {
        match mapping {
            crate::config::Mapping::EventForge => Self::EVENT_FORGE,
            crate::config::Mapping::Debezium => Self::DEBEZIUM,
        }
    }

    /// The columns a `select` re-reading one row needs, in `ResolvedMapping::from_names` order.
    pub fn select_list(&self) -> Vec<&'static str> {
        let mut v = vec![
            self.id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.payload,
        ];
        v.extend(
            [
                self.metadata,
                self.created_at,
                self.scheduled_at,
                self.max_retries,
            ]
            .into_iter()
            .flatten(),
        );
        v
    }

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
        let opt = |c: Option<&str>| c.and_then(pos);
        let metadata = opt(self.metadata);
        Ok(ResolvedMapping {
            id: pos(self.id).expect("checked above"),
            aggregate_type: pos(self.aggregate_type).expect("checked above"),
            aggregate_id: pos(self.aggregate_id).expect("checked above"),
            event_type: pos(self.event_type).expect("checked above"),
            payload,
            payload_is_json: is_json_type(columns[payload].type_id),
            metadata,
            metadata_is_json: metadata.is_some_and(|m| is_json_type(columns[m].type_id)),
            created_at: opt(self.created_at),
            scheduled_at: opt(self.scheduled_at),
            max_retries: opt(self.max_retries),
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
    scheduled_at: Option<usize>,
    max_retries: Option<usize>,
}

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
    /// Builds the event from an Insert's new tuple.
    // The error keeps what could be read of the row (it is parked as-is); it is the
    // rare path, and the hot Ok path is not affected by its size.
    #[allow(clippy::result_large_err)]
    pub fn event(&self, tuple: &TupleData) -> Result<OutboxEvent, MalformedRow> {
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
    #[allow(clippy::result_large_err)]
    pub fn build(
        &self,
        cell: impl Fn(usize) -> Result<Option<Bytes>, String>,
    ) -> Result<OutboxEvent, MalformedRow> {
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
            })
        })();
        result.map_err(|reason| {
            bad.reason = reason;
            bad
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
            ColumnMapping::DEBEZIUM.missing_required(&["id".into(), "payload".into()]),
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
