//! The loop's failure branch: parking messages in the retry store, re-publishing
//! retried heads when they are due, and dead-lettering heads out of retries.
//! The commands go to the store task; its answers come back as `StoreEvent`s.

use super::window::{Origin, Resolved, Seq};
use super::Relay;
use crate::event::{AggregateKey, Row};
use crate::failure::Failure;
use crate::metrics;
use crate::retry::{Load, Loaded, Park, ParkItem, StoreCommand, StoreEvent};
use crate::sink::{self, OutboundMessage};
use crate::time::{backoff, now_micros};
use std::sync::Arc;
use tokio::time::Instant;

impl Relay {
    /// Parks these window entries (each with its own cause, if any) in one
    /// retry-state transaction.
    pub(super) async fn park(&mut self, seqs: Vec<Seq>) {
        if seqs.is_empty() {
            return;
        }
        let items: Vec<ParkItem> = seqs.into_iter().filter_map(|s| self.park_item(s)).collect();
        for item in &items {
            self.parked
                .command_sent(item.key, &item.aggregate_type, &item.aggregate_id);
        }
        let _ = self.parks.send(Park(items)).await;
    }

    fn park_item(&self, seq: Seq) -> Option<ParkItem> {
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

    /// A retried head was acked: the store removes it and says what is next.
    pub(super) async fn retry_delivered(&mut self, row: &Row, parked_seq: i64) {
        let key = row.key();
        let (aggregate_type, aggregate_id) = self.parked.names(key);
        self.parked.releasing(key);
        let _ = self
            .store
            .send(StoreCommand::Delivered {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id: row.id().to_string(),
            })
            .await;
    }

    /// A head is out of retries (its dead-letter copy acked, or none configured).
    pub(super) async fn retry_dead(
        &mut self,
        row: &Row,
        parked_seq: i64,
        attempts: i32,
        reason: String,
    ) {
        let key = row.key();
        let (aggregate_type, aggregate_id) = self.parked.names(key);
        self.parked.releasing(key);
        let _ = self
            .store
            .send(StoreCommand::Dead {
                key,
                aggregate_type,
                aggregate_id,
                parked_seq,
                id: row.id().to_string(),
                attempts,
                reason,
            })
            .await;
    }

    /// A retried head failed again: schedule the next attempt, or dead-letter it.
    pub(super) async fn retry_failed(
        &mut self,
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
            let key = row.key();
            let (aggregate_type, aggregate_id) = self.parked.names(key);
            self.parked.releasing(key);
            let _ = self
                .store
                .send(StoreCommand::Failed {
                    key,
                    aggregate_type,
                    aggregate_id,
                    parked_seq,
                    id: row.id().to_string(),
                    attempts,
                    reason,
                    delay,
                })
                .await;
            return;
        }
        match self.dead_letter_exchange.clone() {
            Some(dlx) => {
                let dead = sink::format::dead_letter(
                    &dlx,
                    &self.config.amqp.exchange,
                    &row,
                    message.as_deref(),
                    attempts,
                    &reason,
                );
                self.window.admit_retry(
                    row,
                    Arc::new(dead),
                    Origin::DeadLetter {
                        parked_seq,
                        attempts,
                        reason,
                    },
                    true,
                );
            }
            None => {
                tracing::warn!(id = %row.id(), attempts, %reason, "message is dead (no dead_letter_exchange configured)");
                self.retry_dead(&row, parked_seq, attempts, reason).await;
            }
        }
    }

    pub(super) async fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Parked { tokens, heads } => {
                for token in tokens {
                    let Some(Resolved { entry, park }) = self.window.resolve(token) else {
                        continue;
                    };
                    debug_assert!(park.is_empty(), "a parked message holds no turn");
                    self.parked.command_done(entry.row().key());
                    if let Origin::Stream { txn, .. } = entry.origin() {
                        self.tracker.resolve(*txn);
                    }
                }
                for head in heads {
                    self.parked.adopt(head);
                }
            }
            StoreEvent::Loaded { key, head } => {
                self.parked.loaded();
                match head {
                    None => self.parked.empty(key),
                    Some(loaded) => self.publish_loaded(key, loaded).await,
                }
            }
            StoreEvent::Released { key, next } => {
                self.parked.command_done(key);
                match next {
                    Some(head) => self.parked.next_head(head),
                    None => self.parked.empty(key),
                }
            }
            StoreEvent::Rescheduled { key, due } => {
                self.parked.command_done(key);
                self.parked.schedule(key, due);
            }
            StoreEvent::Blocked { key } => {
                self.parked.command_done(key);
                self.parked.block(key);
            }
            StoreEvent::Heads(heads) => {
                for head in heads {
                    self.parked.adopt(head);
                }
            }
        }
    }

    /// Re-publishes a loaded head, or counts a failure when it still cannot be sent.
    async fn publish_loaded(&mut self, key: AggregateKey, loaded: Loaded) {
        self.parked.in_flight(key);
        let Loaded {
            parked_seq,
            event,
            commit_time,
            attempts,
            max_retries,
        } = loaded;
        let event = match event {
            Ok(e) => Arc::new(e),
            Err(bad) => {
                let failure = Failure::Malformed(bad.reason.clone());
                self.retry_failed(
                    Row::Malformed(bad),
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
        let encoded = self.encode(&event, commit_time);
        match encoded {
            Ok(message) => {
                let alone = self.refused.contains(&event.id);
                self.window.admit_retry(
                    Row::Event(event),
                    message,
                    Origin::Retry {
                        parked_seq,
                        attempts,
                        max_retries,
                    },
                    alone,
                );
            }
            Err((message, failure)) => {
                self.retry_failed(
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

    /// Asks the store for the heads whose time has come, as far as the window has room.
    pub(super) async fn load_due(&mut self, now: Instant) {
        for (key, aggregate_type, aggregate_id) in self.parked.due(now, self.window.room()) {
            let _ = self
                .loads
                .send(Load {
                    key,
                    aggregate_type,
                    aggregate_id,
                })
                .await;
        }
    }
}
