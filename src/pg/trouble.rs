//! One way to survive a sick SQL session, for every task that owns one (the
//! retry store, housekeeping, the inbox store): what a failed statement calls
//! for, and how a batch is narrowed down to the rows a statement refuses. A
//! leaf: no I/O, tested without a server.
//!
//! - The connection is gone, a lock or statement timeout, a deadlock: keep the
//!   work, back off (`time::Backoff`), reconnect when the session is gone, try
//!   the same statement again.
//! - The table changed under the statement (a column dropped): learn its shape
//!   again and retry at once, once.
//! - A row's values are refused (a constraint, a trigger, a conversion): split
//!   the batch ([`Narrowing`]) until the rows refused alone are found; the rest
//!   go through, and the caller decides what becomes of those rows.
//! - Anything else: retried a few times, then treated as the rows' own.

use crate::error::SqlTrouble;
use std::collections::VecDeque;

/// Failures of a statement for another reason than the connection (or a
/// timeout) before it is treated as its rows' own.
pub const GIVE_UP_AFTER: u32 = 5;

/// What a failed statement calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep the work; back off, reconnect if the session is gone, try again.
    RetryLater,
    /// Learn the table's shape again, then try again at once.
    Relearn,
    /// One of the rows is refused: narrow the batch down to it.
    Narrow,
}

/// The decision for a statement that failed with `trouble` (`None`: not a
/// statement's failure, e.g. the connection could not be made), after the
/// table's shape was just learned again (`relearned`), on its `attempt`-th
/// failure.
pub fn decide(trouble: Option<SqlTrouble>, relearned: bool, attempt: u32) -> Decision {
    match trouble {
        None | Some(SqlTrouble::Connection) | Some(SqlTrouble::Timeout) => Decision::RetryLater,
        Some(SqlTrouble::SchemaDrift) if !relearned => Decision::Relearn,
        Some(SqlTrouble::SchemaDrift) | Some(SqlTrouble::Row) => Decision::Narrow,
        Some(SqlTrouble::Other) if attempt < GIVE_UP_AFTER => Decision::RetryLater,
        Some(SqlTrouble::Other) => Decision::Narrow,
    }
}

/// Splits a batch a statement refused into halves, and those again, until the
/// rows refused on their own are found; every item is either in a part that
/// went through or handed back alone, once, in its original order.
#[derive(Debug)]
pub struct Narrowing<T> {
    parts: VecDeque<Vec<T>>,
}

impl<T> Narrowing<T> {
    pub fn new(batch: Vec<T>) -> Narrowing<T> {
        let mut parts = VecDeque::new();
        if !batch.is_empty() {
            parts.push_back(batch);
        }
        Narrowing { parts }
    }

    /// The next part to try, oldest rows first.
    pub fn next_part(&mut self) -> Option<Vec<T>> {
        self.parts.pop_front()
    }

    /// `part` failed for the connection's sake (or before the table was learned
    /// again): it is tried again next.
    pub fn again(&mut self, part: Vec<T>) {
        self.parts.push_front(part);
    }

    /// Everything not tried yet, in order (the work is put off).
    pub fn rest(&mut self) -> Vec<T> {
        self.parts.drain(..).flatten().collect()
    }

    /// `part` was refused for a row's sake: its halves are tried next; a part of
    /// one row is that row, handed back.
    pub fn refused(&mut self, mut part: Vec<T>) -> Option<T> {
        if part.len() == 1 {
            return part.pop();
        }
        let second = part.split_off(part.len() / 2);
        self.parts.push_front(second);
        self.parts.push_front(part);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_trouble_has_its_decision() {
        use SqlTrouble::*;
        assert_eq!(decide(None, false, 1), Decision::RetryLater);
        assert_eq!(decide(Some(Connection), true, 99), Decision::RetryLater);
        assert_eq!(decide(Some(Timeout), false, 99), Decision::RetryLater);
        assert_eq!(decide(Some(SchemaDrift), false, 1), Decision::Relearn);
        assert_eq!(decide(Some(SchemaDrift), true, 1), Decision::Narrow);
        assert_eq!(decide(Some(Row), false, 1), Decision::Narrow);
        assert_eq!(decide(Some(Other), false, 1), Decision::RetryLater);
        assert_eq!(decide(Some(Other), false, GIVE_UP_AFTER), Decision::Narrow);
    }

    #[test]
    fn narrowing_finds_the_refused_row_in_few_statements() {
        let mut n = Narrowing::new((0..1000).collect::<Vec<u32>>());
        let (mut statements, mut passed, mut culprits) = (0, Vec::new(), Vec::new());
        while let Some(part) = n.next_part() {
            statements += 1;
            if part.contains(&613) {
                culprits.extend(n.refused(part));
            } else {
                passed.extend(part);
            }
        }
        assert_eq!(culprits, vec![613]);
        assert_eq!(passed.len(), 999);
        assert!(passed.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(statements <= 2 * 10 + 1, "{statements} statements");
    }

    #[test]
    fn work_put_off_keeps_every_row_not_tried_in_order() {
        let mut n = Narrowing::new((0..8).collect::<Vec<u32>>());
        let whole = n.next_part().unwrap();
        assert_eq!(n.refused(whole), None);
        let first = n.next_part().unwrap();
        assert_eq!(first, vec![0, 1, 2, 3]);
        n.again(first);
        assert_eq!(n.rest(), (0..8).collect::<Vec<u32>>());
        assert_eq!(n.next_part(), None);
    }

    proptest! {
        /// Whatever rows are refused and whatever connection failures come in
        /// between: every item ends up passed or handed back, exactly once, the
        /// handed-back ones are exactly the refused ones, and order is kept.
        #[test]
        fn every_item_is_accounted_for_once(
            n in 0usize..200,
            bad in proptest::collection::btree_set(0usize..200, 0..10),
            flaky in proptest::collection::vec(proptest::bool::weighted(0.2), 0..64),
        ) {
            let mut narrowing = Narrowing::new((0..n).collect::<Vec<usize>>());
            let mut flaky = flaky.into_iter();
            let mut out: Vec<usize> = Vec::new();
            let mut culprits = Vec::new();
            let mut steps = 0;
            while let Some(part) = narrowing.next_part() {
                steps += 1;
                prop_assert!(steps < 10_000);
                if flaky.next().unwrap_or(false) {
                    narrowing.again(part);
                } else if part.iter().any(|i| bad.contains(i)) {
                    if let Some(c) = narrowing.refused(part) {
                        culprits.push(c);
                        out.push(c);
                    }
                } else {
                    out.extend(part);
                }
            }
            let expected: Vec<usize> = (0..n).collect();
            prop_assert_eq!(out, expected);
            let want: Vec<usize> = bad.iter().copied().filter(|b| *b < n).collect();
            prop_assert_eq!(culprits, want);
        }
    }
}
