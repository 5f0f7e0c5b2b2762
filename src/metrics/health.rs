//! What `/readyz` reports: whether the relay can make progress, and if not, why.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

/// A condition that stops the relay from making progress, reported by the part
/// of the relay that sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// The broker blocks publishing (a resource alarm).
    BrokerBlocked,
    /// The broker keeps closing the connection, or cannot be connected to.
    BrokerUnavailable,
    /// The retry store's statements keep failing.
    Store,
    /// Work is pending and the applied LSN has not moved for too long.
    Stalled,
    /// The inbox table refuses rows and has accepted none since: receiving is paused.
    InboxTable,
    /// Every publish across many routing keys is refused the same way (returned,
    /// nacked): publishing is paused, nothing is counted against the messages.
    Routing,
    /// The replication slot is lost (dropped, invalidated, or a fail-over to a
    /// server without it): the relay waits for `replay --pending`.
    SlotLost,
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    streaming: AtomicBool,
    /// The broker node (`host:port`) connected to; `None` while not connected.
    broker: Mutex<Option<String>>,
    /// Pid of the process holding the slot while this relay waits as a standby; 0 otherwise.
    standby_for: AtomicI32,
    problems: Mutex<BTreeMap<Problem, String>>,
}

impl Health {
    pub fn set_streaming(&self, v: bool) {
        self.streaming.store(v, Ordering::Relaxed);
    }

    /// Connected to `node` (`host:port`), or not connected (`None`); also sets
    /// `outbox_relay_broker_node`.
    pub fn set_broker(&self, node: Option<String>) {
        let mut broker = self.broker.lock().unwrap_or_else(|p| p.into_inner());
        super::metrics().set_broker_node(broker.as_deref(), node.as_deref());
        *broker = node;
    }

    /// The broker node connected to, if any.
    pub fn broker(&self) -> Option<String> {
        self.broker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_standby(&self, holder_pid: Option<i32>) {
        self.standby_for
            .store(holder_pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// Reports `problem` with its reason, or clears it with `None`.
    pub fn set_problem(&self, problem: Problem, reason: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(r) => {
                problems.insert(problem, r);
            }
            None => {
                problems.remove(&problem);
            }
        }
    }

    pub fn has_problem(&self, problem: Problem) -> bool {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&problem)
    }

    /// `Ok` (naming the broker node) when replication streams, the broker is
    /// connected and nothing stops progress; else why not.
    pub fn ready(&self) -> Result<String, String> {
        let standby = self.standby_for.load(Ordering::Relaxed);
        if standby != 0 {
            return Err(format!("standby: the slot is held by pid {standby}"));
        }
        let mut why = Vec::new();
        let broker = self.broker();
        match (self.streaming.load(Ordering::Relaxed), broker.is_some()) {
            (true, true) => {}
            (false, true) => {
                why.push("replication is not streaming (connecting to Postgres)".to_string())
            }
            (true, false) => why.push("broker is not connected".to_string()),
            (false, false) => {
                why.push("replication is not streaming and the broker is not connected".to_string())
            }
        }
        why.extend(
            self.problems
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        if why.is_empty() {
            Ok(format!("ready: broker node {}", broker.unwrap_or_default()))
        } else {
            Err(why.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_why() {
        let h = Health::default();
        assert!(h.ready().unwrap_err().contains("not streaming"));
        h.set_streaming(true);
        assert!(h.ready().unwrap_err().contains("broker"));
        h.set_broker(Some("rabbit-2:5672".into()));
        assert_eq!(h.ready().unwrap(), "ready: broker node rabbit-2:5672");
        h.set_problem(
            Problem::BrokerBlocked,
            Some("broker blocked publishing: memory alarm".into()),
        );
        h.set_problem(
            Problem::Store,
            Some("retry store failing: lock timeout".into()),
        );
        let why = h.ready().unwrap_err();
        assert!(
            why.contains("memory alarm") && why.contains("lock timeout"),
            "{why}"
        );
        h.set_problem(Problem::BrokerBlocked, None);
        h.set_problem(Problem::Store, None);
        assert!(h.ready().is_ok());
        h.set_standby(Some(42));
        assert!(h.ready().unwrap_err().contains("pid 42"));
    }
}
