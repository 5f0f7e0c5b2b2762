//! Marks: how far the slot may be confirmed while acked rows wait for their
//! `on_success` (marked `published`, or deleted).
//!
//! Acked ids are handed to the housekeeping task in batches; each hand-over
//! gets a sequence number and remembers `applied` at that moment. Every row of
//! a transaction at or before that position was acked before the hand-over,
//! so it is in that batch or an earlier one: once housekeeping reports a
//! hand-over marked, its position may be confirmed. Later positions wait for
//! later hand-overs — also when `applied` moves on without a new hand-over
//! (a park resolved the transaction that held it), which is why the marks are
//! counted by hand-over and not compared as positions.
//!
//! When the marks do not move for `WAIT_MAX` (housekeeping stuck on a row
//! another session holds locked), the slot is confirmed without them, so a
//! status update can never stall the slot; a stop never gives up that way.

use pgwire_replication::Lsn;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// How long the slot waits for marks that do not move.
pub(super) const WAIT_MAX: Duration = Duration::from_secs(5);

pub(super) struct Marks {
    /// The sequence number of the next hand-over (the first is 1).
    next: u64,
    /// Hand-overs not yet marked: (sequence, `applied` when handed over).
    handed: VecDeque<(u64, Lsn)>,
    /// The position of the newest marked hand-over.
    marked_at: Lsn,
    /// When the marks last moved, or nothing waited for them.
    moved_at: Instant,
    /// The wait was given up in this episode (warned once).
    given_up: bool,
    /// The last [`Marks::safe`] was behind `applied` for the marks' sake.
    waiting: bool,
}

/// What [`Marks::safe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Safe {
    /// The newest position the server may be told.
    pub lsn: Lsn,
    /// It is behind `applied` for the marks' sake.
    pub waiting: bool,
    /// The wait was given up just now (the caller warns once).
    pub gave_up: bool,
}

impl Marks {
    pub(super) fn new(start: Lsn, now: Instant) -> Marks {
        Marks {
            next: 1,
            handed: VecDeque::new(),
            marked_at: start,
            moved_at: now,
            given_up: false,
            waiting: false,
        }
    }

    /// The sequence number the next hand-over carries to housekeeping.
    pub(super) fn next_seq(&self) -> u64 {
        self.next
    }

    /// The hand-over numbered [`Marks::next_seq`] went out, with every
    /// transaction up to `applied` resolved.
    pub(super) fn handed_over(&mut self, applied: Lsn) {
        self.handed.push_back((self.next, applied));
        self.next += 1;
    }

    /// Housekeeping marked every hand-over up to `seq`.
    pub(super) fn marked(&mut self, seq: u64, now: Instant) {
        while let Some(&(s, lsn)) = self.handed.front() {
            if s > seq {
                break;
            }
            self.handed.pop_front();
            self.marked_at = self.marked_at.max(lsn);
        }
        self.moved_at = now;
        self.given_up = false;
    }

    /// Every hand-over is marked.
    pub(super) fn all_marked(&self) -> bool {
        self.handed.is_empty()
    }

    /// The position the server may be told with `applied` resolved and, when
    /// `unhanded`, acked ids not handed over yet. `may_give_up`: false at a
    /// stop.
    pub(super) fn safe(
        &mut self,
        applied: Lsn,
        unhanded: bool,
        now: Instant,
        may_give_up: bool,
    ) -> Safe {
        let held = unhanded || !self.handed.is_empty();
        if !held {
            self.moved_at = now;
            self.given_up = false;
            self.waiting = false;
            return Safe {
                lsn: applied,
                waiting: false,
                gave_up: false,
            };
        }
        let stuck = may_give_up && now.duration_since(self.moved_at) >= WAIT_MAX;
        let gave_up = stuck && !self.given_up;
        self.given_up |= stuck;
        let lsn = if stuck {
            applied
        } else {
            self.marked_at.min(applied)
        };
        self.waiting = lsn < applied;
        Safe {
            lsn,
            waiting: self.waiting,
            gave_up,
        }
    }

    /// When the wait for marks that do not move ends (while one is waited for).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.waiting.then_some(self.moved_at + WAIT_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::from_u64(n)
    }

    #[test]
    fn a_position_is_confirmed_only_once_its_hand_over_is_marked() {
        let t = Instant::now();
        let mut m = Marks::new(lsn(10), t);
        assert_eq!(m.safe(lsn(20), true, t, true).lsn, lsn(10));
        let seq = m.next_seq();
        m.handed_over(lsn(20));
        assert_eq!(m.safe(lsn(20), false, t, true).lsn, lsn(10));
        m.marked(seq, t);
        assert_eq!(m.safe(lsn(20), false, t, true).lsn, lsn(20));
    }

    /// The case a comparison of positions got wrong: two hand-overs at the same
    /// `applied`, the first marked, then `applied` moves on without a new
    /// hand-over (a park resolved the transaction that held it back).
    #[test]
    fn a_second_hand_over_at_the_same_position_holds_the_slot_until_marked() {
        let t = Instant::now();
        let mut m = Marks::new(lsn(0), t);
        let first = m.next_seq();
        m.handed_over(lsn(100));
        let second = m.next_seq();
        m.handed_over(lsn(100));
        m.marked(first, t);
        let s = m.safe(lsn(300), false, t, true);
        assert_eq!(s.lsn, lsn(100));
        assert!(s.waiting);
        m.marked(second, t);
        assert_eq!(m.safe(lsn(300), false, t, true).lsn, lsn(300));
    }

    #[test]
    fn marks_that_do_not_move_are_given_up_once_but_never_at_a_stop() {
        let t = Instant::now();
        let mut m = Marks::new(lsn(0), t);
        m.handed_over(lsn(50));
        let later = t + WAIT_MAX;
        assert_eq!(m.safe(lsn(50), false, later, false).lsn, lsn(0));
        assert_eq!(m.deadline(), Some(t + WAIT_MAX));
        let s = m.safe(lsn(50), false, later, true);
        assert_eq!((s.lsn, s.gave_up), (lsn(50), true));
        assert!(!m.safe(lsn(60), false, later, true).gave_up);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Transactions resolve: `applied` moves on by this much.
        Apply(u64),
        /// Rows acked (of transactions past `applied`, or up to it).
        Ack,
        HandOver,
        /// Housekeeping marks hand-overs up to this many of those handed.
        Mark(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u64..50).prop_map(Step::Apply),
            Just(Step::Ack),
            Just(Step::HandOver),
            (0usize..4).prop_map(Step::Mark),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Never confirmed past an acked row that is not marked: every acked
        /// row's transaction position is at or before `applied` once resolved,
        /// and the safe position stays at or before the oldest of those not
        /// marked yet (no time passes: nothing is given up).
        #[test]
        fn never_confirmed_past_an_unmarked_resolved_row(steps in proptest::collection::vec(step(), 1..80)) {
            let t = Instant::now();
            let mut m = Marks::new(lsn(0), t);
            let mut applied = 0u64;
            // Acked rows not handed over yet, and hand-overs (seq, rows) not marked.
            let mut unhanded: Vec<u64> = Vec::new();
            let mut handed: VecDeque<(u64, Vec<u64>)> = VecDeque::new();
            for s in steps {
                match s {
                    Step::Apply(d) => {
                        applied += d;
                    }
                    Step::Ack => {
                        // Its transaction's commit is past `applied`.
                        unhanded.push(applied + 1);
                    }
                    Step::HandOver => {
                        if !unhanded.is_empty() {
                            let seq = m.next_seq();
                            m.handed_over(lsn(applied));
                            handed.push_back((seq, std::mem::take(&mut unhanded)));
                        }
                    }
                    Step::Mark(k) => {
                        let k = k.min(handed.len());
                        if k > 0 {
                            let seq = handed[k - 1].0;
                            handed.drain(..k);
                            m.marked(seq, t);
                        }
                    }
                }
                let safe = m.safe(lsn(applied), !unhanded.is_empty(), t, true);
                prop_assert!(safe.lsn <= lsn(applied));
                let oldest_unmarked = unhanded
                    .iter()
                    .chain(handed.iter().flat_map(|(_, rows)| rows.iter()))
                    .filter(|&&pos| pos <= applied)
                    .min()
                    .copied();
                if let Some(pos) = oldest_unmarked {
                    prop_assert!(safe.lsn.as_u64() < pos, "confirmed {} past unmarked row at {}", safe.lsn.as_u64(), pos);
                }
            }
        }
    }
}
