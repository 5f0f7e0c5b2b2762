//! The table privileges the configured mode needs, and the GRANT that adds each
//! one the connected role lacks (`sql/role.sql` is the reference for the defaults).

use crate::config::{Config, OnSuccess};
use crate::error::Error;
use crate::outbox_table::RETRY_COLUMNS;
use crate::pg::catalog;
use crate::pg::slots::SlotRecords;
use crate::pg::{get, query_err, TableName};
use tokio_postgres::Client;

/// One privilege the relay needs, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// `SELECT`, `INSERT`, `UPDATE`, `DELETE` on a table, `USAGE` on a schema or sequence.
    pub privilege: &'static str,
    pub object: Object,
    pub why: &'static str,
}

/// What a privilege is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Schema(String),
    Table(TableName),
    /// A sequence, by its quoted qualified name as Postgres prints it.
    Sequence(String),
}

impl Need {
    /// The statement that grants it to `role`.
    pub fn grant(&self, role: &str) -> String {
        let role = crate::pg::quote_ident(role);
        match &self.object {
            Object::Schema(s) => format!(
                "GRANT USAGE ON SCHEMA {} TO {role};",
                crate::pg::quote_ident(s)
            ),
            Object::Table(t) => format!("GRANT {} ON {} TO {role};", self.privilege, t.quoted()),
            Object::Sequence(s) => format!("GRANT USAGE ON SEQUENCE {s} TO {role};"),
        }
    }

    fn object_text(&self) -> String {
        match &self.object {
            Object::Schema(s) => format!("schema {s}"),
            Object::Table(t) => t.to_string(),
            Object::Sequence(s) => format!("sequence {s}"),
        }
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} ({})",
            self.privilege,
            self.object_text(),
            self.why
        )
    }
}

/// What the role connected as lacks: each missing privilege with its GRANT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub role: String,
    pub needs: Vec<Need>,
}

/// The table privileges `config` needs on the tables that exist now (a missing
/// table is reported by its own check, and `init` creates it).
pub async fn needed(sql: &Client, config: &Config) -> Result<Vec<Need>, Error> {
    let pg = &config.postgres;
    let table = |t: &TableName| Object::Table(t.clone());
    let mut needs = Vec::new();
    let mut schemas: Vec<&str> = Vec::new();
    let outbox = match pg.source {
        crate::config::Source::Table => catalog::table_columns(sql, &pg.table).await?,
        crate::config::Source::Messages => None,
    };
    if let Some(columns) = outbox {
        schemas.push(&pg.table.schema);
        needs.push(Need {
            privilege: "SELECT",
            object: table(&pg.table),
            why: "re-reading a row before its retry, replay --pending, status",
        });
        let mirror = pg.columns.status.is_some()
            && RETRY_COLUMNS
                .iter()
                .all(|c| columns.iter().any(|have| have == c));
        if pg.on_success == OnSuccess::MarkPublished || mirror {
            needs.push(Need {
                privilege: "UPDATE",
                object: table(&pg.table),
                why: match pg.on_success {
                    OnSuccess::MarkPublished => "on_success = \"mark_published\"",
                    _ => "showing retry state in the Event-Forge status columns",
                },
            });
        }
        let retention = pg.on_success == OnSuccess::MarkPublished && mirror;
        if pg.on_success == OnSuccess::Delete || retention {
            needs.push(Need {
                privilege: "DELETE",
                object: table(&pg.table),
                why: if retention {
                    "postgres.retention deletes published rows"
                } else {
                    "on_success = \"delete\""
                },
            });
        }
    }
    if catalog::table_columns(sql, &pg.retry_table)
        .await?
        .is_some()
    {
        schemas.push(&pg.retry_table.schema);
        for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
            needs.push(Need {
                privilege,
                object: table(&pg.retry_table),
                why: "the retry state the relay keeps",
            });
        }
        let row = sql
            .query_one(
                "select pg_get_serial_sequence($1, 'seq')",
                &[&pg.retry_table.quoted()],
            )
            .await
            .map_err(query_err("looking up the retry table's sequence"))?;
        if let Some(sequence) = get::<Option<String>>(&row, 0, "the retry table's sequence")? {
            needs.push(Need {
                privilege: "USAGE",
                object: Object::Sequence(sequence),
                why: "numbering parked messages in commit order",
            });
        }
    }
    let records = SlotRecords::next_to(&pg.retry_table);
    if catalog::table_columns(sql, records.name()).await?.is_some() {
        for privilege in ["SELECT", "INSERT", "UPDATE"] {
            needs.push(Need {
                privilege,
                object: table(records.name()),
                why: "the relay's record of its slot",
            });
        }
    }
    schemas.dedup();
    for schema in schemas.into_iter().rev() {
        needs.insert(
            0,
            Need {
                privilege: "USAGE",
                object: Object::Schema(schema.to_string()),
                why: "reaching the tables in it",
            },
        );
    }
    Ok(needs)
}

/// Which of `needs` the connected role lacks.
pub async fn missing(sql: &Client, needs: Vec<Need>) -> Result<Missing, Error> {
    let role: String = get(
        &sql.query_one("select current_user::text", &[])
            .await
            .map_err(query_err("reading the connected role"))?,
        0,
        "current_user",
    )?;
    let mut lacking = Vec::new();
    for need in needs {
        let statement = match &need.object {
            Object::Schema(_) => "select has_schema_privilege($1, $2, $3)",
            Object::Table(_) => "select has_table_privilege($1, $2, $3)",
            Object::Sequence(_) => "select has_sequence_privilege($1, $2, $3)",
        };
        let object = match &need.object {
            // has_schema_privilege takes the name as stored, not quoted.
            Object::Schema(s) => s.clone(),
            Object::Table(t) => t.quoted(),
            Object::Sequence(s) => s.clone(),
        };
        let held: bool = get(
            &sql.query_one(statement, &[&role, &object, &need.privilege])
                .await
                .map_err(query_err("checking a privilege"))?,
            0,
            "privilege",
        )?;
        if !held {
            lacking.push(need);
        }
    }
    Ok(Missing {
        role,
        needs: lacking,
    })
}
