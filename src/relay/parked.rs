//! Which aggregates have retry state, what the relay is doing about each, and
//! which are due.
//!
//! An aggregate is parked from the moment a park for it is on its way until the
//! store says its queue is empty and no park for it is unanswered: while it is,
//! its later stream messages are parked behind it instead of published.
//!
//! Recovery runs per aggregate from a loaded page of its queue: the next message
//! goes out as soon as its predecessor is acked, without asking the store again
//! (strict order allows one unconfirmed message per aggregate); a new page is
//! loaded when one runs out, and an aggregate whose queue looked empty is loaded
//! once more before it is let go (parks behind it may have committed meanwhile).
//! The rows waiting in pages are bounded in bytes.

use super::fastmap::FastMap;
use crate::event::AggregateKey;
use crate::retry::{Head, Load, Loaded, PageEnd};
use crate::time::instant_of;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use tokio::time::Instant;

/// Most loads requested at once.
pub const MAX_LOADING: usize = 64;
/// Most rows one load asks for.
pub const PAGE_ROWS: usize = 64;

/// What the relay knows of each aggregate with retry state.
pub struct Parked {
    aggregates: FastMap<AggregateKey, ParkedAggregate>,
    due: BinaryHeap<Reverse<(Instant, AggregateKey)>>,
    /// Loads requested and not yet answered.
    loading: usize,
    /// Aggregates with a loaded row ready to publish, waiting for room in the window.
    ready: VecDeque<AggregateKey>,
    /// Bytes of loaded rows waiting for their turn.
    buffered: usize,
    /// Most bytes of loaded rows held at once.
    budget: usize,
}

struct ParkedAggregate {
    aggregate_type: String,
    aggregate_id: String,
    /// Parks for it sent and not yet committed.
    parking: u32,
    state: State,
}

enum State {
    /// No row of it is known to the relay (none, or only parks on their way).
    Empty,
    /// Load when this time comes.
    Scheduled(Instant),
    /// A load is on its way (`after`: the last row seen before it).
    Loading { after: Option<i64> },
    /// Recovering from a loaded page.
    Active(Page),
    /// Its head is dead and `on_dead = "block"` holds it until a requeue.
    Blocked,
}

struct Page {
    rows: VecDeque<Loaded>,
    /// One of its messages is published (or being dead-lettered).
    in_flight: bool,
    /// The last row loaded so far (the next page starts after it).
    last_seq: i64,
    end: PageEnd,
}

impl Parked {
    pub fn new(budget: usize) -> Self {
        Parked {
            aggregates: FastMap::default(),
            due: BinaryHeap::new(),
            loading: 0,
            ready: VecDeque::new(),
            buffered: 0,
            budget: budget.max(1),
        }
    }

    /// Later stream messages of this aggregate must park behind it.
    pub fn is_parked(&self, key: AggregateKey) -> bool {
        self.aggregates.contains_key(&key)
    }

    /// Parks sent and not yet committed (they hold the window and the LSN).
    pub fn parking(&self) -> u32 {
        self.aggregates.values().map(|a| a.parking).sum()
    }

    /// Aggregates with retry state known to the relay.
    pub fn len(&self) -> usize {
        self.aggregates.len()
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
                parking: 0,
                state: State::Empty,
            })
    }

    /// A park for this aggregate is on its way to the store.
    pub fn park_sent(&mut self, key: AggregateKey, aggregate_type: &str, aggregate_id: &str) {
        self.entry(key, aggregate_type, aggregate_id).parking += 1;
    }

    /// A park committed (after any head it brought was adopted). An aggregate the
    /// relay knows no rows of is loaded to check: the store reports a head only
    /// when nothing held the aggregate before, so it is never simply let go.
    pub fn park_done(&mut self, key: AggregateKey, now: Instant) {
        let Some(a) = self.aggregates.get_mut(&key) else {
            return;
        };
        a.parking = a.parking.saturating_sub(1);
        if matches!(a.state, State::Empty) {
            a.state = State::Scheduled(now);
            self.due.push(Reverse((now, key)));
        }
    }

    /// A head reported by the store (a park that started a queue, a reload, a requeue).
    pub fn adopt(&mut self, head: Head) {
        let at = instant_of(head.due);
        let a = self.entry(head.key, &head.aggregate_type, &head.aggregate_id);
        match a.state {
            State::Empty | State::Blocked if head.blocked => a.state = State::Blocked,
            State::Empty | State::Blocked => {
                a.state = State::Scheduled(at);
                self.due.push(Reverse((at, head.key)));
            }
            // Already on its way: the rows are found by paging.
            State::Scheduled(_) | State::Loading { .. } | State::Active(_) => {}
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Bytes one load may bring (the store may go over by one row).
    fn per_load(&self) -> usize {
        (self.budget / MAX_LOADING).max(1)
    }

    /// A load can start: not too many on their way, and room for their rows
    /// (counting what the loads on their way may bring).
    pub fn can_load(&self) -> bool {
        self.loading < MAX_LOADING
            && self.buffered + (self.loading + 1) * self.per_load() <= self.budget
    }

    fn request(&mut self, key: AggregateKey, after: Option<i64>) -> Option<Load> {
        let max_bytes = self.per_load();
        let a = self.aggregates.get_mut(&key)?;
        a.state = State::Loading { after };
        self.loading += 1;
        Some(Load {
            key,
            aggregate_type: a.aggregate_type.clone(),
            aggregate_id: a.aggregate_id.clone(),
            after_seq: after,
            max_rows: PAGE_ROWS,
            max_bytes,
        })
    }

    /// Loads for the aggregates whose time has come, as far as loads can start.
    pub fn due(&mut self, now: Instant) -> Vec<Load> {
        let mut out = Vec::new();
        while let Some(Reverse((at, key))) = self.due.peek().copied() {
            if at > now || !self.can_load() {
                break;
            }
            self.due.pop();
            let scheduled = self
                .aggregates
                .get(&key)
                .is_some_and(|a| matches!(a.state, State::Scheduled(t) if t == at));
            if scheduled {
                out.extend(self.request(key, None));
            }
        }
        out
    }

    /// A page of the aggregate's queue arrived. Returns a load to ask for when the
    /// page says more is to be had at once.
    pub fn loaded(&mut self, key: AggregateKey, rows: Vec<Loaded>, end: PageEnd) -> Option<Load> {
        self.loading = self.loading.saturating_sub(1);
        let a = self.aggregates.get_mut(&key)?;
        let State::Loading { after } = a.state else {
            return None;
        };
        let Some(last) = rows.last().map(|r| r.parked_seq) else {
            return self.ran_out(key, after, end, false);
        };
        self.buffered += rows.iter().map(Loaded::weight).sum::<usize>();
        a.state = State::Active(Page {
            rows: rows.into(),
            in_flight: false,
            last_seq: last,
            end,
        });
        self.ready.push_back(key);
        None
    }

    /// The aggregate has no loaded row left and none in flight: what next.
    /// `from_page`: a page ran out (rather than a load coming back empty), so an
    /// `Empty` end is checked with one more load.
    fn ran_out(
        &mut self,
        key: AggregateKey,
        after: Option<i64>,
        end: PageEnd,
        from_page: bool,
    ) -> Option<Load> {
        let a = self.aggregates.get_mut(&key)?;
        match end {
            PageEnd::More => self.request(key, after),
            // A page that ran out may have had parks committed behind it: check.
            PageEnd::Empty if from_page => self.request(key, after),
            PageEnd::Empty => {
                a.state = State::Empty;
                if a.parking == 0 {
                    self.aggregates.remove(&key);
                }
                None
            }
            PageEnd::Due(t) => {
                let at = instant_of(t);
                a.state = State::Scheduled(at);
                self.due.push(Reverse((at, key)));
                None
            }
            PageEnd::Blocked => {
                a.state = State::Blocked;
                None
            }
        }
    }

    /// The next aggregate with a row ready to publish.
    pub fn take_ready(&mut self) -> Option<AggregateKey> {
        self.ready.pop_front()
    }

    /// Takes the aggregate's next loaded row to publish (it is then in flight).
    pub fn next(&mut self, key: AggregateKey) -> Option<Loaded> {
        let a = self.aggregates.get_mut(&key)?;
        let State::Active(page) = &mut a.state else {
            return None;
        };
        if page.in_flight {
            return None;
        }
        let row = page.rows.pop_front()?;
        page.in_flight = true;
        self.buffered -= row.weight();
        Some(row)
    }

    /// The message in flight is done (acked, or dead and skipped): the next one is
    /// ready, or a load is to be asked for.
    pub fn delivered(&mut self, key: AggregateKey) -> Option<Load> {
        let a = self.aggregates.get_mut(&key)?;
        let State::Active(page) = &mut a.state else {
            return None;
        };
        page.in_flight = false;
        if !page.rows.is_empty() {
            self.ready.push_back(key);
            return None;
        }
        let (last, end) = (page.last_seq, page.end);
        self.ran_out(key, Some(last), end, true)
    }

    /// The message in flight failed and is due again at `due`: what was loaded
    /// after it waits for that (it is loaded again then).
    pub fn failed(&mut self, key: AggregateKey, due: Instant) {
        self.stop(key, State::Scheduled(due));
        self.due.push(Reverse((due, key)));
    }

    /// The message in flight is dead and holds the aggregate (`on_dead = "block"`).
    pub fn blocked(&mut self, key: AggregateKey) {
        self.stop(key, State::Blocked);
    }

    fn stop(&mut self, key: AggregateKey, state: State) {
        let Some(a) = self.aggregates.get_mut(&key) else {
            return;
        };
        if let State::Active(page) = &a.state {
            self.buffered -= page.rows.iter().map(Loaded::weight).sum::<usize>();
        }
        a.state = state;
    }

    /// Bytes of loaded rows waiting for their turn.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buffered
    }
}

#[cfg(test)]
mod tests;
