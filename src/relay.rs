//! The main loop: WAL in, AMQP out, LSN forward only behind broker acks or
//! durable retry state.
//!
//! One row's path: `source` hands an XLogData payload to the decoder, which
//! makes an `OutboxEvent`; `sink::format` turns it into an AMQP message; the
//! `Pipeline` admits it into the in-flight window and, when its aggregate is
//! free, sends it to the sink task; the sink's confirm comes back here and
//! resolves the message in the `progress::Tracker`; once its transaction and
//! all earlier ones are resolved and committed, the commit's end LSN is set as
//! applied on the replication client, whose worker reports it to the server.
//!
//! Failure branch: a nack, a return, no confirm in time, an oversized body or a
//! malformed row parks the message in the retry table (`retry`); the committed
//! park counts as resolved. While an aggregate has parked messages its later
//! stream messages are parked behind them; the retry heads are re-published
//! here when due, in commit order, and dead-lettered after the last retry.

use crate::catalog::{self, PgTarget, TableName};
use crate::config::{Config, ConfigError, Ordering};
use crate::error::Error;
use crate::event::{ColumnMapping, MalformedRow, OutboxEvent};
use crate::metrics::{self, Health, LagSource};
use crate::progress::{Tracker, TxnId};
use crate::retry::{
    self, now_micros, sleep_until_opt, Head, Loaded, ParkItem, Store, StoreCommand, StoreEvent,
    StoreSettings,
};
use crate::sink::{
    self, AggregateKey, OutboundMessage, Outcome, SinkCommand, SinkEvent, SinkSettings,
};
use crate::source::{self, decode::DecodeError, Decoded, Decoder, SourceSettings};
use futures_util::FutureExt;
use lapin::types::{AMQPValue, LongString, ShortString};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Runs the relay until `shutdown` resolves (then drains and exits cleanly) or
/// an error that the relay cannot recover from.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let invalid = |key: &str| {
        let key = key.to_string();
        move |message| ConfigError::Invalid { key, message }
    };
    let target = PgTarget::parse(config.postgres.url.expose()).map_err(invalid("postgres.url"))?;
    let table = TableName::parse(&config.postgres.table).map_err(invalid("postgres.table"))?;
    let retry_table =
        TableName::parse(&config.postgres.retry_table).map_err(invalid("postgres.retry_table"))?;
    let mapping = ColumnMapping::for_config(config.postgres.mapping);

    // /healthz answers from the start; /readyz says why it is not ready yet.
    let health = Arc::new(Health::default());
    let _metrics_server = match config.metrics.listen.as_str() {
        "" => None,
        listen => {
            let addr =
                listen
                    .parse()
                    .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                        key: "metrics.listen".into(),
                        message: e.to_string(),
                    })?;
            let listener = metrics::bind(addr).await?;
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(listen = %local, "metrics listening on {local}: /metrics /healthz /readyz");
            let lag = LagSource {
                target: target.clone(),
                slot: config.postgres.slot.clone(),
            };
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                listener,
                health.clone(),
                lag,
            ))))
        }
    };

    // Preflight: everything that would make the relay unable to run fails here, once, clearly.
    let sql = target.connect().await?;
    catalog::require_logical(&sql).await?;
    catalog::require_table(&sql, &table, &mapping).await?;
    if !catalog::can_replicate(&sql).await? {
        return Err(Error::NoReplicationPrivilege);
    }
    let create = config.postgres.create_missing;
    if catalog::ensure_publication(&sql, &config.postgres.publication, &table, create).await? {
        tracing::info!(publication = %config.postgres.publication, %table, "created publication (inserts only)");
    }
    catalog::ensure_slot(&sql, &config.postgres.slot, &target.dbname, create).await?;
    drop(sql);

    let (store, heads) = Store::open(StoreSettings {
        target: target.clone(),
        slot: config.postgres.slot.clone(),
        table: table.clone(),
        retry_table,
        mapping: mapping.clone(),
        on_success: config.postgres.on_success(),
        on_dead: config.retry.on_dead,
        retention: config.postgres.retention,
        reconnect_backoff_max: config.postgres.reconnect_backoff_max,
    })
    .await?;

    let sink_settings = SinkSettings::from_config(&config.amqp);
    let broker = sink::connect(&sink_settings).await?;

    let source_settings = SourceSettings {
        target: target.clone(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        status_interval: config.postgres.status_interval,
        buffer_events: 4096,
    };
    let Some((client, start_lsn)) =
        take_slot(&source_settings, &config, &health, &mut shutdown).await?
    else {
        tracing::info!("stopped while waiting for the slot");
        return Ok(());
    };
    health.set_streaming(true);

    tracing::info!(
        postgres = %target.redacted(),
        %table,
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        amqp = %sink::redact_amqp_url(config.amqp.url.expose()),
        exchange = %config.amqp.exchange,
        start_lsn = %start_lsn,
        ordering = ?config.relay.ordering,
        parked_aggregates = heads.len(),
        "outbox-relay {} streaming",
        env!("CARGO_PKG_VERSION")
    );
    metrics::metrics()
        .confirmed_lsn
        .set(start_lsn.as_u64() as f64);
    let _heartbeat = (!config.postgres.heartbeat_interval.is_zero()).then(|| {
        AbortOnDrop(tokio::spawn(heartbeat(
            target.clone(),
            heartbeat_application_name(&config.postgres.slot),
            config.postgres.heartbeat_interval,
        )))
    });

    let window = config.amqp.max_in_flight;
    let (cmd_tx, cmd_rx) = mpsc::channel(window * 2 + 16);
    let (ev_tx, ev_rx) = mpsc::channel(window * 4 + 64);
    let sink_task = tokio::spawn(sink::run(sink_settings, broker, cmd_rx, ev_tx));
    // Answers outstanding at once: parks (each holds window space), one command per
    // retried head in flight (window) and loads (capped): the event channel always
    // has room, so the store never blocks and the main loop never waits on it for long.
    let (store_tx, store_rx) = mpsc::channel(window * 2 + MAX_LOADING + 16);
    let (loads_tx, loads_rx) = mpsc::channel(MAX_LOADING + 16);
    let (parks_tx, parks_rx) = mpsc::channel(window + 16);
    let (store_ev_tx, store_ev_rx) = mpsc::channel(window * 2 + MAX_LOADING * 2 + 64);
    let store_task = tokio::spawn(store.run(parks_rx, store_rx, loads_rx, store_ev_tx));

    let dead_letter_exchange = (!config.amqp.dead_letter_exchange.is_empty())
        .then(|| ShortString::from(config.amqp.dead_letter_exchange.as_str()));
    let mut relay = Relay {
        pipeline: Pipeline::new(&config, cmd_tx),
        tracker: Tracker::new(),
        decoder: Decoder::new(table.clone(), mapping.clone()),
        table,
        mapping,
        source_settings,
        client,
        applied: start_lsn,
        commit_time: 0,
        store: store_tx,
        loads: loads_tx,
        parks: parks_tx,
        parked: Parked::default(),
        dead_letter_exchange,
        succeeded: Vec::new(),
        succeeded_since: None,
        collect_succeeded: config.postgres.on_success() != crate::config::OnSuccess::Keep,
        health: health.clone(),
        config,
    };
    for head in heads {
        relay.parked.adopt(head);
    }
    let result = relay.main_loop(ev_rx, store_ev_rx, shutdown).await;
    // Closing the command channels ends the sink task (which closes the broker
    // connection) and the store task (after it flushes pending on_success updates).
    let Relay {
        pipeline,
        store,
        loads,
        parks,
        ..
    } = relay;
    drop(pipeline);
    drop(parks);
    drop(store);
    drop(loads);
    let _ = tokio::time::timeout(Duration::from_secs(5), sink_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), store_task).await;
    result
}

/// Most WAL events handled in one turn of the main loop.
const WAL_BATCH: usize = 256;

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts replication on the slot from its confirmed position. While another
/// process holds it: as a standby, waits (with backoff) until it is released;
/// otherwise gives up after `slot_wait` naming the holder. `None`: shutdown came first.
async fn take_slot(
    settings: &SourceSettings,
    config: &Config,
    health: &Health,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<(ReplicationClient, Lsn)>, Error> {
    let deadline = Instant::now() + config.postgres.slot_wait;
    let mut backoff = Duration::from_millis(250);
    let mut logged_pid = None;
    loop {
        let attempt = async {
            let sql = settings.target.connect().await?;
            let state = catalog::slot_state(&sql, &settings.slot)
                .await?
                .ok_or_else(|| Error::SlotMissing {
                    slot: settings.slot.clone(),
                })?;
            drop(sql);
            let start = state.confirmed_flush.unwrap_or(Lsn::from_u64(0));
            source::start(settings, start).await.map(|c| (c, start))
        };
        let result = tokio::select! {
            biased;
            _ = shutdown.as_mut() => return Ok(None),
            r = attempt => r,
        };
        match result {
            Ok(taken) => {
                if logged_pid.is_some() {
                    tracing::info!(slot = %settings.slot, "slot released by its holder: taking over");
                }
                health.set_standby(None);
                return Ok(Some(taken));
            }
            Err(Error::SlotBusy { slot, pid })
                if config.postgres.standby || Instant::now() < deadline =>
            {
                if config.postgres.standby {
                    health.set_standby(Some(pid));
                }
                if logged_pid != Some(pid) {
                    let role = if config.postgres.standby {
                        "waiting as a hot standby"
                    } else {
                        "waiting for it to be released"
                    };
                    tracing::info!(%slot, pid, "slot is held by another process (pid {pid}): {role}");
                    logged_pid = Some(pid);
                }
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                if config.postgres.standby {
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Emits a non-transactional logical message every `interval`, so an otherwise
/// idle slot keeps moving (the relay confirms it when nothing is in flight).
/// `application_name` of the heartbeat's session.
pub fn heartbeat_application_name(slot: &str) -> String {
    let mut name = format!("outbox-relay heartbeat {slot}");
    name.truncate(63);
    name
}

async fn heartbeat(target: PgTarget, application_name: String, interval: Duration) {
    let mut client = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.is_none() {
            client = target.connect_as(&application_name).await.ok();
        }
        if let Some(c) = &client {
            if let Err(e) = c
                .batch_execute(
                    "select pg_logical_emit_message(false, 'outbox-relay-heartbeat', '')",
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed; reconnecting for the next one");
                client = None;
            }
        }
    }
}

struct Relay {
    config: Config,
    pipeline: Pipeline,
    tracker: Tracker,
    decoder: Decoder,
    table: TableName,
    mapping: ColumnMapping,
    source_settings: SourceSettings,
    client: ReplicationClient,
    /// The newest LSN set as applied on the client.
    applied: Lsn,
    /// Commit time (Postgres epoch, µs) of the open transaction.
    commit_time: i64,
    store: mpsc::Sender<StoreCommand>,
    /// Retry loads, served by the store after everything in `store`.
    loads: mpsc::Sender<StoreCommand>,
    /// Parks, served by the store before anything else (they hold window and LSN).
    parks: mpsc::Sender<StoreCommand>,
    parked: Parked,
    dead_letter_exchange: Option<ShortString>,
    /// Ids acked since the last hand-over to the store's batched on_success update.
    succeeded: Vec<String>,
    /// When the oldest of them was acked: handed over 50 ms later at the latest.
    succeeded_since: Option<Instant>,
    /// `on_success` does something with acked rows (not `keep`).
    collect_succeeded: bool,
    health: Arc<Health>,
}

/// Why the WAL stream needs a new connection.
struct StreamLost(String);

impl Relay {
    async fn main_loop(
        &mut self,
        mut sink_events: mpsc::Receiver<SinkEvent>,
        mut store_events: mpsc::Receiver<StoreEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut draining_until: Option<Instant> = None;
        loop {
            if draining_until.is_some()
                && self.pipeline.is_empty()
                && self.parked.outstanding() == 0
            {
                break;
            }
            let read_wal = draining_until.is_none() && self.pipeline.has_room();
            // Due heads only count as a timer while a load can start: a past due time
            // that cannot be served would wake the loop for nothing, ahead of the WAL.
            let loads =
                draining_until.is_none() && self.pipeline.has_room() && self.parked.can_load();
            let hand_over = self.succeeded_since.map(|t| t + Duration::from_millis(50));
            let next_timer = [
                self.pipeline.next_timer(),
                self.parked.next_due().filter(|_| loads),
                hand_over,
            ]
            .into_iter()
            .flatten()
            .min();
            // Priority, highest first: shutdown, confirms (they free the window and
            // move the LSN), retry-state answers, retries and timeouts due, WAL
            // (only with room in the window and the broker up), keepalives (they
            // arrive as WAL events).
            tokio::select! {
                biased;
                _ = &mut shutdown, if draining_until.is_none() => {
                    let timeout = self.config.relay.shutdown_timeout;
                    tracing::info!(in_flight = self.pipeline.len(), ?timeout, "shutting down: stopped reading WAL, waiting for outstanding confirms");
                    draining_until = Some(Instant::now() + timeout);
                }
                _ = sleep_until_opt(draining_until) => {
                    tracing::warn!(unconfirmed = self.pipeline.len(), "shutdown timeout reached; unconfirmed messages are re-published on the next start");
                    break;
                }
                ev = sink_events.recv() => {
                    let Some(ev) = ev else {
                        return Err(Error::Shutdown("the broker task ended unexpectedly".into()));
                    };
                    self.on_sink_event(ev).await;
                }
                ev = store_events.recv() => {
                    let Some(ev) = ev else {
                        return Err(Error::Shutdown("the retry-state task ended unexpectedly".into()));
                    };
                    self.on_store_event(ev).await;
                }
                _ = sleep_until_opt(next_timer) => {
                    self.on_timers(loads).await;
                }
                ev = self.client.recv(), if read_wal => {
                    // Whatever else is already buffered is handled in the same turn (up
                    // to WAL_BATCH, while the window has room): fewer wake-ups, and the
                    // sink gets its publishes in bursts.
                    let mut next = Some(ev);
                    let mut handled = 0;
                    while let Some(ev) = next.take() {
                        let outcome = match ev {
                            Ok(Some(ev)) => self.on_wal_event(ev).await,
                            Ok(None) => Err(Ok(StreamLost("the server ended the replication stream".into()))),
                            Err(e) => Err(Ok(StreamLost(e.to_string()))),
                        };
                        match outcome {
                            Ok(()) => {}
                            Err(Err(fatal)) => return Err(fatal),
                            Err(Ok(StreamLost(reason))) => {
                                if !self.reconnect_source(reason, &mut shutdown).await? {
                                    draining_until = Some(Instant::now());
                                }
                                break;
                            }
                        }
                        handled += 1;
                        if handled < WAL_BATCH && self.pipeline.has_room() {
                            next = self.client.recv().now_or_never();
                        }
                    }
                }
            }
            self.advance();
            self.hand_over_succeeded(256);
            metrics::metrics().inflight.set(self.pipeline.len() as i64);
        }
        self.hand_over_succeeded(1);
        self.finish().await;
        Ok(())
    }

    /// Handles one replication event. `Err(Ok(_))`: the stream must be reconnected;
    /// `Err(Err(_))`: the relay cannot go on.
    async fn on_wal_event(
        &mut self,
        ev: ReplicationEvent,
    ) -> Result<(), Result<StreamLost, Error>> {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                if self.tracker.current().is_some() {
                    return Err(Ok(StreamLost("Begin inside an open transaction".into())));
                }
                self.tracker.begin();
                self.commit_time = commit_time_micros;
            }
            ReplicationEvent::XLogData { data, .. } => {
                let decoded = self.decoder.decode(data).map_err(|e| match e {
                    DecodeError::ColumnsMissing { table, missing } => {
                        Err(Error::ColumnsMissing { table, missing })
                    }
                    other => Err(Error::Decode(other.to_string())),
                })?;
                let Some(txn) = self.tracker.current() else {
                    return match decoded {
                        Decoded::Ignored => Ok(()),
                        _ => Err(Err(Error::Decode(
                            "an insert arrived outside a transaction".into(),
                        ))),
                    };
                };
                match decoded {
                    Decoded::Ignored => {}
                    Decoded::Event(event) => self.admit_stream_event(Arc::new(event), txn).await,
                    Decoded::Malformed(row) => {
                        tracing::warn!(id = %row.id, reason = %row.reason, "malformed outbox row: parked in retry state");
                        let cause = ParkCause {
                            failure: Some(format!("malformed row: {}", row.reason)),
                            not_before: None,
                        };
                        self.admit_stream(Body::Malformed(row), None, txn, Some(cause))
                            .await;
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.tracker.commit(end_lsn),
            ReplicationEvent::KeepAlive { wal_end, .. } => self.confirm_when_idle(wal_end),
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                ..
            } => self.confirm_when_idle(lsn),
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { reached } => {
                return Err(Ok(StreamLost(format!("stream stopped at {reached}"))));
            }
        }
        Ok(())
    }

    async fn admit_stream_event(&mut self, event: Arc<OutboxEvent>, txn: TxnId) {
        let due = event
            .scheduled_at
            .as_deref()
            .and_then(retry::scheduled_micros);
        let delayed = due.filter(|d| *d > now_micros());
        match sink::format::encode(&event, self.commit_time) {
            Err(e) => {
                let cause = ParkCause {
                    failure: Some(format!("cannot be sent: {}", e.0)),
                    not_before: delayed,
                };
                self.admit_stream(Body::Event(event), None, txn, Some(cause))
                    .await;
            }
            Ok(message) => {
                let limit = self.config.amqp.max_message_bytes;
                let cause = if message.body.len() > limit {
                    Some(ParkCause {
                        failure: Some(format!(
                            "message body of {} bytes exceeds amqp.max_message_bytes ({limit})",
                            message.body.len()
                        )),
                        not_before: delayed,
                    })
                } else {
                    delayed.map(|d| ParkCause {
                        failure: None,
                        not_before: Some(d),
                    })
                };
                self.admit_stream(Body::Event(event), Some(Arc::new(message)), txn, cause)
                    .await;
            }
        }
    }

    /// Admits a stream message: parked behind its aggregate when that one has retry
    /// state, parked now when it has a cause of its own, else published.
    async fn admit_stream(
        &mut self,
        body: Body,
        message: Option<Arc<OutboundMessage>>,
        txn: TxnId,
        cause: Option<ParkCause>,
    ) {
        self.tracker.add_message(txn);
        let key = body.key();
        let origin = Origin::Stream {
            txn,
            commit_time: self.commit_time,
        };
        if self.parked.is_parked(key) {
            let seq = self.pipeline.insert(body, message, origin, State::Parking);
            self.park_behind(seq, key, cause).await;
            return;
        }
        match self.pipeline.admit(body, message, origin, cause) {
            Admitted::Sent | Admitted::Queued => {}
            Admitted::ParkNow(seq) => self.park_with_queue(seq).await,
        }
    }

    /// Parks `seq` (with its own cause) and everything queued behind it in memory.
    async fn park_with_queue(&mut self, seq: u64) {
        let Some(p) = self.pipeline.pending.get(&seq) else {
            return;
        };
        let key = p.body.key();
        let cause = p.cause.clone();
        self.pipeline.mark_parking(seq);
        self.park_behind(seq, key, cause).await;
    }

    /// Parks `seq` (with its own cause) followed by whatever waits behind it in memory.
    async fn park_behind(&mut self, seq: u64, key: AggregateKey, cause: Option<ParkCause>) {
        let mut items = vec![self.park_item(seq, cause.as_ref())];
        items.extend(
            self.pipeline
                .drain_queue(key)
                .into_iter()
                .map(|s| self.park_item(s, None)),
        );
        self.send_park(items).await;
    }

    fn park_item(&self, seq: u64, cause: Option<&ParkCause>) -> ParkItem {
        let p = &self.pipeline.pending[&seq];
        let commit_time = match p.origin {
            Origin::Stream { commit_time, .. } => commit_time,
            _ => 0,
        };
        let max = self.config.retry.max_retries;
        let mut item = match &p.body {
            Body::Event(e) => ParkItem::from_event(seq, e, commit_time, max),
            Body::Malformed(m) => ParkItem::from_malformed(seq, m, commit_time, max),
        };
        if let Some(c) = cause {
            if let Some(f) = &c.failure {
                metrics::metrics().failure(failure_label(f));
                item.failure = Some(f.clone());
                let delay = retry::backoff(
                    self.config.retry.backoff_base,
                    self.config.retry.backoff_max,
                    1,
                );
                item.not_before = Some(
                    c.not_before
                        .unwrap_or(0)
                        .max(now_micros() + delay.as_micros() as i64),
                );
            } else if let Some(nb) = c.not_before {
                item.not_before = Some(nb);
            }
        }
        item
    }

    async fn send_park(&mut self, items: Vec<ParkItem>) {
        for item in &items {
            self.parked
                .command_sent(item.key, &item.aggregate_type, &item.aggregate_id);
        }
        let _ = self.parks.send(StoreCommand::Park(items)).await;
    }

    /// With nothing in flight, everything the server has sent is handled:
    /// confirm its position so unrelated WAL is not retained for this slot.
    fn confirm_when_idle(&mut self, lsn: Lsn) {
        if self.tracker.is_idle() && lsn > self.applied {
            self.set_applied(lsn);
        }
    }

    fn set_applied(&mut self, lsn: Lsn) {
        self.applied = lsn;
        self.client.update_applied_lsn(lsn);
        metrics::metrics().confirmed_lsn.set(lsn.as_u64() as f64);
    }

    async fn on_sink_event(&mut self, ev: SinkEvent) {
        match ev {
            SinkEvent::Confirmed {
                generation,
                outcomes,
            } => {
                for (seq, outcome) in outcomes {
                    if !self.pipeline.is_published(seq, generation) {
                        continue; // a stale confirm: the message was re-sent or already handled
                    }
                    if outcome == Outcome::Ack {
                        self.on_acked(seq).await;
                    } else {
                        self.on_failed(seq, outcome.describe()).await;
                    }
                }
            }
            SinkEvent::Down { generation, reason } => {
                tracing::warn!(generation, %reason, in_flight = self.pipeline.len(), "broker down: stopped reading WAL until it is back");
                self.health.set_broker(false);
                self.pipeline.on_down(generation);
            }
            SinkEvent::Up { generation } => {
                self.health.set_broker(true);
                if generation > 1 {
                    metrics::metrics().reconnect("amqp");
                }
                self.pipeline.on_up(generation).await
            }
        }
    }

    async fn on_acked(&mut self, seq: u64) {
        let (p, next) = self.pipeline.resolve(seq);
        let m = metrics::metrics();
        if !matches!(p.origin, Origin::DeadLetter { .. }) {
            m.published.inc();
        }
        if let Origin::Stream { commit_time, .. } = p.origin {
            let latency_micros =
                now_micros() - (commit_time + sink::format::PG_EPOCH_OFFSET_MICROS);
            m.delivery_latency
                .observe(latency_micros.max(0) as f64 / 1e6);
        }
        if let Some(next) = next {
            self.pipeline_next(next).await;
        }
        match p.origin {
            Origin::Stream { txn, .. } => {
                self.tracker.resolve(txn);
                if let (Body::Event(e), true) = (&p.body, self.collect_succeeded) {
                    if self.succeeded.is_empty() {
                        self.succeeded_since = Some(Instant::now());
                    }
                    self.succeeded.push(e.id.clone());
                }
            }
            Origin::Retry { parked_seq, .. } | Origin::DeadLetter { parked_seq, .. } => {
                let key = p.body.key();
                let (aggregate_type, aggregate_id) = self.parked.names(key);
                let cmd = match p.origin {
                    Origin::Retry { .. } => StoreCommand::Delivered {
                        key,
                        aggregate_type,
                        aggregate_id,
                        parked_seq,
                        id: p.body.id(),
                    },
                    Origin::DeadLetter {
                        attempts,
                        ref reason,
                        ..
                    } => {
                        tracing::warn!(id = %p.body.id(), attempts, %reason, "dead-lettered");
                        StoreCommand::Dead {
                            key,
                            aggregate_type,
                            aggregate_id,
                            parked_seq,
                            id: p.body.id(),
                            attempts,
                            reason: reason.clone(),
                        }
                    }
                    Origin::Stream { .. } => unreachable!(),
                };
                self.parked.releasing(key);
                let _ = self.store.send(cmd).await;
            }
        }
    }

    /// Sends or parks the message whose turn came after an ack.
    async fn pipeline_next(&mut self, seq: u64) {
        if self
            .pipeline
            .pending
            .get(&seq)
            .is_some_and(|p| p.cause.is_some())
        {
            self.park_with_queue(seq).await;
        } else {
            self.pipeline.send(seq).await;
        }
    }

    /// A publish failed (nack, return, timeout).
    async fn on_failed(&mut self, seq: u64, reason: String) {
        let Some(p) = self.pipeline.pending.get(&seq) else {
            return;
        };
        match p.origin.clone() {
            Origin::Stream { .. } => {
                tracing::warn!(id = %p.body.id(), %reason, "publish failed: parking in retry state");
                self.pipeline.pending.get_mut(&seq).expect("present").cause = Some(ParkCause {
                    failure: Some(reason),
                    not_before: None,
                });
                self.park_with_queue(seq).await;
            }
            Origin::Retry {
                parked_seq,
                attempts,
                max_retries,
            } => {
                let (p, next) = self.pipeline.resolve(seq);
                if let Some(next) = next {
                    self.pipeline_next(next).await;
                }
                self.retry_failed(
                    p.body,
                    p.message,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    reason,
                )
                .await;
            }
            Origin::DeadLetter { .. } => {
                let delay = retry::backoff(
                    self.config.retry.backoff_base,
                    self.config.retry.backoff_max,
                    1,
                );
                tracing::warn!(id = %p.body.id(), %reason, retry_in = ?delay, "dead-letter publish failed; retrying");
                self.pipeline.backoff(seq, delay);
            }
        }
    }

    /// A retried head failed again: schedule the next attempt, or dead-letter it.
    async fn retry_failed(
        &mut self,
        body: Body,
        message: Option<Arc<OutboundMessage>>,
        parked_seq: i64,
        attempts: i32,
        max_retries: i32,
        reason: String,
    ) {
        let key = body.key();
        let (aggregate_type, aggregate_id) = self.parked.names(key);
        metrics::metrics().failure(failure_label(&reason));
        if attempts <= max_retries {
            let delay = retry::backoff(
                self.config.retry.backoff_base,
                self.config.retry.backoff_max,
                attempts as u32,
            );
            tracing::warn!(id = %body.id(), attempts, max_retries, retry_in = ?delay, %reason, "retry failed");
            self.parked.releasing(key);
            let _ = self
                .store
                .send(StoreCommand::Failed {
                    key,
                    parked_seq,
                    id: body.id(),
                    attempts,
                    reason,
                    delay,
                })
                .await;
            return;
        }
        match self.dead_letter_exchange.clone() {
            Some(dlx) => {
                let dead = dead_letter_message(
                    &dlx,
                    &self.config.amqp.exchange,
                    &body,
                    message.as_deref(),
                    attempts,
                    &reason,
                );
                self.pipeline
                    .admit_retry(
                        body,
                        Arc::new(dead),
                        Origin::DeadLetter {
                            parked_seq,
                            attempts,
                            reason,
                        },
                    )
                    .await;
            }
            None => {
                tracing::warn!(id = %body.id(), attempts, %reason, "message is dead (no dead_letter_exchange configured)");
                self.parked.releasing(key);
                let _ = self
                    .store
                    .send(StoreCommand::Dead {
                        key,
                        aggregate_type,
                        aggregate_id,
                        parked_seq,
                        id: body.id(),
                        attempts,
                        reason,
                    })
                    .await;
            }
        }
    }

    async fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Parked { tokens, heads } => {
                for token in tokens {
                    let (p, _) = self.pipeline.resolve(token);
                    self.parked.command_done(p.body.key());
                    if let Origin::Stream { txn, .. } = p.origin {
                        self.tracker.resolve(txn);
                    }
                }
                for head in heads {
                    self.parked.adopt(head);
                }
            }
            StoreEvent::Loaded { key, head } => {
                self.parked.loaded();
                match head {
                    None => self.parked.empty(key),
                    Some(loaded) => self.publish_loaded(key, loaded).await,
                }
            }
            StoreEvent::Released { key, next } => {
                self.parked.command_done(key);
                match next {
                    Some(head) => self.parked.next_head(head),
                    None => self.parked.empty(key),
                }
            }
            StoreEvent::Rescheduled { key, due } => {
                self.parked.command_done(key);
                self.parked.schedule(key, due);
            }
            StoreEvent::Blocked { key } => {
                self.parked.command_done(key);
                self.parked.block(key);
            }
            StoreEvent::Heads(heads) => {
                for head in heads {
                    self.parked.adopt(head);
                }
            }
        }
    }

    /// Re-publishes a loaded head, or counts a failure when it still cannot be sent.
    async fn publish_loaded(&mut self, key: AggregateKey, loaded: Loaded) {
        self.parked.in_flight(key);
        let Loaded {
            parked_seq,
            event,
            commit_time,
            attempts,
            max_retries,
        } = loaded;
        let event = match event {
            Ok(e) => e,
            Err(bad) => {
                let reason = format!("malformed row: {}", bad.reason);
                self.retry_failed(
                    Body::Malformed(bad),
                    None,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    reason,
                )
                .await;
                return;
            }
        };
        let event = Arc::new(event);
        let limit = self.config.amqp.max_message_bytes;
        match sink::format::encode(&event, commit_time) {
            Err(e) => {
                let reason = format!("cannot be sent: {}", e.0);
                self.retry_failed(
                    Body::Event(event),
                    None,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    reason,
                )
                .await
            }
            Ok(m) if m.body.len() > limit => {
                let reason = format!(
                    "message body of {} bytes exceeds amqp.max_message_bytes ({limit})",
                    m.body.len()
                );
                self.retry_failed(
                    Body::Event(event),
                    Some(Arc::new(m)),
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    reason,
                )
                .await
            }
            Ok(m) => {
                self.pipeline
                    .admit_retry(
                        Body::Event(event),
                        Arc::new(m),
                        Origin::Retry {
                            parked_seq,
                            attempts,
                            max_retries,
                        },
                    )
                    .await
            }
        }
    }

    async fn on_timers(&mut self, loads: bool) {
        let now = Instant::now();
        if self
            .succeeded_since
            .is_some_and(|t| t + Duration::from_millis(50) <= now)
        {
            self.hand_over_succeeded(1);
        }
        for seq in self.pipeline.expired(now) {
            let reason = format!(
                "no confirm within retry.publish_timeout ({:?})",
                self.config.retry.publish_timeout
            );
            self.on_failed(seq, reason).await;
        }
        self.pipeline.fire_backoffs(now).await;
        if !loads {
            return;
        }
        let room = self
            .pipeline
            .max_messages
            .saturating_sub(self.pipeline.len());
        for (key, aggregate_type, aggregate_id) in self.parked.due(now, room) {
            let _ = self
                .loads
                .send(StoreCommand::Load {
                    key,
                    aggregate_type,
                    aggregate_id,
                })
                .await;
        }
    }

    /// Passes acked ids to the store in batches, without ever waiting on it: when its
    /// queue is full (say, Postgres is restarting) the ids wait here for the next try.
    fn hand_over_succeeded(&mut self, at_least: usize) {
        if self.succeeded.len() < at_least || self.succeeded.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.succeeded);
        match self.store.try_send(StoreCommand::Succeeded(ids)) {
            Err(mpsc::error::TrySendError::Full(StoreCommand::Succeeded(ids))) => {
                // Try again in 50 ms.
                self.succeeded = ids;
                self.succeeded_since = Some(Instant::now());
            }
            _ => self.succeeded_since = None,
        }
    }

    fn advance(&mut self) {
        if let Some(lsn) = self.tracker.advance() {
            if lsn > self.applied {
                self.set_applied(lsn);
            }
        }
    }

    /// Replaces a lost replication connection. Stream messages not yet applied are
    /// dropped from memory: the server sends them again from the slot's position.
    /// Returns false when shutdown was requested while reconnecting.
    async fn reconnect_source(
        &mut self,
        reason: String,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        tracing::warn!(%reason, dropped = self.pipeline.len(), "replication stream lost; reconnecting, unapplied transactions will be replayed");
        self.health.set_streaming(false);
        self.client.abort();
        self.pipeline.drop_stream_messages();
        self.tracker.reset();
        let mut backoff = Duration::from_millis(200);
        loop {
            let attempt = async {
                let sql = self.source_settings.target.connect().await?;
                let state = catalog::slot_state(&sql, &self.source_settings.slot)
                    .await?
                    .ok_or_else(|| Error::SlotMissing {
                        slot: self.source_settings.slot.clone(),
                    })?;
                let start = state
                    .confirmed_flush
                    .unwrap_or(self.applied)
                    .max(self.applied);
                let client = source::start(&self.source_settings, start).await?;
                Ok::<_, Error>((client, start))
            };
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(false),
                res = attempt => match res {
                    Ok((client, start)) => {
                        tracing::info!(start_lsn = %start, "replication stream resumed");
                        metrics::metrics().reconnect("postgres");
                        self.health.set_streaming(true);
                        self.client = client;
                        self.decoder = Decoder::new(self.table.clone(), self.mapping.clone());
                        return Ok(true);
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot resume replication yet");
                    }
                    Err(e) => return Err(e),
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(false),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.config.postgres.reconnect_backoff_max);
        }
    }

    /// Makes sure the server heard the final applied LSN, then ends the stream.
    async fn finish(&mut self) {
        self.client.update_applied_lsn(self.applied);
        let metrics = self.client.metrics();
        let deadline =
            Instant::now() + self.config.postgres.status_interval + Duration::from_secs(2);
        while metrics.last_applied_lsn() < self.applied
            && Instant::now() < deadline
            && self.client.is_running()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reported = metrics.last_applied_lsn();
        if reported < self.applied {
            tracing::warn!(applied = %self.applied, %reported, "final status update not confirmed; the next start replays from the slot");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
        tracing::info!(applied = %self.applied, "stopped");
    }
}

/// The copy published to the dead-letter exchange, with headers that say why.
fn dead_letter_message(
    dlx: &ShortString,
    exchange: &str,
    body: &Body,
    original: Option<&OutboundMessage>,
    attempts: i32,
    reason: &str,
) -> OutboundMessage {
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let (routing_key, payload, mut properties) = match original {
        Some(m) => (m.routing_key.clone(), m.body.clone(), m.properties.clone()),
        None => {
            let (kind, id, agg_type, agg_id, event_type, raw) = match body {
                Body::Event(e) => (
                    "event",
                    e.id.clone(),
                    Some(e.aggregate_type.clone()),
                    Some(e.aggregate_id.clone()),
                    Some(e.event_type.clone()),
                    Some(String::from_utf8_lossy(&e.payload).into_owned()),
                ),
                Body::Malformed(m) => (
                    "malformed",
                    m.id.clone(),
                    m.aggregate_type.clone(),
                    m.aggregate_id.clone(),
                    m.event_type.clone(),
                    m.payload
                        .as_ref()
                        .map(|p| String::from_utf8_lossy(p).into_owned()),
                ),
            };
            let doc = serde_json::json!({
                "id": id, "aggregateType": agg_type, "aggregateId": agg_id, "eventType": event_type,
                "rawPayload": raw, "kind": kind,
            });
            let rk = format!(
                "{}.{}",
                agg_type.unwrap_or_default(),
                event_type.unwrap_or_default()
            );
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(ShortString::try_new(id).unwrap_or_default());
            (
                ShortString::try_new(rk).unwrap_or_else(|_| "dead".into()),
                serde_json::to_vec(&doc).unwrap_or_default(),
                props,
            )
        }
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-outbox-error".into(), long(reason));
    headers.insert("x-outbox-attempts".into(), AMQPValue::LongInt(attempts));
    headers.insert("x-outbox-original-exchange".into(), long(exchange));
    headers.insert(
        "x-outbox-original-routing-key".into(),
        long(routing_key.as_str()),
    );
    properties = properties.with_headers(headers);
    OutboundMessage {
        exchange: Some(dlx.clone()),
        id: body.id(),
        aggregate: body.key(),
        routing_key,
        body: payload,
        properties,
    }
}

/// The `reason` label of `outbox_relay_publish_failures_total` for a failure text.
fn failure_label(reason: &str) -> &'static str {
    if reason.starts_with("nacked") {
        "nack"
    } else if reason.starts_with("returned") {
        "returned"
    } else if reason.starts_with("no confirm") {
        "timeout"
    } else if reason.starts_with("message body of") {
        "too_large"
    } else {
        "malformed"
    }
}

/// What a message is made of: an event, or what could be read of a malformed row.
#[derive(Debug, Clone)]
enum Body {
    Event(Arc<OutboxEvent>),
    Malformed(MalformedRow),
}

impl Body {
    fn key(&self) -> AggregateKey {
        match self {
            Body::Event(e) => AggregateKey::of(&e.aggregate_type, &e.aggregate_id),
            Body::Malformed(m) => AggregateKey::of(
                m.aggregate_type.as_deref().unwrap_or_default(),
                m.aggregate_id.as_deref().unwrap_or_default(),
            ),
        }
    }

    fn id(&self) -> String {
        match self {
            Body::Event(e) => e.id.clone(),
            Body::Malformed(m) => m.id.clone(),
        }
    }
}

/// Where a message came from, which decides what its resolution means.
#[derive(Debug, Clone)]
enum Origin {
    /// From the WAL: resolving it moves the LSN.
    Stream { txn: TxnId, commit_time: i64 },
    /// A retried head of an aggregate's retry queue.
    Retry {
        parked_seq: i64,
        attempts: i32,
        max_retries: i32,
    },
    /// The dead-letter copy of a head out of retries.
    DeadLetter {
        parked_seq: i64,
        attempts: i32,
        reason: String,
    },
}

/// Why a stream message is parked instead of (or after) being published.
#[derive(Debug, Clone)]
struct ParkCause {
    /// Its own failure (counts as an attempt).
    failure: Option<String>,
    /// Not before this time (Unix µs): a delayed message.
    not_before: Option<i64>,
}

/// Where one message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting behind an unconfirmed message of its aggregate (strict ordering).
    Queued,
    /// Sent to the broker on connection `generation`, confirm outstanding.
    Published { generation: u64 },
    /// Holds its aggregate's turn; to be sent when the broker is up.
    Unsent,
    /// A dead-letter publish waiting for its backoff.
    Backoff,
    /// Being written to the retry table; resolved when that commits.
    Parking,
}

struct Pending {
    body: Body,
    message: Option<Arc<OutboundMessage>>,
    origin: Origin,
    state: State,
    /// Set for messages to be parked when their turn comes.
    cause: Option<ParkCause>,
    /// Holds its aggregate's turn.
    has_turn: bool,
}

#[derive(Default)]
struct Aggregate {
    /// Messages of this aggregate that hold a turn.
    active: u32,
    /// Messages waiting for the turn, in commit order.
    queue: VecDeque<u64>,
}

enum Admitted {
    Sent,
    Queued,
    /// Has a park cause and its turn: park it now.
    ParkNow(u64),
}

/// A map keyed by the relay's own u64s (sequence numbers, aggregate keys that are
/// already hashes): one multiply instead of SipHash on the hot path.
type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<U64Hasher>>;

#[derive(Default, Clone, Copy)]
struct U64Hasher(u64);

impl std::hash::Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Folded multiply: every input bit reaches the high bits hashbrown uses.
        let m = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15u128;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

/// The in-flight window: every message from admission to its resolution.
struct Pipeline {
    ordering: Ordering,
    max_messages: usize,
    max_bytes: usize,
    publish_timeout: Duration,
    commands: mpsc::Sender<SinkCommand>,
    /// Broker connection generation currently up, if any.
    generation: Option<u64>,
    next_seq: u64,
    pending: FastMap<u64, Pending>,
    aggregates: FastMap<AggregateKey, Aggregate>,
    bytes: usize,
    /// Dead-letter publishes waiting for their backoff.
    backoffs: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Publish deadlines in publish order (the timeout is constant).
    deadlines: VecDeque<(Instant, u64, u64)>,
}

impl Pipeline {
    fn new(config: &Config, commands: mpsc::Sender<SinkCommand>) -> Self {
        Self {
            ordering: config.relay.ordering,
            max_messages: config.amqp.max_in_flight,
            max_bytes: config.amqp.max_in_flight_bytes,
            publish_timeout: config.retry.publish_timeout,
            commands,
            generation: None,
            next_seq: 0,
            pending: FastMap::default(),
            aggregates: FastMap::default(),
            bytes: 0,
            backoffs: BinaryHeap::new(),
            deadlines: VecDeque::new(),
        }
    }

    fn len(&self) -> usize {
        self.pending.len()
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Room for one more message, and a broker to send it to. One message over
    /// the byte limit is let in when the window is empty, so it cannot stall.
    fn has_room(&self) -> bool {
        self.generation.is_some()
            && self.pending.len() < self.max_messages
            && (self.bytes < self.max_bytes || self.pending.is_empty())
    }

    fn next_timer(&self) -> Option<Instant> {
        let backoff = self.backoffs.peek().map(|Reverse((at, _))| *at);
        let deadline = self.deadlines.front().map(|(at, _, _)| *at);
        [backoff, deadline].into_iter().flatten().min()
    }

    fn weight(body: &Body, message: Option<&Arc<OutboundMessage>>) -> usize {
        match (message, body) {
            (Some(m), _) => m.weight(),
            (None, Body::Event(e)) => e.payload.len() + 256,
            (None, Body::Malformed(m)) => m.payload.as_ref().map_or(0, |p| p.len()) + 256,
        }
    }

    fn insert(
        &mut self,
        body: Body,
        message: Option<Arc<OutboundMessage>>,
        origin: Origin,
        state: State,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += Self::weight(&body, message.as_ref());
        self.pending.insert(
            seq,
            Pending {
                body,
                message,
                origin,
                state,
                cause: None,
                has_turn: false,
            },
        );
        seq
    }

    /// Admits a stream message that is not parked behind its aggregate.
    fn admit(
        &mut self,
        body: Body,
        message: Option<Arc<OutboundMessage>>,
        origin: Origin,
        cause: Option<ParkCause>,
    ) -> Admitted {
        let key = body.key();
        let seq = self.insert(body, message, origin, State::Queued);
        let agg = self.aggregates.entry(key).or_default();
        let busy = agg.active > 0 || !agg.queue.is_empty();
        let p = self.pending.get_mut(&seq).expect("just inserted");
        p.cause = cause;
        if self.ordering == Ordering::Strict && busy {
            agg.queue.push_back(seq);
            return Admitted::Queued;
        }
        if p.cause.is_some() {
            return Admitted::ParkNow(seq);
        }
        agg.active += 1;
        p.has_turn = true;
        p.state = State::Unsent;
        self.send_now(seq);
        Admitted::Sent
    }

    /// Admits a retried head or a dead-letter copy: published at once (it holds its aggregate's turn).
    async fn admit_retry(&mut self, body: Body, message: Arc<OutboundMessage>, origin: Origin) {
        let key = body.key();
        let seq = self.insert(body, Some(message), origin, State::Unsent);
        self.aggregates.entry(key).or_default().active += 1;
        self.pending.get_mut(&seq).expect("just inserted").has_turn = true;
        self.send(seq).await;
    }

    fn send_now(&mut self, seq: u64) {
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        let Some(message) = p.message.clone() else {
            return;
        };
        match self.generation {
            Some(generation) => {
                p.state = State::Published { generation };
                self.deadlines
                    .push_back((Instant::now() + self.publish_timeout, seq, generation));
                // The command channel holds twice the window: this never waits in practice,
                // and the sink always drains it. A closed channel means the sink ended, which
                // the main loop learns from the event channel.
                if let Err(mpsc::error::TrySendError::Full(cmd)) =
                    self.commands.try_send(SinkCommand::Publish {
                        seq,
                        generation,
                        message,
                    })
                {
                    let commands = self.commands.clone();
                    tokio::spawn(async move {
                        let _ = commands.send(cmd).await;
                    });
                }
            }
            None => p.state = State::Unsent,
        }
    }

    /// Sends a message that holds its turn.
    async fn send(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            if !p.has_turn {
                let key = p.body.key();
                p.has_turn = true;
                self.aggregates.entry(key).or_default().active += 1;
            }
        }
        self.send_now(seq);
    }

    fn is_published(&self, seq: u64, generation: u64) -> bool {
        self.pending
            .get(&seq)
            .is_some_and(|p| p.state == State::Published { generation })
    }

    /// Gives up `seq`'s aggregate turn; returns the aggregate when it held one.
    fn give_up_turn(&mut self, seq: u64) -> Option<AggregateKey> {
        let p = self.pending.get_mut(&seq)?;
        if !p.has_turn {
            return None;
        }
        p.has_turn = false;
        let key = p.body.key();
        if let Some(agg) = self.aggregates.get_mut(&key) {
            agg.active -= 1;
        }
        Some(key)
    }

    /// Forgets an aggregate with no turn held and nothing queued.
    fn forget_if_idle(&mut self, key: AggregateKey) {
        if self
            .aggregates
            .get(&key)
            .is_some_and(|a| a.active == 0 && a.queue.is_empty())
        {
            self.aggregates.remove(&key);
        }
    }

    /// Gives up `seq`'s aggregate turn; returns the next queued message to run, if any.
    fn release_turn(&mut self, seq: u64) -> Option<u64> {
        let key = self.give_up_turn(seq)?;
        let agg = self.aggregates.get_mut(&key)?;
        let next = if agg.active == 0 {
            agg.queue.pop_front()
        } else {
            None
        };
        self.forget_if_idle(key);
        next
    }

    /// Removes a resolved message; returns it and the next message whose turn came.
    fn resolve(&mut self, seq: u64) -> (Pending, Option<u64>) {
        let next = self.release_turn(seq);
        let p = self
            .pending
            .remove(&seq)
            .expect("resolving a pending message");
        self.bytes -= Self::weight(&p.body, p.message.as_ref());
        // Deadlines of answered publishes leave from the front (answers come roughly
        // in publish order), so the queue stays as small as the window.
        while let Some(&(_, s, g)) = self.deadlines.front() {
            if self.is_published(s, g) {
                break;
            }
            self.deadlines.pop_front();
        }
        (p, next)
    }

    /// The message goes to the retry table (it keeps counting in the window until that commits).
    fn mark_parking(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.state = State::Parking;
        }
        self.release_turn_without_next(seq);
    }

    fn release_turn_without_next(&mut self, seq: u64) {
        if let Some(key) = self.give_up_turn(seq) {
            self.forget_if_idle(key);
        }
    }

    /// Takes everything queued behind an aggregate's turn (to be parked behind it).
    fn drain_queue(&mut self, key: AggregateKey) -> Vec<u64> {
        let Some(agg) = self.aggregates.get_mut(&key) else {
            return Vec::new();
        };
        let drained: Vec<u64> = agg.queue.drain(..).collect();
        if agg.active == 0 {
            self.aggregates.remove(&key);
        }
        for seq in &drained {
            if let Some(p) = self.pending.get_mut(seq) {
                p.state = State::Parking;
            }
        }
        drained
    }

    fn backoff(&mut self, seq: u64, delay: Duration) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.state = State::Backoff;
            self.backoffs.push(Reverse((Instant::now() + delay, seq)));
        }
    }

    async fn fire_backoffs(&mut self, now: Instant) {
        while let Some(Reverse((at, seq))) = self.backoffs.peek().copied() {
            if at > now {
                break;
            }
            self.backoffs.pop();
            if self
                .pending
                .get(&seq)
                .is_some_and(|p| p.state == State::Backoff)
            {
                self.send(seq).await;
            }
        }
    }

    /// Published messages whose confirm is overdue.
    fn expired(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(at, seq, generation)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if self.is_published(seq, generation) {
                out.push(seq);
            }
        }
        out
    }

    fn on_down(&mut self, generation: u64) {
        if self.generation == Some(generation) {
            self.generation = None;
        }
        for p in self.pending.values_mut() {
            if matches!(p.state, State::Published { generation: g } if g <= generation) {
                p.state = State::Unsent;
            }
        }
        // A broker outage is not a per-message failure: no publish timeouts run while it lasts.
        self.deadlines.clear();
    }

    /// The broker is back: re-publish what was unresolved, in admission order.
    async fn on_up(&mut self, generation: u64) {
        self.generation = Some(generation);
        let mut unsent: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.state == State::Unsent)
            .map(|(seq, _)| *seq)
            .collect();
        unsent.sort_unstable();
        if !unsent.is_empty() {
            tracing::info!(
                generation,
                count = unsent.len(),
                "broker back: re-publishing unconfirmed messages"
            );
        }
        for seq in unsent {
            self.send_now(seq);
        }
    }

    /// Forgets stream messages that are not being parked (the replication stream
    /// replays what was not applied); retried heads, dead-letter copies and parks
    /// in progress stay.
    fn drop_stream_messages(&mut self) {
        let drop: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.origin, Origin::Stream { .. }) && p.state != State::Parking)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in drop {
            if let Some(p) = self.pending.get(&seq) {
                let key = p.body.key();
                if let Some(agg) = self.aggregates.get_mut(&key) {
                    agg.queue.retain(|s| *s != seq);
                }
            }
            self.release_turn_without_next(seq);
            let p = self.pending.remove(&seq).expect("present");
            self.bytes -= Self::weight(&p.body, p.message.as_ref());
        }
    }
}

/// What the main loop knows of each aggregate with retry state: the store's
/// last word plus its own commands not yet answered.
#[derive(Default)]
struct Parked {
    aggregates: FastMap<AggregateKey, ParkedAggregate>,
    due: BinaryHeap<Reverse<(Instant, AggregateKey)>>,
    /// Loads requested and not yet answered (bounded, so answers never pile up).
    loading: usize,
}

/// Most heads loaded at once.
const MAX_LOADING: usize = 64;

struct ParkedAggregate {
    aggregate_type: String,
    aggregate_id: String,
    /// The store last said the aggregate has parked rows.
    store_parked: bool,
    /// Commands for this aggregate the store has not answered yet.
    outstanding: u32,
    head: HeadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    /// Nothing scheduled.
    Idle,
    /// Load when this time comes.
    Scheduled(Instant),
    /// Load requested, or published, or its outcome being recorded.
    Busy,
    /// Dead head holding the aggregate (`on_dead = "block"`).
    Blocked,
}

impl Parked {
    fn is_parked(&self, key: AggregateKey) -> bool {
        self.aggregates
            .get(&key)
            .is_some_and(|a| a.store_parked || a.outstanding > 0 || a.head != HeadState::Idle)
    }

    fn outstanding(&self) -> u32 {
        self.aggregates.values().map(|a| a.outstanding).sum()
    }

    fn names(&self, key: AggregateKey) -> (String, String) {
        self.aggregates
            .get(&key)
            .map(|a| (a.aggregate_type.clone(), a.aggregate_id.clone()))
            .unwrap_or_default()
    }

    fn entry(
        &mut self,
        key: AggregateKey,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> &mut ParkedAggregate {
        self.aggregates
            .entry(key)
            .or_insert_with(|| ParkedAggregate {
                aggregate_type: aggregate_type.to_string(),
                aggregate_id: aggregate_id.to_string(),
                store_parked: false,
                outstanding: 0,
                head: HeadState::Idle,
            })
    }

    fn command_sent(&mut self, key: AggregateKey, aggregate_type: &str, aggregate_id: &str) {
        self.entry(key, aggregate_type, aggregate_id).outstanding += 1;
    }

    fn command_done(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.outstanding = a.outstanding.saturating_sub(1);
        }
        self.forget_if_clear(key);
    }

    /// A head reported by the store (start-up, a new head after a park, the next after a release, a requeue).
    fn adopt(&mut self, head: Head) {
        let a = self.entry(head.key, &head.aggregate_type, &head.aggregate_id);
        a.store_parked = true;
        match a.head {
            HeadState::Idle | HeadState::Blocked if head.blocked => a.head = HeadState::Blocked,
            HeadState::Idle | HeadState::Blocked => self.schedule(head.key, head.due),
            HeadState::Scheduled(_) | HeadState::Busy => {}
        }
    }

    /// The head after a release: replaces the one that was busy.
    fn next_head(&mut self, head: Head) {
        if let Some(a) = self.aggregates.get_mut(&head.key) {
            a.head = HeadState::Idle;
        }
        self.adopt(head);
    }

    fn schedule(&mut self, key: AggregateKey, due_micros: i64) {
        let at = retry::instant_of(due_micros);
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.store_parked = true;
            a.head = HeadState::Scheduled(at);
            self.due.push(Reverse((at, key)));
        }
    }

    fn block(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.head = HeadState::Blocked;
            a.store_parked = true;
        }
    }

    fn in_flight(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.head = HeadState::Busy;
        }
    }

    /// A command about the head is on its way to the store.
    fn releasing(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.outstanding += 1;
            a.head = HeadState::Busy;
        }
    }

    /// The store says the aggregate's queue is empty.
    fn empty(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.store_parked = false;
            a.head = HeadState::Idle;
        }
        self.forget_if_clear(key);
    }

    fn forget_if_clear(&mut self, key: AggregateKey) {
        if self
            .aggregates
            .get(&key)
            .is_some_and(|a| !a.store_parked && a.outstanding == 0 && a.head == HeadState::Idle)
        {
            self.aggregates.remove(&key);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    fn can_load(&self) -> bool {
        self.loading < MAX_LOADING
    }

    fn loaded(&mut self) {
        self.loading = self.loading.saturating_sub(1);
    }

    /// Heads whose time has come, at most `room` and the load cap:
    /// (key, aggregate_type, aggregate_id) to load.
    fn due(&mut self, now: Instant, room: usize) -> Vec<(AggregateKey, String, String)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, key))) = self.due.peek().copied() {
            if at > now || out.len() >= room || self.loading >= MAX_LOADING {
                break;
            }
            self.due.pop();
            if let Some(a) = self.aggregates.get_mut(&key) {
                if a.head == HeadState::Scheduled(at) {
                    a.head = HeadState::Busy;
                    self.loading += 1;
                    out.push((key, a.aggregate_type.clone(), a.aggregate_id.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_spread_over_the_hash_table() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        // hashbrown picks the bucket from the low bits and a tag from the top 7 bits:
        // a window of consecutive sequence numbers must use both well.
        let build = BuildHasherDefault::<U64Hasher>::default();
        let hashes: Vec<u64> = (1_000_000u64..1_002_048)
            .map(|s| build.hash_one(s))
            .collect();
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 2047).collect();
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            buckets.len() > 1200,
            "{} of 2048 buckets used",
            buckets.len()
        );
        assert_eq!(tags.len(), 128, "every 7-bit tag is used");
    }

    fn head(key: u64, due: i64, blocked: bool) -> Head {
        Head {
            key: AggregateKey(key),
            aggregate_type: "A".into(),
            aggregate_id: key.to_string(),
            due,
            blocked,
        }
    }

    #[test]
    fn parked_aggregate_stays_parked_until_the_store_and_its_commands_agree() {
        let mut p = Parked::default();
        let k = AggregateKey(1);
        assert!(!p.is_parked(k));
        p.command_sent(k, "A", "1");
        assert!(p.is_parked(k), "a park on its way parks the aggregate");
        p.adopt(head(1, 0, false));
        p.command_done(k);
        assert!(p.is_parked(k));
        let due = p.due(Instant::now() + Duration::from_millis(1), 10);
        assert_eq!(due.len(), 1, "the head is loaded once due");
        assert!(
            p.due(Instant::now() + Duration::from_secs(1), 10)
                .is_empty(),
            "and only once"
        );
        p.loaded();
        p.releasing(k);
        // The store answered an empty queue while another park is on its way.
        p.command_sent(k, "A", "1");
        p.command_done(k);
        p.empty(k);
        assert!(p.is_parked(k), "the park still on its way keeps it parked");
        p.command_done(k);
        assert!(!p.is_parked(k));
    }

    #[test]
    fn failure_labels() {
        assert_eq!(failure_label(&Outcome::Nack.describe()), "nack");
        let r = Outcome::Returned {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        };
        assert_eq!(failure_label(&r.describe()), "returned");
        assert_eq!(
            failure_label("no confirm within retry.publish_timeout (1s)"),
            "timeout"
        );
        assert_eq!(
            failure_label("message body of 9 bytes exceeds amqp.max_message_bytes (1)"),
            "too_large"
        );
        assert_eq!(
            failure_label("malformed row: payload is not valid JSON"),
            "malformed"
        );
    }

    #[test]
    fn a_blocked_head_is_not_scheduled_until_requeued() {
        let mut p = Parked::default();
        p.adopt(head(2, 0, true));
        assert!(p.is_parked(AggregateKey(2)));
        assert!(p.next_due().is_none());
        p.adopt(head(2, 0, false));
        assert!(p.next_due().is_some());
    }
}
