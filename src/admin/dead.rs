//! `outbox-relay dead list` (paged) and `dead requeue` (in pages, each its own
//! transaction with its NOTIFY).

use super::retry_table;
use crate::config::Config;
use crate::error::{Error, SqlTrouble};
use crate::outbox_table::OutboxTable;
use crate::pg::{query_err, quote_ident};
use crate::retry::queries::DeadMessage;
use crate::retry::queries::{RequeueKey, RequeuePage, RetryTable};

/// Rows requeued per transaction.
const REQUEUE_PAGE: i64 = 1000;

/// Dead messages of one slot, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct DeadList {
    #[serde(skip)]
    slot: String,
    #[serde(skip)]
    limit: i64,
    #[serde(skip)]
    offset: i64,
    pub messages: Vec<DeadMessage>,
}

impl std::fmt::Display for DeadList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.messages.is_empty() {
            return writeln!(f, "no dead messages for slot {}", self.slot);
        }
        writeln!(
            f,
            "{:<38} {:<40} {:<24} {:>8}  last error",
            "id", "aggregate", "event type", "attempts"
        )?;
        for d in &self.messages {
            writeln!(
                f,
                "{:<38} {:<40} {:<24} {:>8}  {}",
                d.id,
                format!("{}/{}", d.aggregate_type, d.aggregate_id),
                d.event_type.as_deref().unwrap_or_default(),
                d.attempts,
                d.last_error.as_deref().unwrap_or_default()
            )?;
        }
        if self.messages.len() as i64 == self.limit {
            writeln!(
                f,
                "(the first {} from offset {}; more may follow: --offset {})",
                self.limit,
                self.offset,
                self.offset + self.limit
            )?;
        }
        Ok(())
    }
}

/// Dead messages of this relay's slot, oldest first: `limit` after `offset`.
pub async fn dead_list(config: &Config, limit: i64, offset: i64) -> Result<DeadList, Error> {
    crate::pg::shards::chosen(&config.postgres.sharding, "dead list")?;
    let retry = retry_table(config);
    let sql = config.postgres.target.connect().await?;
    let messages = if retry.exists(&sql).await? {
        retry.dead(&sql, limit.max(1), offset.max(0)).await?
    } else {
        Vec::new()
    };
    Ok(DeadList {
        slot: config.postgres.slot.clone(),
        limit: limit.max(1),
        offset: offset.max(0),
        messages,
    })
}

/// Gives dead messages (`ids`, or all with `None`) a fresh retry budget and wakes the
/// running relay, a page at a time. Returns how many were requeued; unknown ids
/// are an error naming them (nothing is requeued then).
pub async fn dead_requeue(config: &Config, ids: Option<&[String]>) -> Result<u64, Error> {
    crate::pg::shards::chosen(&config.postgres.sharding, "dead requeue")?;
    let pg = &config.postgres;
    let retry = retry_table(config);
    let mut sql = pg.target.connect().await?;
    if !retry.exists(&sql).await? {
        return Err(Error::Requeue(format!(
            "retry table {} does not exist: nothing is dead",
            retry.name()
        )));
    }
    let outbox = OutboxTable::learn(&sql, pg.table.clone(), &pg.columns).await?;
    let notify = format!(
        "notify {}",
        quote_ident(&crate::retry::requeue_channel(&pg.slot))
    );
    if let Some(ids) = ids {
        // Named ids: all of them or none, in one transaction.
        let (requeued, _) = retrying(
            &mut sql,
            &retry,
            &outbox,
            &notify,
            Some(ids),
            &RequeueKey::default(),
        )
        .await?;
        return Ok(requeued as u64);
    }
    // Keyset pages: each starts after the last key the previous one requeued.
    let (mut total, mut after) = (0u64, RequeueKey::default());
    loop {
        let (requeued, last) = retrying(&mut sql, &retry, &outbox, &notify, None, &after).await?;
        total += requeued as u64;
        // Done when a page finds nothing after the key: a page that came back
        // short (housekeeping purged some of its rows meanwhile) is not the end.
        match last {
            Some(key) => after = key,
            None => return Ok(total),
        }
    }
}

/// Runs one requeue transaction again (up to five times, after a short wait) when
/// Postgres aborted it for a deadlock, a serialization failure or a lock timeout:
/// the running relay updates the same outbox rows, and a rolled-back page changed
/// nothing.
async fn retrying(
    sql: &mut tokio_postgres::Client,
    retry: &RetryTable,
    outbox: &OutboxTable,
    notify: &str,
    ids: Option<&[String]>,
    after: &RequeueKey,
) -> Result<(usize, Option<RequeueKey>), Error> {
    let mut attempt = 0u32;
    loop {
        match requeue_page(sql, retry, outbox, notify, ids, after).await {
            Err(e) if e.sql_trouble() == Some(SqlTrouble::Timeout) && attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "requeue page aborted by Postgres: trying it again");
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
            }
            other => return other,
        }
    }
}

/// One requeue transaction: the named `ids` (all or none), or the next page of
/// dead messages after the key `after`; marks their outbox rows and wakes the
/// relay. How many, and the page's last key.
async fn requeue_page(
    sql: &mut tokio_postgres::Client,
    retry: &RetryTable,
    outbox: &OutboxTable,
    notify: &str,
    ids: Option<&[String]>,
    after: &RequeueKey,
) -> Result<(usize, Option<RequeueKey>), Error> {
    let tx = sql
        .transaction()
        .await
        .map_err(query_err("starting the requeue"))?;
    let limit = ids.map_or(REQUEUE_PAGE, |ids| ids.len().max(1) as i64);
    let RequeuePage {
        ids: requeued,
        last,
    } = retry.requeue(&tx, ids, after, limit).await?;
    if let Some(ids) = ids {
        let unknown: Vec<&str> = ids
            .iter()
            .filter(|id| !requeued.contains(id))
            .map(|s| s.as_str())
            .collect();
        if !unknown.is_empty() {
            tx.rollback().await.ok();
            return Err(Error::Requeue(format!(
                "not dead in slot {}: {} (see `outbox-relay dead list`)",
                retry.slot(),
                unknown.join(", ")
            )));
        }
    }
    outbox.mirror_requeued(&tx, &requeued).await?;
    if !requeued.is_empty() {
        tx.batch_execute(notify)
            .await
            .map_err(query_err("notifying the relay"))?;
    }
    tx.commit()
        .await
        .map_err(query_err("committing the requeue"))?;
    Ok((requeued.len(), last))
}
