//! Which aggregates have retry state, what the relay asked the store about each
//! and has not heard back, and which heads are due for a retry.
//!
//! An aggregate is parked from the moment a park for it is on its way until the
//! store says its queue is empty and no command about it is unanswered: while it
//! is, its later stream messages are parked behind it instead of published.

use super::fastmap::FastMap;
use crate::event::AggregateKey;
use crate::retry::Head;
use crate::time::instant_of;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use tokio::time::Instant;

/// What the main loop knows of each aggregate with retry state: the store's
/// last word plus its own commands not yet answered.
#[derive(Default)]
pub struct Parked {
    aggregates: FastMap<AggregateKey, ParkedAggregate>,
    due: BinaryHeap<Reverse<(Instant, AggregateKey)>>,
    /// Loads requested and not yet answered (bounded, so answers never pile up).
    loading: usize,
}

/// Most heads loaded at once.
pub const MAX_LOADING: usize = 64;

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
    pub fn is_parked(&self, key: AggregateKey) -> bool {
        self.aggregates
            .get(&key)
            .is_some_and(|a| a.store_parked || a.outstanding > 0 || a.head != HeadState::Idle)
    }

    pub fn outstanding(&self) -> u32 {
        self.aggregates.values().map(|a| a.outstanding).sum()
    }

    pub fn names(&self, key: AggregateKey) -> (String, String) {
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

    pub fn command_sent(&mut self, key: AggregateKey, aggregate_type: &str, aggregate_id: &str) {
        self.entry(key, aggregate_type, aggregate_id).outstanding += 1;
    }

    pub fn command_done(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.outstanding = a.outstanding.saturating_sub(1);
        }
        self.forget_if_clear(key);
    }

    /// A head reported by the store (start-up, a new head after a park, the next after a release, a requeue).
    pub fn adopt(&mut self, head: Head) {
        let a = self.entry(head.key, &head.aggregate_type, &head.aggregate_id);
        a.store_parked = true;
        match a.head {
            HeadState::Idle | HeadState::Blocked if head.blocked => a.head = HeadState::Blocked,
            HeadState::Idle | HeadState::Blocked => self.schedule(head.key, head.due),
            HeadState::Scheduled(_) | HeadState::Busy => {}
        }
    }

    /// The head after a release: replaces the one that was busy.
    pub fn next_head(&mut self, head: Head) {
        if let Some(a) = self.aggregates.get_mut(&head.key) {
            a.head = HeadState::Idle;
        }
        self.adopt(head);
    }

    pub fn schedule(&mut self, key: AggregateKey, due_micros: i64) {
        let at = instant_of(due_micros);
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.store_parked = true;
            a.head = HeadState::Scheduled(at);
            self.due.push(Reverse((at, key)));
        }
    }

    pub fn block(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.head = HeadState::Blocked;
            a.store_parked = true;
        }
    }

    pub fn in_flight(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.head = HeadState::Busy;
        }
    }

    /// A command about the head is on its way to the store.
    pub fn releasing(&mut self, key: AggregateKey) {
        if let Some(a) = self.aggregates.get_mut(&key) {
            a.outstanding += 1;
            a.head = HeadState::Busy;
        }
    }

    /// The store says the aggregate's queue is empty.
    pub fn empty(&mut self, key: AggregateKey) {
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

    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    pub fn can_load(&self) -> bool {
        self.loading < MAX_LOADING
    }

    pub fn loaded(&mut self) {
        self.loading = self.loading.saturating_sub(1);
    }

    /// Heads whose time has come, at most `room` and the load cap:
    /// (key, aggregate_type, aggregate_id) to load.
    pub fn due(&mut self, now: Instant, room: usize) -> Vec<(AggregateKey, String, String)> {
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
    use std::time::Duration;

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
    fn a_blocked_head_is_not_scheduled_until_requeued() {
        let mut p = Parked::default();
        p.adopt(head(2, 0, true));
        assert!(p.is_parked(AggregateKey(2)));
        assert!(p.next_due().is_none());
        p.adopt(head(2, 0, false));
        assert!(p.next_due().is_some());
    }
}
