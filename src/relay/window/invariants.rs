//! The window's internal consistency, checked by its tests after every step.

use super::{Entry, Ordering, State, Window};

impl Window {
    /// Internal consistency, for tests: turns and queues match the entries, and
    /// the byte count is the sum of the entries' weights.
    pub(super) fn check_invariants(&self) {
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
            if e.has_turn {
                assert!(
                    self.aggregates.contains_key(&e.row.key()),
                    "a turn held in a forgotten aggregate"
                );
            }
        }
    }
}
