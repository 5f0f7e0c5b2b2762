//! Whose fault is a refused row: the message's or the table's. A leaf: no I/O.
//!
//! When the inbox table refuses a row (a constraint, a trigger, a NOT NULL column
//! nothing fills), the receiver cannot tell from that row alone whether the
//! message is bad or the table is: a `CHECK` on a value fails one message, a
//! `tenant text not null` added by a migration fails every message. So a refused
//! row is *held*, unacked, and the table is judged by the rows around it:
//!
//! - once the table accepts any row, every row it refused since was refused for
//!   its own sake: those are set aside (dead-lettered with the reason);
//! - while it accepts none, nothing is set aside: the receiver pauses (stops
//!   taking deliveries, `/readyz` 503 naming the refusal and its fix), retries
//!   the held rows with backoff and tries one more delivery each time, and
//!   resumes by itself when a row goes in. Two or more rows refused the same way
//!   (same SQLSTATE, same column or constraint) with none accepted is the table's
//!   fault, and `/readyz` says so.
//!
//! Nothing a table fault touches is dead-lettered or lost: the held deliveries are
//! redelivered by the broker if the receiver stops.

use std::fmt;

/// How the table refused one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// SQLSTATE, e.g. `23502` (not null), `23514` (check).
    pub code: String,
    /// The column the refusal names, if any.
    pub column: Option<String>,
    /// The constraint the refusal names, if any.
    pub constraint: Option<String>,
    /// The server's message (and detail), one line.
    pub message: String,
}

impl Refusal {
    /// The refusal in a statement's error, when it is a server error.
    pub fn of(error: &tokio_postgres::Error) -> Option<Refusal> {
        let db = error.as_db_error()?;
        let mut message = db.message().to_string();
        if let Some(detail) = db.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        Some(Refusal {
            code: db.code().code().to_string(),
            column: db.column().map(str::to_string),
            constraint: db.constraint().map(str::to_string),
            message: message.replace(['\n', '\r'], " "),
        })
    }

    /// The same SQLSTATE on the same column or constraint.
    pub fn same_way(&self, other: &Refusal) -> bool {
        self.code == other.code
            && self.column == other.column
            && self.constraint == other.constraint
    }

    /// What fixes the table, when the refusal says.
    pub fn fix(&self, table: &str) -> String {
        match (self.code.as_str(), &self.column, &self.constraint) {
            ("23502", Some(column), _) => format!(
                "the receiver does not write column {column}: ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL, or give it a default (ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT ...)"
            ),
            (_, _, Some(constraint)) => format!(
                "make constraint {constraint} of {table} accept the rows, or ALTER TABLE {table} DROP CONSTRAINT {constraint}"
            ),
            _ => format!("fix {table} so that it takes the rows (see the message)"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// What the held rows say about the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is held: the table takes rows.
    Clear,
    /// Rows were refused and none accepted since, but not (yet) all the same way:
    /// paused while one more delivery tells whose fault it is.
    Suspect { held: usize, last: Refusal },
    /// Two or more rows refused the same way and none accepted since: the table's fault.
    TableAtFault { held: usize, refusal: Refusal },
}

impl Verdict {
    /// The `/readyz` reason for `table`, `None` when clear.
    pub fn reason(&self, table: &str) -> Option<String> {
        match self {
            Verdict::Clear => None,
            Verdict::Suspect { held, last } => Some(format!(
                "the inbox table {table} refused {held} delivery(ies) ({last}) and accepted none since: holding them unacked (nothing is dead-lettered) and trying the next delivery to tell a bad message from a table fault"
            )),
            Verdict::TableAtFault { held, refusal } => Some(format!(
                "the inbox table {table} refuses every row the same way: {refusal}; {}. Receiving is paused: {held} delivery(ies) held unacked, nothing dead-lettered; it resumes by itself once the table takes a row",
                refusal.fix(table)
            )),
        }
    }
}

/// Rows the table refused since it last accepted one, held for judgement.
#[derive(Debug)]
pub struct Judge<T> {
    held: Vec<(T, Refusal)>,
}

impl<T> Default for Judge<T> {
    fn default() -> Self {
        Judge { held: Vec::new() }
    }
}

impl<T> Judge<T> {
    /// A batch was recorded: `accepted` rows went in (new or duplicate), `refused`
    /// were refused. Returns what is now known to be the messages' own fault, to
    /// set aside: every held and refused row, once the table accepted one.
    pub fn outcome(&mut self, accepted: usize, refused: Vec<(T, Refusal)>) -> Vec<(T, Refusal)> {
        self.held.extend(refused);
        if accepted > 0 {
            std::mem::take(&mut self.held)
        } else {
            Vec::new()
        }
    }

    /// Rows are held: receiving is paused until the table takes one.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// How many rows are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The held rows, oldest first, for a retry (their results go back through
    /// [`Judge::outcome`]).
    pub fn take_held(&mut self) -> Vec<(T, Refusal)> {
        std::mem::take(&mut self.held)
    }

    /// Puts rows taken for a retry back, ahead of anything held since.
    pub fn put_back(&mut self, mut rows: Vec<(T, Refusal)>) {
        rows.append(&mut self.held);
        self.held = rows;
    }

    /// Drops held rows that `stale` says are gone (their delivery belongs to a
    /// broker connection that no longer exists: the broker redelivers them).
    pub fn forget(&mut self, stale: impl Fn(&T) -> bool) {
        self.held.retain(|(t, _)| !stale(t));
    }

    pub fn verdict(&self) -> Verdict {
        let Some((_, last)) = self.held.last() else {
            return Verdict::Clear;
        };
        let same = self.held.iter().all(|(_, r)| r.same_way(last));
        if same && self.held.len() >= 2 {
            Verdict::TableAtFault {
                held: self.held.len(),
                refusal: last.clone(),
            }
        } else {
            Verdict::Suspect {
                held: self.held.len(),
                last: last.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn not_null(column: &str) -> Refusal {
        Refusal {
            code: "23502".into(),
            column: Some(column.into()),
            constraint: None,
            message: format!("null value in column \"{column}\" violates not-null constraint"),
        }
    }

    fn check(constraint: &str) -> Refusal {
        Refusal {
            code: "23514".into(),
            column: None,
            constraint: Some(constraint.into()),
            message: format!("new row violates check constraint \"{constraint}\""),
        }
    }

    #[test]
    fn a_row_refused_beside_accepted_ones_is_set_aside_at_once() {
        let mut j = Judge::default();
        let aside = j.outcome(9, vec![(1, check("positive"))]);
        assert_eq!(aside.len(), 1);
        assert!(!j.holding());
        assert_eq!(j.verdict(), Verdict::Clear);
    }

    #[test]
    fn a_lone_refusal_is_held_until_the_next_row_decides() {
        let mut j = Judge::default();
        assert!(j.outcome(0, vec![(1, check("positive"))]).is_empty());
        assert!(j.holding());
        assert!(matches!(j.verdict(), Verdict::Suspect { held: 1, .. }));
        // The next delivery goes in: the held one was the message's fault.
        let aside = j.outcome(1, vec![]);
        assert_eq!(aside.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![1]);
        assert_eq!(j.verdict(), Verdict::Clear);
    }

    #[test]
    fn every_row_refused_the_same_way_is_the_tables_fault_and_nothing_is_set_aside() {
        let mut j = Judge::default();
        assert!(j
            .outcome(0, (0..300).map(|i| (i, not_null("tenant"))).collect())
            .is_empty());
        match j.verdict() {
            Verdict::TableAtFault { held, refusal } => {
                assert_eq!(held, 300);
                assert_eq!(refusal.column.as_deref(), Some("tenant"));
                let why = j.verdict().reason("public.inbox_messages").unwrap();
                assert!(
                    why.contains(
                        "ALTER TABLE public.inbox_messages ALTER COLUMN tenant DROP NOT NULL"
                    ),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Retried while the table is still broken: still held.
        let again = j.take_held();
        assert!(j.outcome(0, again).is_empty());
        assert_eq!(j.held(), 300);
        // The column got a default: the retry is accepted, nothing is set aside.
        let retried = j.take_held();
        assert_eq!(retried.len(), 300);
        assert!(j.outcome(300, vec![]).is_empty());
        assert_eq!(j.verdict(), Verdict::Clear);
    }

    #[test]
    fn different_refusals_with_nothing_accepted_stay_suspect() {
        let mut j = Judge::default();
        j.outcome(0, vec![(1, check("a")), (2, check("b"))]);
        assert!(matches!(j.verdict(), Verdict::Suspect { held: 2, .. }));
        assert!(!check("a").same_way(&check("b")));
        assert!(not_null("x").same_way(&not_null("x")));
    }

    #[test]
    fn put_back_keeps_arrival_order_and_forget_drops_stale_rows() {
        let mut j = Judge::default();
        j.outcome(0, vec![(1, check("a")), (2, check("a"))]);
        let taken = j.take_held();
        j.outcome(0, vec![(3, check("a"))]);
        j.put_back(taken);
        let order: Vec<i32> = j.take_held().into_iter().map(|(t, _)| t).collect();
        assert_eq!(order, vec![1, 2, 3]);
        j.outcome(0, vec![(1, check("a")), (2, check("a"))]);
        j.forget(|t| *t == 1);
        assert_eq!(j.held(), 1);
        let kept: Vec<i32> = j.take_held().into_iter().map(|(t, _)| t).collect();
        assert_eq!(kept, vec![2], "the stale row goes, the other stays");
    }

    proptest! {
        /// Over any sequence of batches: a row is set aside only in a batch where
        /// the table accepted a row; every refused row is either held or set aside
        /// exactly once; and the verdict is Clear exactly when nothing is held.
        #[test]
        fn nothing_is_set_aside_without_an_accepted_row(
            batches in proptest::collection::vec((0usize..3, proptest::collection::vec(0u8..3, 0..5)), 1..40)
        ) {
            let mut j = Judge::default();
            let mut next = 0u32;
            let mut refused_total = 0usize;
            let mut aside_total = 0usize;
            for (accepted, kinds) in batches {
                let refused: Vec<(u32, Refusal)> = kinds
                    .iter()
                    .map(|k| {
                        next += 1;
                        (next, check(&format!("c{k}")))
                    })
                    .collect();
                refused_total += refused.len();
                let aside = j.outcome(accepted, refused);
                if accepted == 0 {
                    prop_assert!(aside.is_empty());
                }
                aside_total += aside.len();
                prop_assert_eq!(aside_total + j.held(), refused_total);
                prop_assert_eq!(j.verdict() == Verdict::Clear, !j.holding());
                if let Verdict::TableAtFault { held, .. } = j.verdict() {
                    prop_assert!(held >= 2);
                }
            }
        }
    }
}
