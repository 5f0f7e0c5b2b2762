//! The main loop: WAL in, AMQP out, LSN forward only behind broker acks.
//!
//! One row's path: `source` hands an XLogData payload to the decoder, which
//! makes an `OutboxEvent`; `sink::format` turns it into an AMQP message; the
//! `Pipeline` below admits it into the in-flight window and, when its aggregate
//! is free, sends it to the sink task; the sink's confirm comes back here,
//! resolves the message in the `progress::Tracker`, and once its transaction
//! and all earlier ones are resolved and committed the commit's end LSN is set
//! as applied on the replication client, whose worker reports it to the server.

use crate::catalog::{self, PgTarget, TableName};
use crate::config::{Config, Ordering};
use crate::error::Error;
use crate::event::ColumnMapping;
use crate::progress::{Tracker, TxnId};
use crate::sink::{
    self, AggregateKey, OutboundMessage, Outcome, SinkCommand, SinkEvent, SinkSettings,
};
use crate::source::{self, decode::DecodeError, Decoded, Decoder, SourceSettings};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use rand::Rng;
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
    let target = PgTarget::parse(config.postgres.url.expose()).map_err(|message| {
        crate::config::ConfigError::Invalid {
            key: "postgres.url".into(),
            message,
        }
    })?;
    let table = TableName::parse(&config.postgres.table).map_err(|message| {
        crate::config::ConfigError::Invalid {
            key: "postgres.table".into(),
            message,
        }
    })?;
    let mapping = ColumnMapping::EVENT_FORGE;

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
    let slot = catalog::ensure_slot(&sql, &config.postgres.slot, &target.dbname, create).await?;
    drop(sql);

    let sink_settings = SinkSettings {
        url: config.amqp.url.expose().to_string(),
        exchange: config.amqp.exchange.clone(),
        declare_exchange: config.amqp.declare_exchange,
        reconnect_backoff_max: config.amqp.reconnect_backoff_max,
    };
    let broker = sink::connect(&sink_settings).await?;

    let source_settings = SourceSettings {
        target: target.clone(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        status_interval: config.postgres.status_interval,
        buffer_events: 4096,
    };
    let start_lsn = slot.confirmed_flush.unwrap_or(Lsn::from_u64(0));
    let client =
        start_waiting_for_slot(&source_settings, start_lsn, config.postgres.slot_wait).await?;

    tracing::info!(
        postgres = %target.redacted(),
        %table,
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        amqp = %sink::redact_amqp_url(config.amqp.url.expose()),
        exchange = %config.amqp.exchange,
        start_lsn = %start_lsn,
        ordering = ?config.relay.ordering,
        "outbox-relay {} streaming",
        env!("CARGO_PKG_VERSION")
    );

    let window = config.amqp.max_in_flight;
    let (cmd_tx, cmd_rx) = mpsc::channel(window * 2 + 16);
    let (ev_tx, ev_rx) = mpsc::channel(window * 4 + 64);
    let sink_task = tokio::spawn(sink::run(sink_settings, broker, cmd_rx, ev_tx));

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
        config,
    };
    let result = relay.main_loop(ev_rx, shutdown).await;
    // Closing the command channel ends the sink task, which closes the connection.
    let Relay { pipeline, .. } = relay;
    drop(pipeline);
    let _ = tokio::time::timeout(Duration::from_secs(5), sink_task).await;
    result
}

/// Starts replication; while another process holds the slot, keeps trying for `wait`.
async fn start_waiting_for_slot(
    settings: &SourceSettings,
    start: Lsn,
    wait: Duration,
) -> Result<ReplicationClient, Error> {
    let deadline = Instant::now() + wait;
    loop {
        match source::start(settings, start).await {
            Err(Error::SlotBusy { slot, pid }) if Instant::now() < deadline => {
                tracing::info!(%slot, pid, "slot is held by another process, waiting for it to be released");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
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
}

/// Why the WAL stream needs a new connection.
struct StreamLost(String);

impl Relay {
    async fn main_loop(
        &mut self,
        mut sink_events: mpsc::Receiver<SinkEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut draining_until: Option<Instant> = None;
        loop {
            if draining_until.is_some() && self.pipeline.is_empty() {
                break;
            }
            let read_wal = draining_until.is_none() && self.pipeline.has_room();
            let next_due = self.pipeline.next_due();
            // Priority, highest first: shutdown, confirms (they free the window and
            // move the LSN), retries due, WAL (only with room in the window and the
            // broker up), keepalives (they arrive as WAL events).
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
                _ = sleep_until_opt(next_due) => {
                    self.pipeline.fire_due(Instant::now()).await;
                }
                ev = self.client.recv(), if read_wal => {
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
                        }
                    }
                }
            }
            self.advance();
        }
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
                match decoded {
                    Decoded::Ignored => {}
                    Decoded::Event(event) => {
                        let Some(txn) = self.tracker.current() else {
                            return Err(Err(Error::Decode(
                                "an insert arrived outside a transaction".into(),
                            )));
                        };
                        let message =
                            sink::format::encode(&event, self.commit_time).map_err(|e| {
                                Err(Error::MalformedRow {
                                    table: self.table.to_string(),
                                    id: event.id.clone(),
                                    reason: e.0,
                                })
                            })?;
                        self.pipeline
                            .admit(Arc::new(message), txn, &mut self.tracker)
                            .await;
                    }
                    Decoded::Malformed(m) => {
                        return Err(Err(Error::MalformedRow {
                            table: self.table.to_string(),
                            id: m.id,
                            reason: m.reason,
                        }))
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.tracker.commit(end_lsn);
            }
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

    /// With nothing in flight, everything the server has sent is handled:
    /// confirm its position so unrelated WAL is not retained for this slot.
    fn confirm_when_idle(&mut self, lsn: Lsn) {
        if self.tracker.is_idle() && lsn > self.applied {
            self.applied = lsn;
            self.client.update_applied_lsn(lsn);
        }
    }

    async fn on_sink_event(&mut self, ev: SinkEvent) {
        match ev {
            SinkEvent::Confirmed {
                seq,
                generation,
                outcome,
            } => {
                self.pipeline
                    .on_confirm(seq, generation, outcome, &mut self.tracker)
                    .await
            }
            SinkEvent::Down { generation, reason } => {
                tracing::warn!(generation, %reason, in_flight = self.pipeline.len(), "broker down: stopped reading WAL until it is back");
                self.pipeline.on_down(generation);
            }
            SinkEvent::Up { generation } => self.pipeline.on_up(generation).await,
        }
    }

    fn advance(&mut self) {
        if let Some(lsn) = self.tracker.advance() {
            if lsn > self.applied {
                self.applied = lsn;
                self.client.update_applied_lsn(lsn);
            }
        }
    }

    /// Replaces a lost replication connection. Everything not yet applied is
    /// dropped from memory: the server sends it again from the slot's position.
    /// Returns false when shutdown was requested while reconnecting.
    async fn reconnect_source(
        &mut self,
        reason: String,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        tracing::warn!(%reason, dropped = self.pipeline.len(), "replication stream lost; reconnecting, unapplied transactions will be replayed");
        self.client.abort();
        self.pipeline.clear();
        self.tracker = Tracker::new();
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
    /// Refused by the broker; re-published when its backoff ends.
    Backoff,
}

struct Pending {
    message: Arc<OutboundMessage>,
    txn: TxnId,
    attempts: u32,
    state: State,
}

#[derive(Default)]
struct Aggregate {
    /// Messages of this aggregate that hold a turn (published, unsent or in backoff).
    active: u32,
    /// Messages waiting for the turn, in commit order.
    queue: VecDeque<u64>,
}

/// The in-flight window: every message from admission to its resolution.
struct Pipeline {
    ordering: Ordering,
    max_messages: usize,
    max_bytes: usize,
    backoff_base: Duration,
    backoff_max: Duration,
    commands: mpsc::Sender<SinkCommand>,
    /// Broker connection generation currently up, if any.
    generation: Option<u64>,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    aggregates: HashMap<AggregateKey, Aggregate>,
    bytes: usize,
    due: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Pipeline {
    fn new(config: &Config, commands: mpsc::Sender<SinkCommand>) -> Self {
        Self {
            ordering: config.relay.ordering,
            max_messages: config.amqp.max_in_flight,
            max_bytes: config.amqp.max_in_flight_bytes,
            backoff_base: config.retry.backoff_base,
            backoff_max: config.retry.backoff_max,
            commands,
            generation: None,
            next_seq: 0,
            pending: HashMap::new(),
            aggregates: HashMap::new(),
            bytes: 0,
            due: BinaryHeap::new(),
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

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    async fn admit(&mut self, message: Arc<OutboundMessage>, txn: TxnId, tracker: &mut Tracker) {
        let seq = self.next_seq;
        self.next_seq += 1;
        tracker.add_message(txn);
        self.bytes += message.weight();
        let agg = self.aggregates.entry(message.aggregate).or_default();
        let wait = self.ordering == Ordering::Strict && (agg.active > 0 || !agg.queue.is_empty());
        let state = if wait {
            agg.queue.push_back(seq);
            State::Queued
        } else {
            agg.active += 1;
            State::Unsent
        };
        self.pending.insert(
            seq,
            Pending {
                message,
                txn,
                attempts: 0,
                state,
            },
        );
        if state == State::Unsent {
            self.send(seq).await;
        }
    }

    /// Sends an `Unsent` or `Backoff` message if the broker is up.
    async fn send(&mut self, seq: u64) {
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        match self.generation {
            Some(generation) => {
                p.state = State::Published { generation };
                let cmd = SinkCommand::Publish {
                    seq,
                    generation,
                    message: p.message.clone(),
                };
                // The sink always drains its commands; a closed channel means it ended,
                // which the main loop learns from the event channel.
                let _ = self.commands.send(cmd).await;
            }
            None => p.state = State::Unsent,
        }
    }

    async fn on_confirm(
        &mut self,
        seq: u64,
        generation: u64,
        outcome: Outcome,
        tracker: &mut Tracker,
    ) {
        let Some(p) = self.pending.get_mut(&seq) else {
            return; // dropped by a replication reconnect
        };
        if p.state != (State::Published { generation }) {
            return; // a confirm from a connection that is gone
        }
        if outcome == Outcome::Ack {
            let p = self.pending.remove(&seq).expect("present");
            self.bytes -= p.message.weight();
            tracker.resolve(p.txn);
            let key = p.message.aggregate;
            let next = {
                let agg = self
                    .aggregates
                    .get_mut(&key)
                    .expect("aggregate of a pending message");
                agg.active -= 1;
                let next = if agg.active == 0 {
                    agg.queue.pop_front()
                } else {
                    None
                };
                if next.is_some() {
                    agg.active += 1;
                }
                next
            };
            match next {
                Some(next) => {
                    if let Some(n) = self.pending.get_mut(&next) {
                        n.state = State::Unsent;
                    }
                    self.send(next).await;
                }
                None => {
                    if self
                        .aggregates
                        .get(&key)
                        .is_some_and(|a| a.active == 0 && a.queue.is_empty())
                    {
                        self.aggregates.remove(&key);
                    }
                }
            }
            return;
        }
        p.attempts += 1;
        p.state = State::Backoff;
        let delay = backoff(self.backoff_base, self.backoff_max, p.attempts);
        tracing::warn!(
            id = %p.message.id,
            routing_key = %p.message.routing_key,
            attempt = p.attempts,
            retry_in = ?delay,
            reason = %outcome.describe(),
            "broker refused a message; re-publishing after backoff, the slot waits for it"
        );
        self.due.push(Reverse((Instant::now() + delay, seq)));
    }

    async fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse((at, seq))) = self.due.peek().copied() {
            if at > now {
                break;
            }
            self.due.pop();
            if self
                .pending
                .get(&seq)
                .is_some_and(|p| p.state == State::Backoff)
            {
                self.send(seq).await;
            }
        }
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
            self.send(seq).await;
        }
    }

    /// Forgets everything (the replication stream replays what was not applied).
    fn clear(&mut self) {
        self.pending.clear();
        self.aggregates.clear();
        self.due.clear();
        self.bytes = 0;
    }
}

/// min(base · 2^(attempt-1), max) ± 10 % jitter.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(max);
    let jitter = rand::rng().random_range(0.9..=1.1);
    capped.mul_f64(jitter)
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
}
