//! The relay loop: WAL in, AMQP out, LSN forward only behind broker acks or
//! durable retry state. This file is the loop and its dispatch; the state it
//! drives lives in its own rooms:
//!
//! - [`window`]: the in-flight window, per-aggregate turns, byte and message
//!   accounting, publish deadlines;
//! - [`parked`]: which aggregates have retry state and which heads are due;
//! - [`retries`]: parking messages and re-publishing retried heads;
//! - [`startup`]: preflight, slot take-over and standby wait, heartbeat;
//! - [`wiring`]: `run`, which starts the tasks and channels and hands them to the loop.
//!
//! One row's path: `source` hands an XLogData payload to the decoder, which
//! makes an `OutboxEvent`; `sink::format` turns it into an AMQP message; the
//! window admits it and, when its aggregate is free, publishes it through the
//! sink task; the sink's confirm comes back here and resolves the message in the
//! `progress::Tracker`; once its transaction and all earlier ones are resolved
//! and committed, the commit's end LSN is set as applied on the replication
//! client, whose worker reports it to the server.

mod fastmap;
mod parked;
mod retries;
mod routing;
mod startup;
mod window;
mod wiring;

pub use wiring::run;

pub use startup::heartbeat_application_name;

use crate::amqp::AmqpSettings;
use crate::config::{Config, OnSuccess};
use crate::error::Error;
use crate::event::{OutboxEvent, Row};
use crate::failure::Failure;
use crate::metrics::{self, Health, Problem};
use crate::outbox_table::housekeeping::{
    housekeeping_application_name, Chore, Housekeeping, HousekeepingSettings,
};
use crate::pg::connect::session_timeouts;
use crate::progress::{Tracker, TxnId};
use crate::retry::{Load, Park, Store, StoreCommand, StoreEvent, StoreSettings};
use crate::sink::{self, SinkCommand, SinkEvent};
use crate::source::{decode::DecodeError, Decoded, Decoder, SourceSettings};
use crate::time::{now_micros, sleep_until_opt, PG_EPOCH_OFFSET_MICROS};
use futures_util::FutureExt;
use lapin::types::ShortString;
use parked::{Parked, MAX_LOADING};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use window::{Admitted, Origin, ParkCause, Resolved, Window};

/// Most WAL events handled in one turn of the main loop.
const WAL_BATCH: usize = 256;

/// Acked ids wait at most this long before they go to the on_success batch.
const HAND_OVER_AFTER: Duration = Duration::from_millis(50);

/// Acked ids held when housekeeping cannot take them (Postgres slow or away):
/// past this many, WAL reading stops.
const MAX_SUCCEEDED: usize = 100_000;

/// The loop's state: the window and the parked set it drives, the transactions
/// it tracks, and the channels to the tasks that own the connections.
struct Relay {
    config: Config,
    window: Window,
    tracker: Tracker,
    decoder: Decoder,
    source_settings: SourceSettings,
    client: ReplicationClient,
    /// The newest LSN set as applied on the client.
    applied: Lsn,
    /// Commit time (Postgres epoch, µs) of the open transaction.
    commit_time: i64,
    sink: mpsc::Sender<SinkCommand>,
    /// Retry outcomes and on_success batches for the store.
    store: mpsc::Sender<StoreCommand>,
    /// Retry loads, served by the store after everything else.
    loads: mpsc::Sender<Load>,
    /// Parks, served by the store before anything else (they hold window and LSN).
    parks: mpsc::Sender<Park>,
    parked: Parked,
    /// The retry state is being read (at start-up, after a reconnect): no WAL until it is.
    heads_pending: bool,
    /// on_success for acked stream messages, straight to the housekeeping task.
    chores: mpsc::Sender<Chore>,
    heartbeat: startup::Heartbeat,
    /// When the replication stream and the LSN last showed signs of life.
    liveness: Liveness,
    dead_letter_exchange: Option<ShortString>,
    /// The broker's frame size: a message whose header frame is larger is refused.
    frame_max: usize,
    /// Messages the broker closed a channel for: their retries go out alone.
    refused: RefusedIds,
    /// `/readyz` says the relay is probing for a message the broker refused.
    probing_reported: bool,
    /// `/readyz` says publishing is paused for a routing fault.
    routing_reported: bool,
    /// Ids acked since the last hand-over to the store's batched on_success update.
    succeeded: Vec<String>,
    /// When the oldest of them was acked: handed over `HAND_OVER_AFTER` later at the latest.
    succeeded_since: Option<Instant>,
    /// `on_success` does something with acked rows (not `keep`).
    collect_succeeded: bool,
    health: Arc<Health>,
}

/// Ids of messages the broker closed a channel for, most recent last (bounded):
/// their retries and dead-letter copies are published alone on the isolated
/// channel, so they cannot take other publishes down with them again.
#[derive(Default)]
struct RefusedIds {
    order: std::collections::VecDeque<String>,
}

impl RefusedIds {
    const CAPACITY: usize = 1024;

    fn insert(&mut self, id: String) {
        if !self.contains(&id) {
            if self.order.len() == Self::CAPACITY {
                self.order.pop_front();
            }
            self.order.push_back(id);
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.order.iter().any(|r| r == id)
    }

    fn remove(&mut self, id: &str) {
        if !self.order.is_empty() {
            self.order.retain(|r| r != id);
        }
    }
}

/// Signs of life: of the replication connection (while the relay reads it) and
/// of progress (the applied LSN moving while work is pending).
struct Liveness {
    /// The last replication event, or when the relay started reading again.
    last_wal: Instant,
    reading: bool,
    probed: bool,
    /// The applied LSN last moved, or nothing was pending.
    last_progress: Instant,
    stalled: bool,
}

impl Liveness {
    fn new() -> Self {
        let now = Instant::now();
        Liveness {
            last_wal: now,
            reading: false,
            probed: false,
            last_progress: now,
            stalled: false,
        }
    }

    fn wal_event(&mut self) {
        self.last_wal = Instant::now();
        self.probed = false;
    }

    /// Silence only counts while the relay reads the stream.
    fn reading(&mut self, reading: bool) {
        if reading && !self.reading {
            self.wal_event();
        }
        self.reading = reading;
    }
}

/// What handling one replication event asks of the loop.
enum WalStep {
    Continue,
    /// The stream must be reconnected (the server replays what was not applied).
    StreamLost(String),
    /// The relay cannot go on.
    Fatal(Error),
}

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
            // Draining: what is on the wire or being parked gets its answer; messages
            // that wait (for the broker, a backoff or their turn) are replayed next time.
            if draining_until.is_some()
                && !self.window.has_unanswered()
                && self.parked.parking() == 0
            {
                break;
            }
            let read_wal = draining_until.is_none()
                && !self.heads_pending
                && self.window.has_room()
                && self.succeeded.len() < MAX_SUCCEEDED;
            // Due heads only count as a timer while a load can start: a past due time
            // that cannot be served would wake the loop for nothing, ahead of the WAL.
            let loads =
                draining_until.is_none() && self.window.has_room() && self.parked.can_load();
            self.liveness.reading(read_wal);
            let next_timer = [
                self.window.next_timer(),
                self.parked.next_due().filter(|_| loads),
                self.succeeded_since.map(|t| t + HAND_OVER_AFTER),
                self.liveness_timer(),
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
                    tracing::info!(in_flight = self.window.len(), ?timeout, "shutting down: stopped reading WAL, waiting for outstanding confirms");
                    draining_until = Some(Instant::now() + timeout);
                }
                _ = sleep_until_opt(draining_until) => {
                    tracing::warn!(unconfirmed = self.window.len(), "shutdown timeout reached; unconfirmed messages are re-published on the next start");
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
                    if let Some(reason) = self.on_timers(loads).await {
                        if !self.reconnect_source(reason, &mut shutdown).await? {
                            draining_until = Some(Instant::now());
                        }
                    }
                }
                ev = self.client.recv(), if read_wal => {
                    // Whatever else is already buffered is handled in the same turn (up
                    // to WAL_BATCH, while the window has room): fewer wake-ups, and the
                    // sink gets its publishes in bursts.
                    let mut next = Some(ev);
                    let mut handled = 0;
                    self.liveness.wal_event();
                    while let Some(ev) = next.take() {
                        let step = match ev {
                            Ok(Some(ev)) => self.on_wal_event(ev).await,
                            Ok(None) => WalStep::StreamLost("the server ended the replication stream".into()),
                            Err(e) => WalStep::StreamLost(e.to_string()),
                        };
                        match step {
                            WalStep::Continue => {}
                            WalStep::Fatal(e) => return Err(e),
                            WalStep::StreamLost(reason) => {
                                if !self.reconnect_source(reason, &mut shutdown).await? {
                                    draining_until = Some(Instant::now());
                                }
                                break;
                            }
                        }
                        handled += 1;
                        if handled < WAL_BATCH && self.window.has_room() {
                            next = self.client.recv().now_or_never();
                        }
                    }
                }
            }
            if draining_until.is_none() {
                self.publish_ready().await;
            }
            self.flush_publishes();
            self.report_routing();
            if self.probing_reported && self.window.suspects() == 0 {
                tracing::info!("every message the broker might have refused has an answer: publishing normally again");
                self.health.set_problem(Problem::BrokerUnavailable, None);
                self.probing_reported = false;
            }
            self.advance();
            self.check_progress();
            self.hand_over_succeeded(256);
            let m = metrics::metrics();
            m.inflight.set(self.window.len() as i64);
            m.inflight_bytes.set(self.window.bytes() as i64);
        }
        self.hand_over_succeeded(1);
        self.finish().await;
        Ok(())
    }

    /// Says in `/readyz`, the log and `outbox_relay_paused` when publishing
    /// pauses for a routing fault, and when it resumes.
    fn report_routing(&mut self) {
        let paused = self.window.routing_paused();
        if paused == self.routing_reported {
            return;
        }
        self.routing_reported = paused;
        metrics::metrics().set_paused(metrics::Pause::Routing, paused);
        match self.window.routing_fault() {
            Some(fault) if paused => {
                let why = format!(
                    "{fault}: exchange {:?} routes nothing (check its bindings and queues). Publishing is paused: nothing is counted against the messages (no retry spent, nothing dead-lettered); a held message is published again as a probe, every {:?} at most, and everything resumes once one is acked",
                    self.config.amqp.exchange, self.config.amqp.reconnect_backoff_max
                );
                tracing::warn!("{why}");
                self.health.set_problem(Problem::Routing, Some(why));
            }
            _ => {
                tracing::info!("the broker routes again: publishing what was held");
                self.health.set_problem(Problem::Routing, None);
            }
        }
    }

    /// Hands what the window decided to publish to the sink task.
    fn flush_publishes(&mut self) {
        for p in self.window.take_publishes() {
            let cmd = SinkCommand::Publish {
                seq: p.seq,
                generation: p.generation,
                message: p.message,
                isolated: p.isolated,
            };
            // The command channel holds twice the window: this never waits in practice,
            // and the sink always drains it. A closed channel means the sink ended, which
            // the main loop learns from the event channel.
            if let Err(mpsc::error::TrySendError::Full(cmd)) = self.sink.try_send(cmd) {
                let sink = self.sink.clone();
                tokio::spawn(async move {
                    let _ = sink.send(cmd).await;
                });
            }
        }
    }

    /// Handles one replication event.
    async fn on_wal_event(&mut self, ev: ReplicationEvent) -> WalStep {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                if self.tracker.current().is_some() {
                    return WalStep::StreamLost("Begin inside an open transaction".into());
                }
                self.tracker.begin();
                self.commit_time = commit_time_micros;
            }
            ReplicationEvent::XLogData { data, .. } => {
                let decoded = match self.decoder.decode(data) {
                    Ok(d) => d,
                    Err(DecodeError::ColumnsMissing { table, missing }) => {
                        return WalStep::Fatal(Error::ColumnsMissing { table, missing })
                    }
                    Err(other) => return WalStep::Fatal(Error::Decode(other.to_string())),
                };
                let Some(txn) = self.tracker.current() else {
                    return match decoded {
                        Decoded::Ignored => WalStep::Continue,
                        _ => WalStep::Fatal(Error::Decode(
                            "an insert arrived outside a transaction".into(),
                        )),
                    };
                };
                match decoded {
                    Decoded::Ignored => {}
                    Decoded::Event(event) => self.admit_stream_event(Arc::new(event), txn).await,
                    Decoded::Malformed(row) => {
                        tracing::warn!(id = %row.id, reason = %row.reason, "malformed outbox row: parked in retry state");
                        let cause = ParkCause {
                            failure: Some(Failure::Malformed(row.reason.clone())),
                            not_before: None,
                        };
                        self.admit_stream(Row::Malformed(row), None, txn, Some(cause))
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
                return WalStep::StreamLost(format!("stream stopped at {reached}"));
            }
        }
        WalStep::Continue
    }

    async fn admit_stream_event(&mut self, event: Arc<OutboxEvent>, txn: TxnId) {
        let delayed = event
            .scheduled_at
            .as_deref()
            .and_then(crate::time::pg_timestamp_to_unix_micros)
            .filter(|d| *d > now_micros());
        let (message, failure) = match self.encode(&event, self.commit_time) {
            Ok(message) => (Some(message), None),
            Err((message, failure)) => (message, Some(failure)),
        };
        let cause = (failure.is_some() || delayed.is_some()).then_some(ParkCause {
            failure,
            not_before: delayed,
        });
        self.admit_stream(Row::Event(event), message, txn, cause)
            .await;
    }

    /// The AMQP message of an event, or why it cannot be published (with the
    /// message when it could be encoded). A body that is surely too large is
    /// refused before it is encoded; headers are checked against the broker's
    /// `frame_max`.
    fn encode(
        &self,
        event: &OutboxEvent,
        commit_time: i64,
    ) -> Result<Arc<sink::OutboundMessage>, (Option<Arc<sink::OutboundMessage>>, Failure)> {
        let limit = self.config.amqp.max_message_bytes;
        let at_least = sink::format::body_len_at_least(event);
        if at_least > limit {
            return Err((
                None,
                Failure::TooLarge {
                    bytes: at_least,
                    limit,
                },
            ));
        }
        let message = match sink::format::encode(event, commit_time) {
            Ok(m) => Arc::new(m),
            Err(e) => return Err((None, Failure::Unsendable(e.0))),
        };
        if message.body.len() > limit {
            let bytes = message.body.len();
            return Err((Some(message), Failure::TooLarge { bytes, limit }));
        }
        if message.header_len > self.frame_max {
            let bytes = message.header_len;
            let frame_max = self.frame_max;
            return Err((Some(message), Failure::HeadersTooLarge { bytes, frame_max }));
        }
        Ok(message)
    }

    /// Admits a stream message: parked behind its aggregate when that one has retry
    /// state, parked now when it has a cause of its own, else published.
    async fn admit_stream(
        &mut self,
        row: Row,
        message: Option<Arc<sink::OutboundMessage>>,
        txn: TxnId,
        cause: Option<ParkCause>,
    ) {
        self.tracker.add_message(txn);
        let origin = Origin::Stream {
            txn,
            commit_time: self.commit_time,
        };
        if self.parked.is_parked(row.key()) {
            let seq = self.window.admit_parking(row, message, origin, cause);
            self.park(vec![seq]).await;
            return;
        }
        match self.window.admit(row, message, origin, cause) {
            Admitted::Sent | Admitted::Queued => {}
            Admitted::Park(seqs) => self.park(seqs).await,
        }
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
        self.liveness.last_progress = Instant::now();
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
                    if !self.window.is_published(seq, generation) {
                        continue; // a stale confirm: the message was re-sent or already handled
                    }
                    match Failure::from_outcome(outcome) {
                        None => self.on_acked(seq).await,
                        Some(failure) => self.on_failed(seq, failure).await,
                    }
                }
            }
            SinkEvent::Down {
                generation,
                reason,
                refusal,
            } => {
                tracing::warn!(generation, %reason, in_flight = self.window.len(), "broker down: stopped reading WAL until it is back");
                self.health.set_broker(false);
                self.health.set_problem(Problem::BrokerBlocked, None);
                let culprit = self.window.on_down(generation, refusal.is_some());
                match (culprit, refusal) {
                    (Some(seq), Some(r)) => {
                        // Published alone, and the broker closed the connection: this one.
                        self.on_failed(
                            seq,
                            Failure::Refused {
                                reply_code: r.reply_code,
                                reply_text: r.reply_text,
                            },
                        )
                        .await;
                    }
                    (None, Some(r)) => {
                        let why = format!(
                            "the broker closed the connection in answer to a publish ({} {}): re-publishing the {} unanswered message(s) one at a time to find it",
                            r.reply_code,
                            r.reply_text,
                            self.window.suspects()
                        );
                        tracing::warn!("{why}");
                        self.health
                            .set_problem(Problem::BrokerUnavailable, Some(why));
                        self.probing_reported = true;
                    }
                    _ => {}
                }
            }
            SinkEvent::Up {
                generation,
                frame_max,
            } => {
                self.health.set_broker(true);
                self.frame_max = frame_max;
                if generation > 1 {
                    metrics::metrics().reconnect("amqp");
                }
                let count = self.window.on_up(generation);
                if count > 0 {
                    tracing::info!(
                        generation,
                        count,
                        probing = self.window.probing().is_some(),
                        "broker back: re-publishing unconfirmed messages"
                    );
                }
            }
            SinkEvent::Blocked { generation, reason } => {
                if self.window.generation_is(generation) {
                    self.health.set_problem(
                        Problem::BrokerBlocked,
                        Some(format!("the broker blocks publishing ({reason}): waiting, publish deadlines suspended")),
                    );
                    self.window.suspend();
                }
            }
            SinkEvent::Unblocked { generation } => {
                if self.window.generation_is(generation) {
                    self.health.set_problem(Problem::BrokerBlocked, None);
                    self.window.resume();
                }
            }
        }
    }

    async fn on_acked(&mut self, seq: u64) {
        self.window.routed(seq);
        let Some(Resolved { entry, park }) = self.window.resolve(seq) else {
            return;
        };
        self.park(park).await;
        let (row, _, origin) = entry.into_parts();
        self.refused.remove(row.id());
        let m = metrics::metrics();
        match origin {
            Origin::Stream { txn, commit_time } => {
                m.published.inc();
                let latency_micros = now_micros() - (commit_time + PG_EPOCH_OFFSET_MICROS);
                m.delivery_latency
                    .observe(latency_micros.max(0) as f64 / 1e6);
                self.tracker.resolve(txn);
                if let (Row::Event(e), true) = (&row, self.collect_succeeded) {
                    if self.succeeded.is_empty() {
                        self.succeeded_since = Some(Instant::now());
                    }
                    self.succeeded.push(e.id.clone());
                }
            }
            Origin::Retry {
                key, parked_seq, ..
            } => {
                m.published.inc();
                self.retry_delivered(key, &row, parked_seq).await;
            }
            Origin::DeadLetter {
                key,
                parked_seq,
                attempts,
                reason,
            } => {
                tracing::warn!(id = %row.id(), attempts, %reason, "dead-lettered");
                self.retry_dead(key, &row, parked_seq, attempts, reason)
                    .await;
            }
        }
    }

    /// A publish failed (nack, return, timeout, refusal).
    async fn on_failed(&mut self, seq: u64, failure: Failure) {
        if self.window.unrouted(seq, &failure) {
            // Part of a systemic fault: held in the window, not charged.
            metrics::metrics().failure(failure.label());
            return;
        }
        let Some((origin, id)) = self
            .window
            .entry(seq)
            .map(|e| (e.origin().clone(), e.row().id().to_string()))
        else {
            return;
        };
        if matches!(failure, Failure::Refused { .. }) {
            self.refused.insert(id);
        }
        match origin {
            Origin::Stream { .. } => {
                if let Some(e) = self.window.entry(seq) {
                    tracing::warn!(id = %e.row().id(), reason = %failure, "publish failed: parking in retry state");
                }
                let seqs = self.window.fail_stream(seq, failure);
                self.park(seqs).await;
            }
            Origin::Retry {
                key,
                parked_seq,
                attempts,
                max_retries,
            } => {
                let Some(Resolved { entry, park }) = self.window.resolve(seq) else {
                    return;
                };
                self.park(park).await;
                let (row, message, _) = entry.into_parts();
                self.retry_failed(
                    key,
                    row,
                    message,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    failure,
                )
                .await;
            }
            Origin::DeadLetter { .. } => {
                let delay = crate::time::backoff(
                    self.config.retry.backoff_base,
                    self.config.retry.backoff_max,
                    1,
                );
                if let Some(e) = self.window.entry(seq) {
                    tracing::warn!(id = %e.row().id(), reason = %failure, retry_in = ?delay, "dead-letter publish failed; retrying");
                }
                self.window.backoff(seq, delay);
            }
        }
    }

    /// Due timers; returns why the replication stream must be reconnected, if it must.
    async fn on_timers(&mut self, loads: bool) -> Option<String> {
        let now = Instant::now();
        if self
            .succeeded_since
            .is_some_and(|t| t + HAND_OVER_AFTER <= now)
        {
            self.hand_over_succeeded(1);
        }
        let after = self.config.retry.publish_timeout;
        for seq in self.window.expired(now) {
            self.on_failed(seq, Failure::Timeout { after }).await;
        }
        self.window.fire_backoffs(now);
        self.window.fire_routing_probe(now);
        if loads {
            self.load_due(now).await;
        }
        self.check_progress();
        self.check_stream(now)
    }

    /// The next liveness deadline: the probe, the reconnect, the stall report.
    fn liveness_timer(&self) -> Option<Instant> {
        let timeout = self.config.postgres.replication_timeout;
        let l = &self.liveness;
        let stream = l.reading.then(|| {
            if l.probed {
                l.last_wal + timeout
            } else {
                l.last_wal + timeout / 2
            }
        });
        let stall = (!self.tracker.is_idle() && !l.stalled)
            .then(|| l.last_progress + self.config.relay.stall_timeout);
        [stream, stall].into_iter().flatten().min()
    }

    /// Half the replication timeout silent: ask the server for a sign of life; all
    /// of it: the connection is dead (a partition TCP has not noticed).
    fn check_stream(&mut self, now: Instant) -> Option<String> {
        let timeout = self.config.postgres.replication_timeout;
        let l = &mut self.liveness;
        if !l.reading {
            return None;
        }
        let silent = now.saturating_duration_since(l.last_wal);
        if silent >= timeout {
            l.wal_event();
            return Some(format!(
                "the replication connection was silent for {silent:?} (postgres.replication_timeout), even after a probe"
            ));
        }
        if silent >= timeout / 2 && !l.probed {
            l.probed = true;
            tracing::debug!(?silent, "replication connection silent: probing");
            self.heartbeat.probe();
        }
        None
    }

    /// Reports (and clears) a stall: work pending while the applied LSN stands still.
    fn check_progress(&mut self) {
        let now = Instant::now();
        if self.tracker.is_idle() {
            self.liveness.last_progress = now;
        }
        let waited = now.saturating_duration_since(self.liveness.last_progress);
        let stalled = waited >= self.config.relay.stall_timeout;
        if stalled && !self.liveness.stalled {
            let why = format!(
                "no progress for {waited:?}: {} transaction(s) wait, {} message(s) in the window, {} park(s) unanswered (relay.stall_timeout)",
                self.tracker.len(),
                self.window.len(),
                self.parked.parking()
            );
            tracing::warn!("{why}");
            self.health.set_problem(Problem::Stalled, Some(why));
        } else if !stalled && self.liveness.stalled {
            self.health.set_problem(Problem::Stalled, None);
        }
        self.liveness.stalled = stalled;
    }

    /// Passes acked ids to the store in batches, without ever waiting on it: when its
    /// queue is full (say, Postgres is restarting) the ids wait here for the next try.
    fn hand_over_succeeded(&mut self, at_least: usize) {
        if self.succeeded.len() < at_least || self.succeeded.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.succeeded);
        match self.chores.try_send(Chore::Succeeded(ids)) {
            Err(mpsc::error::TrySendError::Full(Chore::Succeeded(ids))) => {
                // Try again in HAND_OVER_AFTER (WAL reading stops at MAX_SUCCEEDED).
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
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        tracing::warn!(%reason, dropped = self.window.len(), "replication stream lost; reconnecting, unapplied transactions will be replayed");
        self.health.set_streaming(false);
        self.client.abort();
        self.window.drop_stream_messages();
        self.tracker.reset();
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(false),
                res = startup::open_stream(&self.source_settings, &self.config, self.applied) => match res {
                    Ok((client, start)) => {
                        tracing::info!(start_lsn = %start, "replication stream resumed");
                        metrics::metrics().reconnect("postgres");
                        self.health.set_streaming(true);
                        self.client = client;
                        self.decoder = Decoder::new(
                            self.config.postgres.table.clone(),
                            self.config.postgres.columns.clone(),
                        );
                        // Another relay may have held the slot meanwhile: read the
                        // retry state again before the first WAL message is published.
                        self.heads_pending = true;
                        let _ = self.store.send(StoreCommand::Reload).await;
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
