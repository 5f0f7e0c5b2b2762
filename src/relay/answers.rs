//! The broker's answers: confirms, returns, refusals, the connection going down
//! and up, blocked and unblocked — each resolved in the window and the tracker.

use super::main_loop::Relay;
use super::window::{Origin, Resolved};
use crate::event::Row;
use crate::failure::Failure;
use crate::metrics::{self, Problem};
use crate::retry::StoreCommand;
use crate::sink::SinkEvent;
use crate::time::{now_micros, PG_EPOCH_OFFSET_MICROS};
use tokio::time::Instant;

impl Relay {
    pub(super) async fn on_sink_event(&mut self, ev: SinkEvent) {
        match ev {
            SinkEvent::Confirmed {
                generation,
                outcomes,
            } => {
                for (seq, outcome) in outcomes {
                    if !self.window.is_published(seq, generation) {
                        continue; // a stale confirm: the message was re-sent or already handled
                    }
                    match Failure::from_outcome(outcome) {
                        None => self.on_acked(seq).await,
                        Some(failure) => self.on_failed(seq, failure).await,
                    }
                }
            }
            SinkEvent::Down {
                generation,
                reason,
                refusal,
            } => {
                tracing::warn!(generation, %reason, in_flight = self.window.len(), "broker down: stopped reading WAL until it is back");
                self.health.set_broker(None);
                self.health.set_problem(Problem::BrokerBlocked, None);
                let culprit = self.window.on_down(generation, refusal.is_some());
                match (culprit, refusal) {
                    (Some(seq), Some(r)) => {
                        // Published alone, and the broker closed the connection: this one.
                        self.on_failed(
                            seq,
                            Failure::Refused {
                                reply_code: r.reply_code,
                                reply_text: r.reply_text,
                            },
                        )
                        .await;
                    }
                    (None, Some(r)) => {
                        let why = format!(
                            "the broker closed the connection in answer to a publish ({} {}): re-publishing the {} unanswered message(s) one at a time to find it",
                            r.reply_code,
                            r.reply_text,
                            self.window.suspects()
                        );
                        tracing::warn!("{why}");
                        self.health
                            .set_problem(Problem::BrokerUnavailable, Some(why));
                        self.probing_reported = true;
                    }
                    _ => {}
                }
            }
            SinkEvent::Up {
                generation,
                frame_max,
                node,
            } => {
                self.health.set_broker(Some(node.clone()));
                let _ = self.store.send(StoreCommand::BrokerNode(node)).await;
                self.frame_max = frame_max;
                if generation > 1 {
                    metrics::metrics().reconnect("amqp");
                }
                let count = self.window.on_up(generation);
                if count > 0 {
                    tracing::info!(
                        generation,
                        count,
                        probing = self.window.probing().is_some(),
                        "broker back: re-publishing unconfirmed messages"
                    );
                }
            }
            SinkEvent::Blocked { generation, reason } => {
                if self.window.generation_is(generation) {
                    self.health.set_problem(
                        Problem::BrokerBlocked,
                        Some(format!("the broker blocks publishing ({reason}): waiting, publish deadlines suspended")),
                    );
                    self.window.suspend();
                }
            }
            SinkEvent::Unblocked { generation } => {
                if self.window.generation_is(generation) {
                    self.health.set_problem(Problem::BrokerBlocked, None);
                    self.window.resume();
                }
            }
        }
    }

    pub(super) async fn on_acked(&mut self, seq: u64) {
        self.window.routed(seq);
        let Some(Resolved { entry, park }) = self.window.resolve(seq) else {
            return;
        };
        self.park(park).await;
        let (row, _, origin) = entry.into_parts();
        self.refused.remove(row.id());
        let m = metrics::metrics();
        match origin {
            Origin::Stream { txn, commit_time } => {
                m.published.inc();
                // Saturating: a commit time is the walsender's word, not ours.
                let latency_micros =
                    now_micros().saturating_sub(commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS));
                m.delivery_latency
                    .observe(latency_micros.max(0) as f64 / 1e6);
                self.tracker.resolve(txn);
                if let (Row::Event(e), true) = (&row, self.collect_succeeded) {
                    if self.succeeded.is_empty() {
                        self.succeeded_since = Some(Instant::now());
                    }
                    self.succeeded.push(e.id.clone());
                }
            }
            Origin::Retry {
                key, parked_seq, ..
            } => {
                m.published.inc();
                self.retry_delivered(key, &row, parked_seq).await;
            }
            Origin::DeadLetter {
                key,
                parked_seq,
                attempts,
                reason,
            } => {
                tracing::warn!(id = %row.id(), attempts, %reason, "dead-lettered");
                self.retry_dead(key, &row, parked_seq, attempts, reason)
                    .await;
            }
        }
    }

    /// A publish failed (nack, return, timeout, refusal).
    pub(super) async fn on_failed(&mut self, seq: u64, failure: Failure) {
        if self.window.unrouted(seq, &failure) {
            // Part of a systemic fault: held in the window, not charged.
            metrics::metrics().failure(failure.label());
            return;
        }
        let Some((origin, id)) = self
            .window
            .entry(seq)
            .map(|e| (e.origin().clone(), e.row().id().to_string()))
        else {
            return;
        };
        if matches!(failure, Failure::Refused { .. }) {
            self.refused.insert(id);
        }
        match origin {
            Origin::Stream { .. } => {
                if let Some(e) = self.window.entry(seq) {
                    tracing::warn!(id = %e.row().id(), reason = %failure, "publish failed: parking in retry state");
                }
                let seqs = self.window.fail_stream(seq, failure);
                self.park(seqs).await;
            }
            Origin::Retry {
                key,
                parked_seq,
                attempts,
                max_retries,
            } => {
                let Some(Resolved { entry, park }) = self.window.resolve(seq) else {
                    return;
                };
                self.park(park).await;
                let (row, message, _) = entry.into_parts();
                self.retry_failed(
                    key,
                    row,
                    message,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    failure,
                )
                .await;
            }
            Origin::DeadLetter { .. } => {
                let delay = crate::time::backoff(
                    self.config.retry.backoff_base,
                    self.config.retry.backoff_max,
                    1,
                );
                if let Some(e) = self.window.entry(seq) {
                    tracing::warn!(id = %e.row().id(), reason = %failure, retry_in = ?delay, "dead-letter publish failed; retrying");
                }
                self.window.backoff(seq, delay);
            }
        }
    }
}
