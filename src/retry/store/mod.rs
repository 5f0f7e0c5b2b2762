//! The retry store task: the only writer of the retry table.
//!
//! Everything it does is batched where the relay's throughput depends on it:
//! parks waiting in the channel go into one statement, delivered retries are
//! deleted together, a load reads a page of an aggregate's queue and re-reads
//! those outbox rows in one statement. A statement that fails for the
//! connection's sake (or a lock or statement timeout) is retried with backoff —
//! the slot waits, and `/readyz` says why; a batch of parks that fails for one
//! row's sake is narrowed down to that row, which is parked without the parts
//! that cannot be stored; the others go through.

use super::queries::RetryTable;

use super::{
    requeue_channel, store_application_name, Head, Load, Park, ParkItem, StoreCommand, StoreEvent,
    StoreSettings,
};
use crate::config::OnSuccess;
use crate::error::{Error, SqlTrouble};
use crate::metrics::{metrics, Health, Problem};
use crate::outbox_table::housekeeping::Chore;
use crate::outbox_table::{MirrorUpdate, OutboxTable};
use crate::pg::trouble::{decide, Decision, Narrowing, GIVE_UP_AFTER};
use crate::pg::{query_err, quote_ident, PgTarget};
use crate::time::now_micros;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};

mod loads;

/// Most parked messages written in one statement.
const PARK_BATCH: usize = 2000;
/// Most outcome commands handled in one turn (their deletes go together).
const COMMAND_BATCH: usize = 2000;
/// Most loads answered by one statement.
const LOAD_BATCH: usize = 64;
/// Heads read per page on a reload.
const HEADS_PAGE: i64 = 1000;
/// Requeue notifications cause at most one reload per this interval.
pub const REQUEUE_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a delivered retry's transaction waits for a lock on an outbox row
/// (or table) before its `on_success` goes to the housekeeping task instead.
const TOGETHER_LOCK_WAIT: Duration = Duration::from_millis(50);
/// After that, how long delivered retries are marked by the housekeeping task.
const APART_FOR: Duration = Duration::from_secs(300);
/// Failures of one statement before `/readyz` reports the store as failing.
const REPORT_AFTER: u32 = 3;

/// The store: its connection, what it knows of the tables, where its chores go.
pub struct Store {
    settings: StoreSettings,
    retry: RetryTable,
    outbox: OutboxTable,
    client: Client,
    notifications: mpsc::Receiver<String>,
    health: Arc<Health>,
    chores: mpsc::Sender<Chore>,
    /// Chores the housekeeping task had no room for yet.
    held: VecDeque<Chore>,
    /// Counts the times this store found Postgres shutting down (see
    /// [`Store::open`]).
    stopping: watch::Sender<u64>,
    /// Until then, delivered retries are not marked in the store's own
    /// transaction (see [`Store::delivered`]).
    apart_until: Option<Instant>,
}

async fn connect(
    target: &PgTarget,
    slot: &str,
    options: &str,
) -> Result<(Client, mpsc::Receiver<String>), Error> {
    let (client, mut connection) = target
        .connect_raw(&store_application_name(slot), options)
        .await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.try_send(n.channel().to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "retry store connection ended");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("listen {}", quote_ident(&requeue_channel(slot))))
        .await
        .map_err(query_err("listening for requeue notifications"))?;
    Ok((client, rx))
}

/// What to do after a statement failed.
/// A retried message that failed again, waiting to be recorded.
struct FailedRetry {
    parked_seq: i64,
    id: String,
    attempts: i32,
    reason: String,
    delay: Duration,
}

enum Next {
    /// Try the same statement again (after a backoff, or at once after the
    /// outbox table's shape was read again).
    Again,
    /// It keeps failing for a reason other than the connection: give it up.
    GiveUp,
}

impl Store {
    /// Connects, creates the retry table if missing, learns the outbox table's
    /// shape and LISTENs for requeues. The heads are read when the relay asks
    /// (`StoreCommand::Reload`), once it holds the slot.
    ///
    /// `stopping` counts up each time a statement or a reconnect finds Postgres
    /// shutting down (or this session ended by it): a fast shutdown waits for
    /// the walsender, which waits for the relay to confirm what it was sent,
    /// which may wait for this store to park a message, which waits for
    /// Postgres. The relay lets the stream go when it counts up.
    pub async fn open(
        settings: StoreSettings,
        health: Arc<Health>,
        chores: mpsc::Sender<Chore>,
        stopping: watch::Sender<u64>,
    ) -> Result<Store, Error> {
        let (client, notifications) =
            connect(&settings.target, &settings.slot, &settings.session_options).await?;
        let retry = RetryTable::new(
            settings.retry_table.clone(),
            settings.slot.clone(),
            settings.on_dead,
        );
        retry.create_if_missing(&client).await?;
        let outbox = if settings.tableless {
            OutboxTable::absent(settings.table.clone(), &settings.mapping)
        } else {
            OutboxTable::learn(&client, settings.table.clone(), &settings.mapping).await?
        };
        metrics()
            .retries_pending
            .set(retry.count_parked(&client).await?);
        Ok(Store {
            settings,
            retry,
            outbox,
            client,
            notifications,
            health,
            chores,
            held: VecDeque::new(),
            stopping,
            apart_until: None,
        })
    }

    /// The outbox table as the store learned it (for the housekeeping task).
    pub fn outbox(&self) -> &OutboxTable {
        &self.outbox
    }

    /// The retry rows of this slot (for the housekeeping task).
    pub fn retry_table(&self) -> &RetryTable {
        &self.retry
    }

    /// Serves the channels until the commands channel closes.
    pub async fn run(
        mut self,
        mut parks: mpsc::Receiver<Park>,
        mut commands: mpsc::Receiver<StoreCommand>,
        mut loads: mpsc::Receiver<Load>,
        events: mpsc::Sender<StoreEvent>,
    ) {
        let mut parks_open = true;
        // Any role that may connect can NOTIFY any channel: a burst of requeue
        // notifications (a flood from anyone) makes one reload, at most one per
        // REQUEUE_RELOAD_INTERVAL, and a reload is read in pages anyway.
        let mut reload_due: Option<tokio::time::Instant> = None;
        let mut last_reload: Option<tokio::time::Instant> = None;
        loop {
            // Priority, highest first: parks (they hold the relay's window and LSN),
            // outcomes and reloads, loads (a retry storm slows retries down but never
            // starves the stream), requeue notifications, then handing held chores on.
            let sent = tokio::select! {
                biased;
                park = parks.recv(), if parks_open => match park {
                    Some(Park(mut items)) => {
                        while items.len() < PARK_BATCH {
                            match parks.try_recv() {
                                Ok(Park(more)) => items.extend(more),
                                Err(_) => break,
                            }
                        }
                        let (tokens, heads) = self.park(items).await;
                        events.send(StoreEvent::Parked { tokens, heads }).await.is_ok()
                    }
                    None => {
                        parks_open = false;
                        true
                    }
                },
                cmd = commands.recv() => match cmd {
                    Some(first) => {
                        let mut batch = vec![first];
                        while batch.len() < COMMAND_BATCH {
                            match commands.try_recv() {
                                Ok(more) => batch.push(more),
                                Err(_) => break,
                            }
                        }
                        self.commands(batch, &events).await
                    }
                    None => break,
                },
                Some(first) = loads.recv() => {
                    // Every load waiting now, in one statement.
                    let mut batch = vec![first];
                    while batch.len() < LOAD_BATCH {
                        match loads.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    let pages = self.load(&batch).await;
                    let mut sent = true;
                    for (load, (rows, end)) in batch.iter().zip(pages) {
                        sent &= events.send(StoreEvent::Loaded { key: load.key, rows, end }).await.is_ok();
                    }
                    sent
                }
                Some(_) = self.notifications.recv() => {
                    while self.notifications.try_recv().is_ok() {}
                    let now = tokio::time::Instant::now();
                    let due = last_reload.map_or(now, |t| (t + REQUEUE_RELOAD_INTERVAL).max(now));
                    reload_due.get_or_insert(due);
                    true
                }
                _ = tokio::time::sleep_until(reload_due.unwrap_or_else(tokio::time::Instant::now)), if reload_due.is_some() => {
                    reload_due = None;
                    last_reload = Some(tokio::time::Instant::now());
                    tracing::info!("requeue notification: reading the retry queue again");
                    self.reload(&events).await
                }
                _ = tokio::time::sleep(Duration::from_millis(100)), if !self.held.is_empty() => true,
            };
            if !sent {
                return;
            }
            self.pass_chores();
        }
        // Whatever is held goes to housekeeping before the channel closes.
        while let Some(chore) = self.held.pop_front() {
            if self.chores.send(chore).await.is_err() {
                break;
            }
        }
    }

    /// Hands held chores to the housekeeping task as far as it has room.
    fn pass_chores(&mut self) {
        while let Some(chore) = self.held.pop_front() {
            match self.chores.try_send(chore) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(chore)) => {
                    self.held.push_front(chore);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.held.clear();
                    return;
                }
            }
        }
    }

    fn chore(&mut self, chore: Chore) {
        self.held.push_back(chore);
    }

    /// Decides about a failed statement (the `attempt`-th failure of `what`) the
    /// one way every SQL task does (`pg::trouble`): the connection's trouble
    /// waits and tries again (the slot waits, and `/readyz` says so after a few
    /// failures), a changed table is learned again, a row's trouble gives up (the
    /// caller narrows the batch down to it).
    async fn trouble(&mut self, what: &str, e: &Error, attempt: u32) -> Next {
        if attempt >= REPORT_AFTER {
            self.health.set_problem(
                Problem::Store,
                Some(format!("the retry store keeps failing while {what}: {e}")),
            );
        }
        self.note_stopping(e);
        match decide(e.sql_trouble(), attempt > 1, attempt) {
            Decision::Relearn => {
                // Someone altered a table: read the outbox table's columns again, retry.
                let _ = self.outbox.relearn(&self.client).await;
                Next::Again
            }
            Decision::RetryLater => {
                let wait = crate::time::backoff(
                    Duration::from_millis(100),
                    self.settings.reconnect_backoff_max,
                    attempt,
                );
                tracing::warn!(error = %e, retry_in = ?wait, "retry store: {what} failed; trying again (the slot waits)");
                tokio::time::sleep(wait).await;
                self.reconnect().await;
                Next::Again
            }
            Decision::Narrow => Next::GiveUp,
        }
    }

    fn healthy(&self) {
        if self.health.has_problem(Problem::Store) {
            self.health.set_problem(Problem::Store, None);
        }
    }

    async fn reconnect(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match connect(
            &self.settings.target,
            &self.settings.slot,
            &self.settings.session_options,
        )
        .await
        {
            Ok((client, notifications)) => {
                self.client = client;
                self.notifications = notifications;
                tracing::info!("retry store reconnected");
            }
            Err(e) => {
                self.note_stopping(&e);
                tracing::warn!(error = %e, "retry store cannot reconnect yet")
            }
        }
    }

    /// Tells the relay when `e` says Postgres is shutting down.
    fn note_stopping(&self, e: &Error) {
        if e.server_stopping() {
            self.stopping.send_modify(|n| *n += 1);
        }
    }

    /// Parks the items (in one statement when it can); returns their tokens and
    /// the aggregates that got a new head. Never gives up: a row that cannot be
    /// stored as read is stored without its payload, with the reason; a retry
    /// table that refuses everything holds the relay (loudly) until it is fixed.
    async fn park(&mut self, items: Vec<ParkItem>) -> (Vec<u64>, Vec<Head>) {
        let mut out = (Vec::new(), Vec::new());
        let mut narrowing = Narrowing::new(items);
        while let Some(part) = narrowing.next_part() {
            let mut attempt = 0;
            loop {
                match self.retry.insert_many(&self.client, &part).await {
                    Ok(rows) => {
                        self.parked(&part, &rows, &mut out);
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        if let Next::Again = self.trouble("parking messages", &e, attempt).await {
                            continue;
                        }
                        if let Some(item) = narrowing.refused(part) {
                            let degraded = degrade(&item, &e);
                            tracing::warn!(id = %item.id, error = %e, "a message cannot be parked as read; parking it without its payload (the outbox row is read again before each retry)");
                            // A retry table that refuses even that is broken: back off.
                            if item.payload.is_none() && item.metadata.is_none() {
                                tokio::time::sleep(self.settings.reconnect_backoff_max).await;
                            }
                            narrowing.again(vec![degraded]);
                        }
                        break;
                    }
                }
            }
        }
        self.healthy();
        out
    }

    fn parked(
        &mut self,
        batch: &[ParkItem],
        rows: &[super::queries::Inserted],
        out: &mut (Vec<u64>, Vec<Head>),
    ) {
        for (item, row) in batch.iter().zip(rows) {
            out.0.push(item.token);
            if row.head {
                out.1.push(Head {
                    key: item.key,
                    aggregate_type: item.aggregate_type.clone(),
                    aggregate_id: item.aggregate_id.clone(),
                    due: row.due,
                    blocked: false,
                });
            }
            if let Some(reason) = &item.failure {
                let delay = item
                    .not_before
                    .map(|nb| Duration::from_micros((nb - now_micros()).max(0) as u64));
                self.chore(Chore::Mirror(MirrorUpdate {
                    id: item.id.clone(),
                    status: "failed",
                    reason: reason.clone(),
                    delay,
                }));
            }
        }
        metrics().retries_pending.add(batch.len() as i64);
    }

    /// Outcome commands in order; consecutive deliveries are deleted together, and
    /// consecutive failures recorded together.
    async fn commands(
        &mut self,
        batch: Vec<StoreCommand>,
        events: &mpsc::Sender<StoreEvent>,
    ) -> bool {
        let mut delivered: Vec<(i64, String)> = Vec::new();
        let mut failed: Vec<FailedRetry> = Vec::new();
        for cmd in batch {
            if !matches!(cmd, StoreCommand::Delivered { .. }) {
                self.delivered(std::mem::take(&mut delivered)).await;
            }
            if !matches!(cmd, StoreCommand::Failed { .. }) {
                self.failed(std::mem::take(&mut failed)).await;
            }
            match cmd {
                StoreCommand::Delivered { parked_seq, id } => delivered.push((parked_seq, id)),
                StoreCommand::Failed {
                    parked_seq,
                    id,
                    attempts,
                    reason,
                    delay,
                } => failed.push(FailedRetry {
                    parked_seq,
                    id,
                    attempts,
                    reason,
                    delay,
                }),
                StoreCommand::Dead {
                    parked_seq,
                    id,
                    attempts,
                    reason,
                } => {
                    let mut attempt = 0;
                    loop {
                        match self
                            .retry
                            .mark_dead(&self.client, parked_seq, attempts, &reason)
                            .await
                        {
                            Ok(marked) => {
                                if marked {
                                    metrics().retries_pending.dec();
                                    metrics().dead_letters.inc();
                                }
                                break;
                            }
                            Err(e) => {
                                attempt += 1;
                                if let Next::GiveUp =
                                    self.trouble("marking a message dead", &e, attempt).await
                                {
                                    tracing::error!(%id, error = %e, "cannot mark a message dead; it is retried again");
                                    break;
                                }
                            }
                        }
                    }
                    self.chore(Chore::Mirror(MirrorUpdate {
                        id,
                        status: "permanently_failed",
                        reason,
                        delay: None,
                    }));
                }
                StoreCommand::Reload => {
                    if !self.reload(events).await {
                        return false;
                    }
                }
                StoreCommand::BrokerNode(node) => {
                    // For `status` only: one attempt, the node is in the log anyway.
                    let records =
                        crate::pg::slots::SlotRecords::next_to(&self.settings.retry_table);
                    if let Err(e) = records
                        .broker_node(&self.client, &self.settings.slot, &node)
                        .await
                    {
                        tracing::warn!(error = %e, %node, "cannot record the broker node in the slot record (status will not show it)");
                    }
                }
            }
        }
        self.delivered(delivered).await;
        self.failed(failed).await;
        self.healthy();
        true
    }

    /// Removes delivered rows from the retry table and applies `on_success` to
    /// their outbox rows in one transaction, so a relay killed in between
    /// leaves both as they were (the message is delivered again, a duplicate)
    /// rather than the retry row gone and the outbox row `pending` for good.
    /// The store must not wait on the outbox table (parks wait behind it):
    /// the transaction waits at most [`TOGETHER_LOCK_WAIT`] for a lock, and
    /// when it fails not for the connection's sake (a lock held by another
    /// session, a trigger that refuses a row or runs past the statement
    /// timeout, a changed table) the rows are removed alone and their
    /// `on_success` goes to the housekeeping task, which waits for locks and
    /// narrows a batch down to the row that refuses — and so for the next
    /// [`APART_FOR`], so a table that keeps refusing costs one attempt.
    async fn delivered(&mut self, delivered: Vec<(i64, String)>) {
        if delivered.is_empty() {
            return;
        }
        let seqs: Vec<i64> = delivered.iter().map(|(s, _)| *s).collect();
        let ids: Vec<String> = delivered.into_iter().map(|(_, id)| id).collect();
        let mut together = self.apart_until.is_none_or(|t| Instant::now() >= t);
        let mut attempt = 0;
        loop {
            let removed = if together {
                self.remove_and_mark(&seqs, &ids).await
            } else {
                self.retry.delete_many(&self.client, &seqs).await
            };
            match removed {
                Ok(n) => {
                    metrics().retries_pending.sub(n as i64);
                    break;
                }
                Err(e)
                    if together
                        && !matches!(e.sql_trouble(), None | Some(SqlTrouble::Connection)) =>
                {
                    if e.sql_trouble() == Some(SqlTrouble::SchemaDrift) {
                        let _ = self.outbox.relearn(&self.client).await;
                    }
                    tracing::warn!(count = seqs.len(), error = %e, apart_for = ?APART_FOR, "delivered retries: their outbox rows could not be marked in the transaction that removes them from the retry table; they are removed first and marked by the housekeeping task (a relay killed in between leaves them pending)");
                    self.apart_until = Some(Instant::now() + APART_FOR);
                    together = false;
                }
                Err(e) => {
                    attempt += 1;
                    if let Next::GiveUp = self
                        .trouble("removing delivered messages", &e, attempt)
                        .await
                    {
                        tracing::error!(count = seqs.len(), error = %e, "cannot remove delivered messages from the retry table; they will be delivered again");
                        break;
                    }
                }
            }
        }
        if !together {
            self.chore(Chore::Succeeded { ids, seq: None });
        }
    }

    /// One transaction: the retry rows out, `on_success` on the outbox rows.
    async fn remove_and_mark(&mut self, seqs: &[i64], ids: &[String]) -> Result<u64, Error> {
        if self.settings.on_success == OnSuccess::Keep || self.settings.tableless {
            return self.retry.delete_many(&self.client, seqs).await;
        }
        const CONTEXT: &str = "removing delivered messages from the retry table";
        let tx = self
            .client
            .transaction()
            .await
            .map_err(query_err(CONTEXT))?;
        let n = self.retry.delete_many(&tx, seqs).await?;
        // Only the outbox rows' locks are waited for briefly (the retry
        // table's are the store's own business, under the session's timeout).
        tx.batch_execute(&format!(
            "set local lock_timeout = {}",
            TOGETHER_LOCK_WAIT.as_millis()
        ))
        .await
        .map_err(query_err(CONTEXT))?;
        self.outbox
            .on_success_now(&tx, self.settings.on_success, ids)
            .await?;
        tx.commit().await.map_err(query_err(CONTEXT))?;
        Ok(n)
    }

    /// Records failed retries in one statement; a batch that fails for a row's
    /// sake is narrowed down to it (which is then retried sooner than its
    /// backoff says).
    async fn failed(&mut self, failed: Vec<FailedRetry>) {
        if failed.is_empty() {
            return;
        }
        for f in &failed {
            self.chore(Chore::Mirror(MirrorUpdate {
                id: f.id.clone(),
                status: "failed",
                reason: f.reason.clone(),
                delay: Some(f.delay),
            }));
        }
        let mut narrowing = Narrowing::new(failed);
        while let Some(part) = narrowing.next_part() {
            let items: Vec<(i64, i32, &str, Duration)> = part
                .iter()
                .map(|f| (f.parked_seq, f.attempts, f.reason.as_str(), f.delay))
                .collect();
            let mut attempt = 0;
            let refused = loop {
                match self.retry.record_failures(&self.client, &items).await {
                    Ok(_) => break None,
                    Err(e) => {
                        attempt += 1;
                        if let Next::GiveUp =
                            self.trouble("recording failed retries", &e, attempt).await
                        {
                            break Some(e);
                        }
                    }
                }
            };
            drop(items);
            if let Some(e) = refused {
                if let Some(f) = narrowing.refused(part) {
                    tracing::error!(id = %f.id, error = %e, "cannot record a failed retry; it is retried sooner than its backoff says");
                }
            }
        }
    }
}

/// The item without what could not be stored: the reason instead.
fn degrade(item: &ParkItem, e: &Error) -> ParkItem {
    let why = format!("parked without its payload: it could not be stored ({e})");
    ParkItem {
        payload: None,
        metadata: None,
        created_at: None,
        event_type: item.event_type.clone().filter(|t| !t.contains('\0')),
        failure: Some(match &item.failure {
            Some(f) => format!("{f}; {why}"),
            None => why,
        }),
        ..item.clone()
    }
}
