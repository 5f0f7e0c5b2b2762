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
        }
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
            && self.entries.len() < self.max_messages
            && (self.bytes < self.max_bytes || self.entries.is_empty())
    }

    /// The next backoff or publish deadline.
    pub fn next_timer(&self) -> Option<Instant> {
        let backoff = self.backoffs.peek().map(|Reverse((at, _))| *at);
        let deadline = self.deadlines.front().map(|(at, _, _)| *at);
        [backoff, deadline].into_iter().flatten().min()
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
        if self.suspects > 0 {
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

    /// `seq` got an answer: it is no longer a suspect (nor the probe). Returns
    /// whether it was one; call `wire_changed` once it left the wire.
    fn clear_suspect(&mut self, seq: Seq) -> bool {
        if self.probing == Some(seq) {
            self.probing = None;
        }
        match self.entries.get_mut(&seq) {
            Some(e) if e.suspect => {
                e.suspect = false;
                self.suspects -= 1;
                true
            }
            _ => false,
        }
    }

    /// A message left the wire: with suspects left the next probe may go out;
    /// after the last one, whatever waited.
    fn wire_changed(&mut self, was_suspect: bool) {
        if self.suspects > 0 || was_suspect {
            self.continue_probing();
        }
    }

    /// Once the wire is empty, publishes the oldest suspect alone (on the
    /// isolated channel); when none is left, whatever waited.
    fn continue_probing(&mut self) {
        if self.generation.is_none() || self.probing.is_some() {
            return;
        }
        if self.suspects > 0 {
            let on_wire = self
                .entries
                .values()
                .any(|e| matches!(e.state, State::Published { .. }));
            if on_wire {
                return;
            }
            let next = self
                .entries
                .iter()
                .filter(|(_, e)| e.suspect && e.state == State::Unsent)
                .map(|(seq, _)| *seq)
                .min();
            match next {
                Some(seq) => {
                    self.probing = Some(seq);
                    self.publish(seq);
                    return;
                }
                None => {
                    // Every suspect left the window some other way.
                    for e in self.entries.values_mut() {
                        e.suspect = false;
                    }
                    self.suspects = 0;
                }
            }
        }
        self.publish_unsent();
    }

    /// Publishes every message holding its turn that waited, in admission order.
    fn publish_unsent(&mut self) -> usize {
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

    /// `generation` is the broker connection currently up.
    pub fn generation_is(&self, generation: u64) -> bool {
        self.generation == Some(generation)
    }

    /// Messages still to be probed after a refusal.
    pub fn suspects(&self) -> usize {
        self.suspects
    }

    /// The message published alone after a refusal, if one is on the wire.
    pub fn probing(&self) -> Option<Seq> {
        self.probing
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

    /// The broker connection of `generation` is gone: nothing published on it will
    /// be answered. A broker outage is not a per-message failure: no publish
    /// timeouts run while it lasts. With `refused` the broker closed it in answer
    /// to a publish: when a probe was alone on the wire, it is returned (the
    /// culprit, to be failed); otherwise everything that was on the wire becomes a
    /// suspect, published again one at a time.
    pub fn on_down(&mut self, generation: u64, refused: bool) -> Option<Seq> {
        if self.generation == Some(generation) {
            self.generation = None;
        }
        let culprit = self
            .probing
            .take()
            .filter(|p| refused && self.is_published(*p, generation));
        for e in self.entries.values_mut() {
            if matches!(e.state, State::Published { generation: g } if g <= generation) {
                e.state = State::Unsent;
                if refused && !e.suspect {
                    e.suspect = true;
                    self.suspects += 1;
                }
            }
        }
        self.deadlines.clear();
        self.blocked = false;
        culprit
    }

    /// The broker is back: re-publish what was unresolved, in admission order, or
    /// after a refusal the suspects one at a time. Returns how many went out.
    pub fn on_up(&mut self, generation: u64) -> usize {
        self.generation = Some(generation);
        if self.suspects > 0 {
            self.continue_probing();
            return usize::from(self.probing.is_some());
        }
        self.publish_unsent()
    }

    /// The broker blocks publishing: deadlines are suspended, nothing new is admitted.
    pub fn suspend(&mut self) {
        self.blocked = true;
        self.deadlines.clear();
    }

    /// The broker publishes again: every message on the wire gets a full deadline.
    pub fn resume(&mut self) {
        if !self.blocked {
            return;
        }
        self.blocked = false;
        let mut published: Vec<(Seq, u64)> = self
            .entries
            .iter()
            .filter_map(|(seq, e)| match e.state {
                State::Published { generation } => Some((*seq, generation)),
                _ => None,
            })
            .collect();
        published.sort_unstable();
        let at = Instant::now() + self.publish_timeout;
        self.deadlines
            .extend(published.into_iter().map(|(seq, g)| (at, seq, g)));
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

    /// Internal consistency, for tests: turns and queues match the entries, and
    /// the byte count is the sum of the entries' weights.
    #[cfg(test)]
    fn check_invariants(&self) {
        let bytes: usize = self.entries.values().map(Entry::weight).sum();
        assert_eq!(bytes, self.bytes, "byte accounting");
        let suspects = self.entries.values().filter(|e| e.suspect).count();
        assert_eq!(suspects, self.suspects, "suspect count");
        if let Some(p) = self.probing {
            assert!(self.entries[&p].suspect, "the probe is a suspect");
            let on_wire = self
                .entries
                .values()
                .filter(|e| matches!(e.state, State::Published { .. }))
                .count();
            assert_eq!(on_wire, 1, "a probe is alone on the wire");
        }
        for (key, agg) in &self.aggregates {
            let turns = self
                .entries
                .values()
                .filter(|e| e.has_turn && e.row.key() == *key)
                .count();
            assert_eq!(turns as u32, agg.active, "turn count of {key:?}");
            for s in &agg.queue {
                let e = &self.entries[s];
                assert_eq!(e.state, State::Queued, "queued entry state");
                assert_eq!(e.row.key(), *key);
            }
            assert!(
                agg.active > 0 || !agg.queue.is_empty(),
                "idle aggregate kept"
            );
            if self.ordering == Ordering::Strict {
                assert!(agg.active <= 1, "strict: one turn per aggregate");
            }
        }
        for (seq, e) in &self.entries {
            if e.state == State::Queued {
                let key = e.row.key();
                assert!(
                    self.aggregates[&key].queue.contains(seq),
                    "queued entry missing from its queue"
                );
            }
            if matches!(e.state, State::Published { .. }) {
                assert!(e.has_turn, "published without a turn");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::OutboxEvent;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn event(agg: u8, n: u32) -> Row {
        Row::Event(Arc::new(OutboxEvent {
            id: format!("{agg}-{n}"),
            aggregate_type: "A".into(),
            aggregate_id: agg.to_string(),
            event_type: "e".into(),
            payload: Bytes::from_static(b"{}"),
            metadata: None,
            created_at: None,
            scheduled_at: None,
            max_retries: None,
        }))
    }

    fn message(row: &Row, size: usize) -> Arc<OutboundMessage> {
        let Row::Event(e) = row else { unreachable!() };
        let mut m = crate::sink::format::encode(e, 0).unwrap();
        m.body.resize(size, b' ');
        Arc::new(m)
    }

    fn stream(txn: u64) -> Origin {
        Origin::Stream {
            txn,
            commit_time: 0,
        }
    }

    fn window(ordering: Ordering, max: usize) -> Window {
        let mut w = Window::new(ordering, max, 1 << 30, Duration::from_secs(30));
        w.on_up(1);
        w
    }

    #[test]
    fn strict_order_queues_behind_the_unconfirmed_message() {
        let mut w = window(Ordering::Strict, 10);
        let a0 = event(1, 0);
        let a1 = event(1, 1);
        let b0 = event(2, 0);
        assert_eq!(
            w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None),
            Admitted::Sent
        );
        assert_eq!(
            w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None),
            Admitted::Queued
        );
        assert_eq!(
            w.admit(b0.clone(), Some(message(&b0, 10)), stream(0), None),
            Admitted::Sent
        );
        let sent: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
        assert_eq!(sent, vec![0, 2]);
        let r = w.resolve(0).unwrap();
        assert!(r.park.is_empty());
        let sent: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
        assert_eq!(sent, vec![1], "the ack hands the turn to the next message");
        w.check_invariants();
    }

    #[test]
    fn a_full_window_refuses_and_a_confirm_frees_room() {
        let mut w = window(Ordering::Relaxed, 2);
        for n in 0..2 {
            let r = event(1, n);
            w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
        }
        assert!(!w.has_room());
        assert_eq!(w.room(), 0);
        w.resolve(0);
        assert!(w.has_room());
        w.resolve(1);
        assert_eq!((w.len(), w.bytes()), (0, 0));
    }

    #[test]
    fn bytes_limit_lets_one_big_message_into_an_empty_window() {
        let mut w = Window::new(Ordering::Strict, 100, 1024, Duration::from_secs(30));
        w.on_up(1);
        let r = event(1, 0);
        assert!(w.has_room());
        w.admit(r.clone(), Some(message(&r, 5000)), stream(0), None);
        assert!(!w.has_room(), "over the byte limit");
        w.resolve(0);
        assert!(w.has_room());
    }

    #[test]
    fn no_broker_no_room_and_unsent_messages_go_out_on_reconnect_in_order() {
        let mut w = window(Ordering::Relaxed, 10);
        for n in 0..3 {
            let r = event(1, n);
            w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
        }
        assert_eq!(w.take_publishes().count(), 3);
        assert_eq!(w.on_down(1, false), None);
        assert!(!w.has_room());
        assert!(!w.is_published(0, 1));
        assert!(
            w.expired(Instant::now() + Duration::from_secs(3600))
                .is_empty(),
            "no deadlines run while the broker is down"
        );
        assert_eq!(w.on_up(2), 3);
        let sent: Vec<(Seq, u64)> = w.take_publishes().map(|p| (p.seq, p.generation)).collect();
        assert_eq!(sent, vec![(0, 2), (1, 2), (2, 2)]);
        assert!(w.is_published(1, 2) && !w.is_published(1, 1));
    }

    #[test]
    fn a_failure_parks_the_message_and_its_queue() {
        let mut w = window(Ordering::Strict, 10);
        for n in 0..3 {
            let r = event(1, n);
            w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
        }
        let park = w.fail_stream(0, Failure::Nack);
        assert_eq!(park, vec![0, 1, 2]);
        assert_eq!(
            w.take_publishes().count(),
            1,
            "only the first was published"
        );
        for s in park {
            assert!(w.resolve(s).unwrap().park.is_empty());
        }
        assert!(w.is_empty());
        w.check_invariants();
    }

    #[test]
    fn a_queued_message_with_its_own_cause_is_parked_when_its_turn_comes() {
        let mut w = window(Ordering::Strict, 10);
        let a0 = event(1, 0);
        let a1 = event(1, 1);
        let a2 = event(1, 2);
        w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
        let cause = ParkCause {
            failure: Some(Failure::TooLarge { bytes: 2, limit: 1 }),
            not_before: None,
        };
        assert_eq!(
            w.admit(a1.clone(), None, stream(0), Some(cause)),
            Admitted::Queued
        );
        w.admit(a2.clone(), Some(message(&a2, 10)), stream(0), None);
        w.take_publishes().count();
        let r = w.resolve(0).unwrap();
        assert_eq!(r.park, vec![1, 2]);
        assert_eq!(w.take_publishes().count(), 0);
        w.check_invariants();
    }

    #[test]
    fn timeouts_expire_only_what_is_still_published() {
        let mut w = window(Ordering::Relaxed, 10);
        for n in 0..3 {
            let r = event(n as u8, n);
            w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
        }
        w.resolve(1);
        let late = Instant::now() + Duration::from_secs(31);
        assert_eq!(w.expired(late), vec![0, 2]);
        assert!(w.expired(late).is_empty(), "each deadline fires once");
    }

    #[test]
    fn dropping_stream_messages_keeps_parks_and_retries() {
        let mut w = window(Ordering::Strict, 10);
        let a0 = event(1, 0);
        let a1 = event(1, 1);
        let b0 = event(2, 0);
        w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
        w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None);
        let parking = w.admit_parking(b0.clone(), None, stream(0), None);
        let retry = event(3, 0);
        w.admit_retry(
            retry.clone(),
            message(&retry, 10),
            Origin::Retry {
                key: retry.key(),
                parked_seq: 1,
                attempts: 1,
                max_retries: 3,
            },
            false,
        );
        assert_eq!(w.drop_stream_messages(), 2);
        assert_eq!(w.len(), 2);
        assert!(w.entry(parking).is_some());
        w.check_invariants();
    }

    /// One step of a random interleaving.
    #[derive(Debug, Clone)]
    enum Op {
        /// A stream message of aggregate `agg` (of 4), `size` bytes, maybe with its own cause.
        Admit {
            agg: u8,
            size: usize,
            cause: bool,
        },
        /// The broker answers the `i`-th oldest outstanding publish: ack or refusal.
        Answer {
            i: usize,
            ack: bool,
        },
        /// Every outstanding publish times out.
        Timeout,
        /// The connection drops and comes back.
        Reconnect,
        /// The broker closes the connection in answer to a publish, and is back.
        Refuse,
        /// The broker blocks publishing, or unblocks.
        Block,
        Unblock,
        /// The oldest pending park commits.
        ParkCommitted,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 1usize..600, proptest::bool::weighted(0.1))
                .prop_map(|(agg, size, cause)| Op::Admit { agg, size, cause }),
            4 => (0usize..8, proptest::bool::weighted(0.85)).prop_map(|(i, ack)| Op::Answer { i, ack }),
            1 => Just(Op::Timeout),
            1 => Just(Op::Reconnect),
            1 => Just(Op::Refuse),
            1 => Just(Op::Block),
            1 => Just(Op::Unblock),
            2 => Just(Op::ParkCommitted),
        ]
    }

    /// Drives a window the way the relay does: parks go to a model retry table,
    /// an aggregate with parked messages parks its later messages behind them.
    struct Harness {
        w: Window,
        generation: u64,
        /// Outstanding publishes in publish order: (seq, generation).
        wire: Vec<(Seq, u64)>,
        parking: VecDeque<Seq>,
        parked_aggs: HashMap<AggregateKey, usize>,
        /// Per aggregate: admission numbers in the order first published.
        published: HashMap<u8, Vec<u32>>,
        /// Per aggregate: admission numbers in the order parked.
        parked: HashMap<u8, Vec<u32>>,
        counters: HashMap<u8, u32>,
        admitted: usize,
        resolved: usize,
    }

    fn agg_and_n(row: &Row) -> (u8, u32) {
        let (a, n) = row.id().split_once('-').unwrap();
        (a.parse().unwrap(), n.parse().unwrap())
    }

    impl Harness {
        fn new(ordering: Ordering) -> Self {
            let mut w = Window::new(ordering, 16, 4096, Duration::from_secs(30));
            w.on_up(1);
            Harness {
                w,
                generation: 1,
                wire: Vec::new(),
                parking: VecDeque::new(),
                parked_aggs: HashMap::new(),
                published: HashMap::new(),
                parked: HashMap::new(),
                counters: HashMap::new(),
                admitted: 0,
                resolved: 0,
            }
        }

        fn collect(&mut self) {
            let sent: Vec<(Seq, u64)> = self
                .w
                .take_publishes()
                .map(|p| (p.seq, p.generation))
                .collect();
            for (seq, g) in sent {
                let (agg, n) = agg_and_n(self.w.entry(seq).unwrap().row());
                let list = self.published.entry(agg).or_default();
                if !list.contains(&n) {
                    list.push(n);
                }
                self.wire.push((seq, g));
            }
        }

        fn park(&mut self, seqs: Vec<Seq>) {
            for s in seqs {
                let row = self.w.entry(s).unwrap().row().clone();
                *self.parked_aggs.entry(row.key()).or_default() += 1;
                let (agg, n) = agg_and_n(&row);
                self.parked.entry(agg).or_default().push(n);
                self.parking.push_back(s);
            }
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Admit { agg, size, cause } => {
                    if !self.w.has_room() {
                        return;
                    }
                    let n = self.counters.entry(agg).or_default();
                    let row = event(agg, *n);
                    *n += 1;
                    self.admitted += 1;
                    let m = Some(message(&row, size));
                    let cause = cause.then_some(ParkCause {
                        failure: Some(Failure::TooLarge {
                            bytes: size,
                            limit: 0,
                        }),
                        not_before: None,
                    });
                    if self.parked_aggs.contains_key(&row.key()) {
                        let s = self.w.admit_parking(row, m, stream(0), cause);
                        self.park(vec![s]);
                    } else if let Admitted::Park(seqs) = self.w.admit(row, m, stream(0), cause) {
                        self.park(seqs);
                    }
                }
                Op::Answer { i, ack } => {
                    if self.wire.is_empty() {
                        return;
                    }
                    let (seq, g) = self.wire.remove(i % self.wire.len());
                    if !self.w.is_published(seq, g) {
                        return; // stale
                    }
                    if ack {
                        let r = self.w.resolve(seq).unwrap();
                        self.resolved += 1;
                        self.park(r.park);
                    } else {
                        let seqs = self.w.fail_stream(seq, Failure::Nack);
                        self.park(seqs);
                    }
                }
                Op::Timeout => {
                    let late = Instant::now() + Duration::from_secs(3600);
                    for seq in self.w.expired(late) {
                        let seqs = self.w.fail_stream(
                            seq,
                            Failure::Timeout {
                                after: Duration::from_secs(30),
                            },
                        );
                        self.park(seqs);
                    }
                }
                Op::Reconnect => {
                    assert_eq!(self.w.on_down(self.generation, false), None);
                    self.wire.clear();
                    self.generation += 1;
                    self.w.on_up(self.generation);
                }
                Op::Refuse => {
                    let probe = self.w.probing();
                    let culprit = self.w.on_down(self.generation, true);
                    if let Some(p) = probe {
                        if self
                            .wire
                            .iter()
                            .any(|(s, g)| *s == p && *g == self.generation)
                        {
                            assert_eq!(
                                culprit,
                                Some(p),
                                "the probe alone on the wire is the culprit"
                            );
                        }
                    }
                    self.wire.clear();
                    if let Some(seq) = culprit {
                        let seqs = self.w.fail_stream(
                            seq,
                            Failure::Refused {
                                reply_code: 406,
                                reply_text: "PRECONDITION_FAILED".into(),
                            },
                        );
                        self.park(seqs);
                    }
                    self.generation += 1;
                    self.w.on_up(self.generation);
                }
                Op::Block => {
                    self.w.suspend();
                    assert!(!self.w.has_room());
                    assert!(
                        self.w
                            .expired(Instant::now() + Duration::from_secs(3600))
                            .is_empty(),
                        "no deadline runs while the broker blocks"
                    );
                }
                Op::Unblock => self.w.resume(),
                Op::ParkCommitted => {
                    if let Some(s) = self.parking.pop_front() {
                        let r = self.w.resolve(s).unwrap();
                        assert!(r.park.is_empty(), "a parked message holds no turn");
                        self.resolved += 1;
                    }
                }
            }
            self.collect();
            self.w.check_invariants();
        }

        /// Acks and commits everything outstanding.
        fn settle(&mut self) {
            for _ in 0..10_000 {
                if self.w.is_empty() {
                    return;
                }
                if self.w.blocked {
                    self.apply(Op::Unblock);
                } else if !self.wire.is_empty() {
                    self.apply(Op::Answer { i: 0, ack: true });
                } else if !self.parking.is_empty() {
                    self.apply(Op::ParkCommitted);
                } else {
                    self.apply(Op::Reconnect);
                }
            }
            panic!("window never drained: {} left", self.w.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Strict ordering: per aggregate, first publishes follow admission order and
        /// never overtake a parked message; every message is resolved exactly once;
        /// the window's accounting returns to zero.
        #[test]
        fn strict_window_keeps_order_and_accounting(ops in proptest::collection::vec(op(), 1..120)) {
            let mut h = Harness::new(Ordering::Strict);
            for op in ops {
                h.apply(op);
            }
            h.settle();
            prop_assert_eq!(h.w.len(), 0);
            prop_assert_eq!(h.w.bytes(), 0);
            prop_assert_eq!(h.resolved, h.admitted);
            for (agg, order) in &h.published {
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "aggregate {} published out of order: {:?}", agg, order);
                if let Some(first_parked) = h.parked.get(agg).and_then(|p| p.iter().min()) {
                    prop_assert!(order.iter().all(|n| n < first_parked || h.parked[agg].contains(n)),
                        "aggregate {}: a message after parked {} was published: {:?}", agg, first_parked, order);
                }
                let parked = h.parked.get(agg).cloned().unwrap_or_default();
                prop_assert!(parked.windows(2).all(|w| w[0] < w[1]), "aggregate {} parked out of order: {:?}", agg, parked);
            }
        }

        /// Relaxed ordering pipelines an aggregate but keeps the same accounting.
        #[test]
        fn relaxed_window_accounting_returns_to_zero(ops in proptest::collection::vec(op(), 1..120)) {
            let mut h = Harness::new(Ordering::Relaxed);
            for op in ops {
                h.apply(op);
            }
            h.settle();
            prop_assert_eq!(h.w.len(), 0);
            prop_assert_eq!(h.w.bytes(), 0);
            prop_assert_eq!(h.resolved, h.admitted);
        }
    }
}
