//! The outbox table itself (the application's, not the relay's): every
//! statement the relay runs on it — re-reading a row before a retry (following
//! the table's current columns), the rows still pending (`replay`), the
//! Event-Forge status mirror (`status`, `retry_count`, `error_message`,
//! `scheduled_at`, `updated_at`), `on_success` and retention — and the
//! [`housekeeping`] task that applies the batched ones on a session of its own.

pub mod housekeeping;

use crate::config::{ColumnMapping, OnSuccess};
use crate::error::{Error, SqlTrouble};
use crate::event::{ResolvedMapping, RowRead};
use crate::pg::{catalog, get, query_err, quote_ident, TableName};
use bytes::Bytes;
use pg_walstream::ColumnInfo;
use std::time::Duration;
use tokio_postgres::GenericClient;

/// Event-Forge retry columns: when the table has them all, the relay shows retry
/// state in the row's own columns too.
pub const RETRY_COLUMNS: [&str; 5] = [
    "status",
    "retry_count",
    "error_message",
    "scheduled_at",
    "updated_at",
];

/// How to read and write the outbox table, learned from the catalog.
#[derive(Debug, Clone)]
struct Shape {
    /// `select c1::text, c2::text, ... from t where id = $1::text::<type>`
    reread_sql: String,
    /// The same for many ids: `... where id = any($1::text[]::<type>[])`.
    reread_many_sql: String,
    /// Position of the id column in those selects.
    id_pos: usize,
    /// `select o.c1::text, ... from t` (callers add the alias `o` and the rest).
    select_sql: String,
    resolved: ResolvedMapping,
    /// SQL type of the id column, for casts.
    id_type: String,
    /// The row has Event-Forge retry columns.
    mirror: bool,
    has_max_retries: bool,
}

/// One status-mirror update of an Event-Forge row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorUpdate {
    pub id: String,
    /// `failed` or `permanently_failed`.
    pub status: &'static str,
    pub reason: String,
    /// The next attempt is due after this long (`scheduled_at`).
    pub delay: Option<Duration>,
}

/// How long `on_success` waits before asking again for rows it did not find
/// (their commit may not be visible yet): three more tries within ~0.3 s.
pub const NOT_FOUND_AGAIN: [Duration; 3] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];

/// The outbox table and what the relay knows of its shape.
#[derive(Debug, Clone)]
pub struct OutboxTable {
    table: TableName,
    mapping: ColumnMapping,
    /// `None`: there is no table (`postgres.source = "messages"`): nothing to
    /// re-read (a retry uses its parked copy), mirror or mark.
    shape: Option<Shape>,
}

/// Which pending rows `replay --pending` takes: created at or before `until`
/// (the server's time when it started), at or after `since`, and of the shard
/// when `shard` names its condition.
#[derive(Debug, Clone, Copy)]
pub struct PendingRange<'a> {
    pub until: &'a str,
    pub since: Option<&'a str>,
    pub shard: Option<&'a str>,
}

impl OutboxTable {
    /// Learns the table's shape; fails when the table or a required column is missing.
    pub async fn learn(
        client: &impl GenericClient,
        table: TableName,
        mapping: &ColumnMapping,
    ) -> Result<Self, Error> {
        let shape = shape(client, &table, mapping).await?;
        Ok(OutboxTable {
            table,
            mapping: mapping.clone(),
            shape: Some(shape),
        })
    }

    /// No table: the messages source (`postgres.source = "messages"`).
    pub fn absent(table: TableName, mapping: &ColumnMapping) -> Self {
        OutboxTable {
            table,
            mapping: mapping.clone(),
            shape: None,
        }
    }

    /// Learns the shape again (after `ALTER TABLE`).
    pub async fn relearn(&mut self, client: &impl GenericClient) -> Result<(), Error> {
        if self.shape.is_none() {
            return Ok(());
        }
        self.shape = Some(shape(client, &self.table, &self.mapping).await?);
        tracing::info!(table = %self.table, "outbox table changed: its columns were read again");
        Ok(())
    }

    pub fn name(&self) -> &TableName {
        &self.table
    }

    /// The table has a `max_retries` column of its own.
    pub fn has_max_retries(&self) -> bool {
        self.shape.as_ref().is_some_and(|s| s.has_max_retries)
    }

    /// The table carries Event-Forge retry columns (status mirror, retention).
    pub fn has_mirror(&self) -> bool {
        self.shape.as_ref().is_some_and(|s| s.mirror)
    }

    /// The outbox row as it is now, `None` when it is gone. A statement that names
    /// a column someone dropped is retried once with the table's current columns.
    pub async fn reread(
        &mut self,
        client: &impl GenericClient,
        id: &str,
    ) -> Result<Option<RowRead>, Error> {
        if self.shape.is_none() {
            return Ok(None);
        }
        let current = match self.reread_once(client, id).await {
            Err(e) if e.sql_trouble() == Some(SqlTrouble::SchemaDrift) => {
                self.relearn(client).await?;
                self.reread_once(client, id).await?
            }
            other => other?,
        };
        Ok(current.and_then(|r| self.build(&r)))
    }

    /// The outbox rows of these ids as they are now (ids whose row is gone are
    /// missing from the map), in one statement; like `reread`, it follows the
    /// table's current columns.
    pub async fn reread_many(
        &mut self,
        client: &impl GenericClient,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, RowRead>, Error> {
        let Some(id_pos) = self.shape.as_ref().map(|s| s.id_pos) else {
            return Ok(Default::default());
        };
        let rows = match self.reread_many_once(client, ids).await {
            Err(e) if e.sql_trouble() == Some(SqlTrouble::SchemaDrift) => {
                self.relearn(client).await?;
                self.reread_many_once(client, ids).await?
            }
            other => other?,
        };
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id: String = r.try_get::<_, Option<String>>(id_pos).ok().flatten()?;
                Some((id, self.build(r)?))
            })
            .collect())
    }

    async fn reread_many_once(
        &self,
        client: &impl GenericClient,
        ids: &[&str],
    ) -> Result<Vec<tokio_postgres::Row>, Error> {
        let Some(shape) = &self.shape else {
            return Ok(Vec::new());
        };
        client
            .query(&shape.reread_many_sql, &[&ids])
            .await
            .map_err(query_err("re-reading outbox rows for retries"))
    }

    async fn reread_once(
        &self,
        client: &impl GenericClient,
        id: &str,
    ) -> Result<Option<tokio_postgres::Row>, Error> {
        let Some(shape) = &self.shape else {
            return Ok(None);
        };
        client
            .query_opt(&shape.reread_sql, &[&id])
            .await
            .map_err(query_err("re-reading an outbox row for a retry"))
    }

    /// The row read from the table (`None` only without a table, where no
    /// row is ever read).
    fn build(&self, r: &tokio_postgres::Row) -> Option<RowRead> {
        Some(self.shape.as_ref()?.resolved.build(|idx| {
            r.try_get::<_, Option<String>>(idx)
                .map(|v| v.map(Bytes::from))
                .map_err(|e| format!("column #{idx} cannot be read as text: {e}"))
        }))
    }

    /// The oldest rows still `pending` of `range`, in creation order, that have
    /// no retry state of `slot` in `retry_table`: what `replay --pending`
    /// re-publishes. `None` for tables without the Event-Forge columns.
    pub async fn pending_page(
        &self,
        client: &impl GenericClient,
        (retry_table, slot): (&TableName, &str),
        range: &PendingRange<'_>,
        limit: i64,
    ) -> Result<Option<Vec<RowRead>>, Error> {
        let PendingRange {
            until,
            since,
            shard,
        } = *range;
        let Some(shape) = self.shape.as_ref().filter(|s| s.mirror) else {
            return Ok(None);
        };
        let id = quote_ident(&self.mapping.id);
        let sql = format!(
            "{} o where o.status = 'pending' and o.created_at <= $1::text::timestamptz \
             and ($2::text is null or o.created_at >= $2::text::timestamptz) \
             and not exists (select 1 from {} r where r.slot = $3 and r.id = o.{id}::text){} \
             order by o.created_at, o.{id} limit $4",
            shape.select_sql,
            retry_table.quoted(),
            shard.map(|f| format!(" and ({f})")).unwrap_or_default(),
        );
        let rows = client
            .query(&sql, &[&until, &since, &slot, &limit])
            .await
            .map_err(query_err("reading the outbox rows still pending"))?;
        Ok(Some(rows.iter().filter_map(|r| self.build(r)).collect()))
    }

    /// Shows retry state in Event-Forge rows' own columns, all of `updates` in one
    /// statement (no-op for other tables). A failed attempt counts in `retry_count`.
    /// A row already `published` keeps that status: the retry store marks a
    /// delivered retry itself, in the transaction that removes it from the
    /// retry table, so an update of an earlier attempt still on its way
    /// through the housekeeping task must not show the row as failing again.
    /// (A published row sent again by `replay` that then fails keeps showing
    /// `published`; its retry state is in the retry table and `status`.)
    pub async fn mirror(
        &self,
        client: &impl GenericClient,
        updates: &[MirrorUpdate],
    ) -> Result<(), Error> {
        let Some(shape) = self.shape.as_ref().filter(|s| s.mirror) else {
            return Ok(());
        };
        if updates.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = updates.iter().map(|u| u.id.as_str()).collect();
        let statuses: Vec<&str> = updates.iter().map(|u| u.status).collect();
        let reasons: Vec<&str> = updates.iter().map(|u| u.reason.as_str()).collect();
        let delays: Vec<Option<i64>> = updates
            .iter()
            .map(|u| u.delay.map(|d| d.as_micros() as i64))
            .collect();
        let sql = format!(
            "update {t} as o set status = u.status, error_message = u.reason, retry_count = o.retry_count + 1, \
             scheduled_at = coalesce(now() + u.delay * interval '1 microsecond', o.scheduled_at), updated_at = now() \
             from unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) as u(id, status, reason, delay) \
             where o.{id} = u.id::{ty} and o.status is distinct from 'published'",
            t = self.table.quoted(),
            id = quote_ident(&self.mapping.id),
            ty = shape.id_type,
        );
        client
            .execute(&sql, &[&ids, &statuses, &reasons, &delays])
            .await
            .map_err(query_err("showing retry state in the outbox rows"))?;
        Ok(())
    }

    /// Shows a requeue in Event-Forge rows: `failed` with a fresh retry count, due now.
    pub async fn mirror_requeued(
        &self,
        client: &impl GenericClient,
        ids: &[String],
    ) -> Result<(), Error> {
        let Some(shape) = self.shape.as_ref().filter(|s| s.mirror) else {
            return Ok(());
        };
        if ids.is_empty() {
            return Ok(());
        }
        client
            .execute(
                &format!(
                    "update {} set status = 'failed', retry_count = 0, scheduled_at = now(), updated_at = now() \
                     where {} = any($1::text[]::{}[])",
                    self.table.quoted(),
                    quote_ident(&self.mapping.id),
                    shape.id_type
                ),
                &[&ids],
            )
            .await
            .map_err(query_err("showing the requeue in the outbox rows"))?;
        Ok(())
    }

    /// Applies `on_success` to these rows. A row the statement does not find
    /// is asked for again after each of [`NOT_FOUND_AGAIN`]: logical decoding
    /// hands a transaction out as soon as its commit record is flushed, a
    /// moment before its rows are visible to other sessions (the backend
    /// leaves the proc array after the flush), so a message can be acked while
    /// its row is not visible yet. Rows still not found after that are gone
    /// (deleted meanwhile, or by an earlier `delete` before a re-publish).
    pub async fn on_success(
        &self,
        client: &impl GenericClient,
        on_success: OnSuccess,
        ids: &[String],
    ) -> Result<(), Error> {
        let Some(sql) = self.on_success_sql(on_success) else {
            return Ok(());
        };
        let mut wanted: Vec<String> = ids.to_vec();
        let mut waits = NOT_FOUND_AGAIN.iter();
        loop {
            wanted = Self::apply(client, &sql, wanted).await?;
            let Some(wait) = waits.next().filter(|_| !wanted.is_empty()) else {
                break;
            };
            tokio::time::sleep(*wait).await;
        }
        if !wanted.is_empty() {
            tracing::debug!(
                rows = ids.len(),
                not_found = wanted.len(),
                on_success = on_success.as_str(),
                "on_success: some rows were not there to change (deleted meanwhile, or by an earlier delete)"
            );
        }
        Ok(())
    }

    /// Applies `on_success` to these rows at once, without asking again for
    /// rows it does not find: for rows read from the table before (they are
    /// visible; not found means gone).
    pub async fn on_success_now(
        &self,
        client: &impl GenericClient,
        on_success: OnSuccess,
        ids: &[String],
    ) -> Result<(), Error> {
        if let Some(sql) = self.on_success_sql(on_success) {
            Self::apply(client, &sql, ids.to_vec()).await?;
        }
        Ok(())
    }

    /// `on_success`'s statement (none when there is nothing to change: `keep`,
    /// or no table); it returns the ids it changed.
    fn on_success_sql(&self, on_success: OnSuccess) -> Option<String> {
        // Without a table (the messages source) there is no row to mark.
        let shape = self.shape.as_ref()?;
        let t = self.table.quoted();
        let id_col = quote_ident(&self.mapping.id);
        let cast = &shape.id_type;
        let rows = format!("{id_col} = any($1::text[]::{cast}[])");
        Some(match on_success {
            OnSuccess::Keep => return None,
            OnSuccess::Delete => format!("delete from {t} where {rows} returning {id_col}::text"),
            OnSuccess::MarkPublished if shape.mirror => format!(
                "update {t} set status = 'published', error_message = null, updated_at = now() where {rows} returning {id_col}::text"
            ),
            OnSuccess::MarkPublished => format!(
                "update {t} set status = 'published' where {rows} returning {id_col}::text"
            ),
        })
    }

    /// Runs `on_success`'s statement for `wanted`; returns those it did not change.
    async fn apply(
        client: &impl GenericClient,
        sql: &str,
        mut wanted: Vec<String>,
    ) -> Result<Vec<String>, Error> {
        let found = client
            .query(sql, &[&wanted])
            .await
            .map_err(query_err("applying on_success to published rows"))?;
        if found.len() >= wanted.len() {
            return Ok(Vec::new());
        }
        let found: std::collections::HashSet<String> =
            found.iter().filter_map(|r| r.try_get(0).ok()).collect();
        wanted.retain(|id| !found.contains(id));
        Ok(wanted)
    }

    /// When the oldest published row was marked (Unix µs), for the retention sweep.
    pub async fn oldest_published(
        &self,
        client: &impl GenericClient,
    ) -> Result<Option<i64>, Error> {
        if !self.has_mirror() {
            return Ok(None);
        }
        const CONTEXT: &str = "finding the oldest published row";
        let row = client
            .query_one(
                &format!(
                    "select (extract(epoch from min(updated_at)) * 1000000)::bigint from {} where status = 'published'",
                    self.table.quoted()
                ),
                &[],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        get(&row, 0, CONTEXT)
    }

    /// Deletes up to 1 000 published rows older than `retention`; how many went.
    pub async fn delete_published_before(
        &self,
        client: &impl GenericClient,
        retention: Duration,
    ) -> Result<u64, Error> {
        let t = self.table.quoted();
        client
            .execute(
                &format!(
                    "delete from {t} where ctid = any(array(select ctid from {t} where status = 'published' \
                     and updated_at < now() - $1::bigint * interval '1 microsecond' limit 1000))"
                ),
                &[&(retention.as_micros() as i64)],
            )
            .await
            .map_err(query_err("deleting published rows past retention"))
    }
}

async fn shape(
    client: &impl GenericClient,
    table: &TableName,
    mapping: &ColumnMapping,
) -> Result<Shape, Error> {
    let columns = catalog::table_column_types(client, table).await?;
    if columns.is_empty() {
        return Err(Error::TableMissing {
            table: table.to_string(),
        });
    }
    let infos: Vec<ColumnInfo> = columns
        .iter()
        .map(|(n, oid, _)| ColumnInfo::new(0, n.clone(), *oid, -1))
        .collect();
    let resolved =
        ResolvedMapping::resolve(mapping, &infos).map_err(|missing| Error::ColumnsMissing {
            table: table.to_string(),
            missing,
        })?;
    let names: Vec<&str> = columns.iter().map(|(n, _, _)| n.as_str()).collect();
    let id_type = columns
        .iter()
        .find(|(n, _, _)| *n == mapping.id)
        .map(|(_, _, t)| t.clone())
        .unwrap_or_else(|| "text".into());
    let list = |prefix: &str| {
        names
            .iter()
            .map(|n| format!("{prefix}{}::text", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let reread_sql = format!(
        "select {} from {} where {} = $1::text::{id_type}",
        list(""),
        table.quoted(),
        quote_ident(&mapping.id)
    );
    let reread_many_sql = format!(
        "select {} from {} where {} = any($1::text[]::{id_type}[])",
        list(""),
        table.quoted(),
        quote_ident(&mapping.id)
    );
    let id_pos = names.iter().position(|n| *n == mapping.id).unwrap_or(0);
    let select_sql = format!("select {} from {}", list("o."), table.quoted());
    // Event-Forge's layout only: another table's own status columns are its
    // application's, not the relay's to write.
    let mirror = mapping.status.is_some() && RETRY_COLUMNS.iter().all(|c| names.contains(c));
    let has_max_retries = mapping
        .max_retries
        .as_deref()
        .is_some_and(|c| names.contains(&c));
    Ok(Shape {
        reread_sql,
        reread_many_sql,
        id_pos,
        select_sql,
        resolved,
        id_type,
        mirror,
        has_max_retries,
    })
}
