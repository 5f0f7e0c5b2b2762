//! Durable retry state. One long-lived task owns an SQL connection and is the
//! only writer of the relay-owned retry table (`sql/outbox_relay_parked.sql`):
//! failed, delayed and parked-behind messages in commit order, per aggregate.
//! For Event-Forge tables it also shows the state in the row's own columns
//! (`status`, `retry_count`, `error_message`, `scheduled_at`, `updated_at`),
//! and applies `on_success` (batched, off the publish path) and `retention`.
//!
//! The relay (main loop) decides; this task writes and answers over bounded
//! channels. It runs no query unless told to, except the retention sweep it
//! schedules itself from what it marked published: an idle relay with nothing
//! failed queries nothing. `dead requeue` wakes it with NOTIFY.

use crate::catalog::{self, quote_ident, PgTarget, TableName};
use crate::config::{OnDead, OnSuccess};
use crate::error::Error;
use crate::event::{ColumnMapping, MalformedRow, OutboxEvent, ResolvedMapping};
use crate::sink::AggregateKey;
use bytes::Bytes;
use futures_util::StreamExt;
use pg_walstream::ColumnInfo;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// NOTIFY channel that `dead requeue` signals, per slot.
pub fn requeue_channel(slot: &str) -> String {
    format!("outbox_relay_requeue_{slot}")
}

/// A message to park: its own failure, a delay, or waiting behind its aggregate.
#[derive(Debug, Clone)]
pub struct ParkItem {
    /// The pipeline's sequence number, echoed back once the row is committed.
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
    /// From an event (a failed, delayed or parked-behind stream message).
    pub fn from_event(token: u64, event: &OutboxEvent, commit_time: i64, max_retries: i32) -> Self {
        ParkItem {
            token,
            key: AggregateKey::of(&event.aggregate_type, &event.aggregate_id),
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
        }
    }

    /// From a row that cannot become a message: what could be read of it.
    pub fn from_malformed(
        token: u64,
        row: &MalformedRow,
        commit_time: i64,
        max_retries: i32,
    ) -> Self {
        let aggregate_type = row.aggregate_type.clone().unwrap_or_default();
        let aggregate_id = row.aggregate_id.clone().unwrap_or_default();
        ParkItem {
            token,
            key: AggregateKey::of(&aggregate_type, &aggregate_id),
            aggregate_type,
            aggregate_id,
            id: row.id.clone(),
            event_type: row.event_type.clone(),
            payload: row.payload.clone(),
            metadata: None,
            created_at: None,
            commit_time,
            max_retries,
            failure: Some(format!("malformed row: {}", row.reason)),
            not_before: None,
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

#[derive(Debug)]
pub enum StoreCommand {
    Park(Vec<ParkItem>),
    /// Load the head of the aggregate's queue.
    Load {
        key: AggregateKey,
        aggregate_type: String,
        aggregate_id: String,
    },
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

#[derive(Debug)]
pub enum StoreEvent {
    /// These pipeline tokens are durably parked; these aggregates got a new head.
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

/// How to read and write the outbox table, learned from the catalog at start-up.
#[derive(Debug, Clone)]
struct TableShape {
    /// `select c1::text, c2::text, ... from t where id = $1::text::<type>`
    reread_sql: String,
    resolved: ResolvedMapping,
    /// SQL type of the id column, for casts.
    id_type: String,
    /// The row has Event-Forge retry columns.
    mirror: bool,
    has_max_retries: bool,
}

/// Now, in Unix microseconds.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Local instant for a Unix-microseconds due time.
pub fn instant_of(due_micros: i64) -> Instant {
    let delta = due_micros - now_micros();
    if delta <= 0 {
        Instant::now()
    } else {
        Instant::now() + Duration::from_micros(delta as u64)
    }
}

/// `application_name` of the store's session, so operators can tell it apart.
pub fn application_name(slot: &str) -> String {
    let mut name = format!("outbox-relay retry-store {slot}");
    name.truncate(63);
    name
}

async fn connect(target: &PgTarget, slot: &str) -> Result<(Client, mpsc::Receiver<String>), Error> {
    let mut config: tokio_postgres::Config =
        target
            .url()
            .parse()
            .map_err(|source| Error::PostgresConnect {
                url: target.redacted(),
                source,
            })?;
    config.application_name(application_name(slot));
    let (client, mut connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| Error::PostgresConnect {
                url: target.redacted(),
                source,
            })?;
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
    Ok((client, rx))
}

fn q(context: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres {
        context: context.to_string(),
        source,
    }
}

/// The store: state learned at start-up plus its connection.
pub struct Store {
    settings: StoreSettings,
    shape: TableShape,
    client: Client,
    notifications: mpsc::Receiver<String>,
    /// Ids acked and waiting for the batched on_success update.
    succeeded: Vec<String>,
    flush_at: Option<Instant>,
    retention_at: Option<Instant>,
}

impl Store {
    /// Connects, creates the retry table if missing, learns the outbox table's
    /// shape, LISTENs for requeues, and returns the heads left by earlier runs
    /// (the one start-up query).
    pub async fn open(settings: StoreSettings) -> Result<(Store, Vec<Head>), Error> {
        let (client, notifications) = connect(&settings.target, &settings.slot).await?;
        catalog::create_parked_table(&client, &settings.retry_table).await?;
        let shape = table_shape(&client, &settings).await?;
        client
            .batch_execute(&format!(
                "listen {}",
                quote_ident(&requeue_channel(&settings.slot))
            ))
            .await
            .map_err(q("listening for requeue notifications"))?;
        let mut store = Store {
            settings,
            shape,
            client,
            notifications,
            succeeded: Vec::new(),
            flush_at: None,
            retention_at: None,
        };
        let heads = store.heads().await?;
        store.count_pending().await?;
        store.schedule_retention_from_table().await?;
        Ok((store, heads))
    }

    /// Serves commands until the channel closes; flushes pending on_success updates first.
    /// Served in priority order: `parks` (they hold the relay's window and LSN),
    /// then `commands` (retry outcomes, on_success batches), then `loads` (retry
    /// loads), so a retry storm slows retries down but never starves the stream.
    pub async fn run(
        mut self,
        mut parks: mpsc::Receiver<StoreCommand>,
        mut commands: mpsc::Receiver<StoreCommand>,
        mut loads: mpsc::Receiver<StoreCommand>,
        events: mpsc::Sender<StoreEvent>,
    ) {
        let mut parks_open = true;
        loop {
            let cmd = tokio::select! {
                biased;
                cmd = parks.recv(), if parks_open => match cmd {
                    Some(cmd) => cmd,
                    None => {
                        parks_open = false;
                        continue;
                    }
                },
                cmd = commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
                Some(cmd) = loads.recv() => cmd,
                Some(_) = self.notifications.recv() => {
                    self.reload_heads(&events).await;
                    continue;
                }
                _ = sleep_until_opt(self.flush_at) => {
                    if let Err(e) = self.flush_succeeded().await {
                        tracing::warn!(error = %e, "on_success update failed; retrying");
                        self.flush_at = Some(Instant::now() + Duration::from_secs(1));
                        self.reconnect().await;
                    }
                    continue;
                }
                _ = sleep_until_opt(self.retention_at) => {
                    if let Err(e) = self.sweep_retention().await {
                        tracing::warn!(error = %e, "retention sweep failed; retrying in a minute");
                        self.retention_at = Some(Instant::now() + Duration::from_secs(60));
                        self.reconnect().await;
                    }
                    continue;
                }
            };
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.handle(&cmd).await {
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
            match self.flush_succeeded().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "final on_success update failed");
                    self.reconnect().await;
                }
            }
        }
    }

    /// Sets `outbox_relay_retries_pending` from the table (start-up and requeue only).
    async fn count_pending(&mut self) -> Result<(), Error> {
        let n: i64 = self
            .client
            .query_one(
                &format!(
                    "select count(*) from {} where slot = $1 and status = 'parked'",
                    self.settings.retry_table.quoted()
                ),
                &[&self.settings.slot],
            )
            .await
            .map_err(q("counting pending retries"))?
            .get(0);
        crate::metrics::metrics().retries_pending.set(n);
        Ok(())
    }

    async fn reload_heads(&mut self, events: &mpsc::Sender<StoreEvent>) {
        let _ = self.count_pending().await;
        match self.heads().await {
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
                let listen = format!(
                    "listen {}",
                    quote_ident(&requeue_channel(&self.settings.slot))
                );
                let _ = client.batch_execute(&listen).await;
                self.client = client;
                self.notifications = notifications;
                tracing::info!("retry store reconnected");
            }
            Err(e) => tracing::warn!(error = %e, "retry store cannot reconnect yet"),
        }
    }

    async fn handle(&mut self, cmd: &StoreCommand) -> Result<Option<StoreEvent>, Error> {
        match cmd {
            StoreCommand::Park(items) => self.park(items).await.map(Some),
            StoreCommand::Load {
                key,
                aggregate_type,
                aggregate_id,
            } => {
                let head = self.load(aggregate_type, aggregate_id).await?;
                Ok(Some(StoreEvent::Loaded { key: *key, head }))
            }
            StoreCommand::Delivered {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id,
            } => {
                self.client
                    .execute(
                        &format!(
                            "delete from {} where seq = $1",
                            self.settings.retry_table.quoted()
                        ),
                        &[parked_seq],
                    )
                    .await
                    .map_err(q("removing a delivered message from the retry table"))?;
                crate::metrics::metrics().retries_pending.dec();
                self.on_success_now(id).await?;
                let next = self.next_head(*key, aggregate_type, aggregate_id).await?;
                Ok(Some(StoreEvent::Released { key: *key, next }))
            }
            StoreCommand::Failed {
                key,
                parked_seq,
                id,
                attempts,
                reason,
                delay,
            } => {
                let row = self
                    .client
                    .query_one(
                        &format!(
                            "update {} set attempts = $2, error_message = $3, scheduled_at = now() + $4::bigint * interval '1 microsecond', \
                             updated_at = now() where seq = $1 returning (extract(epoch from scheduled_at) * 1000000)::bigint",
                            self.settings.retry_table.quoted()
                        ),
                        &[parked_seq, attempts, reason, &(delay.as_micros() as i64)],
                    )
                    .await
                    .map_err(q("recording a failed retry"))?;
                self.mirror_failed(id, reason, "failed", Some(*delay))
                    .await?;
                Ok(Some(StoreEvent::Rescheduled {
                    key: *key,
                    due: row.get(0),
                }))
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
                self.client
                    .execute(
                        &format!(
                            "update {} set status = 'dead', attempts = $2, error_message = $3, updated_at = now() where seq = $1",
                            self.settings.retry_table.quoted()
                        ),
                        &[parked_seq, attempts, reason],
                    )
                    .await
                    .map_err(q("marking a message dead"))?;
                crate::metrics::metrics().retries_pending.dec();
                crate::metrics::metrics().dead_letters.inc();
                self.mirror_failed(id, reason, "permanently_failed", None)
                    .await?;
                match self.settings.on_dead {
                    OnDead::Block => Ok(Some(StoreEvent::Blocked { key: *key })),
                    OnDead::Skip => {
                        let next = self.next_head(*key, aggregate_type, aggregate_id).await?;
                        Ok(Some(StoreEvent::Released { key: *key, next }))
                    }
                }
            }
            StoreCommand::Succeeded(ids) => {
                // Never retried in place: a failed flush keeps the ids and tries again from
                // the timer, so commands behind it (and the relay) never wait on it.
                if self.settings.on_success != OnSuccess::Keep {
                    self.succeeded.extend(ids.iter().cloned());
                    if self.succeeded.len() >= 1000 {
                        if let Err(e) = self.flush_succeeded().await {
                            tracing::warn!(error = %e, "on_success update failed; retrying");
                            self.flush_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                    } else if self.flush_at.is_none() {
                        self.flush_at = Some(Instant::now() + Duration::from_millis(100));
                    }
                }
                Ok(None)
            }
        }
    }

    async fn park(&mut self, items: &[ParkItem]) -> Result<StoreEvent, Error> {
        let table = self.settings.retry_table.quoted();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(q("starting a retry-state transaction"))?;
        let mut heads = Vec::new();
        let blockers = match self.settings.on_dead {
            OnDead::Block => "status in ('parked', 'dead')",
            OnDead::Skip => "status = 'parked'",
        };
        let insert = format!(
            "insert into {table} (slot, id, aggregate_type, aggregate_id, event_type, payload, metadata, created_at, commit_time, \
             attempts, max_retries, error_message, scheduled_at) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             coalesce(to_timestamp($13::bigint / 1000000.0), now())) \
             returning seq, (extract(epoch from scheduled_at) * 1000000)::bigint"
        );
        let first = format!(
            "select not exists (select 1 from {table} where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and seq < $4 and {blockers})"
        );
        for item in items {
            let text =
                |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
            let attempts: i32 = if item.failure.is_some() { 1 } else { 0 };
            let row = tx
                .query_one(
                    &insert,
                    &[
                        &self.settings.slot,
                        &item.id,
                        &item.aggregate_type,
                        &item.aggregate_id,
                        &item.event_type,
                        &text(&item.payload),
                        &text(&item.metadata),
                        &item.created_at,
                        &item.commit_time,
                        &attempts,
                        &item.max_retries,
                        &item.failure,
                        &item.not_before,
                    ],
                )
                .await
                .map_err(q("parking a message in the retry table"))?;
            let seq: i64 = row.get(0);
            let due: i64 = row.get(1);
            let is_head: bool = tx
                .query_one(
                    &first,
                    &[
                        &self.settings.slot,
                        &item.aggregate_type,
                        &item.aggregate_id,
                        &seq,
                    ],
                )
                .await
                .map_err(q("checking an aggregate's retry queue"))?
                .get(0);
            if is_head {
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
                mirror(
                    &tx,
                    &self.shape,
                    &self.settings.table,
                    &item.id,
                    reason,
                    "failed",
                    delay,
                    true,
                )
                .await?;
            }
        }
        tx.commit().await.map_err(q("committing retry state"))?;
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
        let row = self
            .client
            .query_opt(
                &format!(
                    "select seq, id, event_type, payload, metadata, created_at, commit_time, attempts, max_retries \
                     from {} where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and status = 'parked' order by seq limit 1",
                    self.settings.retry_table.quoted()
                ),
                &[&self.settings.slot, &aggregate_type, &aggregate_id],
            )
            .await
            .map_err(q("loading a message from the retry table"))?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.get(1);
        let current = self
            .client
            .query_opt(&self.shape.reread_sql, &[&id])
            .await
            .map_err(q("re-reading an outbox row for a retry"))?;
        let event = match current {
            Some(r) => self
                .shape
                .resolved
                .build(|idx| Ok(r.get::<_, Option<String>>(idx).map(Bytes::from))),
            None => {
                // The outbox row is gone (deleted by its producer): use the parked copy.
                let text = |i: usize| row.get::<_, Option<String>>(i);
                let copy = OutboxEvent {
                    id: id.clone(),
                    aggregate_type: aggregate_type.to_string(),
                    aggregate_id: aggregate_id.to_string(),
                    event_type: text(2).unwrap_or_default(),
                    payload: text(3).map(Bytes::from).unwrap_or_default(),
                    metadata: text(4).map(Bytes::from),
                    created_at: text(5),
                    scheduled_at: None,
                    max_retries: None,
                };
                match (&copy.event_type.is_empty(), text(3)) {
                    (false, Some(p))
                        if serde_json::from_str::<serde::de::IgnoredAny>(&p).is_ok() =>
                    {
                        Ok(copy)
                    }
                    _ => Err(MalformedRow {
                        id: id.clone(),
                        reason: "the outbox row is gone and the parked copy is not a valid message"
                            .into(),
                        aggregate_type: Some(aggregate_type.to_string()),
                        aggregate_id: Some(aggregate_id.to_string()),
                        event_type: text(2),
                        payload: text(3).map(Bytes::from),
                    }),
                }
            }
        };
        let max_retries = match &event {
            Ok(e) if self.shape.has_max_retries => e.max_retries.unwrap_or(row.get(8)),
            _ => row.get(8),
        };
        Ok(Some(Loaded {
            parked_seq: row.get(0),
            event,
            commit_time: row.get(6),
            attempts: row.get(7),
            max_retries,
        }))
    }

    async fn next_head(
        &mut self,
        key: AggregateKey,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Head>, Error> {
        let blockers = match self.settings.on_dead {
            OnDead::Block => "status in ('parked', 'dead')",
            OnDead::Skip => "status = 'parked'",
        };
        let row = self
            .client
            .query_opt(
                &format!(
                    "select status, (extract(epoch from greatest(scheduled_at, now())) * 1000000)::bigint from {} \
                     where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and {blockers} order by seq limit 1",
                    self.settings.retry_table.quoted()
                ),
                &[&self.settings.slot, &aggregate_type, &aggregate_id],
            )
            .await
            .map_err(q("finding the next message of an aggregate"))?;
        Ok(row.map(|r| Head {
            key,
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            due: r.get(1),
            blocked: r.get::<_, String>(0) == "dead",
        }))
    }

    /// Every aggregate's head (start-up, and after a requeue).
    async fn heads(&mut self) -> Result<Vec<Head>, Error> {
        let blockers = match self.settings.on_dead {
            OnDead::Block => "status in ('parked', 'dead')",
            OnDead::Skip => "status = 'parked'",
        };
        let rows = self
            .client
            .query(
                &format!(
                    "select distinct on (aggregate_type, aggregate_id) aggregate_type, aggregate_id, status, \
                     (extract(epoch from scheduled_at) * 1000000)::bigint \
                     from {} where slot = $1 and {blockers} order by aggregate_type, aggregate_id, seq",
                    self.settings.retry_table.quoted()
                ),
                &[&self.settings.slot],
            )
            .await
            .map_err(q("loading the retry queue"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let aggregate_type: String = r.get(0);
                let aggregate_id: String = r.get(1);
                Head {
                    key: AggregateKey::of(&aggregate_type, &aggregate_id),
                    aggregate_type,
                    aggregate_id,
                    blocked: r.get::<_, String>(2) == "dead",
                    due: r.get(3),
                }
            })
            .collect())
    }

    async fn mirror_failed(
        &mut self,
        id: &str,
        reason: &str,
        status: &str,
        delay: Option<Duration>,
    ) -> Result<(), Error> {
        mirror(
            &self.client,
            &self.shape,
            &self.settings.table,
            id,
            reason,
            status,
            delay,
            true,
        )
        .await
    }

    /// on_success for one row right away (a retried head).
    async fn on_success_now(&mut self, id: &str) -> Result<(), Error> {
        self.apply_on_success(&[id.to_string()]).await
    }

    async fn flush_succeeded(&mut self) -> Result<(), Error> {
        self.flush_at = None;
        if self.succeeded.is_empty() {
            return Ok(());
        }
        let ids = std::mem::take(&mut self.succeeded);
        if let Err(e) = self.apply_on_success(&ids).await {
            self.succeeded = ids;
            return Err(e);
        }
        Ok(())
    }

    async fn apply_on_success(&mut self, ids: &[String]) -> Result<(), Error> {
        let t = self.settings.table.quoted();
        let id_col = quote_ident(self.settings.mapping.id);
        let cast = &self.shape.id_type;
        let sql = match self.settings.on_success {
            OnSuccess::Keep => return Ok(()),
            OnSuccess::Delete => format!("delete from {t} where {id_col} = any($1::text[]::{cast}[])"),
            OnSuccess::MarkPublished => format!(
                "update {t} set status = 'published', error_message = null, updated_at = now() where {id_col} = any($1::text[]::{cast}[])"
            ),
        };
        self.client
            .execute(&sql, &[&ids])
            .await
            .map_err(q("applying on_success to published rows"))?;
        if self.settings.on_success == OnSuccess::MarkPublished && self.retention_at.is_none() {
            self.retention_at = Some(Instant::now() + self.settings.retention);
        }
        Ok(())
    }

    async fn schedule_retention_from_table(&mut self) -> Result<(), Error> {
        if self.settings.on_success != OnSuccess::MarkPublished || !self.shape.mirror {
            return Ok(());
        }
        let row = self
            .client
            .query_one(
                &format!(
                    "select (extract(epoch from min(updated_at)) * 1000000)::bigint from {} where status = 'published'",
                    self.settings.table.quoted()
                ),
                &[],
            )
            .await
            .map_err(q("finding the oldest published row"))?;
        self.retention_at = row
            .get::<_, Option<i64>>(0)
            .map(|oldest| instant_of(oldest + self.settings.retention.as_micros() as i64));
        Ok(())
    }

    /// Deletes published rows older than the retention, 1 000 at a time.
    async fn sweep_retention(&mut self) -> Result<(), Error> {
        self.retention_at = None;
        let t = self.settings.table.quoted();
        let sql = format!(
            "delete from {t} where ctid = any(array(select ctid from {t} where status = 'published' \
             and updated_at < now() - $1::bigint * interval '1 microsecond' limit 1000))"
        );
        let retention = self.settings.retention.as_micros() as i64;
        let mut total = 0u64;
        loop {
            let n = self
                .client
                .execute(&sql, &[&retention])
                .await
                .map_err(q("deleting published rows past retention"))?;
            total += n;
            if n < 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(deleted = total, "retention: deleted published rows");
        }
        self.schedule_retention_from_table().await
    }
}

/// Shows retry state in an Event-Forge row's own columns (no-op for other tables).
#[allow(clippy::too_many_arguments)]
async fn mirror<C: tokio_postgres::GenericClient>(
    client: &C,
    shape: &TableShape,
    table: &TableName,
    id: &str,
    reason: &str,
    status: &str,
    delay: Option<Duration>,
    count_attempt: bool,
) -> Result<(), Error> {
    if !shape.mirror {
        return Ok(());
    }
    let sql = format!(
        "update {} set status = $2, error_message = $3, retry_count = retry_count + $4, \
         scheduled_at = coalesce(now() + $5::bigint * interval '1 microsecond', scheduled_at), updated_at = now() \
         where id = $1::text::{}",
        table.quoted(),
        shape.id_type
    );
    let delay = delay.map(|d| d.as_micros() as i64);
    client
        .execute(
            &sql,
            &[&id, &status, &reason, &(count_attempt as i32), &delay],
        )
        .await
        .map_err(q("showing retry state in the outbox row"))?;
    Ok(())
}

async fn table_shape(client: &Client, settings: &StoreSettings) -> Result<TableShape, Error> {
    let columns = catalog::table_column_types(client, &settings.table).await?;
    if columns.is_empty() {
        return Err(Error::TableMissing {
            table: settings.table.to_string(),
        });
    }
    let infos: Vec<ColumnInfo> = columns
        .iter()
        .map(|(n, oid, _)| ColumnInfo::new(0, n.clone(), *oid, -1))
        .collect();
    let resolved = settings
        .mapping
        .resolve(&infos)
        .map_err(|missing| Error::ColumnsMissing {
            table: settings.table.to_string(),
            missing,
        })?;
    let names: Vec<&str> = columns.iter().map(|(n, _, _)| n.as_str()).collect();
    let id_type = columns
        .iter()
        .find(|(n, _, _)| n == settings.mapping.id)
        .map(|(_, _, t)| t.clone())
        .unwrap_or_else(|| "text".into());
    let select = names
        .iter()
        .map(|n| format!("{}::text", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let reread_sql = format!(
        "select {select} from {} where {} = $1::text::{id_type}",
        settings.table.quoted(),
        quote_ident(settings.mapping.id)
    );
    let mirror = catalog::RETRY_COLUMNS.iter().all(|c| names.contains(c));
    let has_max_retries = settings
        .mapping
        .max_retries
        .is_some_and(|c| names.contains(&c));
    Ok(TableShape {
        reread_sql,
        resolved,
        id_type,
        mirror,
        has_max_retries,
    })
}

/// Sleeps until `at`, or forever without one (a disabled `select!` timer).
pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Parses a `scheduled_at` text (Postgres ISO, UTC) to Unix microseconds.
pub fn scheduled_micros(text: &str) -> Option<i64> {
    crate::sink::format::pg_timestamp_to_unix_micros(text)
}

/// Backoff for the `attempt`-th failure: min(base · 2^(attempt-1), max) ± 10 % jitter.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    use rand::Rng;
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(max);
    capped.mul_f64(rand::rng().random_range(0.9..=1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let b1 = backoff(base, max, 1);
        assert!(
            b1 >= Duration::from_millis(90) && b1 <= Duration::from_millis(110),
            "{b1:?}"
        );
        let b3 = backoff(base, max, 3);
        assert!(
            b3 >= Duration::from_millis(360) && b3 <= Duration::from_millis(440),
            "{b3:?}"
        );
        let b10 = backoff(base, max, 10);
        assert!(b10 <= Duration::from_millis(1100), "{b10:?}");
    }

    #[test]
    fn parked_ddl_is_renamed() {
        let ddl = catalog::parked_ddl(&TableName::parse("relay.parked").unwrap());
        assert!(ddl.contains("\"relay\".\"parked\""));
        assert!(!ddl.contains("outbox_relay_parked"));
    }
}
