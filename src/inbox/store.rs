//! The store task: owns the Postgres connection of the receiver. It takes the
//! mapped deliveries off its channel, records as many as are waiting (up to
//! `batch_size`) in one transaction with `ON CONFLICT (message_id, source) DO
//! NOTHING`, sends `NOTIFY` with the new ids in that transaction, and after the
//! commit reports the batch's delivery tags back to the broker task, which acks
//! them. A lost connection keeps the batch and retries it on a new one (with
//! backoff): a commit whose answer was lost only turns the batch into duplicates.
//!
//! A batch the table refuses for one row's sake is recorded row by row; a row
//! the table refuses is judged with the rows around it ([`super::table_fault`]):
//! set aside (dead-lettered) once the table accepts another row, held — and
//! receiving paused, `/readyz` 503 — while it accepts none, so a fault of the
//! table is never charged to the messages.

use super::mapping::{Invalid, Record};
use super::queries;
use super::table_fault::{Judge, Refusal, Verdict};
use super::{Committed, Pending};
use crate::config::InboxConfig;
use crate::error::{Error, SqlTrouble};
use crate::metrics::{metrics, Health, Pause, Problem};
use crate::pg::trouble::{decide, Decision, Narrowing};
use crate::pg::PgTarget;
use crate::time::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

/// Settings of the store task.
pub struct StoreSettings {
    pub target: PgTarget,
    pub inbox: InboxConfig,
    pub backoff_max: Duration,
    pub session_options: String,
}

/// The first wait before held rows are tried again; it doubles up to `backoff_max`.
const PAUSE_FIRST: Duration = Duration::from_millis(100);

/// Per delivery of a batch: `Ok(true)` new row, `Ok(false)` duplicate, `Err` refused.
type Outcome = Vec<Result<bool, Refusal>>;

/// The connection and what the task knows while it runs.
struct Store {
    settings: StoreSettings,
    insert: String,
    client: Option<(Client, tokio_postgres::Statement)>,
    /// The wait after consecutive failures of the connection or a statement.
    backoff: Backoff,
    health: Arc<Health>,
    judge: Judge<Pending>,
    /// The wait before the next try of the held rows.
    pause: Backoff,
    /// The kind of verdict last reported (logged when it changes).
    reported: Option<std::mem::Discriminant<Verdict>>,
}

/// Runs until `input` closes (the broker task is done) or `shutdown` turns true
/// while waiting for Postgres.
pub async fn run(
    settings: StoreSettings,
    mut input: mpsc::Receiver<Pending>,
    output: mpsc::Sender<Committed>,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) {
    let backoff_max = settings.backoff_max;
    let mut store = Store {
        insert: queries::insert_sql(&settings.inbox.table),
        settings,
        client: None,
        backoff: Backoff::new(Duration::from_millis(100), backoff_max),
        health,
        judge: Judge::default(),
        pause: Backoff::new(PAUSE_FIRST, backoff_max),
        reported: None,
    };
    loop {
        let answer = if store.judge.holding() {
            // Paused. Priority: shutdown (the held deliveries stay unacked: the
            // broker redelivers them), then the end of the wait.
            let wait = store.pause.fail();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            store.retry_held(&mut input, &mut shutdown).await
        } else {
            let Some(first) = input.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < store.settings.inbox.batch_size {
                match input.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            store.record_batch(batch, &mut shutdown).await
        };
        let Some(committed) = answer else {
            return; // shutdown while Postgres was away
        };
        store.report();
        if !(committed.settled.is_empty() && committed.refused.is_empty())
            && output.send(committed).await.is_err()
        {
            return;
        }
    }
}

impl Store {
    /// Records `batch` and judges what the table refused. `None`: shutdown came
    /// while Postgres was away.
    async fn record_batch(
        &mut self,
        batch: Vec<Pending>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Committed> {
        let outcome = self.record(&batch, shutdown).await?;
        Some(self.judged(batch.into_iter().zip(outcome).collect()))
    }

    /// The held rows, the oldest alone first: when the table takes it, the rest
    /// go too (a fault that was fixed); when it still refuses it, one more
    /// delivery (if one is waiting) tells whether the table refuses every row.
    async fn retry_held(
        &mut self,
        input: &mut mpsc::Receiver<Pending>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Committed> {
        let mut held = self.judge.take_held().into_iter();
        let Some((first, _)) = held.next() else {
            return Some(empty());
        };
        let outcome = self.record(std::slice::from_ref(&first), shutdown).await?;
        let mut rows: Vec<(Pending, Result<bool, Refusal>)> = vec![(first, outcome_of(outcome))];
        if rows[0].1.is_ok() {
            tracing::info!("inbox table takes rows again: recording the held deliveries");
            let rest: Vec<Pending> = held.map(|(p, _)| p).collect();
            let outcome = self.record(&rest, shutdown).await?;
            rows.extend(rest.into_iter().zip(outcome));
            return Some(self.judged(rows));
        }
        let (first, refusal) = rows.pop().expect("one row");
        let mut back = vec![(first, refusal.expect_err("refused"))];
        back.extend(held);
        self.judge.put_back(back);
        // Try the next delivery alone: accepted, the held rows were the messages'
        // own fault; refused, it is held too.
        let Ok(probe) = input.try_recv() else {
            return Some(empty());
        };
        let epoch = probe.epoch;
        self.judge.forget(|p| p.epoch < epoch);
        let outcome = self.record(std::slice::from_ref(&probe), shutdown).await?;
        Some(self.judged(vec![(probe, outcome_of(outcome))]))
    }

    /// Hands the batch's results to the judge; the answer for the broker task.
    fn judged(&mut self, rows: Vec<(Pending, Result<bool, Refusal>)>) -> Committed {
        let m = metrics();
        let mut committed = empty();
        let mut refused = Vec::new();
        for (p, result) in rows {
            match result {
                Ok(new) => {
                    if new {
                        m.inbox_received.inc();
                    } else {
                        m.inbox_duplicates.inc();
                    }
                    m.inbox_receive_latency
                        .observe(p.arrived.elapsed().as_secs_f64());
                    committed.settled.push((p.epoch, p.tag));
                }
                Err(refusal) => refused.push((p, refusal)),
            }
        }
        let accepted = committed.settled.len();
        for (p, refusal) in self.judge.outcome(accepted, refused) {
            tracing::warn!(message_id = %p.record.message_id, refusal = %refusal, "inbox table refused a row that others went in beside: setting it aside");
            committed.refused.push((
                p.epoch,
                p.tag,
                Invalid::RefusedByTable(refusal.to_string()),
                p.delivery,
            ));
        }
        if accepted > 0 {
            self.pause.reset();
        }
        committed
    }

    /// Reports the judge's verdict in `/readyz`, the log (when it changes) and the
    /// metric. A clear verdict also clears what the start-up check reported: a
    /// row went in.
    fn report(&mut self) {
        let verdict = self.judge.verdict();
        let kind = std::mem::discriminant(&verdict);
        let changed = self.reported != Some(kind);
        self.reported = Some(kind);
        let table = self.settings.inbox.table.to_string();
        match verdict.reason(&table) {
            Some(why) => {
                if changed {
                    tracing::warn!("{why}");
                }
                self.health.set_problem(Problem::InboxTable, Some(why));
            }
            None => {
                if changed && self.health.has_problem(Problem::InboxTable) {
                    tracing::info!("inbox table {table} takes rows: receiving again");
                }
                self.health.set_problem(Problem::InboxTable, None);
            }
        }
        metrics().set_paused(Pause::InboxTable, self.judge.holding());
    }

    /// Records `batch` until Postgres answers, the one way every SQL task
    /// survives a sick session (`pg::trouble`): the whole batch in one
    /// transaction; when the table refuses it for a row's sake, halves of it
    /// until the rows refused alone are found (their refusals go to the judge).
    /// Connection trouble keeps the batch and retries it with backoff. `None`:
    /// shutdown came first.
    async fn record(
        &mut self,
        batch: &[Pending],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let mut outcome: Vec<Option<Result<bool, Refusal>>> = vec![None; batch.len()];
        let mut narrowing = Narrowing::new((0..batch.len()).collect::<Vec<usize>>());
        let mut attempt = 0;
        while let Some(part) = narrowing.next_part() {
            let rows: Vec<&Pending> = part.iter().map(|i| &batch[*i]).collect();
            let result = match self.connected().await {
                Ok(()) => self.transaction(&rows).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(recorded) => {
                    if self.backoff.failures() > 0 {
                        self.health.set_problem(Problem::Store, None);
                    }
                    self.backoff.reset();
                    for (i, r) in part.iter().zip(recorded) {
                        outcome[*i] = Some(Ok(r));
                    }
                    continue;
                }
                Err(e) => e,
            };
            attempt += 1;
            // The inbox table has no shape to learn: a statement it refuses for a
            // changed column is judged like any refusal.
            if decide(e.sql_trouble(), true, attempt) == Decision::Narrow {
                if let Some(i) = narrowing.refused(part) {
                    outcome[i] = Some(Err(refusal(&e)));
                }
                continue;
            }
            narrowing.again(part);
            let lost = self.client.as_ref().is_none_or(|(c, _)| c.is_closed())
                || matches!(e.sql_trouble(), None | Some(SqlTrouble::Connection));
            if lost {
                self.client = None;
                self.health.set_streaming(false);
            }
            self.health
                .set_problem(Problem::Store, Some(format!("inbox store: {e}")));
            let wait = self.backoff.fail();
            tracing::warn!(error = %e, retry_in = ?wait, "inbox store: recording a batch failed; retrying it");
            // Priority: shutdown first (give up the batch: it is not acked, the
            // broker redelivers it), then the end of the backoff.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Some(
            outcome
                .into_iter()
                .map(|o| o.expect("every delivery recorded or refused"))
                .collect(),
        )
    }

    /// A connection with the insert prepared.
    async fn connected(&mut self) -> Result<(), Error> {
        if self.client.is_some() {
            return Ok(());
        }
        let client = self
            .settings
            .target
            .connect_with("outbox-relay inbox", &self.settings.session_options)
            .await?;
        let statement = client
            .prepare(&self.insert)
            .await
            .map_err(crate::pg::query_err("preparing the inbox insert"))?;
        if self.backoff.failures() > 0 {
            metrics().reconnect("postgres");
            tracing::info!("inbox store connected to Postgres again");
        }
        self.health.set_streaming(true);
        self.client = Some((client, statement));
        Ok(())
    }

    /// Records these deliveries in one transaction, with its NOTIFY: per
    /// delivery, whether it made a new row (else a duplicate).
    async fn transaction(&mut self, batch: &[&Pending]) -> Result<Vec<bool>, Error> {
        let Some((client, statement)) = self.client.as_mut() else {
            return Err(Error::InboxBroker("no Postgres connection".into()));
        };
        let err = crate::pg::query_err("recording inbox deliveries");
        let tx = client.transaction().await.map_err(&err)?;
        let records: Vec<&Record> = batch.iter().map(|p| &p.record).collect();
        let new = queries::insert(
            &tx,
            statement,
            &self.settings.inbox.source,
            self.settings.inbox.max_retries,
            &records,
        )
        .await
        .map_err(&err)?;
        notify(&tx, &self.settings, &new).await?;
        tx.commit().await.map_err(&err)?;
        // Which deliveries made the new rows: the first of each message_id in the batch.
        let mut fresh: std::collections::HashSet<&str> =
            new.iter().map(|(_, m)| m.as_str()).collect();
        Ok(batch
            .iter()
            .map(|p| fresh.remove(p.record.message_id.as_str()))
            .collect())
    }
}

/// A row's refusal, from the error of the statement that recorded it alone.
fn refusal(e: &Error) -> Refusal {
    let of = match e {
        Error::Postgres { source, .. } => Refusal::of(source),
        _ => None,
    };
    of.unwrap_or_else(|| Refusal {
        code: String::new(),
        column: None,
        constraint: None,
        message: e.to_string(),
    })
}

/// The result of a one-row outcome.
fn outcome_of(mut outcome: Outcome) -> Result<bool, Refusal> {
    outcome.pop().unwrap_or(Ok(false))
}

fn empty() -> Committed {
    Committed {
        settled: Vec::new(),
        refused: Vec::new(),
    }
}

async fn notify(
    tx: &tokio_postgres::Transaction<'_>,
    settings: &StoreSettings,
    new: &[(String, String)],
) -> Result<(), Error> {
    let Some(channel) = &settings.inbox.notify_channel else {
        return Ok(());
    };
    let ids: Vec<String> = new.iter().map(|(id, _)| id.clone()).collect();
    for payload in queries::notify_payloads(&ids) {
        tx.execute("select pg_notify($1, $2)", &[channel, &payload])
            .await
            .map_err(crate::pg::query_err("notifying the inbox channel"))?;
    }
    Ok(())
}
