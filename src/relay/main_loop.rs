//! The relay loop and its dispatch: one biased `select!` over shutdown, the
//! sink's answers, the store's answers, timers and WAL (its priority order in a
//! comment there); the loop's state is [`Relay`], whose other methods live in
//! `wal.rs` (WAL in), `answers.rs` (the broker's answers) and `liveness.rs`
//! (signs of life, reconnecting the stream).

use super::marks::{self, Marks};
use super::parked::Parked;
use super::signs::Liveness;
use super::startup;
use super::window::Window;
use crate::config::{Config, OnSuccess};
use crate::error::Error;
use crate::failure::Failure;
use crate::metrics::{self, Health, Problem};
use crate::outbox_table::housekeeping::Chore;
use crate::progress::Tracker;
use crate::retry::{Load, Park, StoreCommand, StoreEvent};
use crate::sink::{SinkCommand, SinkEvent};
use crate::source::{Decoder, SourceSettings};
use crate::time::sleep_until_opt;
use futures_util::FutureExt;
use lapin::types::ShortString;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most WAL events handled in one turn of the main loop.
pub(super) const WAL_BATCH: usize = 256;

/// Acked ids wait at most this long before they go to the on_success batch.
pub(super) const HAND_OVER_AFTER: Duration = Duration::from_millis(50);

/// Acked ids held when housekeeping cannot take them (Postgres slow or away):
/// past this many, WAL reading stops.
pub(super) const MAX_SUCCEEDED: usize = 100_000;

/// The loop's state: the window and the parked set it drives, the transactions
/// it tracks, and the channels to the tasks that own the connections.
pub(super) struct Relay {
    pub(super) config: Config,
    pub(super) window: Window,
    pub(super) tracker: Tracker,
    pub(super) decoder: Decoder,
    pub(super) source_settings: SourceSettings,
    pub(super) client: ReplicationClient,
    /// The newest LSN set as applied on the client.
    pub(super) applied: Lsn,
    /// Commit time (Postgres epoch, µs) of the open transaction.
    pub(super) commit_time: i64,
    /// `postgres.source = "messages"`: the outbox is logical decoding messages.
    pub(super) messages_source: bool,
    pub(super) sink: mpsc::Sender<SinkCommand>,
    /// Retry outcomes and on_success batches for the store.
    pub(super) store: mpsc::Sender<StoreCommand>,
    /// Retry loads, served by the store after everything else.
    pub(super) loads: mpsc::Sender<Load>,
    /// Parks, served by the store before anything else (they hold window and LSN).
    pub(super) parks: mpsc::Sender<Park>,
    pub(super) parked: Parked,
    /// The retry state is being read (at start-up, after a reconnect): no WAL until it is.
    pub(super) heads_pending: bool,
    /// on_success for acked stream messages, straight to the housekeeping task.
    pub(super) chores: mpsc::Sender<Chore>,
    pub(super) heartbeat: startup::Heartbeat,
    /// Counts up when the retry store finds Postgres shutting down.
    pub(super) server_stopping: tokio::sync::watch::Receiver<u64>,
    /// The newest hand-over of acked ids whose rows all have their
    /// `on_success` applied (the housekeeping task's answer).
    pub(super) marked: tokio::sync::watch::Receiver<u64>,
    /// How far the slot may be confirmed while acked rows wait for marks.
    pub(super) marks: Marks,
    /// The newest LSN the server was told (`applied`, held back while the rows
    /// it covers are not marked yet).
    pub(super) reported: Lsn,
    /// When the replication stream and the LSN last showed signs of life.
    pub(super) liveness: Liveness,
    pub(super) dead_letter_exchange: Option<ShortString>,
    /// The broker's frame size: a message whose header frame is larger is refused.
    pub(super) frame_max: usize,
    /// Messages the broker closed a channel for: their retries go out alone.
    pub(super) refused: RefusedIds,
    /// `/readyz` says the relay is probing for a message the broker refused.
    pub(super) probing_reported: bool,
    /// `/readyz` says publishing is paused for a routing fault.
    pub(super) routing_reported: bool,
    /// Ids acked since the last hand-over to the store's batched on_success update.
    pub(super) succeeded: Vec<String>,
    /// When the oldest of them was acked: handed over `HAND_OVER_AFTER` later at the latest.
    pub(super) succeeded_since: Option<Instant>,
    /// `on_success` does something with acked rows (not `keep`).
    pub(super) collect_succeeded: bool,
    pub(super) health: Arc<Health>,
}

/// The replication stream the relay reads, as `wiring` took it.
pub(super) struct Stream {
    pub(super) client: ReplicationClient,
    pub(super) settings: SourceSettings,
    pub(super) start_lsn: Lsn,
    pub(super) heartbeat: startup::Heartbeat,
    /// Counts up when the retry store finds Postgres shutting down.
    pub(super) server_stopping: tokio::sync::watch::Receiver<u64>,
    /// The newest hand-over of acked ids whose rows all have their `on_success` applied.
    pub(super) marked: tokio::sync::watch::Receiver<u64>,
}

/// The senders to the tasks that own the connections.
pub(super) struct Channels {
    pub(super) sink: mpsc::Sender<SinkCommand>,
    pub(super) store: mpsc::Sender<StoreCommand>,
    pub(super) loads: mpsc::Sender<Load>,
    pub(super) parks: mpsc::Sender<Park>,
    pub(super) chores: mpsc::Sender<Chore>,
}

impl Relay {
    /// The loop's state at the start: nothing in flight, the retry state still
    /// to be read (no WAL until it is).
    pub(super) fn new(
        config: Config,
        health: Arc<Health>,
        stream: Stream,
        channels: Channels,
        frame_max: usize,
    ) -> Relay {
        Relay {
            window: Window::new(
                config.relay.ordering,
                config.amqp.max_in_flight,
                config.amqp.max_in_flight_bytes,
                config.retry.publish_timeout,
            )
            .with_probe_max(config.amqp.reconnect_backoff_max),
            tracker: Tracker::new(),
            decoder: Decoder::new(
                config.postgres.table.clone(),
                config.postgres.columns.clone(),
            ),
            source_settings: stream.settings,
            client: stream.client,
            applied: stream.start_lsn,
            commit_time: 0,
            messages_source: config.postgres.source == crate::config::Source::Messages,
            sink: channels.sink,
            store: channels.store,
            loads: channels.loads,
            parks: channels.parks,
            parked: Parked::new(config.amqp.max_in_flight_bytes / 2),
            heads_pending: true,
            chores: channels.chores,
            heartbeat: stream.heartbeat,
            server_stopping: stream.server_stopping,
            marked: stream.marked,
            marks: Marks::new(stream.start_lsn, Instant::now()),
            reported: stream.start_lsn,
            liveness: Liveness::new(),
            dead_letter_exchange: config
                .amqp
                .dead_letter_exchange
                .as_deref()
                .map(ShortString::from),
            frame_max,
            refused: RefusedIds::default(),
            probing_reported: false,
            routing_reported: false,
            succeeded: Vec::new(),
            succeeded_since: None,
            collect_succeeded: config.postgres.on_success != OnSuccess::Keep,
            health,
            config,
        }
    }
}

/// Ids of messages the broker closed a channel for, most recent last (bounded):
/// their retries and dead-letter copies are published alone on the isolated
/// channel, so they cannot take other publishes down with them again.
#[derive(Default)]
pub(super) struct RefusedIds {
    order: std::collections::VecDeque<String>,
}

impl RefusedIds {
    const CAPACITY: usize = 1024;

    pub(super) fn insert(&mut self, id: String) {
        if !self.contains(&id) {
            if self.order.len() == Self::CAPACITY {
                self.order.pop_front();
            }
            self.order.push_back(id);
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.order.iter().any(|r| r == id)
    }

    pub(super) fn remove(&mut self, id: &str) {
        if !self.order.is_empty() {
            self.order.retain(|r| r != id);
        }
    }
}

/// What handling one replication event asks of the loop.
pub(super) enum WalStep {
    Continue,
    /// The stream must be reconnected (the server replays what was not applied).
    StreamLost(String),
    /// The relay cannot go on.
    Fatal(Error),
}

impl Relay {
    pub(super) async fn main_loop(
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
                self.marks.deadline(),
                self.liveness_timer(),
            ]
            .into_iter()
            .flatten()
            .min();
            // Priority, highest first: shutdown, confirms (they free the window and
            // move the LSN), retry-state answers, Postgres shutting down (the
            // stream is let go), retries and timeouts due, WAL
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
                        return Err(Error::TaskEnded("broker"));
                    };
                    self.on_sink_event(ev).await;
                }
                ev = store_events.recv() => {
                    let Some(ev) = ev else {
                        return Err(Error::TaskEnded("retry-state"));
                    };
                    self.on_store_event(ev).await;
                }
                Ok(()) = self.marked.changed() => {
                    let seq = *self.marked.borrow_and_update();
                    self.marks.marked(seq, Instant::now());
                    self.report();
                }
                Ok(()) = self.server_stopping.changed(), if draining_until.is_none() => {
                    // Postgres shuts down only once its walsender's client confirmed
                    // everything sent, which may need the retry store, which needs
                    // Postgres: let the stream go (what is unconfirmed is read again).
                    let reason = "Postgres is shutting down (the retry store's session was ended or refused): letting the replication stream go so the server can stop".to_string();
                    let resumed = self.reconnect_source(reason, &mut shutdown).await?;
                    self.server_stopping.borrow_and_update();
                    if !resumed {
                        draining_until = Some(Instant::now());
                    }
                }
                _ = sleep_until_opt(next_timer) => {
                    if let Some(reason) = self.on_timers(loads).await {
                        if !self.reconnect_source(reason, &mut shutdown).await? {
                            draining_until = Some(Instant::now());
                        }
                    }
                }
                ev = self.client.recv(), if read_wal => {
                    if let Some(reason) = self.read_wal(ev).await? {
                        if !self.reconnect_source(reason, &mut shutdown).await? {
                            draining_until = Some(Instant::now());
                        }
                    }
                }
            }
            self.after_turn(draining_until.is_none()).await;
        }
        self.hand_over_succeeded(1);
        self.finish().await;
        Ok(())
    }

    /// Handles `first` and whatever else is already buffered, in the same turn
    /// (up to `WAL_BATCH`, while the window has room): fewer wake-ups, and the
    /// sink gets its publishes in bursts. `Some`: the stream is lost, why.
    async fn read_wal(
        &mut self,
        first: Result<Option<ReplicationEvent>, pgwire_replication::PgWireError>,
    ) -> Result<Option<String>, Error> {
        let mut next = Some(first);
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
                WalStep::StreamLost(reason) => return Ok(Some(reason)),
            }
            handled += 1;
            if handled < WAL_BATCH && self.window.has_room() {
                next = self.client.recv().now_or_never();
            }
        }
        Ok(None)
    }

    /// After each turn: publish what is ready, hand publishes to the sink, say
    /// what changed in `/readyz`, move the LSN, hand acked ids to housekeeping.
    async fn after_turn(&mut self, reading: bool) {
        if reading {
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

    /// Says in `/readyz`, the log and `outbox_relay_paused` when publishing
    /// pauses for a routing fault, and when it resumes.
    pub(super) fn report_routing(&mut self) {
        let paused = self.window.routing_paused();
        if paused == self.routing_reported {
            return;
        }
        self.routing_reported = paused;
        metrics::metrics().set_paused(metrics::Pause::Routing, paused);
        match self.window.routing_fault() {
            Some(fault) if paused => {
                let exchange = &self.config.amqp.exchange;
                let hint = match fault.kind {
                    "returned" => format!("exchange {exchange:?} routes nothing (check its bindings and queues)"),
                    "nack" => "the broker refuses to store them (a quorum queue without a leader or majority, a full queue with overflow = reject-publish, or a channel that nacks everything: each probe goes out on a new connection, from the next node of amqp.url)".to_string(),
                    _ => "the broker confirms nothing (overloaded, or a stuck connection: each probe goes out on a new connection, from the next node of amqp.url)".to_string(),
                };
                let why = format!(
                    "{fault}: {hint}. Publishing is paused: nothing is counted against the messages (no retry spent, nothing dead-lettered); a held message is published again as a probe, every {:?} at most, and everything resumes once one is acked",
                    self.config.amqp.reconnect_backoff_max
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
    pub(super) fn flush_publishes(&mut self) {
        for p in self.window.take_publishes() {
            let cmd = SinkCommand::Publish {
                seq: p.seq,
                generation: p.generation,
                message: p.message,
                isolated: p.isolated,
            };
            to_sink(&self.sink, cmd);
        }
        if let Some(generation) = self.window.take_renewal() {
            tracing::warn!(
                generation,
                "every publish is nacked or unanswered: replacing the broker connection (from the next node) before the next probe"
            );
            to_sink(&self.sink, SinkCommand::Renew { generation });
        }
    }

    /// Due timers; returns why the replication stream must be reconnected, if it must.
    pub(super) async fn on_timers(&mut self, loads: bool) -> Option<String> {
        self.report();
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

    /// Passes acked ids to the store in batches, without ever waiting on it: when its
    /// queue is full (say, Postgres is restarting) the ids wait here for the next try.
    pub(super) fn hand_over_succeeded(&mut self, at_least: usize) {
        if self.succeeded.len() < at_least || self.succeeded.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.succeeded);
        let seq = Some(self.marks.next_seq());
        match self.chores.try_send(Chore::Succeeded { ids, seq }) {
            Err(mpsc::error::TrySendError::Full(Chore::Succeeded { ids, .. })) => {
                // Try again in HAND_OVER_AFTER (WAL reading stops at MAX_SUCCEEDED).
                self.succeeded = ids;
                self.succeeded_since = Some(Instant::now());
            }
            _ => {
                self.succeeded_since = None;
                self.marks.handed_over(self.applied);
            }
        }
    }

    /// Tells the server the newest position it may forget: `applied`, but not
    /// past rows whose `on_success` is not applied yet (`marks`; with
    /// `on_success = "keep"` there is nothing to apply). When the marks do not
    /// move for `marks::WAIT_MAX`, the slot is confirmed without them (a relay
    /// killed then leaves those rows `pending`); never so at a stop.
    pub(super) fn report(&mut self) {
        self.report_as(true);
    }

    fn report_as(&mut self, may_give_up: bool) {
        let safe = self.marks.safe(
            self.applied,
            !self.succeeded.is_empty(),
            Instant::now(),
            may_give_up,
        );
        if safe.gave_up {
            tracing::warn!(applied = %self.applied, confirmed = %safe.lsn, wait = ?marks::WAIT_MAX, "acked rows are not being marked (on_success): the slot is confirmed without waiting for them; a relay killed before they are marked leaves them pending");
        }
        if safe.lsn > self.reported {
            self.reported = safe.lsn;
            self.client.update_applied_lsn(safe.lsn);
            metrics::metrics()
                .confirmed_lsn
                .set(safe.lsn.as_u64() as f64);
        }
    }

    pub(super) fn advance(&mut self) {
        if let Some(lsn) = self.tracker.advance() {
            if lsn > self.applied {
                self.set_applied(lsn);
            }
        }
    }

    /// Waits (a few seconds at most) for the delivered rows to be marked, makes
    /// sure the server heard the final position, then ends the stream.
    pub(super) async fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seq = *self.marked.borrow_and_update();
            self.marks.marked(seq, Instant::now());
            if self.marks.all_marked() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.report_as(false);
        if self.reported < self.applied {
            tracing::warn!(applied = %self.applied, marked = %self.reported, "delivered rows not marked yet at stop: the next start publishes them again");
        }
        let metrics = self.client.metrics();
        let deadline =
            Instant::now() + self.config.postgres.status_interval + Duration::from_secs(2);
        while metrics.last_applied_lsn() < self.reported
            && Instant::now() < deadline
            && self.client.is_running()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reported = metrics.last_applied_lsn();
        if reported < self.reported {
            tracing::warn!(applied = %self.reported, %reported, "final status update not confirmed; the next start replays from the slot");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
        tracing::info!(applied = %self.applied, "stopped");
    }
}

/// Hands `cmd` to the sink. The command channel holds twice the window: this
/// never waits in practice, and the sink always drains it. A closed channel
/// means the sink ended, which the main loop learns from the event channel.
fn to_sink(sink: &mpsc::Sender<SinkCommand>, cmd: SinkCommand) {
    if let Err(mpsc::error::TrySendError::Full(cmd)) = sink.try_send(cmd) {
        let sink = sink.clone();
        tokio::spawn(async move {
            let _ = sink.send(cmd).await;
        });
    }
}
