//! pgoutput (protocol 1) decoding with pg_walstream's parser: Relation messages
//! give each table's column names, Inserts into the outbox table become events.
//! Begin and Commit arrive as their own replication events (the transport splits
//! them out), everything else is ignored.

use crate::config::ColumnMapping;
use crate::event::{MalformedRow, OutboxEvent, ResolvedMapping};
use crate::pg::TableName;
use bytes::Bytes;
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser};
use std::collections::HashMap;

/// The result of decoding one XLogData payload.
#[derive(Debug)]
pub enum Decoded {
    /// An insert into the outbox table.
    Event(OutboxEvent),
    /// An outbox insert that cannot become an event.
    Malformed(MalformedRow),
    /// Anything else (other tables, other operations, relation and type messages).
    Ignored,
}

/// Errors that stop decoding altogether.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message cannot be parsed: {0}")]
    Protocol(String),
    #[error("outbox table {table} now lacks required column(s) {}: restore them (see sql/outbox_messages.sql)", .missing.join(", "))]
    ColumnsMissing { table: String, missing: Vec<String> },
    #[error("insert for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
}

/// Decoder state for one replication connection (relation ids are per session).
pub struct Decoder {
    parser: LogicalReplicationParser,
    table: TableName,
    mapping: ColumnMapping,
    /// Relation id -> the outbox mapping (None: another table).
    relations: HashMap<u32, Option<ResolvedMapping>>,
}

impl Decoder {
    pub fn new(table: TableName, mapping: ColumnMapping) -> Self {
        Self {
            parser: LogicalReplicationParser::with_protocol_version(1),
            table,
            mapping,
            relations: HashMap::new(),
        }
    }

    /// Decodes one XLogData payload.
    pub fn decode(&mut self, data: Bytes) -> Result<Decoded, DecodeError> {
        let msg = self
            .parser
            .parse_wal_message_bytes(data)
            .map_err(|e| DecodeError::Protocol(e.to_string()))?;
        match msg.message {
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let ours = *namespace == *self.table.schema && *relation_name == *self.table.name;
                let resolved = if ours {
                    let m =
                        ResolvedMapping::resolve(&self.mapping, &columns).map_err(|missing| {
                            DecodeError::ColumnsMissing {
                                table: self.table.to_string(),
                                missing,
                            }
                        })?;
                    tracing::debug!(relation_id, table = %self.table, "outbox relation mapped");
                    Some(m)
                } else {
                    None
                };
                self.relations.insert(relation_id, resolved);
                Ok(Decoded::Ignored)
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                match self.relations.get(&relation_id) {
                    Some(Some(mapping)) => Ok(match mapping.event(&tuple) {
                        Ok(e) => Decoded::Event(e),
                        Err(m) => Decoded::Malformed(*m),
                    }),
                    Some(None) => Ok(Decoded::Ignored),
                    None => Err(DecodeError::UnknownRelation(relation_id)),
                }
            }
            _ => Ok(Decoded::Ignored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_msg(id: u32, ns: &str, name: &str, cols: &[(&str, u32)]) -> Bytes {
        let mut b = vec![b'R'];
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(ns.as_bytes());
        b.push(0);
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.push(b'd');
        b.extend_from_slice(&(cols.len() as u16).to_be_bytes());
        for (n, oid) in cols {
            b.push(0);
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
        }
        Bytes::from(b)
    }

    fn insert_msg(id: u32, values: &[Option<&str>]) -> Bytes {
        let mut b = vec![b'I'];
        b.extend_from_slice(&id.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        Bytes::from(b)
    }

    const COLS: &[(&str, u32)] = &[
        ("id", 1043),
        ("aggregate_type", 1043),
        ("aggregate_id", 1043),
        ("event_type", 1043),
        ("payload", 114),
    ];

    #[test]
    fn inserts_into_the_outbox_become_events_others_are_ignored() {
        let mut d = Decoder::new(
            TableName::parse("public.outbox").unwrap(),
            ColumnMapping::event_forge(),
        );
        assert!(matches!(
            d.decode(relation_msg(1, "public", "outbox", COLS)).unwrap(),
            Decoded::Ignored
        ));
        assert!(matches!(
            d.decode(relation_msg(2, "public", "other", COLS)).unwrap(),
            Decoded::Ignored
        ));
        let row = [
            Some("i1"),
            Some("Order"),
            Some("o1"),
            Some("placed"),
            Some("{}"),
        ];
        match d.decode(insert_msg(1, &row)).unwrap() {
            Decoded::Event(e) => assert_eq!(e.id, "i1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            d.decode(insert_msg(2, &row)).unwrap(),
            Decoded::Ignored
        ));
        let null_agg = [Some("i2"), Some("Order"), None, Some("placed"), Some("{}")];
        assert!(matches!(
            d.decode(insert_msg(1, &null_agg)).unwrap(),
            Decoded::Malformed(_)
        ));
        assert!(matches!(
            d.decode(insert_msg(9, &row)),
            Err(DecodeError::UnknownRelation(9))
        ));
    }

    #[test]
    fn a_relation_without_required_columns_is_an_error() {
        let mut d = Decoder::new(
            TableName::parse("outbox").unwrap(),
            ColumnMapping::event_forge(),
        );
        let e = d
            .decode(relation_msg(1, "public", "outbox", &COLS[..3]))
            .unwrap_err();
        assert!(e.to_string().contains("event_type, payload"), "{e}");
    }
}
