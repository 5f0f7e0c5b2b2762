//! What the relay asks Postgres's catalog over plain SQL: server settings, the
//! outbox table's shape, the publication and the slot; and the DDL of the
//! tables the relay creates (`sql/`).

use super::names::{quote_ident, TableName};
use super::{get, query_err};
use crate::config::ColumnMapping;
use crate::error::Error;
use pgwire_replication::Lsn;
use tokio_postgres::Client;

/// DDL of the Event-Forge outbox table (`sql/outbox_messages.sql`), shared by `init` and the tests.
pub const OUTBOX_DDL: &str = include_str!("../../sql/outbox_messages.sql");

pub async fn wal_level(client: &Client) -> Result<String, Error> {
    let row = client
        .query_one("show wal_level", &[])
        .await
        .map_err(query_err("reading wal_level"))?;
    get(&row, 0, "reading wal_level")
}

pub async fn require_logical(client: &Client) -> Result<(), Error> {
    let level = wal_level(client).await?;
    if level != "logical" {
        return Err(Error::WalLevel { actual: level });
    }
    Ok(())
}

/// Whether `table` exists (a table or a partitioned table).
pub async fn table_exists<C: tokio_postgres::GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<bool, Error> {
    Ok(client
        .query_opt(
            "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("looking up a table"))?
        .is_some())
}

/// Column names of the table, or `None` when it does not exist.
pub async fn table_columns(
    client: &Client,
    table: &TableName,
) -> Result<Option<Vec<String>>, Error> {
    if !table_exists(client, table).await? {
        return Ok(None);
    }
    let columns = table_column_types(client, table).await?;
    Ok(Some(columns.into_iter().map(|(name, _, _)| name).collect()))
}

/// The table exists and has every column the mapping requires.
pub async fn require_table(
    client: &Client,
    table: &TableName,
    mapping: &ColumnMapping,
) -> Result<(), Error> {
    if !table_exists(client, table).await? {
        return Err(Error::TableMissing {
            table: table.to_string(),
        });
    }
    let typed = table_column_types(client, table).await?;
    let columns: Vec<String> = typed.iter().map(|(n, _, _)| n.clone()).collect();
    let missing = mapping.missing_required(&columns);
    if !missing.is_empty() {
        return Err(Error::ColumnsMissing {
            table: table.to_string(),
            missing,
        });
    }
    for (field, column) in mapping.named() {
        let Some((_, _, found)) = typed.iter().find(|(n, _, _)| n == column) else {
            continue; // an optional column the table does not have
        };
        if let Some(expected) = unfit_type(field, found) {
            return Err(Error::ColumnType {
                table: table.to_string(),
                column: column.to_string(),
                field,
                found: found.clone(),
                expected,
            });
        }
    }
    Ok(())
}

/// What `field`'s column must be instead of `found` (a `format_type` name), if
/// it cannot hold it: the payload and metadata JSON (or text holding JSON),
/// timestamps, an integer budget. Ids and names may be of any type (read as text).
fn unfit_type(field: &str, found: &str) -> Option<&'static str> {
    let textual = |t: &str| {
        matches!(t, "json" | "jsonb" | "text")
            || t.starts_with("character varying")
            || t.starts_with("character(")
    };
    let ok = match field {
        "payload" | "metadata" => textual(found),
        "created_at" | "scheduled_at" => found.starts_with("timestamp"),
        "max_retries" => matches!(found, "smallint" | "integer" | "bigint"),
        _ => true,
    };
    (!ok).then_some(match field {
        "payload" | "metadata" => "json, jsonb or text holding JSON",
        "created_at" | "scheduled_at" => "a timestamp (with or without time zone)",
        _ => "an integer type",
    })
}

pub async fn can_replicate(client: &Client) -> Result<bool, Error> {
    let row = client
        .query_one(
            "select rolreplication or rolsuper from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map_err(query_err("reading the role's attributes"))?;
    get(&row, 0, "reading the role's attributes")
}

/// What Postgres says about the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationState {
    Missing,
    /// Exists; whether it covers the table, publishes inserts, and publishes the
    /// changes of a partitioned table under the root's name.
    Present {
        covers_table: bool,
        publishes_insert: bool,
        via_root: bool,
    },
}

/// Whether the table is partitioned (its rows live in partitions, whose changes
/// the stream names after the partitions unless the publication says otherwise).
pub async fn is_partitioned(client: &Client, table: &TableName) -> Result<bool, Error> {
    const CONTEXT: &str = "looking up the outbox table's kind";
    let row = client
        .query_opt(
            "select c.relkind = 'p' from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    row.map(|r| get(&r, 0, CONTEXT))
        .transpose()
        .map(|p| p.unwrap_or(false))
}

pub async fn publication_state(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<PublicationState, Error> {
    const CONTEXT: &str = "looking up the publication";
    let row = client
        .query_opt(
            "select pubinsert, pubviaroot from pg_publication where pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    let Some(row) = row else {
        return Ok(PublicationState::Missing);
    };
    let publishes_insert: bool = get(&row, 0, CONTEXT)?;
    let via_root: bool = get(&row, 1, CONTEXT)?;
    // pg_publication_tables lists a partitioned table itself only when the
    // publication publishes via the root; otherwise it lists its partitions.
    let covers = client
        .query_opt(
            "select 1 from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .map_err(query_err("reading the publication's tables"))?
        .is_some();
    Ok(PublicationState::Present {
        covers_table: covers,
        publishes_insert,
        via_root,
    })
}

/// Inserts only, and a partitioned table's changes under the root's name.
/// The publication of the messages source: any publication will do (logical
/// decoding messages are not filtered by publication); a missing one is
/// created without tables when `create` says so. True when it was created.
pub async fn ensure_message_publication(
    client: &Client,
    publication: &str,
    create: bool,
) -> Result<bool, Error> {
    let exists = client
        .query_opt(
            "select 1 from pg_publication where pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err("looking up the publication"))?
        .is_some();
    match (exists, create) {
        (true, _) => Ok(false),
        (false, true) => {
            client
                .batch_execute(&format!("create publication {}", quote_ident(publication)))
                .await
                .map_err(query_err(
                    "creating the publication (needs CREATE on the database)",
                ))?;
            Ok(true)
        }
        (false, false) => Err(Error::MessagePublicationMissing {
            publication: publication.to_string(),
        }),
    }
}

pub async fn create_publication(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<(), Error> {
    let sql = format!(
        "create publication {} for table {} with (publish = 'insert', publish_via_partition_root = true)",
        quote_ident(publication),
        table.quoted()
    );
    client.batch_execute(&sql).await.map_err(query_err(
        "creating the publication (needs ownership of the table)",
    ))
}

/// What is wrong with the publication for this table, if anything.
pub fn publication_problem(
    state: &PublicationState,
    publication: &str,
    table: &TableName,
    partitioned: bool,
) -> Option<Error> {
    match *state {
        PublicationState::Missing => Some(Error::PublicationMissing {
            publication: publication.to_string(),
            table: table.to_string(),
        }),
        // Checked before coverage: without via_root the partitions are listed, not
        // the table, and the fix is this setting, not ADD TABLE.
        PublicationState::Present {
            via_root: false, ..
        } if partitioned => Some(Error::PublicationNotViaRoot {
            publication: publication.to_string(),
            table: table.to_string(),
        }),
        PublicationState::Present {
            covers_table: false,
            ..
        } => Some(Error::PublicationMismatch {
            publication: publication.to_string(),
            table: table.to_string(),
        }),
        PublicationState::Present {
            publishes_insert: false,
            ..
        } => Some(Error::PublicationNoInsert {
            publication: publication.to_string(),
        }),
        PublicationState::Present { .. } => None,
    }
}

/// The publication exists (created when `create` is set), covers the table,
/// publishes inserts and, for a partitioned table, publishes via its root.
/// True: it was created.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    table: &TableName,
    create: bool,
) -> Result<bool, Error> {
    let state = publication_state(client, publication, table).await?;
    if state == PublicationState::Missing && create {
        create_publication(client, publication, table).await?;
        return Ok(true);
    }
    let partitioned = is_partitioned(client, table).await?;
    match publication_problem(&state, publication, table, partitioned) {
        Some(e) => Err(e),
        None => Ok(false),
    }
}

/// What Postgres says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    /// Bytes of WAL between the slot's confirmed position and the server's current position.
    pub lag_bytes: Option<i64>,
    /// `wal_status`: `reserved`, `extended`, `unreserved`, or `lost` (invalidated).
    pub wal_status: Option<String>,
    /// Why the server invalidated the slot, when it did: `invalidation_reason`
    /// (PostgreSQL 17), a conflict on a standby (`conflicting`, 16), or WAL
    /// removed (`wal_status = 'lost'`).
    pub invalidated: Option<String>,
    /// A fail-over slot (PostgreSQL 17 `failover`: synchronized to the standbys
    /// in `synchronized_standby_slots`); `None` before 17.
    pub failover: Option<bool>,
}

impl SlotState {
    /// The slot can no longer be read from.
    pub fn is_invalidated(&self) -> bool {
        self.invalidated.is_some()
    }
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, Error> {
    // The columns that tell an invalidated slot differ by version: read them
    // through to_jsonb, which has whichever the server has.
    let row = client
        .query_opt(
            "select plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
             to_jsonb(s) ->> 'wal_status', to_jsonb(s) ->> 'invalidation_reason', \
             (to_jsonb(s) ->> 'conflicting')::bool, (to_jsonb(s) ->> 'failover')::bool \
             from pg_replication_slots s where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("looking up the replication slot"))?;
    let Some(r) = row else { return Ok(None) };
    const CONTEXT: &str = "looking up the replication slot";
    let wal_status: Option<String> = get(&r, 5, CONTEXT)?;
    let reason: Option<String> = get(&r, 6, CONTEXT)?;
    let conflicting: Option<bool> = get(&r, 7, CONTEXT)?;
    let invalidated = match (reason, conflicting, wal_status.as_deref()) {
        (Some(reason), _, _) => Some(reason),
        (None, Some(true), _) => Some("rows_removed: a conflict with recovery on a standby".into()),
        (None, _, Some("lost")) => Some(
            "wal_removed: it fell more than max_slot_wal_keep_size behind and the WAL it needed was removed"
                .into(),
        ),
        _ => None,
    };
    Ok(Some(SlotState {
        plugin: get(&r, 0, CONTEXT)?,
        database: get(&r, 1, CONTEXT)?,
        active_pid: get(&r, 2, CONTEXT)?,
        confirmed_flush: get::<Option<String>>(&r, 3, CONTEXT)?.and_then(|s| Lsn::parse(&s).ok()),
        lag_bytes: get(&r, 4, CONTEXT)?,
        wal_status,
        invalidated,
        failover: get(&r, 8, CONTEXT)?,
    }))
}

/// Which server this is: its system identifier (the same on a physical standby)
/// and the timeline it writes (a promoted standby starts a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub system_id: String,
    pub timeline: i64,
}

pub async fn server_identity(client: &Client) -> Result<ServerIdentity, Error> {
    const CONTEXT: &str = "reading the server's identity (pg_control_system, timeline)";
    let row = client
        .query_one(
            "select system_identifier::text, pg_walfile_name(pg_current_wal_lsn()) from pg_control_system()",
            &[],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    let walfile: String = get(&row, 1, CONTEXT)?;
    Ok(ServerIdentity {
        system_id: get(&row, 0, CONTEXT)?,
        timeline: i64::from_str_radix(walfile.get(..8).unwrap_or("1"), 16).unwrap_or(1),
    })
}

/// Drops a slot nobody holds (`replay` does it to an invalidated one).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), Error> {
    client
        .execute("select pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(query_err("dropping the invalidated replication slot"))?;
    Ok(())
}

/// The server's version as a number (`170002` for 17.2).
pub async fn server_version_num(client: &Client) -> Result<i32, Error> {
    const CONTEXT: &str = "reading the server's version";
    let row = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .map_err(query_err(CONTEXT))?;
    get(&row, 0, CONTEXT)
}

/// Creates a pgoutput slot; returns the LSN it starts at. On PostgreSQL 17 and
/// later it is a fail-over slot (`failover = true`): with the standbys listed in
/// `synchronized_standby_slots` (and `sync_replication_slots` on them) it
/// survives a fail-over.
pub async fn create_slot(client: &Client, slot: &str) -> Result<Lsn, Error> {
    const CONTEXT: &str = "creating the replication slot (needs REPLICATION and a free slot: raise max_replication_slots)";
    let sql = if server_version_num(client).await? >= 170000 {
        "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let row = client
        .query_one(sql, &[&slot])
        .await
        .map_err(query_err(CONTEXT))?;
    let lsn: String = get(&row, 0, CONTEXT)?;
    Ok(Lsn::parse(&lsn).unwrap_or(Lsn::from_u64(0)))
}

/// The slot is a pgoutput slot in `dbname`.
pub fn check_slot(state: &SlotState, slot: &str, dbname: &str) -> Result<(), Error> {
    match (&state.plugin, &state.database) {
        (Some(p), Some(d)) if p == "pgoutput" && d == dbname => Ok(()),
        (plugin, database) => Err(Error::SlotMismatch {
            slot: slot.to_string(),
            plugin: plugin.clone().unwrap_or_else(|| "physical".into()),
            database: database.clone().unwrap_or_default(),
            expected_database: dbname.to_string(),
        }),
    }
}

/// The DDL of `sql/outbox_messages.sql` for another table name.
pub fn outbox_ddl(table: &TableName) -> String {
    OUTBOX_DDL
        .replace("public.outbox_messages", &table.quoted())
        .replace("idx_outbox_messages_", &format!("idx_{}_", table.name))
}

/// Columns of the table with their type oids and SQL type names, in attnum order.
pub async fn table_column_types<C: tokio_postgres::GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<Vec<(String, u32, String)>, Error> {
    let rows = client
        .query(
            "select a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod) from pg_attribute a \
             join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped \
             order by a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("reading the outbox table's column types"))?;
    const CONTEXT: &str = "reading the outbox table's column types";
    rows.iter()
        .map(|r| {
            Ok((
                get(r, 0, CONTEXT)?,
                get(r, 1, CONTEXT)?,
                get(r, 2, CONTEXT)?,
            ))
        })
        .collect()
}

/// NOT NULL columns of `table` without a default (nor identity, nor generated)
/// that are not among `written`: an insert that writes only `written` fails on
/// them. Empty when the table does not exist.
pub async fn unfilled_not_null<C: tokio_postgres::GenericClient>(
    client: &C,
    table: &TableName,
    written: &[&str],
) -> Result<Vec<String>, Error> {
    const CONTEXT: &str = "reading the table's NOT NULL columns";
    let written: Vec<&str> = written.to_vec();
    let rows = client
        .query(
            "select a.attname::text from pg_attribute a join pg_class c on c.oid = a.attrelid \
             join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped \
             and a.attnotnull and not a.atthasdef and a.attidentity = '' and a.attgenerated = '' \
             and not (a.attname::text = any($3)) order by a.attnum",
            &[&table.schema, &table.name, &written],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    rows.iter().map(|r| get(r, 0, CONTEXT)).collect()
}

/// What makes a writer that writes none of `columns` work on `table`.
pub fn unfilled_fix(table: &TableName, columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| {
            format!(
                "ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL (or SET DEFAULT ...)",
                table.quoted(),
                quote_ident(c)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Outbox rows still `pending`.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRows {
    pub count: i64,
    /// When the oldest was created (ISO-8601, UTC).
    pub oldest: Option<String>,
    /// How long ago, in seconds.
    pub oldest_age_seconds: Option<f64>,
}

/// Outbox rows still `pending`, for tables with a `status` and a `created_at`
/// column; `None` for other layouts.
pub async fn pending_rows(
    client: &Client,
    table: &TableName,
    filter: Option<&str>,
) -> Result<Option<PendingRows>, Error> {
    const CONTEXT: &str = "counting the outbox rows still pending";
    let Some(columns) = table_columns(client, table).await? else {
        return Ok(None);
    };
    if !columns.iter().any(|c| c == "status") || !columns.iter().any(|c| c == "created_at") {
        return Ok(None);
    }
    let row = client
        .query_one(
            &format!(
                "select count(*), to_char(min(created_at) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                 extract(epoch from now() - min(created_at))::float8 from {} where status = 'pending'{}",
                table.quoted(),
                filter.map(|f| format!(" and ({f})")).unwrap_or_default()
            ),
            &[],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    Ok(Some(PendingRows {
        count: get(&row, 0, CONTEXT)?,
        oldest: get(&row, 1, CONTEXT)?,
        oldest_age_seconds: get(&row, 2, CONTEXT)?,
    }))
}

/// Parses Postgres's "replication slot \"x\" is active for PID 123".
pub fn pid_from_slot_error(message: &str) -> Option<i32> {
    let idx = message.find("active for PID ")?;
    message[idx + "active for PID ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_renamed() {
        let ddl = outbox_ddl(&TableName::parse("app.events_out").unwrap());
        assert!(ddl.contains("\"app\".\"events_out\""));
        assert!(!ddl.contains("outbox_messages"));
    }

    #[test]
    fn slot_pid() {
        assert_eq!(
            pid_from_slot_error("replication slot \"s\" is active for PID 4242"),
            Some(4242)
        );
        assert_eq!(pid_from_slot_error("other"), None);
    }
}
