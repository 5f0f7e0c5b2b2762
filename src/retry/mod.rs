//! Durable retry state. One long-lived task owns an SQL connection and is the
//! only writer of the relay-owned retry table (`sql/outbox_relay_parked.sql`):
//! failed, delayed and parked-behind messages in commit order, per aggregate.
//! Every statement on that table is in [`queries`]; what the store does to the
//! outbox rows themselves (the Event-Forge status mirror, `on_success`,
//! `retention`, re-reading a row before a retry) is in [`housekeeping`].
//!
//! The relay (main loop) decides; this task writes and answers over bounded
//! channels, one per priority: parks, then retry outcomes and on_success
//! batches, then loads. It runs no query unless told to, except the retention
//! sweep it schedules itself from what it marked published: an idle relay with
//! nothing failed queries nothing. `dead requeue` wakes it with NOTIFY.

pub mod housekeeping;
pub mod queries;

use crate::config::{ColumnMapping, OnDead, OnSuccess};
use crate::error::Error;
use crate::event::{AggregateKey, MalformedRow, OutboxEvent, Row};
use crate::pg::{connect::application_name, query_err, quote_ident, PgTarget, TableName};
use crate::time::{now_micros, sleep_until_opt};
use bytes::Bytes;
use futures_util::StreamExt;
use housekeeping::Housekeeping;
use queries::RetryTable;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

/// NOTIFY channel that `dead requeue` signals, per slot.
pub fn requeue_channel(slot: &str) -> String {
    format!("outbox_relay_requeue_{slot}")
}

/// `application_name` of the store's session, so operators can tell it apart.
pub fn store_application_name(slot: &str) -> String {
    application_name("retry-store", slot)
}

/// A message to park: its own failure, a delay, or waiting behind its aggregate.
#[derive(Debug, Clone)]
pub struct ParkItem {
    /// The window's sequence number, echoed back once the row is committed.
    pub token: u64,
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub id: String,
    pub event_type: Option<String>,
    pub payload: Option<Bytes>,
    pub metadata: Option<Bytes>,
    pub created_at: Option<String>,
    pub commit_time: i64,
    pub max_retries: i32,
    /// Why it failed (counts as an attempt); `None` when delayed or parked behind.
    pub failure: Option<String>,
    /// Not before this time (Unix microseconds): backoff after a failure, or `scheduled_at`.
    pub not_before: Option<i64>,
}

impl ParkItem {
    /// From a row: an event (failed, delayed or parked behind), or what could be read
    /// of a malformed one (its reason becomes the failure).
    pub fn from_row(token: u64, row: &Row, commit_time: i64, max_retries: i32) -> Self {
        match row {
            Row::Event(event) => ParkItem {
                token,
                key: event.key(),
                aggregate_type: event.aggregate_type.clone(),
                aggregate_id: event.aggregate_id.clone(),
                id: event.id.clone(),
                event_type: Some(event.event_type.clone()),
                payload: Some(event.payload.clone()),
                metadata: event.metadata.clone(),
                created_at: event.created_at.clone(),
                commit_time,
                max_retries: event.max_retries.unwrap_or(max_retries),
                failure: None,
                not_before: None,
            },
            Row::Malformed(m) => {
                let aggregate_type = m.aggregate_type.clone().unwrap_or_default();
                let aggregate_id = m.aggregate_id.clone().unwrap_or_default();
                ParkItem {
                    token,
                    key: AggregateKey::of(&aggregate_type, &aggregate_id),
                    aggregate_type,
                    aggregate_id,
                    id: m.id.clone(),
                    event_type: m.event_type.clone(),
                    payload: m.payload.clone(),
                    metadata: None,
                    created_at: None,
                    commit_time,
                    max_retries,
                    failure: Some(format!("malformed row: {}", m.reason)),
                    not_before: None,
                }
            }
        }
    }
}

/// The head of an aggregate's retry queue and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Unix microseconds.
    pub due: i64,
    /// The head is dead and `on_dead = "block"` holds the aggregate.
    pub blocked: bool,
}

/// A parked message loaded for a retry.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub parked_seq: i64,
    pub event: Result<OutboxEvent, MalformedRow>,
    pub commit_time: i64,
    pub attempts: i32,
    pub max_retries: i32,
}

/// Parks, on the highest-priority channel: they hold the relay's window and LSN.
#[derive(Debug)]
pub struct Park(pub Vec<ParkItem>);

/// A retry load, on the lowest-priority channel: load the head of the aggregate's queue.
#[derive(Debug)]
pub struct Load {
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
}

/// Retry outcomes and on_success batches, served after parks and before loads.
#[derive(Debug)]
pub enum StoreCommand {
    /// The head was acked: remove it, apply on_success, say what is next.
    Delivered {
        key: AggregateKey,
        aggregate_type: String,
        aggregate_id: String,
        parked_seq: i64,
        id: String,
    },
    /// The head failed again: count the attempt, schedule the next one.
    Failed {
        key: AggregateKey,
        aggregate_type: String,
        aggregate_id: String,
        parked_seq: i64,
        id: String,
        attempts: i32,
        reason: String,
        delay: Duration,
    },
    /// The head is out of retries (and dead-lettered when configured).
    Dead {
        key: AggregateKey,
        aggregate_type: String,
        aggregate_id: String,
        parked_seq: i64,
        id: String,
        attempts: i32,
        reason: String,
    },
    /// Stream messages acked: apply on_success (batched).
    Succeeded(Vec<String>),
}

/// What the store tells the relay.
#[derive(Debug)]
pub enum StoreEvent {
    /// These window tokens are durably parked; these aggregates got a new head.
    Parked { tokens: Vec<u64>, heads: Vec<Head> },
    /// The head of `key`, or `None` when its queue is empty.
    Loaded {
        key: AggregateKey,
        head: Option<Loaded>,
    },
    /// After Delivered or Dead: the next head, or `None` when the queue is empty.
    Released {
        key: AggregateKey,
        next: Option<Head>,
    },
    /// After Failed: when the head is due again.
    Rescheduled { key: AggregateKey, due: i64 },
    /// After Dead with `on_dead = "block"`: the aggregate is held.
    Blocked { key: AggregateKey },
    /// After a requeue notification: every aggregate's head.
    Heads(Vec<Head>),
}

/// What the store needs to know.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub target: PgTarget,
    pub slot: String,
    pub table: TableName,
    pub retry_table: TableName,
    pub mapping: ColumnMapping,
    pub on_success: OnSuccess,
    pub on_dead: OnDead,
    pub retention: Duration,
    pub reconnect_backoff_max: Duration,
}

/// One unit of the store's work, whichever channel it came from.
enum Job {
    Park(Park),
    Load(Load),
    Command(StoreCommand),
}

/// The store: state learned at start-up plus its connection.
pub struct Store {
    settings: StoreSettings,
    retry: RetryTable,
    outbox: Housekeeping,
    client: Client,
    notifications: mpsc::Receiver<String>,
}

async fn connect(target: &PgTarget, slot: &str) -> Result<(Client, mpsc::Receiver<String>), Error> {
    let (client, mut connection) = target.connect_raw(&store_application_name(slot)).await?;
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

impl Store {
    /// Connects, creates the retry table if missing, learns the outbox table's
    /// shape, LISTENs for requeues, and returns the heads left by earlier runs
    /// (the one start-up query).
    pub async fn open(settings: StoreSettings) -> Result<(Store, Vec<Head>), Error> {
        let (client, notifications) = connect(&settings.target, &settings.slot).await?;
        let retry = RetryTable::new(
            settings.retry_table.clone(),
            settings.slot.clone(),
            settings.on_dead,
        );
        retry.create_if_missing(&client).await?;
        let mut outbox = Housekeeping::learn(
            &client,
            settings.table.clone(),
            &settings.mapping,
            settings.on_success,
            settings.retention,
        )
        .await?;
        outbox.schedule_retention_from_table(&client).await?;
        let store = Store {
            settings,
            retry,
            outbox,
            client,
            notifications,
        };
        let heads = store.retry.heads(&store.client).await?;
        store.count_pending().await?;
        Ok((store, heads))
    }

    /// Serves commands until the channels close; flushes pending on_success updates first.
    pub async fn run(
        mut self,
        mut parks: mpsc::Receiver<Park>,
        mut commands: mpsc::Receiver<StoreCommand>,
        mut loads: mpsc::Receiver<Load>,
        events: mpsc::Sender<StoreEvent>,
    ) {
        let mut parks_open = true;
        loop {
            // Priority, highest first: parks (they hold the relay's window and LSN),
            // retry outcomes and on_success batches, loads (a retry storm slows
            // retries down but never starves the stream), requeue notifications,
            // then the housekeeping timers.
            let job = tokio::select! {
                biased;
                park = parks.recv(), if parks_open => match park {
                    Some(p) => Job::Park(p),
                    None => {
                        parks_open = false;
                        continue;
                    }
                },
                cmd = commands.recv() => match cmd {
                    Some(cmd) => Job::Command(cmd),
                    None => break,
                },
                Some(load) = loads.recv() => Job::Load(load),
                Some(_) = self.notifications.recv() => {
                    self.reload_heads(&events).await;
                    continue;
                }
                _ = sleep_until_opt(self.outbox.flush_at()) => {
                    if let Err(e) = self.outbox.flush_succeeded(&self.client).await {
                        tracing::warn!(error = %e, "on_success update failed; retrying in a second");
                        self.reconnect().await;
                    }
                    continue;
                }
                _ = sleep_until_opt(self.outbox.retention_at()) => {
                    if let Err(e) = self.outbox.sweep_retention(&self.client).await {
                        tracing::warn!(error = %e, "retention sweep failed; retrying in a minute");
                        self.reconnect().await;
                    }
                    continue;
                }
            };
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.handle(&job).await {
                    Ok(Some(ev)) => {
                        if events.send(ev).await.is_err() {
                            return;
                        }
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "retry store write failed; retrying (the slot waits)");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.settings.reconnect_backoff_max);
                        self.reconnect().await;
                    }
                }
            }
        }
        for _ in 0..3 {
            if self.outbox.flush_succeeded(&self.client).await.is_ok() {
                return;
            }
            self.reconnect().await;
        }
        self.outbox.finish(&self.client).await;
    }

    /// Sets `outbox_relay_retries_pending` from the table (start-up and requeue only).
    async fn count_pending(&self) -> Result<(), Error> {
        let n = self.retry.count_parked(&self.client).await?;
        crate::metrics::metrics().retries_pending.set(n);
        Ok(())
    }

    async fn reload_heads(&mut self, events: &mpsc::Sender<StoreEvent>) {
        let _ = self.count_pending().await;
        match self.retry.heads(&self.client).await {
            Ok(heads) => {
                tracing::info!(
                    aggregates = heads.len(),
                    "requeue notification: retry queue reloaded"
                );
                let _ = events.send(StoreEvent::Heads(heads)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the retry queue after a requeue notification")
            }
        }
    }

    async fn reconnect(&mut self) {
        if !self.client.is_closed() {
            return;
        }
        match connect(&self.settings.target, &self.settings.slot).await {
            Ok((client, notifications)) => {
                self.client = client;
                self.notifications = notifications;
                tracing::info!("retry store reconnected");
            }
            Err(e) => tracing::warn!(error = %e, "retry store cannot reconnect yet"),
        }
    }

    async fn handle(&mut self, job: &Job) -> Result<Option<StoreEvent>, Error> {
        match job {
            Job::Park(Park(items)) => self.park(items).await.map(Some),
            Job::Load(Load {
                key,
                aggregate_type,
                aggregate_id,
            }) => {
                let head = self.load(aggregate_type, aggregate_id).await?;
                Ok(Some(StoreEvent::Loaded { key: *key, head }))
            }
            Job::Command(cmd) => self.command(cmd).await,
        }
    }

    async fn command(&mut self, cmd: &StoreCommand) -> Result<Option<StoreEvent>, Error> {
        let metrics = crate::metrics::metrics();
        match cmd {
            StoreCommand::Delivered {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id,
            } => {
                if self.retry.delete(&self.client, *parked_seq).await? > 0 {
                    metrics.retries_pending.dec();
                }
                self.outbox
                    .apply_on_success(&self.client, std::slice::from_ref(id))
                    .await?;
                let next = self
                    .retry
                    .next_head(&self.client, *key, aggregate_type, aggregate_id)
                    .await?;
                Ok(Some(StoreEvent::Released { key: *key, next }))
            }
            StoreCommand::Failed {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id,
                attempts,
                reason,
                delay,
            } => {
                let due = self
                    .retry
                    .record_failure(&self.client, *parked_seq, *attempts, reason, *delay)
                    .await?;
                let Some(due) = due else {
                    // The row was removed by an operator: whatever is behind it is next.
                    let next = self
                        .retry
                        .next_head(&self.client, *key, aggregate_type, aggregate_id)
                        .await?;
                    return Ok(Some(StoreEvent::Released { key: *key, next }));
                };
                self.outbox
                    .mirror(&self.client, id, reason, "failed", Some(*delay), true)
                    .await?;
                Ok(Some(StoreEvent::Rescheduled { key: *key, due }))
            }
            StoreCommand::Dead {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id,
                attempts,
                reason,
            } => {
                if self
                    .retry
                    .mark_dead(&self.client, *parked_seq, *attempts, reason)
                    .await?
                {
                    metrics.retries_pending.dec();
                    metrics.dead_letters.inc();
                }
                self.outbox
                    .mirror(&self.client, id, reason, "permanently_failed", None, true)
                    .await?;
                match self.settings.on_dead {
                    OnDead::Block => Ok(Some(StoreEvent::Blocked { key: *key })),
                    OnDead::Skip => {
                        let next = self
                            .retry
                            .next_head(&self.client, *key, aggregate_type, aggregate_id)
                            .await?;
                        Ok(Some(StoreEvent::Released { key: *key, next }))
                    }
                }
            }
            StoreCommand::Succeeded(ids) => {
                // Never retried in place: a failed flush keeps the ids and tries again from
                // the timer, so commands behind it (and the relay) never wait on it.
                if self.outbox.add_succeeded(ids.clone()) {
                    if let Err(e) = self.outbox.flush_succeeded(&self.client).await {
                        tracing::warn!(error = %e, "on_success update failed; retrying in a second");
                    }
                }
                Ok(None)
            }
        }
    }

    async fn park(&mut self, items: &[ParkItem]) -> Result<StoreEvent, Error> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(query_err("starting a retry-state transaction"))?;
        let mut heads = Vec::new();
        for item in items {
            let (seq, due) = self.retry.insert(&tx, item).await?;
            if self
                .retry
                .is_head(&tx, &item.aggregate_type, &item.aggregate_id, seq)
                .await?
            {
                heads.push(Head {
                    key: item.key,
                    aggregate_type: item.aggregate_type.clone(),
                    aggregate_id: item.aggregate_id.clone(),
                    due,
                    blocked: false,
                });
            }
            if let Some(reason) = &item.failure {
                let delay = item
                    .not_before
                    .map(|nb| Duration::from_micros((nb - now_micros()).max(0) as u64));
                self.outbox
                    .mirror(&tx, &item.id, reason, "failed", delay, true)
                    .await?;
            }
        }
        tx.commit()
            .await
            .map_err(query_err("committing retry state"))?;
        crate::metrics::metrics()
            .retries_pending
            .add(items.len() as i64);
        Ok(StoreEvent::Parked {
            tokens: items.iter().map(|i| i.token).collect(),
            heads,
        })
    }

    /// The head of one aggregate's queue, with the outbox row re-read when it still exists
    /// (so a row fixed by an operator is published as fixed).
    async fn load(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Loaded>, Error> {
        let Some(row) = self
            .retry
            .head(&self.client, aggregate_type, aggregate_id)
            .await?
        else {
            return Ok(None);
        };
        let event = match self.outbox.reread(&self.client, &row.id).await? {
            Some(current) => current,
            // The outbox row is gone (deleted by its producer): use the parked copy.
            None => parked_copy(&row, aggregate_type, aggregate_id),
        };
        let max_retries = match &event {
            Ok(e) if self.outbox.has_max_retries() => e.max_retries.unwrap_or(row.max_retries),
            _ => row.max_retries,
        };
        Ok(Some(Loaded {
            parked_seq: row.seq,
            event,
            commit_time: row.commit_time,
            attempts: row.attempts,
            max_retries,
        }))
    }
}

/// The event as it was parked, for a retry whose outbox row is gone.
#[allow(clippy::result_large_err)] // what could be read of the row, as in `event`
fn parked_copy(
    row: &queries::ParkedRow,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<OutboxEvent, MalformedRow> {
    let event_type = row.event_type.clone().unwrap_or_default();
    match &row.payload {
        Some(p)
            if !event_type.is_empty()
                && serde_json::from_str::<serde::de::IgnoredAny>(p).is_ok() =>
        {
            Ok(OutboxEvent {
                id: row.id.clone(),
                aggregate_type: aggregate_type.to_string(),
                aggregate_id: aggregate_id.to_string(),
                event_type,
                payload: Bytes::from(p.clone()),
                metadata: row.metadata.clone().map(Bytes::from),
                created_at: row.created_at.clone(),
                scheduled_at: None,
                max_retries: None,
            })
        }
        _ => Err(MalformedRow {
            id: row.id.clone(),
            reason: "the outbox row is gone and the parked copy is not a valid message".into(),
            aggregate_type: Some(aggregate_type.to_string()),
            aggregate_id: Some(aggregate_id.to_string()),
            event_type: row.event_type.clone(),
            payload: row.payload.clone().map(Bytes::from),
        }),
    }
}
