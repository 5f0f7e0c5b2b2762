//! Outbox-row housekeeping, off the publish path: the outbox table's shape learned
//! from the catalog, re-reading a row before a retry, the Event-Forge status
//! mirror (`status`, `retry_count`, `error_message`, `scheduled_at`,
//! `updated_at`), `on_success` (batched) and `retention`.

use crate::config::{ColumnMapping, OnSuccess};
use crate::error::Error;
use crate::event::{MalformedRow, OutboxEvent, ResolvedMapping};
use crate::pg::{catalog, get, query_err, quote_ident, TableName};
use crate::time::instant_of;
use bytes::Bytes;
use pg_walstream::ColumnInfo;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::{Client, GenericClient};

/// Event-Forge retry columns: when the table has them all, the relay shows retry
/// state in the row's own columns too.
pub const RETRY_COLUMNS: [&str; 5] = [
    "status",
    "retry_count",
    "error_message",
    "scheduled_at",
    "updated_at",
];

/// Most ids applied in one on_success statement.
const SUCCEEDED_BATCH: usize = 1000;

/// How to read and write the outbox table, learned from the catalog at start-up.
#[derive(Debug, Clone)]
struct TableShape {
    /// `select c1::text, c2::text, ... from t where id = $1::text::<type>`
    reread_sql: String,
    /// `select o.c1::text, ... from t` (callers add the alias `o` and the rest).
    select_sql: String,
    resolved: ResolvedMapping,
    /// SQL type of the id column, for casts.
    id_type: String,
    /// The row has Event-Forge retry columns.
    mirror: bool,
    has_max_retries: bool,
}

/// The outbox table as the store keeps it tidy.
pub struct Housekeeping {
    table: TableName,
    id_column: &'static str,
    on_success: OnSuccess,
    retention: Duration,
    shape: TableShape,
    /// Ids acked and waiting for the batched on_success update.
    succeeded: Vec<String>,
    flush_at: Option<Instant>,
    retention_at: Option<Instant>,
}

impl Housekeeping {
    /// Learns the table's shape; fails when the table or a required column is missing.
    pub async fn learn(
        client: &Client,
        table: TableName,
        mapping: &ColumnMapping,
        on_success: OnSuccess,
        retention: Duration,
    ) -> Result<Self, Error> {
        let shape = table_shape(client, &table, mapping).await?;
        Ok(Housekeeping {
            table,
            id_column: mapping.id,
            on_success,
            retention,
            shape,
            succeeded: Vec::new(),
            flush_at: None,
            retention_at: None,
        })
    }

    /// The table has a `max_retries` column of its own.
    pub fn has_max_retries(&self) -> bool {
        self.shape.has_max_retries
    }

    /// The earliest housekeeping timer: the on_success flush or the retention sweep.
    pub fn flush_at(&self) -> Option<Instant> {
        self.flush_at
    }

    pub fn retention_at(&self) -> Option<Instant> {
        self.retention_at
    }

    /// The outbox row as it is now, `None` when it is gone.
    // The error keeps what could be read of the row (it is parked as-is): the rare
    // path, off the hot one.
    #[allow(clippy::result_large_err)]
    pub async fn reread(
        &self,
        client: &impl GenericClient,
        id: &str,
    ) -> Result<Option<Result<OutboxEvent, MalformedRow>>, Error> {
        let current = client
            .query_opt(&self.shape.reread_sql, &[&id])
            .await
            .map_err(query_err("re-reading an outbox row for a retry"))?;
        Ok(current.map(|r| {
            self.shape.resolved.build(|idx| {
                r.try_get::<_, Option<String>>(idx)
                    .map(|v| v.map(Bytes::from))
                    .map_err(|e| format!("column #{idx} cannot be read as text: {e}"))
            })
        }))
    }

    /// The oldest outbox rows still `pending` (created at or before `until`, and
    /// at or after `since`), in creation order, that have no retry state of this
    /// slot: what `replay --pending` re-publishes. `None` for tables without a
    /// status column.
    #[allow(clippy::result_large_err, clippy::type_complexity)]
    pub async fn pending_page(
        &self,
        client: &impl GenericClient,
        retry: &super::queries::RetryTable,
        until: &str,
        since: Option<&str>,
        limit: i64,
    ) -> Result<Option<Vec<Result<OutboxEvent, MalformedRow>>>, Error> {
        if !self.shape.mirror {
            return Ok(None);
        }
        let sql = format!(
            "{} o where o.status = 'pending' and o.created_at <= $1::text::timestamptz \
             and ($2::text is null or o.created_at >= $2::text::timestamptz) \
             and not exists (select 1 from {} r where r.slot = $3 and r.id = o.{}::text) \
             order by o.created_at, o.{} limit $4",
            self.shape.select_sql,
            retry.name().quoted(),
            quote_ident(self.id_column),
            quote_ident(self.id_column),
        );
        let rows = client
            .query(&sql, &[&until, &since, &retry.slot(), &limit])
            .await
            .map_err(query_err("reading the outbox rows still pending"))?;
        Ok(Some(
            rows.iter()
                .map(|r| {
                    self.shape.resolved.build(|idx| {
                        r.try_get::<_, Option<String>>(idx)
                            .map(|v| v.map(Bytes::from))
                            .map_err(|e| format!("column #{idx} cannot be read as text: {e}"))
                    })
                })
                .collect(),
        ))
    }

    /// Shows retry state in an Event-Forge row's own columns (no-op for other tables).
    pub async fn mirror(
        &self,
        client: &impl GenericClient,
        id: &str,
        reason: &str,
        status: &str,
        delay: Option<Duration>,
        count_attempt: bool,
    ) -> Result<(), Error> {
        if !self.shape.mirror {
            return Ok(());
        }
        let sql = format!(
            "update {} set status = $2, error_message = $3, retry_count = retry_count + $4, \
             scheduled_at = coalesce(now() + $5::bigint * interval '1 microsecond', scheduled_at), updated_at = now() \
             where {} = $1::text::{}",
            self.table.quoted(),
            quote_ident(self.id_column),
            self.shape.id_type
        );
        let delay = delay.map(|d| d.as_micros() as i64);
        client
            .execute(
                &sql,
                &[&id, &status, &reason, &(count_attempt as i32), &delay],
            )
            .await
            .map_err(query_err("showing retry state in the outbox row"))?;
        Ok(())
    }

    /// Shows a requeue in Event-Forge rows: `failed` with a fresh retry count, due now.
    pub async fn mirror_requeued(
        &self,
        client: &impl GenericClient,
        ids: &[String],
    ) -> Result<(), Error> {
        if !self.shape.mirror || ids.is_empty() {
            return Ok(());
        }
        client
            .execute(
                &format!(
                    "update {} set status = 'failed', retry_count = 0, scheduled_at = now(), updated_at = now() \
                     where {} = any($1::text[]::{}[])",
                    self.table.quoted(),
                    quote_ident(self.id_column),
                    self.shape.id_type
                ),
                &[&ids],
            )
            .await
            .map_err(query_err("showing the requeue in the outbox rows"))?;
        Ok(())
    }

    /// Queues acked ids for the batched on_success update; true when a batch is full.
    pub fn add_succeeded(&mut self, ids: Vec<String>) -> bool {
        if self.on_success == OnSuccess::Keep {
            return false;
        }
        if self.succeeded.is_empty() {
            self.succeeded = ids;
        } else {
            self.succeeded.extend(ids);
        }
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + Duration::from_millis(100));
        }
        self.succeeded.len() >= SUCCEEDED_BATCH
    }

    /// Applies on_success to the queued ids. On failure they stay queued and the
    /// flush is tried again in a second: commands behind it never wait on it.
    pub async fn flush_succeeded(&mut self, client: &Client) -> Result<(), Error> {
        self.flush_at = None;
        if self.succeeded.is_empty() {
            return Ok(());
        }
        let ids = std::mem::take(&mut self.succeeded);
        if let Err(e) = self.apply_on_success(client, &ids).await {
            self.succeeded = ids;
            self.flush_at = Some(Instant::now() + Duration::from_secs(1));
            return Err(e);
        }
        Ok(())
    }

    /// on_success for these rows right away (a retried head).
    pub async fn apply_on_success(&mut self, client: &Client, ids: &[String]) -> Result<(), Error> {
        let t = self.table.quoted();
        let id_col = quote_ident(self.id_column);
        let cast = &self.shape.id_type;
        let sql = match self.on_success {
            OnSuccess::Keep => return Ok(()),
            OnSuccess::Delete => {
                format!("delete from {t} where {id_col} = any($1::text[]::{cast}[])")
            }
            OnSuccess::MarkPublished => format!(
                "update {t} set status = 'published', error_message = null, updated_at = now() where {id_col} = any($1::text[]::{cast}[])"
            ),
        };
        client
            .execute(&sql, &[&ids])
            .await
            .map_err(query_err("applying on_success to published rows"))?;
        if self.on_success == OnSuccess::MarkPublished && self.retention_at.is_none() {
            self.retention_at = Some(Instant::now() + self.retention);
        }
        Ok(())
    }

    /// Schedules the retention sweep from the oldest published row (start-up and after a sweep).
    pub async fn schedule_retention_from_table(&mut self, client: &Client) -> Result<(), Error> {
        if self.on_success != OnSuccess::MarkPublished || !self.shape.mirror {
            return Ok(());
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
        self.retention_at = get::<Option<i64>>(&row, 0, CONTEXT)?
            .map(|oldest| instant_of(oldest + self.retention.as_micros() as i64));
        Ok(())
    }

    /// Deletes published rows older than the retention, 1 000 at a time. On failure
    /// the sweep is tried again in a minute.
    pub async fn sweep_retention(&mut self, client: &Client) -> Result<(), Error> {
        self.retention_at = Some(Instant::now() + Duration::from_secs(60));
        let t = self.table.quoted();
        let sql = format!(
            "delete from {t} where ctid = any(array(select ctid from {t} where status = 'published' \
             and updated_at < now() - $1::bigint * interval '1 microsecond' limit 1000))"
        );
        let retention = self.retention.as_micros() as i64;
        let mut total = 0u64;
        loop {
            let n = client
                .execute(&sql, &[&retention])
                .await
                .map_err(query_err("deleting published rows past retention"))?;
            total += n;
            if n < 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(deleted = total, "retention: deleted published rows");
        }
        self.retention_at = None;
        self.schedule_retention_from_table(client).await
    }

    /// Applies what is still queued when the store stops (a few tries).
    pub async fn finish(&mut self, client: &Client) {
        if let Err(e) = self.flush_succeeded(client).await {
            tracing::warn!(error = %e, "final on_success update failed; those rows keep their status");
        }
    }
}

async fn table_shape(
    client: &Client,
    table: &TableName,
    mapping: &ColumnMapping,
) -> Result<TableShape, Error> {
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
        .find(|(n, _, _)| n == mapping.id)
        .map(|(_, _, t)| t.clone())
        .unwrap_or_else(|| "text".into());
    let select = names
        .iter()
        .map(|n| format!("{}::text", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let reread_sql = format!(
        "select {select} from {} where {} = $1::text::{id_type}",
        table.quoted(),
        quote_ident(mapping.id)
    );
    let select_sql = format!(
        "select {} from {}",
        names
            .iter()
            .map(|n| format!("o.{}::text", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", "),
        table.quoted()
    );
    let mirror = RETRY_COLUMNS.iter().all(|c| names.contains(c));
    let has_max_retries = mapping.max_retries.is_some_and(|c| names.contains(&c));
    Ok(TableShape {
        reread_sql,
        select_sql,
        resolved,
        id_type,
        mirror,
        has_max_retries,
    })
}
