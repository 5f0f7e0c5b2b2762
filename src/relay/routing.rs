//! Whether the broker still routes anything: "this message is unroutable" or
//! "nothing is routable any more". A leaf: no I/O.
//!
//! A returned (unroutable), nacked or unconfirmed publish is normally that
//! message's failure: it is parked, retried and, out of retries, dead-lettered.
//! But when every publish fails the same way — [`MIN_FAILURES`] in a row with no
//! ack in between — the fault is the topology's or the broker's (the queue was
//! deleted, the bindings removed, a quorum queue lost its majority, a channel
//! nacks everything), not the messages'. Then publishing pauses: the failed
//! messages are held in the window, no retry budget is spent, nothing is
//! dead-lettered, `/readyz` says why, and one held message at a time is
//! published again as a probe (a different routing key each time) until one is
//! acked. A nack or a missing confirm says nothing about the message, only
//! about the broker or the channel: such a pause also renews the connection
//! before each probe ([`RoutingFault::on_connection`]).
//!
//! The first failures of a run are charged as usual (one attempt each, before
//! the pattern is clear). A return is about the routing key: with fewer than
//! [`MIN_KEYS`] keys among the returns a missing binding cannot be told from a
//! message nobody wants, so those failures stay the messages'.

use std::fmt;

/// Failures in a row, with no ack in between, before the fault is systemic.
pub const MIN_FAILURES: usize = 8;
/// Distinct routing keys among them, when they are returns.
pub const MIN_KEYS: usize = 3;
/// Routing keys kept as examples for the report.
const EXAMPLES: usize = 5;

/// The failure kinds that can be systemic (the `reason` labels of
/// `outbox_relay_publish_failures_total`); the others — too large, refused,
/// malformed — are a message's by nature.
pub fn counts(label: &str) -> bool {
    matches!(label, "returned" | "nack" | "timeout")
}

/// A run of failures of one kind since the last ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingFault {
    /// `returned`, `nack` or `timeout`.
    pub kind: &'static str,
    /// The broker's words for the first of them.
    pub reason: String,
    /// Failures in the run (held ones included, once it is a fault).
    pub failures: usize,
    /// Distinct routing keys seen in the run (the first few).
    pub keys: Vec<String>,
}

impl RoutingFault {
    fn new(kind: &'static str, reason: &str) -> RoutingFault {
        RoutingFault {
            kind,
            reason: reason.to_string(),
            failures: 0,
            keys: Vec::new(),
        }
    }

    fn add(&mut self, key: &str) {
        self.failures += 1;
        if self.keys.len() < EXAMPLES.max(MIN_KEYS) && !self.keys.iter().any(|k| k == key) {
            self.keys.push(key.to_string());
        }
    }

    fn systemic(&self) -> bool {
        self.failures >= MIN_FAILURES && (self.on_connection() || self.keys.len() >= MIN_KEYS)
    }

    /// The fault may be the connection's (nacks, missing confirms), not the
    /// topology's (returns): probe on a new connection.
    pub fn on_connection(&self) -> bool {
        self.kind != "returned"
    }
}

impl fmt::Display for RoutingFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            "returned" => "returned as unroutable",
            "nack" => "nacked",
            _ => "left without a confirm",
        };
        let keys = match self.keys.len() {
            1 => format!("routing key {}", self.keys[0]),
            n if n >= EXAMPLES.max(MIN_KEYS) => {
                format!("routing keys {} and more", self.keys.join(", "))
            }
            _ => format!("routing keys {}", self.keys.join(", ")),
        };
        write!(
            f,
            "every publish is {what} ({}): {} in a row with {keys}, none acked since",
            self.reason, self.failures
        )
    }
}

/// Watches the broker's answers for a systemic fault.
#[derive(Debug, Default)]
pub struct RoutingWatch {
    run: Option<RoutingFault>,
    /// The run became systemic: publishing is paused until an ack.
    fault: Option<RoutingFault>,
}

impl RoutingWatch {
    /// A publish was acked: the broker routes. True when that ends a fault.
    pub fn acked(&mut self) -> bool {
        self.run = None;
        self.fault.take().is_some()
    }

    /// A publish with `routing_key` failed (`label`, the broker's `reason`). True
    /// when the fault is systemic (now, or already): hold the message instead of
    /// charging it.
    pub fn failed(&mut self, label: &'static str, routing_key: &str, reason: &str) -> bool {
        if !counts(label) {
            return false;
        }
        if let Some(fault) = &mut self.fault {
            fault.add(routing_key);
            return true;
        }
        let run = match &mut self.run {
            Some(run) if run.kind == label => run,
            _ => self.run.insert(RoutingFault::new(label, reason)),
        };
        run.add(routing_key);
        if run.systemic() {
            self.fault = self.run.take();
            return true;
        }
        false
    }

    /// The systemic fault, while there is one.
    pub fn fault(&self) -> Option<&RoutingFault> {
        self.fault.as_ref()
    }

    /// Forgets everything (nothing is held any more).
    pub fn reset(&mut self) {
        self.run = None;
        self.fault = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_unroutable_key_stays_the_messages_fault() {
        let mut w = RoutingWatch::default();
        for _ in 0..100 {
            assert!(!w.failed("returned", "order.lost", "312 NO_ROUTE"));
        }
        assert!(w.fault().is_none());
    }

    #[test]
    fn many_keys_returned_with_no_ack_is_systemic_until_an_ack() {
        let mut w = RoutingWatch::default();
        let keys = ["Order.placed", "Customer.created", "Invoice.sent"];
        let mut first = None;
        for i in 0..MIN_FAILURES {
            if w.failed("returned", keys[i % 3], "312 NO_ROUTE") {
                first = Some(i);
                break;
            }
        }
        assert_eq!(first, Some(MIN_FAILURES - 1), "the eighth failure decides");
        let fault = w.fault().unwrap().clone();
        assert_eq!(fault.kind, "returned");
        assert!(fault
            .to_string()
            .contains("Order.placed, Customer.created, Invoice.sent"));
        // While it lasts every such failure is held, whatever its key.
        assert!(w.failed("returned", "Order.placed", "312 NO_ROUTE"));
        assert!(w.failed("nack", "x", "nack"));
        // Not the per-message kinds.
        assert!(!w.failed("too_large", "x", ""));
        assert!(w.acked(), "the ack ends the fault");
        assert!(w.fault().is_none());
        assert!(!w.acked());
    }

    #[test]
    fn nacks_or_missing_confirms_on_one_key_are_systemic() {
        for kind in ["nack", "timeout"] {
            let mut w = RoutingWatch::default();
            for _ in 0..MIN_FAILURES - 1 {
                assert!(!w.failed(kind, "Order.streamed", "nacked by the broker"));
            }
            assert!(w.failed(kind, "Order.streamed", "nacked by the broker"));
            let fault = w.fault().unwrap();
            assert!(fault.on_connection(), "{kind}: probe on a new connection");
        }
        let mut w = RoutingWatch::default();
        let keys = ["a", "b", "c"];
        for i in 0..MIN_FAILURES {
            w.failed("returned", keys[i % 3], "r");
        }
        assert!(
            !w.fault().unwrap().on_connection(),
            "returns are the topology's"
        );
    }

    #[test]
    fn an_ack_in_between_or_another_kind_starts_over() {
        let mut w = RoutingWatch::default();
        let keys = ["a", "b", "c"];
        for i in 0..MIN_FAILURES - 1 {
            assert!(!w.failed("returned", keys[i % 3], "r"));
        }
        w.acked();
        for i in 0..MIN_FAILURES - 1 {
            assert!(!w.failed("returned", keys[i % 3], "r"));
        }
        assert!(!w.failed("nack", "a", "n"), "another kind starts a new run");
        assert!(w.fault().is_none());
    }

    #[test]
    fn reset_forgets_the_fault_and_a_new_failure_starts_the_count_again() {
        let mut w = RoutingWatch::default();
        for _ in 0..MIN_FAILURES {
            w.failed("nack", "Order.placed", "nacked by the broker");
        }
        assert!(w.fault().is_some());
        w.reset();
        assert!(w.fault().is_none());
        assert!(
            !w.failed("nack", "Order.placed", "nacked by the broker"),
            "one failure after a reset is the message's"
        );
    }

    proptest! {
        /// Against a model: a fault starts only once MIN_FAILURES failures of one
        /// kind (returns: over MIN_KEYS keys) came with no ack (nor another
        /// counted kind) in between; it holds every counted failure until an ack
        /// ends it.
        #[test]
        fn systemic_only_on_enough_evidence(
            events in proptest::collection::vec((0u8..6, 0u8..4), 1..200)
        ) {
            let mut w = RoutingWatch::default();
            let labels = ["returned", "nack", "timeout", "too_large"];
            let mut run: Option<(&str, usize, std::collections::BTreeSet<u8>)> = None;
            let mut faulted = false;
            for (e, key) in events {
                if e >= 4 {
                    prop_assert_eq!(w.acked(), faulted);
                    run = None;
                    faulted = false;
                    prop_assert!(w.fault().is_none());
                    continue;
                }
                let label = labels[e as usize];
                let held = w.failed(label, &format!("k{key}"), "why");
                if counts(label) && !faulted {
                    let r = match &mut run {
                        Some(r) if r.0 == label => r,
                        _ => run.insert((label, 0, Default::default())),
                    };
                    r.1 += 1;
                    r.2.insert(key);
                    if r.1 >= MIN_FAILURES && (label != "returned" || r.2.len() >= MIN_KEYS) {
                        faulted = true;
                        run = None;
                    }
                }
                prop_assert_eq!(held, faulted && counts(label));
                prop_assert_eq!(w.fault().is_some(), faulted);
            }
        }
    }
}
