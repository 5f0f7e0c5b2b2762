//! [`Processor`]: runs Rust handlers on the rows of an Event-Forge inbox table,
//! each in the transaction that marks its row `processed`, so a handler's own
//! writes and the status commit together (effects once).
//!
//! A worker claims a batch of due rows (`received`, or `failed` with
//! `scheduled_at` reached) with `FOR UPDATE SKIP LOCKED`, so several processors
//! share a table, and runs each row's handler for its `event_type` in that
//! transaction: on success it marks the row `processed`; on failure the row is
//! marked `failed` with Event-Forge's backoff, or `permanently_failed` once the
//! retry budget is spent (`claim.rs`), and none of that handler's writes stay. A
//! batch runs first without savepoints; when a handler fails it is rolled back
//! and claimed again with a savepoint per handler (the failed row is marked
//! without running again), so a handler that succeeded may run twice for one
//! attempt, its writes committed once.
//! One commit covers the batch, so a handler's effects and its row's status still
//! commit together, and a batch pays one commit flush instead of one per row. A
//! crashed worker's transaction rolls the whole batch back by itself; rows left in `processing` by other workers (Event-Forge's own
//! `InboxService`) are recovered by a sweep through the recovery columns. The
//! worker sleeps until a `NOTIFY` from the receiver, the next scheduled retry, or
//! the next recovery sweep: no fixed-interval polling.

use crate::backoff::Backoff;
use crate::connect::{Connect, Session};
use crate::error::{query_err, Error};
use crate::table::TableName;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, Transaction};

mod batch;

/// An inbox row as a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxMessage {
    /// The row's id (a UUID string).
    pub id: String,
    pub message_id: String,
    pub source: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub metadata: Option<serde_json::Value>,
    /// Failed attempts so far.
    pub retry_count: i32,
    pub max_retries: i32,
}

/// What a handler returns on failure: any error (its text becomes `error_message`).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The future a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// A handler for one event type. Any `Fn(&Transaction, &InboxMessage) ->
/// HandlerFuture` is one; its writes go through the transaction it is given.
pub trait Handler: Send + Sync {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        message: &'a InboxMessage,
    ) -> HandlerFuture<'a>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(&'a Transaction<'a>, &'a InboxMessage) -> HandlerFuture<'a> + Send + Sync,
{
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        message: &'a InboxMessage,
    ) -> HandlerFuture<'a> {
        self(tx, message)
    }
}

/// How a [`Processor`] works; `Default` is Event-Forge's policy.
#[derive(Debug, Clone)]
pub struct ProcessorOptions {
    /// First retry delay (Event-Forge: 5 s).
    pub backoff_base: Duration,
    /// Longest retry delay (Event-Forge: 1 h).
    pub backoff_max: Duration,
    /// The receiver's `inbox.notify_channel`; `None`: woken by timers only.
    pub notify_channel: Option<String>,
    /// A row in `processing` for longer than this was left by a crashed worker.
    pub stuck_after: Duration,
    /// Recoveries before such a row is `permanently_failed`.
    pub max_recoveries: i32,
    /// Per-aggregate ordering: rows whose payload has the same value in this
    /// field are processed one at a time, in arrival order (a failed row holds
    /// the later ones until it is processed or dead). `None`: no ordering.
    pub ordering_field: Option<String>,
    /// Rows claimed per transaction (at least 1). The batch commits once: larger
    /// batches pay fewer commit flushes, but a row's effects become visible only
    /// when its batch commits, a crash redoes the whole batch, and a handler's
    /// failure runs the batch's other handlers again (their writes once). With 1,
    /// each attempt runs its handler once. With `ordering_field`, a batch holds at
    /// most one row per aggregate.
    pub batch_size: usize,
}

impl Default for ProcessorOptions {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            notify_channel: Some("inbox_messages".into()),
            stuck_after: Duration::from_secs(300),
            max_recoveries: 3,
            ordering_field: None,
            batch_size: 100,
        }
    }
}

/// What a [`Processor`] did, for whoever counts it (the relay's metrics:
/// `outbox_relay::metrics::ProcessorMetrics`).
pub trait ProcessorObserver: Send + Sync {
    /// `n` rows processed: their handlers' writes committed with the status.
    fn processed(&self, n: u64);
    /// `n` handler attempts failed (scheduled again, or permanently failed).
    fn failed(&self, n: u64);
}

/// [`Processor`]'s knowledge of the table's index of unfinished rows.
const INDEX_UNKNOWN: u8 = 0;
const INDEX_ABSENT: u8 = 1;
/// Present, on PostgreSQL 13 or later (which has incremental sorts).
const INDEX_PRESENT: u8 = 2;
/// Present, on a server without incremental sorts.
const INDEX_PRESENT_NO_INCREMENTAL_SORT: u8 = 3;

/// Runs handlers on inbox rows. See the module documentation.
///
/// ```no_run
/// use outbox_relay_client::{InboxMessage, Processor};
/// use tokio_postgres::Transaction;
///
/// # async fn example() -> Result<(), outbox_relay_client::Error> {
/// let processor = Processor::new("postgresql://app@127.0.0.1:5432/app", "public.inbox_messages")?
///     .handler("order.placed", |tx: &Transaction<'_>, m: &InboxMessage| {
///         let order = m.payload["id"].as_str().unwrap_or_default().to_string();
///         Box::pin(async move {
///             // Runs in the transaction that marks the row processed.
///             tx.execute("insert into shipments (order_id) values ($1)", &[&order])
///                 .await?;
///             Ok(())
///         })
///     });
/// processor.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Processor {
    connect: Arc<dyn Connect>,
    table: TableName,
    handlers: HashMap<String, Arc<dyn Handler>>,
    options: ProcessorOptions,
    observer: Option<Arc<dyn ProcessorObserver>>,
    /// Whether the table has the partial index of unfinished rows
    /// (`created_at`, `id`): [`INDEX_UNKNOWN`], [`INDEX_ABSENT`],
    /// [`INDEX_PRESENT`] or [`INDEX_PRESENT_NO_INCREMENTAL_SORT`]; learned at each connect of [`Processor::run`], and
    /// by the first claim of a caller's own session, it decides how claims
    /// find rows.
    unfinished_index: Arc<std::sync::atomic::AtomicU8>,
}

impl Processor {
    /// A processor for `table` (`schema.table`) in the database at `url`, over
    /// plain connections (for TLS: [`Processor::with_connect`] and
    /// [`Connect::tls`](crate::Connect)).
    pub fn new(url: &str, table: &str) -> Result<Processor, Error> {
        Self::with_connect(<dyn Connect>::plain(url)?, table)
    }

    /// A processor for `table` whose sessions `connect` opens.
    pub fn with_connect(connect: Arc<dyn Connect>, table: &str) -> Result<Processor, Error> {
        let table =
            TableName::parse(table).map_err(|m| Error::Invalid(format!("the inbox table: {m}")))?;
        Ok(Processor {
            connect,
            table,
            handlers: HashMap::new(),
            options: ProcessorOptions::default(),
            observer: None,
            unfinished_index: Arc::new(std::sync::atomic::AtomicU8::new(INDEX_UNKNOWN)),
        })
    }

    /// Reports what it does to `observer` (counts of processed and failed rows).
    pub fn observer(mut self, observer: Arc<dyn ProcessorObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Registers the handler of `event_type` (replacing an earlier one): a
    /// closure that returns `Box::pin(async move { … })`.
    pub fn handler<F>(mut self, event_type: &str, handler: F) -> Self
    where
        F: for<'a> Fn(&'a Transaction<'a>, &'a InboxMessage) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.handlers
            .insert(event_type.to_string(), Arc::new(handler));
        self
    }

    pub fn options(mut self, options: ProcessorOptions) -> Self {
        self.options = options;
        self
    }

    fn event_types(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// Claims and processes one due row; `Ok(false)` when none is due.
    pub async fn process_one(&self, client: &mut Client) -> Result<bool, Error> {
        Ok(self.claim(client, 1).await? > 0)
    }

    /// Claims up to `batch_size` due rows in one transaction, runs each one's
    /// handler and commits once; returns how many rows it
    /// claimed (0 when none is due).
    pub async fn process_batch(&self, client: &mut Client) -> Result<usize, Error> {
        self.claim(client, self.options.batch_size.max(1)).await
    }

    /// Processes due rows until none is left; returns how many were processed.
    pub async fn process_due(&self, client: &mut Client) -> Result<usize, Error> {
        let mut n = 0;
        loop {
            match self.process_batch(client).await? {
                0 => return Ok(n),
                k => n += k,
            }
        }
    }

    /// Moves rows stuck in `processing` for longer than `stuck_after` back to
    /// `failed` (due now), or to `permanently_failed` after `max_recoveries`;
    /// returns how many.
    pub async fn recover_stuck(&self, client: &Client) -> Result<u64, Error> {
        let t = self.table.quoted();
        let secs = self.options.stuck_after.as_secs_f64();
        client
            .execute(
                &format!(
                    "update {t} set status = case when recovery_attempts >= $1 \
                     then 'permanently_failed' else 'failed' end, \
                     scheduled_at = now(), recovery_attempts = recovery_attempts + 1, \
                     last_recovered_at = now(), updated_at = now(), \
                     recovery_reason = 'stuck in processing for more than ' || $2::float8 || ' s (worker crashed?)' \
                     where status = 'processing' and updated_at < now() - make_interval(secs => $2)"
                ),
                &[&self.options.max_recoveries, &secs],
            )
            .await
            .map_err(query_err("recovering stuck inbox rows"))
    }

    /// When the earliest failed row of this processor's event types is due.
    async fn next_due(&self, client: &Client) -> Result<Option<Duration>, Error> {
        let row = client
            .query_one(
                &format!(
                    "select extract(epoch from min(scheduled_at) - now())::float8 from {} \
                     where status = 'failed' and event_type = any($1)",
                    self.table.quoted()
                ),
                &[&self.event_types()],
            )
            .await
            .map_err(query_err("reading the next inbox retry"))?;
        Ok(row
            .get::<_, Option<f64>>(0)
            .map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Runs until `shutdown` resolves: processes what is due, then sleeps until a
    /// NOTIFY, the next retry or the next recovery sweep. Reconnects with backoff.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let result = self.serve(&mut shutdown).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let wait = backoff.fail();
                    tracing::warn!(error = %e, retry_in = ?wait, "inbox processor: reconnecting");
                    // Priority: shutdown, then the end of the backoff.
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn unfinished_index(&self) -> bool {
        self.unfinished_index
            .load(std::sync::atomic::Ordering::Relaxed)
            >= INDEX_PRESENT
    }

    /// Claims turn incremental sorts off (see `claim_and_run`): the table has
    /// the index and the server has the setting.
    fn avoid_incremental_sort(&self) -> bool {
        self.unfinished_index
            .load(std::sync::atomic::Ordering::Relaxed)
            == INDEX_PRESENT
    }

    /// Learns whether the table has the index, once, on `client` (for
    /// sessions the caller brings to [`Processor::process_batch`] and the like).
    async fn know_unfinished_index(&self, client: &tokio_postgres::Client) -> Result<(), Error> {
        if self
            .unfinished_index
            .load(std::sync::atomic::Ordering::Relaxed)
            == INDEX_UNKNOWN
        {
            self.learn_unfinished_index(client).await?;
        }
        Ok(())
    }

    /// Whether the table has a valid partial index of unfinished rows led by
    /// `created_at` (sql/inbox_messages.sql's `idx_inbox_unfinished`); without
    /// one, says what each claim then costs and how to add it.
    async fn learn_unfinished_index(&self, client: &tokio_postgres::Client) -> Result<(), Error> {
        let row = client
            .query_one(
                "select exists (select 1 from pg_index i \
                   join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0] \
                   where i.indrelid = to_regclass($1) and i.indisvalid and i.indpred is not null \
                   and a.attname = 'created_at' \
                   and pg_get_expr(i.indpred, i.indrelid) like '%received%' \
                   and pg_get_expr(i.indpred, i.indrelid) like '%failed%' \
                   and pg_get_expr(i.indpred, i.indrelid) like '%processing%'), \
                   current_setting('server_version_num')::int >= 130000",
                &[&self.table.quoted()],
            )
            .await
            .map_err(query_err(
                "looking for the inbox table's index of unfinished rows",
            ))?;
        let found: bool = row.try_get(0).unwrap_or(false);
        let incremental_sort: bool = row.try_get(1).unwrap_or(false);
        if !found {
            tracing::warn!(
                table = %self.table,
                "the inbox table has no partial index of unfinished rows: each claim reads every unprocessed row, so claims slow down as a backlog grows; run `outbox-relay init` with [inbox] table set, or CREATE INDEX ON {} (created_at, id) WHERE status IN ('received', 'failed', 'processing')",
                self.table.quoted()
            );
        }
        self.unfinished_index.store(
            match (found, incremental_sort) {
                (false, _) => INDEX_ABSENT,
                (true, true) => INDEX_PRESENT,
                (true, false) => INDEX_PRESENT_NO_INCREMENTAL_SORT,
            },
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    async fn serve<S: Future<Output = ()>>(&self, shutdown: &mut Pin<&mut S>) -> Result<(), Error> {
        let Session { mut client, .. } = self.connect.connect("outbox-relay processor").await?;
        self.learn_unfinished_index(&client).await?;
        // Woken by the receiver's NOTIFY on a session of its own; without a
        // channel, by timers only (the sender stays here, so `wake` never ends).
        let (_listener, mut wake, _sender) = match &self.options.notify_channel {
            Some(channel) => {
                let listener = self
                    .connect
                    .connect("outbox-relay processor listen")
                    .await?;
                listener
                    .client
                    .batch_execute(&format!("listen {}", crate::table::quote_ident(channel)))
                    .await
                    .map_err(query_err("listening for new inbox rows"))?;
                (Some(listener.client), listener.notifications, None)
            }
            None => {
                let (sender, wake) = tokio::sync::mpsc::channel::<()>(1);
                (None, wake, Some(sender))
            }
        };
        let mut next_sweep = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_sweep {
                self.recover_stuck(&client).await?;
                next_sweep = tokio::time::Instant::now() + self.options.stuck_after;
            }
            self.process_due(&mut client).await?;
            let retry = self
                .next_due(&client)
                .await?
                .map(|d| tokio::time::Instant::now() + d);
            let wake_at = retry.map_or(next_sweep, |r| r.min(next_sweep));
            // Priority: shutdown, then a NOTIFY, then the timer.
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(()),
                w = wake.recv() => if w.is_none() {
                    return Err(Error::Connect("the LISTEN session was lost".into()));
                },
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }
}
