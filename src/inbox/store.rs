//! The store task: owns the Postgres connection of the receiver. It takes the
//! mapped deliveries off its channel, records as many as are waiting (up to
//! `batch_size`) in one transaction with `ON CONFLICT (message_id, source) DO
//! NOTHING`, sends `NOTIFY` with the new ids in that transaction, and after the
//! commit reports the batch's delivery tags back to the broker task, which acks
//! them. A lost connection keeps the batch and retries it on a new one (with
//! backoff): a commit whose answer was lost only turns the batch into duplicates.

use super::mapping::{Invalid, Record};
use super::queries;
use crate::config::InboxConfig;
use crate::error::{Error, SqlTrouble};
use crate::metrics::{metrics, Health, Problem};
use crate::pg::PgTarget;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

/// A delivery mapped to its row, on its way to the store.
pub struct Pending {
    /// The broker connection it came on (tags are per channel).
    pub epoch: u64,
    pub tag: u64,
    pub record: Record,
    pub arrived: Instant,
    /// Kept to dead-letter it should the table refuse the row.
    pub delivery: super::broker::Raw,
}

/// What the store did with one batch, after its commit.
pub struct Committed {
    /// Recorded, new or duplicate: (epoch, tag) to be acked.
    pub settled: Vec<(u64, u64)>,
    /// Refused by the table: (epoch, tag, why, delivery) to be dead-lettered.
    pub refused: Vec<(u64, u64, Invalid, super::broker::Raw)>,
}

/// Settings of the store task.
pub struct StoreSettings {
    pub target: PgTarget,
    pub inbox: InboxConfig,
    pub backoff_max: Duration,
    pub session_options: String,
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
    let mut client: Option<(Client, tokio_postgres::Statement)> = None;
    let insert = queries::insert_sql(&settings.inbox.table);
    let mut failures = 0u32;
    while let Some(first) = input.recv().await {
        let mut batch = vec![first];
        while batch.len() < settings.inbox.batch_size {
            match input.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        loop {
            let result = match &mut client {
                Some((c, statement)) => record(c, statement, &settings, &batch).await,
                None => match connect(&settings, &insert).await {
                    Ok(c) => {
                        if failures > 0 {
                            metrics().reconnect("postgres");
                            tracing::info!("inbox store connected to Postgres again");
                        }
                        health.set_streaming(true);
                        client = Some(c);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(outcome) => {
                    failures = 0;
                    health.set_problem(Problem::Store, None);
                    let committed = finish(&batch, outcome);
                    if output.send(committed).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let trouble = e.sql_trouble();
                    if matches!(trouble, Some(SqlTrouble::Row)) {
                        // One of the rows is refused by the table itself: record them
                        // one by one, so only that one is set aside.
                        match record_each(client.as_mut(), &settings, &batch).await {
                            Ok(outcome) => {
                                let committed = finish(&batch, outcome);
                                if output.send(committed).await.is_err() {
                                    return;
                                }
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "inbox store: recording rows one by one failed")
                            }
                        }
                    }
                    let lost = client.as_ref().is_none_or(|(c, _)| c.is_closed())
                        || matches!(trouble, None | Some(SqlTrouble::Connection));
                    if lost {
                        client = None;
                        health.set_streaming(false);
                    }
                    health.set_problem(Problem::Store, Some(format!("inbox store: {e}")));
                    let wait = crate::time::backoff(
                        Duration::from_millis(100),
                        settings.backoff_max,
                        failures,
                    );
                    tracing::warn!(error = %e, retry_in = ?wait, "inbox store: recording a batch failed; retrying it");
                    // Priority: shutdown first (give up the batch: it is not acked, the
                    // broker redelivers it), then the end of the backoff.
                    tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// A new connection with the insert statement prepared.
async fn connect(
    settings: &StoreSettings,
    insert: &str,
) -> Result<(Client, tokio_postgres::Statement), Error> {
    let client = settings
        .target
        .connect_with("outbox-relay inbox", &settings.session_options)
        .await?;
    let statement = client
        .prepare(insert)
        .await
        .map_err(crate::pg::query_err("preparing the inbox insert"))?;
    Ok((client, statement))
}

/// Per delivery of a batch: `Ok(true)` new row, `Ok(false)` duplicate, `Err` refused.
type Outcome = Vec<Result<bool, Invalid>>;

/// Records the whole batch in one transaction, with its NOTIFY.
async fn record(
    client: &mut Client,
    statement: &tokio_postgres::Statement,
    settings: &StoreSettings,
    batch: &[Pending],
) -> Result<Outcome, Error> {
    let err = crate::pg::query_err("recording inbox deliveries");
    let tx = client.transaction().await.map_err(&err)?;
    let records: Vec<&Record> = batch.iter().map(|p| &p.record).collect();
    let new = queries::insert(
        &tx,
        statement,
        &settings.inbox.source,
        settings.inbox.max_retries,
        &records,
    )
    .await
    .map_err(&err)?;
    notify(&tx, settings, &new).await?;
    tx.commit().await.map_err(&err)?;
    // Which deliveries made the new rows: the first of each message_id in the batch.
    let mut fresh: std::collections::HashSet<&str> = new.iter().map(|(_, m)| m.as_str()).collect();
    Ok(batch
        .iter()
        .map(|p| Ok(fresh.remove(p.record.message_id.as_str())))
        .collect())
}

/// Records each delivery in a transaction of its own; a row the table refuses is
/// set aside as invalid.
async fn record_each(
    client: Option<&mut (Client, tokio_postgres::Statement)>,
    settings: &StoreSettings,
    batch: &[Pending],
) -> Result<Outcome, Error> {
    let Some((client, statement)) = client else {
        return Err(Error::Shutdown("no connection".into()));
    };
    let mut out = Vec::with_capacity(batch.len());
    for p in batch {
        match record(client, statement, settings, std::slice::from_ref(p)).await {
            Ok(mut o) => out.push(o.pop().unwrap_or(Ok(false))),
            Err(e) if matches!(e.sql_trouble(), Some(SqlTrouble::Row)) => {
                out.push(Err(Invalid::RefusedByTable(e.to_string())))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
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

/// Counts the batch and turns it into the broker task's answer.
fn finish(batch: &[Pending], outcome: Outcome) -> Committed {
    let m = metrics();
    let mut committed = Committed {
        settled: Vec::with_capacity(batch.len()),
        refused: Vec::new(),
    };
    for (p, o) in batch.iter().zip(outcome) {
        match o {
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
            Err(invalid) => committed
                .refused
                .push((p.epoch, p.tag, invalid, p.delivery.clone())),
        }
    }
    committed
}
