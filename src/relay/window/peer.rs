//! The window's answers to the broker as a peer: a connection going down and
//! coming back, a refusal that makes every message on the wire a suspect (probed
//! one at a time until the culprit is found), and a broker that blocks
//! publishing (deadlines suspended until it unblocks).

use super::Seq;
use super::{State, Window};
use tokio::time::Instant;

impl Window {
    /// `seq` got an answer: it is no longer a suspect (nor the probe). Returns
    /// whether it was one; call `wire_changed` once it left the wire.
    pub(super) fn clear_suspect(&mut self, seq: Seq) -> bool {
        if self.probing == Some(seq) {
            self.probing = None;
        }
        match self.entries.get_mut(&seq) {
            Some(e) if e.suspect => {
                e.suspect = false;
                self.suspects -= 1;
                true
            }
            _ => false,
        }
    }

    /// A message left the wire: with suspects left the next probe may go out;
    /// after the last one, whatever waited.
    pub(super) fn wire_changed(&mut self, was_suspect: bool) {
        if self.suspects > 0 || was_suspect {
            self.continue_probing();
        }
    }

    /// Once the wire is empty, publishes the oldest suspect alone (on the
    /// isolated channel); when none is left, whatever waited.
    pub(super) fn continue_probing(&mut self) {
        if self.generation.is_none() || self.probing.is_some() {
            return;
        }
        if self.suspects > 0 {
            let on_wire = self
                .entries
                .values()
                .any(|e| matches!(e.state, State::Published { .. }));
            if on_wire {
                return;
            }
            let next = self
                .entries
                .iter()
                .filter(|(_, e)| e.suspect && e.state == State::Unsent)
                .map(|(seq, _)| *seq)
                .min();
            match next {
                Some(seq) => {
                    self.probing = Some(seq);
                    self.publish(seq);
                    return;
                }
                None => {
                    // Every suspect left the window some other way.
                    for e in self.entries.values_mut() {
                        e.suspect = false;
                    }
                    self.suspects = 0;
                }
            }
        }
        self.publish_unsent();
    }

    /// `generation` is the broker connection currently up.
    pub fn generation_is(&self, generation: u64) -> bool {
        self.generation == Some(generation)
    }

    /// Messages still to be probed after a refusal.
    pub fn suspects(&self) -> usize {
        self.suspects
    }

    /// The message published alone after a refusal, if one is on the wire.
    pub fn probing(&self) -> Option<Seq> {
        self.probing
    }

    /// The broker connection of `generation` is gone: nothing published on it will
    /// be answered. A broker outage is not a per-message failure: no publish
    /// timeouts run while it lasts. With `refused` the broker closed it in answer
    /// to a publish: when a probe was alone on the wire, it is returned (the
    /// culprit, to be failed); otherwise everything that was on the wire becomes a
    /// suspect, published again one at a time.
    pub fn on_down(&mut self, generation: u64, refused: bool) -> Option<Seq> {
        if self.generation == Some(generation) {
            self.generation = None;
        }
        let culprit = self
            .probing
            .take()
            .filter(|p| refused && self.is_published(*p, generation));
        for e in self.entries.values_mut() {
            if matches!(e.state, State::Published { generation: g } if g <= generation) {
                e.state = State::Unsent;
                if refused && !e.suspect {
                    e.suspect = true;
                    self.suspects += 1;
                }
            }
        }
        self.deadlines.clear();
        self.blocked = false;
        culprit
    }

    /// The broker is back: re-publish what was unresolved, in admission order, or
    /// after a refusal the suspects one at a time. Returns how many went out.
    pub fn on_up(&mut self, generation: u64) -> usize {
        self.generation = Some(generation);
        if self.suspects > 0 {
            self.continue_probing();
            return usize::from(self.probing.is_some());
        }
        // Paused for a routing fault: nothing goes out but a probe, at once.
        self.probe_now();
        self.publish_unsent()
    }

    /// The broker blocks publishing: deadlines are suspended, nothing new is admitted.
    pub fn suspend(&mut self) {
        self.blocked = true;
        self.deadlines.clear();
    }

    /// The broker publishes again: every message on the wire gets a full deadline.
    pub fn resume(&mut self) {
        if !self.blocked {
            return;
        }
        self.blocked = false;
        let mut published: Vec<(Seq, u64)> = self
            .entries
            .iter()
            .filter_map(|(seq, e)| match e.state {
                State::Published { generation } => Some((*seq, generation)),
                _ => None,
            })
            .collect();
        published.sort_unstable();
        let at = Instant::now() + self.publish_timeout;
        self.deadlines
            .extend(published.into_iter().map(|(seq, g)| (at, seq, g)));
    }
}
