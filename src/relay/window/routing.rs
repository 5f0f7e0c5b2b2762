//! The window's answer to a systemic routing fault (see `relay::routing`): when
//! every publish fails the same way across many routing keys, the failed
//! messages are held in the window (back to unsent, keeping their aggregate's
//! turn) instead of being parked and charged, nothing new is admitted, and one
//! held message at a time is published again as a probe — a different routing
//! key each time, with a growing wait — until one is acked; then everything
//! held goes out again in admission order. When the fault may be the
//! connection's (nacks, missing confirms), the sink is asked to replace the
//! connection, and the probe goes out on the new one as soon as it is up.

use super::{Origin, Seq, State, Window};
use crate::failure::Failure;
use crate::relay::routing::RoutingFault;
use crate::time::Backoff;
use std::time::Duration;
use tokio::time::Instant;

/// The first wait before a probe; it doubles up to the window's `probe_max`.
pub const PROBE_FIRST: Duration = Duration::from_millis(500);

/// A routing pause in progress.
#[derive(Debug)]
pub(super) struct RoutingPause {
    /// When the next probe may go out (once nothing is on the wire).
    next_probe: Instant,
    /// The wait after each failed probe (doubling up to the window's `probe_max`).
    wait: Backoff,
    /// The routing key of the last probe (the next one tries another).
    last_key: Option<String>,
}

impl Window {
    /// The systemic fault publishing is paused for, if it is.
    pub fn routing_fault(&self) -> Option<&RoutingFault> {
        self.routing_pause.as_ref().and(self.routing.fault())
    }

    /// Whether publishing is paused for a routing fault.
    pub fn routing_paused(&self) -> bool {
        self.routing_pause.is_some()
    }

    /// Only what goes to the configured exchange tells about its routing: stream
    /// messages and retries, not dead-letter copies.
    fn tells_routing(&self, seq: Seq) -> bool {
        self.entries
            .get(&seq)
            .is_some_and(|e| matches!(e.origin, Origin::Stream { .. } | Origin::Retry { .. }))
    }

    /// `seq` was acked (call before resolving it). True when that ended a
    /// routing pause: everything held goes out again.
    pub fn routed(&mut self, seq: Seq) -> bool {
        if !self.tells_routing(seq) {
            return false;
        }
        let ended = self.routing.acked();
        if self.routing_pause.take().is_some() {
            self.publish_waiting();
        }
        ended
    }

    /// `seq` failed with `failure`. True when the failure is part of a systemic
    /// fault: `seq` is held (not charged; published again after the pause), and
    /// publishing pauses if it was not paused yet.
    pub fn unrouted(&mut self, seq: Seq, failure: &Failure) -> bool {
        if !self.tells_routing(seq) {
            return false;
        }
        let key = self
            .entries
            .get(&seq)
            .and_then(|e| e.message.as_ref())
            .map(|m| m.routing_identity())
            .unwrap_or_default();
        if !self
            .routing
            .failed(failure.label(), &key, &failure.to_string())
        {
            return false;
        }
        let now = Instant::now();
        let probe_max = self.probe_max;
        let pause = self.routing_pause.get_or_insert_with(|| RoutingPause {
            next_probe: now,
            wait: Backoff::exact(PROBE_FIRST, probe_max),
            last_key: None,
        });
        pause.next_probe = now + pause.wait.current();
        let was_suspect = self.clear_suspect(seq);
        if let Some(e) = self.entries.get_mut(&seq) {
            let on = match e.state {
                State::Published { generation } => Some(generation),
                _ => None,
            };
            e.state = State::Unsent;
            self.ask_renewal(on);
        }
        self.wire_changed(was_suspect);
        true
    }

    /// A held failure that came on connection `on`: when the fault may be the
    /// connection's (nacks, missing confirms) and `on` is the current one, ask
    /// the sink once to replace it — the next probe goes out on a new one.
    fn ask_renewal(&mut self, on: Option<u64>) {
        let connection_fault = self.routing.fault().is_some_and(|f| f.on_connection());
        if connection_fault && on.is_some() && on == self.generation && on != self.renewed {
            self.renewal = on;
            self.renewed = on;
        }
    }

    /// The connection generation the sink should replace, once.
    pub fn take_renewal(&mut self) -> Option<u64> {
        self.renewal.take()
    }

    /// A new connection is worth a probe at once.
    pub(super) fn probe_now(&mut self) {
        if let Some(pause) = &mut self.routing_pause {
            pause.next_probe = Instant::now();
        }
    }

    /// When the next probe is due: while paused with nothing on the wire.
    pub(super) fn routing_timer(&self) -> Option<Instant> {
        let pause = self.routing_pause.as_ref()?;
        (!self.on_wire()).then_some(pause.next_probe)
    }

    fn on_wire(&self) -> bool {
        self.entries
            .values()
            .any(|e| matches!(e.state, State::Published { .. }))
    }

    /// Publishes one held message as a probe when it is due (the oldest with
    /// another routing key than the last probe, else the oldest). With nothing
    /// held any more there is nothing to probe with: the pause ends (a new
    /// failure starts the count again).
    pub fn fire_routing_probe(&mut self, now: Instant) {
        let Some(pause) = &self.routing_pause else {
            return;
        };
        if pause.next_probe > now || self.on_wire() || self.generation.is_none() {
            return;
        }
        let held = |e: &super::Entry| e.state == State::Unsent && e.has_turn && e.message.is_some();
        let key_of = |e: &super::Entry| e.message.as_ref().map(|m| m.routing_identity());
        let mut candidates: Vec<(Seq, Option<String>)> = self
            .entries
            .iter()
            .filter(|(_, e)| held(e))
            .map(|(seq, e)| (*seq, key_of(e)))
            .collect();
        candidates.sort_unstable_by_key(|(seq, _)| *seq);
        let pick = candidates
            .iter()
            .find(|(_, key)| *key != pause.last_key)
            .or(candidates.first())
            .cloned();
        match pick {
            Some((seq, key)) => {
                if let Some(pause) = &mut self.routing_pause {
                    pause.last_key = key;
                    pause.next_probe = now + pause.wait.fail();
                }
                self.publish(seq);
            }
            None => {
                self.routing_pause = None;
                self.routing.reset();
                self.publish_waiting();
            }
        }
    }

    /// Publishes what waited: the next suspect when a refusal is being probed,
    /// else every held message in admission order.
    pub(super) fn publish_waiting(&mut self) {
        if self.suspects > 0 {
            self.continue_probing();
        } else {
            self.publish_unsent();
        }
    }
}
