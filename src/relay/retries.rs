//! The loop's failure branch: parking messages in the retry store, re-publishing
//! parked messages from loaded pages as their predecessors are acked, and
//! dead-lettering messages out of retries. The commands go to the store task;
//! its answers come back as `StoreEvent`s.

use super::main_loop::Relay;
use super::window::{Origin, Resolved, Seq};
use crate::config::OnDead;
use crate::event::{AggregateKey, Row};
use crate::failure::Failure;
use crate::metrics;
use crate::retry::{Load, Loaded, Park, ParkItem, StoreCommand, StoreEvent};
use crate::sink::{self, OutboundMessage};
use crate::time::{backoff, now_micros};
use std::sync::Arc;
use tokio::time::Instant;

impl Relay {
    /// Parks these window entries (each with its own cause, if any); the store
    /// writes what waits in its channel together.
    pub(super) async fn park(&mut self, seqs: Vec<Seq>) {
        if seqs.is_empty() {
            return;
        }
        let items: Vec<ParkItem> = seqs.into_iter().filter_map(|s| self.park_item(s)).collect();
        for item in &items {
            self.parked
                .park_sent(item.key, &item.aggregate_type, &item.aggregate_id);
        }
        let _ = self.parks.send(Park(items)).await;
    }

    pub(super) fn park_item(&self, seq: Seq) -> Option<ParkItem> {
        let entry = self.window.entry(seq)?;
        let commit_time = match entry.origin() {
            Origin::Stream { commit_time, .. } => *commit_time,
            _ => 0,
        };
        let retry = &self.config.retry;
        let mut item = ParkItem::from_row(seq, entry.row(), commit_time, retry.max_retries);
        if let Some(cause) = entry.cause() {
            if let Some(failure) = &cause.failure {
                metrics::metrics().failure(failure.label());
                item.failure = Some(failure.to_string());
                let delay = backoff(retry.backoff_base, retry.backoff_max, 1);
                item.not_before = Some(
                    cause
                        .not_before
                        .unwrap_or(0)
                        .max(now_micros() + delay.as_micros() as i64),
                );
            } else if let Some(nb) = cause.not_before {
                item.not_before = Some(nb);
            }
        }
        Some(item)
    }

    pub(super) async fn send_load(&mut self, req: Option<Load>) {
        if let Some(req) = req {
            tracing::debug!(key = req.key.0, after = ?req.after_seq, "load");
            let _ = self.loads.send(req).await;
        }
    }

    /// Asks the store for the aggregates whose time has come.
    pub(super) async fn load_due(&mut self, now: Instant) {
        for req in self.parked.due(now) {
            self.send_load(Some(req)).await;
        }
    }

    /// Publishes the next loaded message of every aggregate whose turn came, while
    /// the window has room.
    pub(super) async fn publish_ready(&mut self) {
        while self.window.has_room() {
            let Some(key) = self.parked.take_ready() else {
                return;
            };
            match self.parked.next(key) {
                Some(loaded) => {
                    tracing::trace!(
                        key = key.0,
                        seq = loaded.parked_seq,
                        "publishing a parked message"
                    );
                    self.publish_loaded(key, loaded).await;
                }
                None => tracing::trace!(key = key.0, "ready, but nothing to publish"),
            }
        }
    }

    /// A retried message (of aggregate `key`) was acked: the store removes it; its
    /// successor goes next.
    pub(super) async fn retry_delivered(&mut self, key: AggregateKey, row: &Row, parked_seq: i64) {
        let _ = self
            .store
            .send(StoreCommand::Delivered {
                parked_seq,
                id: row.id().to_string(),
            })
            .await;
        let next = self.parked.delivered(key);
        self.send_load(next).await;
    }

    /// A message is out of retries (its dead-letter copy acked, or none configured).
    pub(super) async fn retry_dead(
        &mut self,
        key: AggregateKey,
        row: &Row,
        parked_seq: i64,
        attempts: i32,
        reason: String,
    ) {
        let _ = self
            .store
            .send(StoreCommand::Dead {
                parked_seq,
                id: row.id().to_string(),
                attempts,
                reason,
            })
            .await;
        match self.config.retry.on_dead {
            OnDead::Block => self.parked.blocked(key),
            OnDead::Skip => {
                let next = self.parked.delivered(key);
                self.send_load(next).await;
            }
        }
    }

    /// A retried message failed again: schedule the next attempt, or dead-letter it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn retry_failed(
        &mut self,
        key: AggregateKey,
        row: Row,
        message: Option<Arc<OutboundMessage>>,
        parked_seq: i64,
        attempts: i32,
        max_retries: i32,
        failure: Failure,
    ) {
        metrics::metrics().failure(failure.label());
        let reason = failure.to_string();
        if attempts <= max_retries {
            let retry = &self.config.retry;
            let delay = backoff(retry.backoff_base, retry.backoff_max, attempts as u32);
            tracing::warn!(id = %row.id(), attempts, max_retries, retry_in = ?delay, %reason, "retry failed");
            let _ = self
                .store
                .send(StoreCommand::Failed {
                    parked_seq,
                    id: row.id().to_string(),
                    attempts,
                    reason,
                    delay,
                })
                .await;
            self.parked.failed(key, Instant::now() + delay);
            return;
        }
        self.dead(key, row, message, parked_seq, attempts, reason)
            .await;
    }

    /// A message out of retries: its dead-letter copy goes out (when one is
    /// configured), else it is recorded dead at once.
    pub(super) async fn dead(
        &mut self,
        key: AggregateKey,
        row: Row,
        message: Option<Arc<OutboundMessage>>,
        parked_seq: i64,
        attempts: i32,
        reason: String,
    ) {
        match self.dead_letter_exchange.clone() {
            Some(dlx) => {
                let dead = sink::format::dead_letter(
                    &dlx,
                    // The original exchange for the copy's header when the message
                    // could not be encoded: the configured name, or the template.
                    &lapin::types::ShortString::try_new(
                        self.config
                            .amqp
                            .wire
                            .fixed_exchange()
                            .unwrap_or_else(|| self.config.amqp.exchange.clone()),
                    )
                    .unwrap_or_default(),
                    &row,
                    message.as_deref(),
                    attempts,
                    &reason,
                );
                self.window.admit_retry(
                    row,
                    Arc::new(dead),
                    Origin::DeadLetter {
                        key,
                        parked_seq,
                        attempts,
                        reason,
                    },
                    true,
                );
            }
            None => {
                tracing::warn!(id = %row.id(), attempts, %reason, "message is dead (no dead_letter_exchange configured)");
                self.retry_dead(key, &row, parked_seq, attempts, reason)
                    .await;
            }
        }
    }

    pub(super) async fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Parked { tokens, heads } => {
                for head in heads {
                    self.parked.adopt(head);
                }
                let now = Instant::now();
                for token in tokens {
                    let Some(Resolved { entry, park }) = self.window.resolve(token) else {
                        continue;
                    };
                    debug_assert!(park.is_empty(), "a parked message holds no turn");
                    self.parked.park_done(entry.row().key(), now);
                    if let Origin::Stream { txn, .. } = entry.origin() {
                        self.tracker.resolve(*txn);
                    }
                }
            }
            StoreEvent::Loaded { key, rows, end } => {
                tracing::debug!(key = key.0, rows = rows.len(), ?end, "loaded");
                let next = self.parked.loaded(key, rows, end);
                self.send_load(next).await;
            }
            StoreEvent::Heads(heads) => {
                for head in heads {
                    self.parked.adopt(head);
                }
            }
            StoreEvent::HeadsDone => {
                if self.heads_pending {
                    tracing::info!(
                        parked_aggregates = self.parked.len(),
                        start_lsn = %self.applied,
                        "retry state read: outbox-relay {} streaming",
                        env!("CARGO_PKG_VERSION")
                    );
                }
                self.heads_pending = false;
            }
        }
    }

    /// Re-publishes a loaded message, or counts a failure when it still cannot be sent.
    pub(super) async fn publish_loaded(&mut self, key: AggregateKey, loaded: Loaded) {
        let Loaded {
            parked_seq,
            event,
            commit_time,
            attempts,
            max_retries,
            last_error,
        } = loaded;
        if attempts > max_retries {
            // Its retry budget is spent (say, `max_retries = 0` and its first publish
            // failed): dead without another attempt.
            let row = match event {
                Ok(e) => Row::Event(Arc::new(e)),
                Err(bad) => Row::Malformed(*bad),
            };
            let message = match &row {
                Row::Event(e) => self.encode(e, commit_time).ok(),
                Row::Malformed(_) => None,
            };
            let reason = last_error.unwrap_or_else(|| "out of retries".into());
            self.dead(key, row, message, parked_seq, attempts, reason)
                .await;
            return;
        }
        let event = match event {
            Ok(e) if e.key() != key => {
                // Published under another aggregate it could overtake that one's
                // messages; the operator who changed it must decide.
                let reason = format!(
                    "its aggregate changed while it was parked (now {}/{}): restore it, or remove the row from the retry table",
                    e.aggregate_type, e.aggregate_id
                );
                let failure = Failure::Malformed(reason);
                self.retry_failed(
                    key,
                    Row::Event(Arc::new(e)),
                    None,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    failure,
                )
                .await;
                return;
            }
            Ok(e) => Arc::new(e),
            Err(bad) => {
                let failure = Failure::Malformed(bad.reason.clone());
                self.retry_failed(
                    key,
                    Row::Malformed(*bad),
                    None,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    failure,
                )
                .await;
                return;
            }
        };
        match self.encode(&event, commit_time) {
            Ok(message) => {
                let alone = self.refused.contains(&event.id);
                self.window.admit_retry(
                    Row::Event(event),
                    message,
                    Origin::Retry {
                        key,
                        parked_seq,
                        attempts,
                        max_retries,
                    },
                    alone,
                );
            }
            Err((message, failure)) => {
                self.retry_failed(
                    key,
                    Row::Event(event),
                    message,
                    parked_seq,
                    attempts + 1,
                    max_retries,
                    failure,
                )
                .await
            }
        }
    }
}
