//! Outbox-row housekeeping, a task of its own on its own SQL session, so the retry
//! store (and the parks the relay's window waits for) never queue behind it:
//! `on_success` and the Event-Forge status mirror (both batched), the retention
//! of published rows, and the purge of dead retry rows after
//! `retry.dead_retention`. A statement that fails because of one row is narrowed
//! down to that row, which is logged and counted; the others go through.

use super::{MirrorUpdate, OutboxTable};
use crate::config::OnSuccess;
use crate::error::Error;
use crate::metrics::metrics;
use crate::pg::trouble::{decide, Decision, Narrowing};
use crate::pg::PgTarget;
use crate::retry::queries::RetryTable;
use crate::time::{instant_of, sleep_until_opt};
use futures_util::future::BoxFuture;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::Client;

/// `application_name` of the housekeeping session.
pub fn housekeeping_application_name(slot: &str) -> String {
    crate::pg::connect::application_name("housekeeping", slot)
}

/// One batched statement on outbox rows.
type Statement<T> =
    for<'a> fn(&'a OutboxTable, &'a Client, OnSuccess, &'a [T]) -> BoxFuture<'a, Result<(), Error>>;

/// Work for the housekeeping task.
#[derive(Debug)]
pub enum Chore {
    /// These rows' messages were acked: apply `on_success`. `seq`: the
    /// relay's number for this hand-over (increasing); reported back (see
    /// [`Housekeeping::open`]) once its rows and every earlier chore's are
    /// all applied.
    Succeeded { ids: Vec<String>, seq: Option<u64> },
    /// Show this retry state in the row.
    Mirror(MirrorUpdate),
}

/// How many ids one statement takes; also when a batch is flushed early.
const BATCH: usize = 1000;
/// Ids held at most before the task stops taking more (the senders then keep
/// theirs, and the relay stops reading WAL past its own bound).
const HELD_MAX: usize = 10 * BATCH;
/// How long acked ids wait for company before their statement runs.
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// What the housekeeping task needs.
#[derive(Debug, Clone)]
pub struct HousekeepingSettings {
    pub target: PgTarget,
    pub application_name: String,
    pub session_options: String,
    pub on_success: OnSuccess,
    pub retention: Duration,
    pub dead_retention: Option<Duration>,
    pub reconnect_backoff_max: Duration,
}

/// The task's state.
pub struct Housekeeping {
    settings: HousekeepingSettings,
    outbox: OutboxTable,
    retry: RetryTable,
    client: Client,
    succeeded: Vec<String>,
    /// The newest `seq` among the chores taken whose ids are not all applied yet.
    seq: Option<u64>,
    /// The newest `seq` whose ids are all applied.
    marked: watch::Sender<u64>,
    mirrors: Vec<MirrorUpdate>,
    flush_at: Option<Instant>,
    retention_at: Option<Instant>,
    purge_at: Option<Instant>,
}

impl Housekeeping {
    /// `marked` is set to the `seq` of each [`Chore::Succeeded`] once its rows
    /// (and every earlier chore's) have their `on_success` applied: the relay
    /// confirms a position to the slot only after that, so a relay killed
    /// before it marked the rows it delivered reads them again on its next
    /// start (and publishes them again) instead of leaving them pending.
    pub async fn open(
        settings: HousekeepingSettings,
        outbox: OutboxTable,
        retry: RetryTable,
        marked: watch::Sender<u64>,
    ) -> Result<Self, Error> {
        let client = settings
            .target
            .connect_with(&settings.application_name, &settings.session_options)
            .await?;
        let mut h = Housekeeping {
            settings,
            outbox,
            retry,
            client,
            succeeded: Vec::new(),
            seq: None,
            marked,
            mirrors: Vec::new(),
            flush_at: None,
            retention_at: None,
            purge_at: None,
        };
        h.schedule_retention().await?;
        h.purge_at = h
            .settings
            .dead_retention
            .map(|r| Instant::now() + r.min(Duration::from_secs(60)));
        Ok(h)
    }

    /// Serves chores until the channel closes, then applies what is still held.
    pub async fn run(mut self, mut chores: mpsc::Receiver<Chore>) {
        loop {
            let room = self.succeeded.len() + self.mirrors.len() < HELD_MAX;
            // Priority: new chores (while there is room), the flush, the retention
            // sweep, the dead purge.
            tokio::select! {
                biased;
                chore = chores.recv(), if room => match chore {
                    Some(c) => self.take(c),
                    None => break,
                },
                _ = sleep_until_opt(self.flush_at) => self.flush().await,
                _ = sleep_until_opt(self.retention_at) => self.sweep_retention().await,
                _ = sleep_until_opt(self.purge_at) => self.purge_dead().await,
            }
            if self.succeeded.len() >= BATCH || self.mirrors.len() >= BATCH {
                self.flush().await;
            }
        }
        for _ in 0..3 {
            self.flush().await;
            if self.succeeded.is_empty() && self.mirrors.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::warn!(
            ids = self.succeeded.len() + self.mirrors.len(),
            "stopping with on_success / status updates not applied: those rows keep their status"
        );
    }

    fn take(&mut self, chore: Chore) {
        match chore {
            Chore::Succeeded { ids, seq } if self.settings.on_success != OnSuccess::Keep => {
                self.succeeded.extend(ids);
                self.seq = self.seq.max(seq);
            }
            Chore::Succeeded { seq, .. } => self.report_marked(seq),
            Chore::Mirror(m) if self.outbox.has_mirror() => self.mirrors.push(m),
            Chore::Mirror(_) => {}
        }
        if self.flush_at.is_none() && !(self.succeeded.is_empty() && self.mirrors.is_empty()) {
            self.flush_at = Some(Instant::now() + FLUSH_AFTER);
        }
    }

    /// Applies the held status updates, then on_success (a row's failure is shown
    /// before a later success overwrites it). What fails for the connection's sake
    /// is kept and tried again in a second.
    async fn flush(&mut self) {
        self.flush_at = None;
        let mirrors = std::mem::take(&mut self.mirrors);
        for chunk in mirrors.chunks(BATCH) {
            let kept = self.apply_mirrors(chunk).await;
            self.mirrors.extend(kept);
        }
        if !self.mirrors.is_empty() {
            // A success must not overtake a failure of the same row.
            self.flush_at = Some(Instant::now() + Duration::from_secs(1));
            return;
        }
        let ids = std::mem::take(&mut self.succeeded);
        for chunk in ids.chunks(BATCH) {
            let kept = self.apply_on_success(chunk).await;
            self.succeeded.extend(kept);
        }
        if self.succeeded.is_empty() {
            let seq = self.seq.take();
            self.report_marked(seq);
        } else {
            self.flush_at = Some(Instant::now() + Duration::from_secs(1));
        }
        let marked = self.settings.on_success == OnSuccess::MarkPublished;
        if marked && self.retention_at.is_none() && self.outbox.has_mirror() {
            self.retention_at = Some(Instant::now() + self.settings.retention);
        }
    }

    /// Every acked row up to `seq` has its `on_success` applied (or was
    /// refused it for its own reasons, logged and counted).
    fn report_marked(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.marked.send_if_modified(|m| {
                let newer = seq > *m;
                *m = (*m).max(seq);
                newer
            });
        }
    }

    /// Shows retry state in the rows; what fails for the connection's sake is
    /// handed back to be tried again.
    async fn apply_mirrors(&mut self, batch: &[MirrorUpdate]) -> Vec<MirrorUpdate> {
        self.apply(
            batch,
            "mirror",
            |m| m.id.as_str(),
            |outbox, client, _, part| Box::pin(outbox.mirror(client, part)),
        )
        .await
    }

    /// Applies `on_success`; what fails for the connection's sake is handed back.
    async fn apply_on_success(&mut self, batch: &[String]) -> Vec<String> {
        self.apply(
            batch,
            "on_success",
            |id| id.as_str(),
            |outbox, client, on_success, part| {
                Box::pin(outbox.on_success(client, on_success, part))
            },
        )
        .await
    }

    /// Runs `statement` on `batch` the one way every SQL task survives a sick
    /// session (`pg::trouble`): a row the statement refuses is narrowed down to,
    /// logged, counted under `job` and dropped (the others go through); a table
    /// that changed is learned again; the connection's trouble hands the rest
    /// back for a later try.
    async fn apply<T: Clone>(
        &mut self,
        batch: &[T],
        job: &'static str,
        id_of: fn(&T) -> &str,
        statement: Statement<T>,
    ) -> Vec<T> {
        let mut narrowing = Narrowing::new(batch.to_vec());
        let (mut relearned, mut attempt) = (false, 0);
        while let Some(part) = narrowing.next_part() {
            let on_success = self.settings.on_success;
            let Err(e) = statement(&self.outbox, &self.client, on_success, &part).await else {
                continue;
            };
            attempt += 1;
            match decide(e.sql_trouble(), relearned, attempt) {
                Decision::RetryLater => {
                    tracing::warn!(error = %e, "housekeeping statement failed; trying again in a second");
                    self.reconnect().await;
                    narrowing.again(part);
                    return narrowing.rest();
                }
                Decision::Relearn => {
                    let _ = self.outbox.relearn(&self.client).await;
                    relearned = true;
                    narrowing.again(part);
                }
                Decision::Narrow => {
                    if let Some(row) = narrowing.refused(part) {
                        metrics().housekeeping_failure(job);
                        tracing::warn!(id = %id_of(&row), job, error = %e, "this outbox row refused the update (its message was handled); it keeps its status");
                    }
                }
            }
        }
        Vec::new()
    }

    async fn reconnect(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match self
            .settings
            .target
            .connect_with(
                &self.settings.application_name,
                &self.settings.session_options,
            )
            .await
        {
            Ok(client) => self.client = client,
            Err(e) => tracing::warn!(error = %e, "housekeeping cannot reconnect yet"),
        }
    }

    async fn schedule_retention(&mut self) -> Result<(), Error> {
        self.retention_at = None;
        if self.settings.on_success != OnSuccess::MarkPublished {
            return Ok(());
        }
        if let Some(oldest) = self.outbox.oldest_published(&self.client).await? {
            self.retention_at = Some(instant_of(
                oldest + self.settings.retention.as_micros() as i64,
            ));
        }
        Ok(())
    }

    /// Deletes published rows older than the retention, 1 000 at a time.
    async fn sweep_retention(&mut self) {
        let retention = self.settings.retention;
        let swept = self
            .sweep("retention", retention, |h, older_than| {
                Box::pin(h.outbox.delete_published_before(&h.client, older_than))
            })
            .await;
        match swept {
            None => self.retention_at = Some(Instant::now() + Duration::from_secs(60)),
            Some(total) => {
                if total > 0 {
                    tracing::info!(deleted = total, "retention: deleted published rows");
                }
                if let Err(e) = self.schedule_retention().await {
                    tracing::warn!(error = %e, "cannot schedule the next retention sweep; trying in a minute");
                    self.retention_at = Some(Instant::now() + Duration::from_secs(60));
                }
            }
        }
    }

    /// Deletes dead retry rows older than `retry.dead_retention`, 1 000 at a time,
    /// then looks again in an hour.
    async fn purge_dead(&mut self) {
        let Some(older_than) = self.settings.dead_retention else {
            self.purge_at = None;
            return;
        };
        self.purge_at = Some(Instant::now() + older_than.min(Duration::from_secs(3600)));
        let swept = self
            .sweep("dead_purge", older_than, |h, older_than| {
                Box::pin(h.retry.purge_dead(&h.client, older_than))
            })
            .await;
        match swept {
            None => self.purge_at = Some(Instant::now() + Duration::from_secs(60)),
            Some(total) if total > 0 => tracing::info!(
                deleted = total,
                "dead rows past retry.dead_retention deleted"
            ),
            Some(_) => {}
        }
    }

    /// Runs a delete of at most 1 000 rows older than `older_than` until one
    /// deletes fewer; how many went in all, or `None` when a statement failed
    /// (counted under `job`; the caller tries again in a minute).
    async fn sweep(
        &mut self,
        job: &'static str,
        older_than: Duration,
        delete: for<'a> fn(&'a Housekeeping, Duration) -> BoxFuture<'a, Result<u64, Error>>,
    ) -> Option<u64> {
        let mut total = 0u64;
        loop {
            match delete(self, older_than).await {
                Ok(n) => {
                    total += n;
                    if n < 1000 {
                        return Some(total);
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    metrics().housekeeping_failure(job);
                    tracing::warn!(error = %e, job, "housekeeping sweep failed; trying again in a minute");
                    self.reconnect().await;
                    return None;
                }
            }
        }
    }
}
