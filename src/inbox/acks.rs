//! Ack bookkeeping for one consumer channel, a small state machine with no I/O.
//!
//! The broker numbers a channel's deliveries 1, 2, 3, … A delivery is *settled*
//! once its row committed (new or duplicate) or it was dead-lettered. A multiple
//! ack up to tag `t` acks every outstanding delivery ≤ `t`, so the receiver may
//! send one only when every delivery up to `t` is settled: the tracker returns the
//! highest such tag that has not been acked yet. Settlements arrive out of order
//! (an invalid delivery is dead-lettered before the batch before it commits).
//!
//! A delivery the receiver rejected on its own (`basic.reject`) is settled
//! *individually*: it is no longer outstanding, so no ack may name its tag (the
//! broker would close the channel for an unknown tag); a later multiple ack
//! still passes over it.

use std::collections::BTreeMap;

/// Which deliveries of one channel are settled and how far they were acked.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Every tag ≤ this is settled and acked (or about to be, by the caller).
    acked_upto: u64,
    /// Highest tag received.
    received: u64,
    /// Settled tags above `acked_upto`; `true`: settled individually.
    settled: BTreeMap<u64, bool>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `tag` arrived (tags arrive in increasing order).
    pub fn received(&mut self, tag: u64) {
        debug_assert!(tag > self.received, "tags arrive in increasing order");
        self.received = self.received.max(tag);
    }

    /// Marks `tag` settled, to be acked. Tags never received, or already settled,
    /// are ignored.
    pub fn settle(&mut self, tag: u64) {
        if tag > self.acked_upto && tag <= self.received {
            self.settled.entry(tag).or_insert(false);
        }
    }

    /// Marks `tag` settled by a reject of its own: no ack may name it.
    pub fn settle_individually(&mut self, tag: u64) {
        if tag > self.acked_upto && tag <= self.received {
            self.settled.insert(tag, true);
        }
    }

    /// The tag to ack with `multiple = true` now, if the settled prefix grew and
    /// holds a delivery that still needs an ack: the highest such one.
    pub fn ackable(&mut self) -> Option<u64> {
        let mut ack = None;
        while let Some(individual) = self.settled.remove(&(self.acked_upto + 1)) {
            self.acked_upto += 1;
            if !individual {
                ack = Some(self.acked_upto);
            }
        }
        ack
    }

    /// Deliveries received and not yet acked.
    pub fn outstanding(&self) -> u64 {
        self.received - self.acked_upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acks_the_settled_prefix_only() {
        let mut t = AckTracker::new();
        for tag in 1..=5 {
            t.received(tag);
        }
        t.settle(2);
        t.settle(3);
        assert_eq!(t.ackable(), None);
        t.settle(1);
        assert_eq!(t.ackable(), Some(3));
        assert_eq!(t.ackable(), None);
        t.settle(5);
        assert_eq!(t.ackable(), None);
        t.settle(4);
        assert_eq!(t.ackable(), Some(5));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn outstanding_counts_what_is_not_acked_yet() {
        // The receiver's shutdown drain waits for this to reach zero.
        let mut t = AckTracker::new();
        for tag in 1..=3 {
            t.received(tag);
        }
        assert_eq!(t.outstanding(), 3);
        t.settle(1);
        assert_eq!(t.outstanding(), 3, "settled is not acked yet");
        assert_eq!(t.ackable(), Some(1));
        assert_eq!(t.outstanding(), 2);
    }

    #[test]
    fn an_ack_never_names_a_rejected_tag() {
        let mut t = AckTracker::new();
        for tag in 1..=3 {
            t.received(tag);
        }
        t.settle(1);
        t.settle(2);
        t.settle_individually(3);
        assert_eq!(t.ackable(), Some(2));
        t.received(4);
        t.settle_individually(4);
        assert_eq!(t.ackable(), None);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_reject_of_a_tag_not_received_is_ignored() {
        let mut t = AckTracker::new();
        t.received(1);
        t.settle_individually(2);
        t.received(2);
        t.settle(1);
        t.settle(2);
        assert_eq!(t.ackable(), Some(2), "2 was never rejected: it is acked");
    }

    proptest! {
        /// For any order of settlements: an ack never covers an unsettled delivery,
        /// acks only grow, and once everything is settled everything is acked.
        #[test]
        fn multiple_acks_cover_only_settled_deliveries(
            n in 1u64..200,
            rejected in proptest::collection::hash_set(1u64..200, 0..20),
            order in proptest::collection::vec(any::<u64>(), 0..400),
            repeat in proptest::collection::vec(any::<u64>(), 0..50),
        ) {
            let mut t = AckTracker::new();
            for tag in 1..=n {
                t.received(tag);
            }
            // A permutation of 1..=n driven by `order`, with some repeated settlements.
            let mut tags: Vec<u64> = (1..=n).collect();
            for (i, r) in order.iter().enumerate() {
                let len = tags.len();
                tags.swap(i % len, (*r % n) as usize);
            }
            for r in &repeat {
                let len = tags.len();
                tags.insert((*r as usize) % (len + 1), (*r % n) + 1);
            }
            let mut settled = std::collections::HashSet::new();
            let mut last = 0;
            for tag in tags {
                if rejected.contains(&tag) {
                    t.settle_individually(tag);
                } else {
                    t.settle(tag);
                }
                settled.insert(tag);
                if let Some(upto) = t.ackable() {
                    prop_assert!(upto > last, "acks only grow");
                    prop_assert!(!rejected.contains(&upto), "an ack names a rejected tag");
                    prop_assert!((1..=upto).all(|x| settled.contains(&x)),
                        "ack up to {upto} covers an unsettled delivery");
                    last = upto;
                }
            }
            // Everything is settled: the last ack names the highest tag that needed one.
            let want = (1..=n).rev().find(|x| !rejected.contains(x)).unwrap_or(0);
            prop_assert_eq!(last, want);
            prop_assert_eq!(t.outstanding(), 0);
        }

        /// Tags beyond what was received are never acked.
        #[test]
        fn never_acks_what_was_not_received(n in 0u64..50, extra in 1u64..50) {
            let mut t = AckTracker::new();
            for tag in 1..=n {
                t.received(tag);
            }
            for tag in 1..=n + extra {
                t.settle(tag);
            }
            prop_assert_eq!(t.ackable().unwrap_or(0), n);
        }
    }
}
