//! The in-flight window: every message from admission to its resolution, with
//! per-aggregate turns, message and byte accounting, publish deadlines and the
//! backoff of dead-letter publishes.
//!
//! With `ordering = "strict"` an aggregate holds at most one turn: its later
//! messages wait in the aggregate's queue (counted in the window) until the one
//! ahead of them is resolved. The window never talks to the broker itself: what
//! it decides to publish collects in an outbox the loop hands to the sink
//! ([`Window::take_publishes`]), so the state machine runs without any service.
//!
//! Two peer conditions pause it without counting against any message: a broker
//! that blocks publishing (deadlines are suspended until it unblocks) and a
//! broker that closed the connection in answer to one of the unanswered
//! publishes. After such a refusal every message that was on the wire is a
//! suspect: they are published again one at a time (a probe) until each has an
//! answer, so the one that makes the broker close the connection again is found —
//! it alone fails — and everything else goes on.

use super::fastmap::FastMap;
use crate::config::Ordering;
use crate::event::{AggregateKey, Row};
use crate::failure::Failure;
use crate::progress::TxnId;
use crate::sink::OutboundMessage;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

mod peer;
mod routing;

/// A message's number in the window (admission order).
pub type Seq = u64;

/// Where a message came from, which decides what its resolution means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// From the WAL: resolving it moves the LSN.
    Stream { txn: TxnId, commit_time: i64 },
    /// A parked message of aggregate `key`, published again.
    Retry {
        key: AggregateKey,
        parked_seq: i64,
        attempts: i32,
        max_retries: i32,
    },
    /// The dead-letter copy of a parked message (of aggregate `key`) out of retries.
    DeadLetter {
        key: AggregateKey,
        parked_seq: i64,
        attempts: i32,
        reason: String,
    },
}

/// Why a stream message is parked instead of (or after) being published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkCause {
    /// Its own failure (counts as an attempt).
    pub failure: Option<Failure>,
    /// Not before this time (Unix µs): a delayed message.
    pub not_before: Option<i64>,
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

/// One message in the window.
#[derive(Debug)]
pub struct Entry {
    row: Row,
    message: Option<Arc<OutboundMessage>>,
    origin: Origin,
    state: State,
    /// Set for messages to be parked when their turn comes.
    cause: Option<ParkCause>,
    /// Holds its aggregate's turn.
    has_turn: bool,
    /// Was on the wire when the broker closed the connection in answer to a publish.
    suspect: bool,
    /// Always published on the isolated channel (a message the broker refused before).
    alone: bool,
}

impl Entry {
    pub fn row(&self) -> &Row {
        &self.row
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn cause(&self) -> Option<&ParkCause> {
        self.cause.as_ref()
    }

    /// Parts the caller keeps once the entry left the window.
    pub fn into_parts(self) -> (Row, Option<Arc<OutboundMessage>>, Origin) {
        (self.row, self.message, self.origin)
    }

    fn weight(&self) -> usize {
        match &self.message {
            Some(m) => m.weight(),
            None => self.row.weight(),
        }
    }
}

#[derive(Default)]
struct Aggregate {
    /// Messages of this aggregate that hold a turn.
    active: u32,
    /// Messages waiting for the turn, in commit order.
    queue: VecDeque<Seq>,
}

/// What became of an admitted stream message.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Published (or waiting for the broker to come back, holding its turn).
    Sent,
    /// Waiting behind its aggregate.
    Queued,
    /// It has a park cause and its turn came at once: park these (it alone).
    Park(Vec<Seq>),
}

/// A publish for the sink.
#[derive(Debug)]
pub struct Publish {
    pub seq: Seq,
    pub generation: u64,
    pub message: Arc<OutboundMessage>,
    /// On the isolated channel, alone: a suspect or a message refused before.
    pub isolated: bool,
}

/// A message that left the window, and what its departure set in motion.
#[derive(Debug)]
pub struct Resolved {
    pub entry: Entry,
    /// The next message of its aggregate had a park cause of its own: park it and
    /// everything queued behind it (already marked as being parked, in order).
    pub park: Vec<Seq>,
}

/// The in-flight window.
pub struct Window {
    ordering: Ordering,
    max_messages: usize,
    max_bytes: usize,
    publish_timeout: Duration,
    /// Broker connection generation currently up, if any.
    generation: Option<u64>,
    next_seq: Seq,
    entries: FastMap<Seq, Entry>,
    aggregates: FastMap<AggregateKey, Aggregate>,
    bytes: usize,
    /// Dead-letter publishes waiting for their backoff.
    backoffs: BinaryHeap<Reverse<(Instant, Seq)>>,
    /// Publish deadlines in publish order (the timeout is constant).
    deadlines: VecDeque<(Instant, Seq, u64)>,
    /// Publishes decided and not yet handed to the sink.
    outbox: Vec<Publish>,
    /// The broker blocks publishing: no deadlines run, nothing new is admitted.
    blocked: bool,
    /// Entries marked as suspects.
    suspects: usize,
    /// The suspect published alone, awaiting its answer.
    probing: Option<Seq>,
    /// Whether the broker routes anything ([`super::routing`]).
    routing: super::routing::RoutingWatch,
    /// Publishing paused for a systemic fault: the held messages wait, probed one
    /// at a time.
    routing_pause: Option<routing::RoutingPause>,
    /// Longest wait between two probes of a routing pause.
    probe_max: Duration,
    /// The connection generation to renew (a pause for nacks or missing
    /// confirms), not yet handed to the sink.
    renewal: Option<u64>,
    /// The last generation a renewal was asked for (asked once each).
    renewed: Option<u64>,
}

impl Window {
    pub fn new(
        ordering: Ordering,
        max_messages: usize,
        max_bytes: usize,
        publish_timeout: Duration,
    ) -> Self {
        Self {
            ordering,
            max_messages,
            max_bytes,
            publish_timeout,
            generation: None,
            next_seq: 0,
            entries: FastMap::default(),
            aggregates: FastMap::default(),
            bytes: 0,
            backoffs: BinaryHeap::new(),
            deadlines: VecDeque::new(),
            outbox: Vec::new(),
            blocked: false,
            suspects: 0,
            probing: None,
            routing: Default::default(),
            routing_pause: None,
            probe_max: Duration::from_secs(30),
            renewal: None,
            renewed: None,
        }
    }

    /// The longest wait between two probes while publishing is paused for a
    /// routing fault (`amqp.reconnect_backoff_max`).
    pub fn with_probe_max(mut self, probe_max: Duration) -> Self {
        self.probe_max = probe_max;
        self
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Some message is on the wire or being parked: its answer is still to come.
    pub fn has_unanswered(&self) -> bool {
        self.entries
            .values()
            .any(|e| matches!(e.state, State::Published { .. } | State::Parking))
    }

    /// Bytes held, as the window counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages that still fit.
    #[cfg(test)]
    pub fn room(&self) -> usize {
        self.max_messages.saturating_sub(self.entries.len())
    }

    /// Room for one more message, and a broker to send it to (up, not blocking,
    /// no suspects left to probe). One message over the byte limit is let in when
    /// the window is empty, so it cannot stall.
    pub fn has_room(&self) -> bool {
        self.generation.is_some()
            && !self.blocked
            && self.suspects == 0
            && self.routing_pause.is_none()
            && self.entries.len() < self.max_messages
            && (self.bytes < self.max_bytes || self.entries.is_empty())
    }

    /// The next backoff or publish deadline.
    pub fn next_timer(&self) -> Option<Instant> {
        let backoff = self.backoffs.peek().map(|Reverse((at, _))| *at);
        let deadline = self.deadlines.front().map(|(at, _, _)| *at);
        [backoff, deadline, self.routing_timer()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn entry(&self, seq: Seq) -> Option<&Entry> {
        self.entries.get(&seq)
    }

    /// Publishes decided since the last call, in the order they were decided.
    pub fn take_publishes(&mut self) -> std::vec::Drain<'_, Publish> {
        self.outbox.drain(..)
    }

    fn insert(
        &mut self,
        row: Row,
        message: Option<Arc<OutboundMessage>>,
        origin: Origin,
        state: State,
        cause: Option<ParkCause>,
    ) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            row,
            message,
            origin,
            state,
            cause,
            has_turn: false,
            suspect: false,
            alone: false,
        };
        self.bytes += entry.weight();
        self.entries.insert(seq, entry);
        seq
    }

    /// Admits a stream message that is not parked behind its aggregate.
    pub fn admit(
        &mut self,
        row: Row,
        message: Option<Arc<OutboundMessage>>,
        origin: Origin,
        cause: Option<ParkCause>,
    ) -> Admitted {
        let key = row.key();
        let has_cause = cause.is_some();
        let seq = self.insert(row, message, origin, State::Queued, cause);
        let agg = self.aggregates.entry(key).or_default();
        let busy = agg.active > 0 || !agg.queue.is_empty();
        if self.ordering == Ordering::Strict && busy {
            agg.queue.push_back(seq);
            return Admitted::Queued;
        }
        if has_cause {
            // It never takes the turn: nothing of the aggregate waits behind it yet.
            self.set_state(seq, State::Parking);
            self.forget_if_idle(key);
            return Admitted::Park(vec![seq]);
        }
        self.take_turn(seq, key);
        self.send(seq);
        Admitted::Sent
    }

    /// Admits a stream message that goes straight to the retry table behind its
    /// aggregate's parked messages (it never takes a turn).
    pub fn admit_parking(
        &mut self,
        row: Row,
        message: Option<Arc<OutboundMessage>>,
        origin: Origin,
        cause: Option<ParkCause>,
    ) -> Seq {
        self.insert(row, message, origin, State::Parking, cause)
    }

    /// Admits a retried head or a dead-letter copy: it takes its aggregate's turn
    /// and is published at once — on the isolated channel when `alone` (the
    /// broker refused it before).
    pub fn admit_retry(
        &mut self,
        row: Row,
        message: Arc<OutboundMessage>,
        origin: Origin,
        alone: bool,
    ) -> Seq {
        let key = row.key();
        let seq = self.insert(row, Some(message), origin, State::Unsent, None);
        if let Some(e) = self.entries.get_mut(&seq) {
            e.alone = alone;
        }
        self.take_turn(seq, key);
        self.send(seq);
        seq
    }

    fn set_state(&mut self, seq: Seq, state: State) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.state = state;
        }
    }

    fn take_turn(&mut self, seq: Seq, key: AggregateKey) {
        if let Some(e) = self.entries.get_mut(&seq) {
            if !e.has_turn {
                e.has_turn = true;
                self.aggregates.entry(key).or_default().active += 1;
            }
        }
    }

    /// Publishes a message that holds its turn (now, or when the broker is back and
    /// no suspects are being probed).
    fn send(&mut self, seq: Seq) {
        if self.suspects > 0 || self.routing_pause.is_some() {
            if let Some(e) = self.entries.get_mut(&seq) {
                e.state = State::Unsent;
            }
            return;
        }
        self.publish(seq);
    }

    fn publish(&mut self, seq: Seq) {
        let Some(e) = self.entries.get_mut(&seq) else {
            return;
        };
        let Some(message) = e.message.clone() else {
            return;
        };
        match self.generation {
            Some(generation) => {
                e.state = State::Published { generation };
                if !self.blocked {
                    self.deadlines.push_back((
                        Instant::now() + self.publish_timeout,
                        seq,
                        generation,
                    ));
                }
                let isolated = e.suspect || e.alone;
                self.outbox.push(Publish {
                    seq,
                    generation,
                    message,
                    isolated,
                });
            }
            None => e.state = State::Unsent,
        }
    }

    /// Publishes every message holding its turn that waited, in admission order.
    fn publish_unsent(&mut self) -> usize {
        if self.routing_pause.is_some() {
            return 0; // the probe goes first
        }
        let mut unsent: Vec<Seq> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state == State::Unsent)
            .map(|(seq, _)| *seq)
            .collect();
        unsent.sort_unstable();
        for &seq in &unsent {
            self.publish(seq);
        }
        unsent.len()
    }

    /// `seq` was published on `generation` and its answer is still awaited.
    pub fn is_published(&self, seq: Seq, generation: u64) -> bool {
        self.entries
            .get(&seq)
            .is_some_and(|e| e.state == State::Published { generation })
    }

    /// Gives up `seq`'s turn; returns its aggregate when it held one.
    fn give_up_turn(&mut self, seq: Seq) -> Option<AggregateKey> {
        let e = self.entries.get_mut(&seq)?;
        if !e.has_turn {
            return None;
        }
        e.has_turn = false;
        let key = e.row.key();
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

    /// Marks `seq` as being parked and takes everything queued behind its
    /// aggregate with it: the seqs to park, in order.
    fn park_with_queue(&mut self, seq: Seq) -> Vec<Seq> {
        self.set_state(seq, State::Parking);
        let Some(key) = self.entries.get(&seq).map(|e| e.row.key()) else {
            return Vec::new();
        };
        self.give_up_turn(seq);
        let mut out = vec![seq];
        if let Some(agg) = self.aggregates.get_mut(&key) {
            out.extend(agg.queue.drain(..));
        }
        for s in &out[1..] {
            self.set_state(*s, State::Parking);
        }
        self.forget_if_idle(key);
        out
    }

    /// A published stream message failed: it is parked with `failure`, and so is
    /// everything queued behind it. Returns the seqs to park, in order.
    pub fn fail_stream(&mut self, seq: Seq, failure: Failure) -> Vec<Seq> {
        let was_suspect = self.clear_suspect(seq);
        match self.entries.get_mut(&seq) {
            Some(e) => {
                e.cause = Some(ParkCause {
                    failure: Some(failure),
                    not_before: None,
                });
            }
            None => return Vec::new(),
        }
        let park = self.park_with_queue(seq);
        self.wire_changed(was_suspect);
        park
    }

    /// Removes a resolved message (acked, failed for good, or durably parked) and
    /// gives its aggregate's turn to the next message in line.
    pub fn resolve(&mut self, seq: Seq) -> Option<Resolved> {
        let was_suspect = self.clear_suspect(seq);
        let key = self.give_up_turn(seq);
        let entry = self.entries.remove(&seq)?;
        self.bytes -= entry.weight();
        // Deadlines of answered publishes leave from the front (answers come roughly
        // in publish order), so the queue stays as small as the window.
        while let Some(&(_, s, g)) = self.deadlines.front() {
            if self.is_published(s, g) {
                break;
            }
            self.deadlines.pop_front();
        }
        let mut park = Vec::new();
        if let Some(key) = key {
            let next = self
                .aggregates
                .get_mut(&key)
                .filter(|agg| agg.active == 0)
                .and_then(|agg| agg.queue.pop_front());
            match next {
                Some(next) if self.entries.get(&next).is_some_and(|e| e.cause.is_some()) => {
                    park = self.park_with_queue(next);
                }
                Some(next) => {
                    self.take_turn(next, key);
                    self.send(next);
                }
                None => self.forget_if_idle(key),
            }
        }
        self.wire_changed(was_suspect);
        Some(Resolved { entry, park })
    }

    /// A dead-letter publish failed: try it again after `delay` (it keeps its turn).
    pub fn backoff(&mut self, seq: Seq, delay: Duration) {
        let was_suspect = self.clear_suspect(seq);
        if let Some(e) = self.entries.get_mut(&seq) {
            e.state = State::Backoff;
            self.backoffs.push(Reverse((Instant::now() + delay, seq)));
        }
        self.wire_changed(was_suspect);
    }

    /// Re-publishes the dead-letter copies whose backoff is over.
    pub fn fire_backoffs(&mut self, now: Instant) {
        while let Some(Reverse((at, seq))) = self.backoffs.peek().copied() {
            if at > now {
                break;
            }
            self.backoffs.pop();
            if self
                .entries
                .get(&seq)
                .is_some_and(|e| e.state == State::Backoff)
            {
                self.send(seq);
            }
        }
    }

    /// Published messages whose confirm is overdue.
    pub fn expired(&mut self, now: Instant) -> Vec<Seq> {
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

    /// Forgets stream messages that are not being parked (the replication stream
    /// replays what was not applied); retried heads, dead-letter copies and parks
    /// in progress stay. Returns how many were dropped.
    pub fn drop_stream_messages(&mut self) -> usize {
        let mut dropped_suspect = false;
        let drop: Vec<Seq> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.origin, Origin::Stream { .. }) && e.state != State::Parking)
            .map(|(seq, _)| *seq)
            .collect();
        for &seq in &drop {
            if let Some(e) = self.entries.get(&seq) {
                let key = e.row.key();
                if let Some(agg) = self.aggregates.get_mut(&key) {
                    agg.queue.retain(|s| *s != seq);
                }
            }
            if let Some(key) = self.give_up_turn(seq) {
                self.forget_if_idle(key);
            }
            if let Some(e) = self.entries.remove(&seq) {
                self.bytes -= e.weight();
                if e.suspect {
                    self.suspects -= 1;
                    dropped_suspect = true;
                }
                if self.probing == Some(seq) {
                    self.probing = None;
                }
            }
        }
        // Aggregates that only held dropped messages.
        let idle: Vec<AggregateKey> = self
            .aggregates
            .iter()
            .filter(|(_, a)| a.active == 0 && a.queue.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.aggregates.remove(&k);
        }
        self.wire_changed(dropped_suspect);
        drop.len()
    }
}

#[cfg(test)]
mod invariants;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod routing_tests;
#[cfg(test)]
mod tests;
