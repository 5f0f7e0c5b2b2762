//! One claim transaction of the [`Processor`]: the due rows claimed with `FOR
//! UPDATE SKIP LOCKED`, their handlers run in it (first without savepoints,
//! again with one per handler when a handler failed), their statuses set, one
//! commit; and the fallbacks when a handler fails or the commit is refused.

use super::{HandlerError, InboxMessage, Processor};
use crate::claim::{self, AfterFailure};
use crate::error::{query_err, Error, SqlTrouble};
use std::time::Duration;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

/// How many of the oldest unprocessed rows a claim looks at first (at least
/// ten times its batch).
const WINDOW: usize = 1000;

impl Processor {
    /// The claim of up to `limit` due rows, oldest first, locked (`SKIP
    /// LOCKED`: rows another processor holds are passed over).
    ///
    /// Candidates are the unfinished rows (never a walk of `created_at` past
    /// every processed row the table still holds: they only grow), from the
    /// partial index of unfinished rows when the table has it, else through
    /// the status. With `window`, only the oldest `window` unprocessed rows are
    /// considered; `None` considers them all,
    /// for when the window held nothing claimable (all locked, or, with an
    /// ordering field, all behind a row that is not due).
    ///
    /// With `ordering_field`, a row is claimable only when it is the oldest
    /// unprocessed row of its key (`payload->>field`; rows without the key are
    /// each their own): an earlier row of the key that is received, failed
    /// (due or not) or being processed holds the later ones back.
    pub(super) fn claim_sql(&self, limit: usize, window: Option<usize>) -> String {
        let t = self.table.quoted();
        let window = window.map(|w| format!(" limit {w}")).unwrap_or_default();
        let due = "(m.status = 'received' or (m.status = 'failed' \
                   and (m.scheduled_at is null or m.scheduled_at <= now())))";
        if self.direct_claim() {
            // The oldest due rows straight off the index of unfinished rows,
            // walking past those other sessions hold: `limit` rows read, not a
            // window of them (1.5 ms against 12 ms per claim of 100 with a
            // window of 1 000).
            return format!(
                "select m.id, m.message_id, m.source, m.event_type, m.payload::text, \
                 m.metadata::text, m.retry_count, m.max_retries from {t} m \
                 where m.status in ('received', 'failed') and m.event_type = any($1) and {due} \
                 order by m.created_at, m.id limit {limit} for update of m skip locked"
            );
        }
        // With an ordering field and the partial index of unfinished rows in
        // `created_at` order (`outbox-relay init` makes it), the oldest
        // `window` come straight off it: a claim costs the same with a backlog
        // of a million rows (5.7 ms against 128 ms through the status with
        // 300 000). Without it, through the status: every unfinished row each
        // claim, but never the processed history `created_at` would walk.
        let (unfinished, first) = if self.unfinished_index() {
            (format!(" order by created_at, id{window}"), String::new())
        } else {
            (String::new(), format!(" order by created_at, id{window}"))
        };
        let candidates = match &self.options.ordering_field {
            Some(_) => format!(
                "with unprocessed as materialized (select id, created_at from {t} \
                   where status in ('received', 'failed', 'processing'){unfinished}), \
                 oldest as (select u.id, u.created_at, r.payload->>$2 as k from \
                   (select id, created_at from unprocessed{first}) u \
                   join {t} r on r.id = u.id), \
                 c as (select id, created_at from (select id, created_at, k, \
                   row_number() over (partition by k order by created_at, id) as turn from oldest) o \
                   where turn = 1 or k is null)"
            ),
            // With the index, a claim without an ordering field is direct (above).
            None => format!(
                "with unprocessed as materialized (select id, created_at from {t} m \
                   where status in ('received', 'failed') and event_type = any($1) and {due}), \
                 c as (select id, created_at from unprocessed order by created_at, id{window})"
            ),
        };
        format!(
            "{candidates} select m.id, m.message_id, m.source, m.event_type, m.payload::text, \
             m.metadata::text, m.retry_count, m.max_retries from c join {t} m on m.id = c.id \
             where m.event_type = any($1) and {due} \
             order by c.created_at, c.id limit {limit} for update of m skip locked"
        )
    }

    /// Claims read the table directly, not through a window: with the index
    /// of unfinished rows and no ordering field (a row's turn does not depend
    /// on the rows before it).
    fn direct_claim(&self) -> bool {
        self.unfinished_index() && self.options.ordering_field.is_none()
    }

    /// One claim of up to `limit` rows. It runs first without a savepoint per
    /// row (a batch of handlers that all succeed pays no savepoint round trips);
    /// when a handler fails, that transaction is rolled back and the rows are
    /// claimed again with a savepoint per handler, so the failing one is marked
    /// failed and the others commit. When Postgres refuses the commit for a
    /// handler's write (a deferred constraint: the whole batch rolled back), the
    /// rows are claimed again one per transaction, so the one that broke it is
    /// found and marked failed with the reason, and the others go through: no row
    /// holds its batch forever.
    pub(super) async fn claim(&self, client: &mut Client, limit: usize) -> Result<usize, Error> {
        self.know_unfinished_index(client).await?;
        let (claimed, mut refused) = match self.claim_isolating(client, limit).await? {
            Ran::Committed(n) => return Ok(n),
            Ran::RefusedAtCommit {
                claimed,
                message,
                error,
            } => (claimed, Some((message, error))),
        };
        if claimed > 1 {
            refused = None;
            for _ in 0..claimed {
                match self.claim_isolating(client, 1).await? {
                    Ran::Committed(0) => break,
                    Ran::Committed(_) => {}
                    Ran::RefusedAtCommit { message, error, .. } => {
                        refused = Some((message, error));
                        break;
                    }
                }
            }
        }
        if let Some((message, error)) = refused {
            let err = query_err("marking an inbox row whose commit was refused");
            let tx = client.transaction().await.map_err(&err)?;
            let status = self.record_failure(&tx, &message, &error).await?;
            tx.commit().await.map_err(&err)?;
            if let Some(o) = &self.observer {
                o.failed(1);
            }
            tracing::warn!(id = %message.id, message_id = %message.message_id, event_type = %message.event_type, status, error = %error, "inbox handler's writes refused at commit");
        }
        Ok(claimed)
    }

    /// A claim without savepoints, and with one per handler when a handler of
    /// the first failed.
    async fn claim_isolating(&self, client: &mut Client, limit: usize) -> Result<Ran, Error> {
        match self.claim_and_run(client, limit, Mode::Batch).await? {
            Attempt::Ran(ran) => Ok(ran),
            Attempt::Undone(failed) => {
                tracing::debug!(
                    "an inbox handler failed: the batch is rolled back and run again with a savepoint per handler"
                );
                match self
                    .claim_and_run(client, limit, Mode::Isolated(failed.as_ref()))
                    .await?
                {
                    Attempt::Ran(ran) => Ok(ran),
                    // With savepoints a failing handler is marked failed, never undone.
                    Attempt::Undone(_) => Ok(Ran::Committed(0)),
                }
            }
        }
    }

    async fn claim_and_run(
        &self,
        client: &mut Client,
        limit: usize,
        mode: Mode<'_>,
    ) -> Result<Attempt, Error> {
        let err = query_err("processing inbox rows");
        let types = self.event_types();
        let tx = client.transaction().await.map_err(&err)?;
        if self.avoid_incremental_sort() {
            // Without this the planner can prefer Event-Forge's plain
            // `created_at` index plus an incremental sort on `id`: it walks
            // every processed row on each claim (8-9 ms per claim at 30 000
            // processed rows, growing with the history). With a full sort as
            // the price of that path, the index of unfinished rows wins.
            tx.batch_execute("set local enable_incremental_sort = off")
                .await
                .map_err(&err)?;
        }
        // Typed parameters: one round trip, no prepare.
        let claim = |window| {
            let sql = self.claim_sql(limit, window);
            let tx = &tx;
            let types = &types;
            async move {
                match &self.options.ordering_field {
                    Some(field) => {
                        tx.query_typed(&sql, &[(types, Type::TEXT_ARRAY), (field, Type::TEXT)])
                            .await
                    }
                    None => tx.query_typed(&sql, &[(types, Type::TEXT_ARRAY)]).await,
                }
            }
        };
        let mut rows = claim(Some(WINDOW.max(10 * limit))).await.map_err(&err)?;
        // A direct claim has no window that could have held nothing claimable.
        if rows.is_empty() && !self.direct_claim() {
            rows = claim(None).await.map_err(&err)?;
        }
        let claimed = rows.len();
        let mut processed = Vec::with_capacity(claimed);
        let mut failures = Vec::new();
        for row in rows {
            let (message, unreadable) = message_of(&row);
            let outcome = match (unreadable, mode) {
                // A row whose JSON a handler cannot be given fails without running.
                (Some(reason), _) => Err(reason),
                // The handler whose failure undid the batch is not run twice:
                // its attempt counts once, with its error.
                (None, Mode::Isolated(Some((id, error)))) if *id == message.id => {
                    Err(error.clone())
                }
                (None, Mode::Isolated(_)) => self
                    .run_handler(&tx, &message)
                    .await?
                    .map_err(|e| e.to_string()),
                (None, Mode::Batch) => match self.handlers.get(&message.event_type) {
                    Some(handler) => handler.handle(&tx, &message).await,
                    None => Err("no handler for this event type".into()),
                }
                .map_err(|e| e.to_string()),
            };
            match (outcome, mode) {
                (Ok(()), _) => processed.push(message),
                (Err(e), Mode::Isolated(_)) => failures.push((message, e)),
                (Err(e), Mode::Batch) => {
                    tx.rollback().await.map_err(&err)?;
                    return Ok(Attempt::Undone(Some((message.id, e))));
                }
            }
        }
        if !processed.is_empty() {
            let ids: Vec<&str> = processed.iter().map(|m| m.id.as_str()).collect();
            let marked = tx
                .execute_typed(
                    &format!(
                        "update {} set status = 'processed', processed_at = clock_timestamp(), \
                         updated_at = clock_timestamp(), error_message = null where id = any($1)",
                        self.table.quoted()
                    ),
                    &[(&ids, Type::TEXT_ARRAY)],
                )
                .await;
            match (marked, mode) {
                (Ok(_), _) => {}
                // A handler returned success after one of its statements had
                // failed: the transaction is void; run the batch again with
                // savepoints, which finds that handler.
                (Err(_), Mode::Batch) => {
                    tx.rollback().await.map_err(&err)?;
                    return Ok(Attempt::Undone(None));
                }
                (Err(e), Mode::Isolated(_)) => return Err(err(e)),
            }
        }
        let mut outcomes = Vec::with_capacity(failures.len());
        for (message, error) in &failures {
            outcomes.push(self.record_failure(&tx, message, error).await?);
        }
        if let Err(e) = tx.commit().await {
            let e = err(e);
            // Only a handler's write can be refused at commit: one of the processed
            // rows' (a failed handler's writes were rolled back to its savepoint).
            if e.sql_trouble() != Some(SqlTrouble::Row) || processed.is_empty() {
                return Err(e);
            }
            let reason = e.to_string();
            let message = processed.swap_remove(0);
            return Ok(Attempt::Ran(Ran::RefusedAtCommit {
                claimed,
                message,
                error: format!(
                    "the handler's writes were refused at commit (a deferred constraint?): {reason}"
                ),
            }));
        }
        if let Some(o) = &self.observer {
            o.processed(processed.len() as u64);
            o.failed(failures.len() as u64);
        }
        for ((message, error), status) in failures.iter().zip(outcomes) {
            tracing::warn!(id = %message.id, message_id = %message.message_id, event_type = %message.event_type, status, error = %error, "inbox handler failed");
        }
        Ok(Attempt::Ran(Ran::Committed(claimed)))
    }

    /// Marks `message` failed (due again after Event-Forge's backoff), or
    /// permanently failed once its budget is spent; returns the status.
    async fn record_failure(
        &self,
        tx: &Transaction<'_>,
        message: &InboxMessage,
        error: &str,
    ) -> Result<&'static str, Error> {
        let jitter = rand::random_range(0.9..=1.1);
        let (status, retries, delay) = match claim::after_failure(
            message.retry_count,
            message.max_retries,
            self.options.backoff_base,
            self.options.backoff_max,
            jitter,
        ) {
            AfterFailure::Retry { retries, delay } => ("failed", retries, delay),
            AfterFailure::Dead { retries } => ("permanently_failed", retries, Duration::ZERO),
        };
        let delay_ms = delay.as_millis() as f64;
        tx.execute(
            &format!(
                "update {} set status = $2::text, retry_count = $3, error_message = $4, \
                 scheduled_at = case when $2::text = 'failed' \
                 then clock_timestamp() + make_interval(secs => $5::float8 / 1000) else scheduled_at end, \
                 updated_at = clock_timestamp() where id = $1",
                self.table.quoted()
            ),
            &[&message.id, &status, &retries, &error, &delay_ms],
        )
        .await
        .map_err(query_err("marking an inbox row failed"))?;
        Ok(status)
    }

    /// Runs `message`'s handler inside a savepoint of `tx`: `Ok(Err(_))` is the
    /// handler's failure (its writes rolled back, the batch goes on); `Err(_)` is
    /// the transaction's (the batch rolls back).
    async fn run_handler(
        &self,
        tx: &Transaction<'_>,
        message: &InboxMessage,
    ) -> Result<Result<(), HandlerError>, Error> {
        let err = query_err("running an inbox handler");
        let Some(handler) = self.handlers.get(&message.event_type) else {
            return Ok(Err("no handler for this event type".into()));
        };
        tx.batch_execute("savepoint outbox_relay_handler")
            .await
            .map_err(&err)?;
        let failure = match handler.handle(tx, message).await {
            Ok(()) => match tx
                .batch_execute("release savepoint outbox_relay_handler")
                .await
            {
                Ok(()) => return Ok(Ok(())),
                // The handler swallowed an error of one of its statements: its
                // writes are void, so this row failed (and the batch goes on).
                Err(e) => format!(
                    "the handler returned success after one of its statements had failed \
                     (it ignored the error; its writes are rolled back): {}",
                    e.as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_string())
                )
                .into(),
            },
            Err(e) => e,
        };
        tx.batch_execute(
            "rollback to savepoint outbox_relay_handler; release savepoint outbox_relay_handler",
        )
        .await
        .map_err(&err)?;
        Ok(Err(failure))
    }
}

/// A row whose handler failed: its id and the error.
type Failed = (String, String);

/// How the handlers of a claim run.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// In the claim's transaction: any failure rolls the whole claim back
    /// ([`Attempt::Undone`]).
    Batch,
    /// Each in a savepoint of its own: a failing handler's writes are undone
    /// alone. The row whose failure undid the batch, if known, is marked failed
    /// with that error without running again.
    Isolated(Option<&'a Failed>),
}

/// One claim transaction without savepoints may be undone; with them it runs.
enum Attempt {
    /// Rolled back: a handler failed (this row, when one returned an error)
    /// while the claim ran without savepoints.
    Undone(Option<Failed>),
    Ran(Ran),
}

/// What one claim transaction did.
pub(super) enum Ran {
    /// Committed; how many rows it claimed.
    Committed(usize),
    /// Postgres refused the commit for a handler's write: everything rolled back.
    /// `message` is the row to blame when the claim held only one.
    RefusedAtCommit {
        claimed: usize,
        message: InboxMessage,
        error: String,
    },
}

/// The claimed row as its handler sees it, and why it cannot be given to one:
/// JSON Postgres holds that `serde_json::Value` cannot read (a number beyond
/// f64, such as 1e400) fails its row with the reason instead of reaching the
/// handler as `null`.
fn message_of(row: &tokio_postgres::Row) -> (InboxMessage, Option<String>) {
    let text: String = row.get(4);
    let metadata: Option<String> = row.get(5);
    let mut unreadable = None;
    let payload = serde_json::from_str(&text).unwrap_or_else(|e| {
        unreadable = Some(format!(
            "the payload cannot be read as a serde_json::Value ({e}): a handler cannot be given it"
        ));
        serde_json::Value::Null
    });
    let metadata = metadata.map(|m| {
        serde_json::from_str(&m).unwrap_or_else(|e| {
            unreadable.get_or_insert(format!(
                "the metadata cannot be read as a serde_json::Value ({e}): a handler cannot be given it"
            ));
            serde_json::Value::Null
        })
    });
    let message = InboxMessage {
        id: row.get(0),
        message_id: row.get(1),
        source: row.get(2),
        event_type: row.get(3),
        payload,
        metadata,
        retry_count: row.get(6),
        max_retries: row.get(7),
    };
    (message, unreadable)
}
