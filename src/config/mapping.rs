//! Which columns of the outbox table hold the outbox fields: a preset
//! (`event-forge`, `debezium`) or `custom`, each adjustable by a `[mapping]`
//! section that names the table's own columns.

use super::ConfigError;
use serde::Deserialize;

/// The layout `postgres.mapping` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// Event-Forge `outbox_messages`: id, aggregate_type, aggregate_id, event_type,
    /// payload, metadata, created_at, status, retry_count, max_retries, scheduled_at, ...
    EventForge,
    /// Debezium-style outbox: id, aggregatetype, aggregateid, type, payload.
    Debezium,
    /// Any table: `[mapping]` names its columns.
    Custom,
}

/// Column names of one table layout, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub metadata: Option<String>,
    pub created_at: Option<String>,
    pub scheduled_at: Option<String>,
    pub max_retries: Option<String>,
    /// The Event-Forge status column (the Event-Forge layout only: the relay
    /// mirrors its retry state into that table's own columns).
    pub status: Option<String>,
    /// Further columns the wire templates name (`{tenant}`): read with the row,
    /// required like the five above.
    pub extra: Vec<String>,
    /// Optional columns `[mapping]` names explicitly: a typo there must be a
    /// refusal, not a feature silently off (delays, metadata, budgets).
    pub named_optional: Vec<String>,
}

impl ColumnMapping {
    /// The Event-Forge `outbox_messages` layout.
    pub fn event_forge() -> ColumnMapping {
        ColumnMapping {
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            metadata: Some("metadata".into()),
            created_at: Some("created_at".into()),
            scheduled_at: Some("scheduled_at".into()),
            max_retries: Some("max_retries".into()),
            status: Some("status".into()),
            extra: Vec::new(),
            named_optional: Vec::new(),
        }
    }

    /// A Debezium-style outbox: id, aggregatetype, aggregateid, type, payload.
    pub fn debezium() -> ColumnMapping {
        ColumnMapping {
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            metadata: None,
            created_at: None,
            scheduled_at: None,
            max_retries: None,
            status: None,
            extra: Vec::new(),
            named_optional: Vec::new(),
        }
    }

    /// A preset's columns (`custom` has none of its own).
    pub fn of(mapping: Mapping) -> ColumnMapping {
        match mapping {
            Mapping::EventForge => Self::event_forge(),
            Mapping::Debezium | Mapping::Custom => Self::debezium(),
        }
    }

    /// The columns every row must have (the templates' among them).
    pub fn required(&self) -> Vec<&str> {
        let mut all = vec![
            self.id.as_str(),
            &self.aggregate_type,
            &self.aggregate_id,
            &self.event_type,
            &self.payload,
        ];
        all.extend(self.extra.iter().map(String::as_str));
        all.extend(self.named_optional.iter().map(String::as_str));
        all
    }

    /// Required columns absent from `columns`.
    pub fn missing_required(&self, columns: &[String]) -> Vec<String> {
        self.required()
            .iter()
            .filter(|c| !columns.iter().any(|have| have == *c))
            .map(|c| c.to_string())
            .collect()
    }

    /// Every column named, with the field it holds (for messages and checks).
    pub fn named(&self) -> Vec<(&'static str, &str)> {
        let mut all = vec![
            ("id", self.id.as_str()),
            ("aggregate_type", self.aggregate_type.as_str()),
            ("aggregate_id", self.aggregate_id.as_str()),
            ("event_type", self.event_type.as_str()),
            ("payload", self.payload.as_str()),
        ];
        for (field, column) in [
            ("metadata", &self.metadata),
            ("created_at", &self.created_at),
            ("scheduled_at", &self.scheduled_at),
            ("max_retries", &self.max_retries),
        ] {
            if let Some(c) = column {
                all.push((field, c.as_str()));
            }
        }
        all
    }
}

/// The raw `[mapping]` section: each key names a column of the table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMapping {
    pub id: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub payload: Option<String>,
    pub metadata: Option<String>,
    pub created_at: Option<String>,
    pub scheduled_at: Option<String>,
    pub max_retries: Option<String>,
}

impl RawMapping {
    /// `layout`'s columns with this section's names over them; `custom` needs
    /// the five required ones named here.
    pub fn resolve(self, layout: Mapping) -> Result<ColumnMapping, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("mapping.{key}"),
            message,
        };
        let name = |key: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
            match v {
                Some(c) if c.is_empty() || c.len() > 63 || c.contains('\0') => Err(invalid(
                    key,
                    format!("{c:?} cannot be a column name (1 to 63 bytes)"),
                )),
                other => Ok(other),
            }
        };
        let mut m = match layout {
            Mapping::Custom => {
                let missing: Vec<&str> = [
                    ("id", &self.id),
                    ("aggregate_type", &self.aggregate_type),
                    ("aggregate_id", &self.aggregate_id),
                    ("event_type", &self.event_type),
                    ("payload", &self.payload),
                ]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
                if !missing.is_empty() {
                    return Err(invalid(
                        missing[0],
                        format!(
                            "postgres.mapping = \"custom\" needs [mapping] to name the column of each of id, aggregate_type, aggregate_id, event_type, payload; missing: {}",
                            missing.join(", ")
                        ),
                    ));
                }
                ColumnMapping::debezium()
            }
            preset => ColumnMapping::of(preset),
        };
        if let Some(c) = name("id", self.id)? {
            m.id = c;
        }
        if let Some(c) = name("aggregate_type", self.aggregate_type)? {
            m.aggregate_type = c;
        }
        if let Some(c) = name("aggregate_id", self.aggregate_id)? {
            m.aggregate_id = c;
        }
        if let Some(c) = name("event_type", self.event_type)? {
            m.event_type = c;
        }
        if let Some(c) = name("payload", self.payload)? {
            m.payload = c;
        }
        for (key, value, slot) in [
            ("metadata", self.metadata, &mut m.metadata),
            ("created_at", self.created_at, &mut m.created_at),
            ("scheduled_at", self.scheduled_at, &mut m.scheduled_at),
            ("max_retries", self.max_retries, &mut m.max_retries),
        ] {
            if let Some(c) = name(key, value)? {
                m.named_optional.push(c.clone());
                *slot = Some(c);
            }
        }
        let named = m.named();
        for (i, (field, column)) in named.iter().enumerate() {
            if let Some((other, _)) = named[..i].iter().find(|(_, c)| c == column) {
                return Err(invalid(
                    field,
                    format!("column {column:?} is already mapped to {other}: each field needs a column of its own"),
                ));
            }
        }
        Ok(m)
    }
}
