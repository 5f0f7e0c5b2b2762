//! WAL in: each replication event, the rows it carries admitted into the
//! window (or parked), and the applied LSN confirmed when nothing is in flight.

use super::main_loop::{Relay, WalStep};
use super::window::{Admitted, Origin, ParkCause};
use crate::error::Error;
use crate::event::{OutboxEvent, Row};
use crate::failure::Failure;
use crate::metrics;
use crate::progress::TxnId;
use crate::sink;
use crate::source::{decode::DecodeError, Decoded};
use crate::time::now_micros;
use pgwire_replication::{Lsn, ReplicationEvent};
use std::sync::Arc;
use tokio::time::Instant;

impl Relay {
    /// Handles one replication event.
    pub(super) async fn on_wal_event(&mut self, ev: ReplicationEvent) -> WalStep {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                if self.tracker.current().is_some() {
                    return WalStep::StreamLost("Begin inside an open transaction".into());
                }
                self.tracker.begin();
                self.commit_time = commit_time_micros;
            }
            // The messages source publishes messages only: rows of any table the
            // publication may carry are not its outbox.
            ReplicationEvent::XLogData { .. } if self.messages_source => {}
            ReplicationEvent::XLogData { data, .. } => {
                let decoded = match self.decoder.decode(data) {
                    Ok(d) => d,
                    Err(DecodeError::ColumnsMissing { table, missing }) => {
                        return WalStep::Fatal(Error::ColumnsMissing { table, missing })
                    }
                    Err(other) => return WalStep::Fatal(Error::Decode(other.to_string())),
                };
                let Some(txn) = self.tracker.current() else {
                    return match decoded {
                        Decoded::Ignored => WalStep::Continue,
                        _ => WalStep::Fatal(Error::Decode(
                            "an insert arrived outside a transaction".into(),
                        )),
                    };
                };
                match decoded {
                    Decoded::Ignored => {}
                    Decoded::Event(event) => self.admit_stream_event(Arc::new(event), txn).await,
                    Decoded::Malformed(row) => {
                        tracing::warn!(id = %row.id, reason = %row.reason, "malformed outbox row: parked in retry state");
                        let cause = ParkCause {
                            failure: Some(Failure::Malformed(row.reason.clone())),
                            not_before: None,
                        };
                        self.admit_stream(Row::Malformed(row), None, txn, Some(cause))
                            .await;
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.tracker.commit(end_lsn),
            ReplicationEvent::KeepAlive { wal_end, .. } => self.confirm_when_idle(wal_end),
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                prefix,
                ..
            } => {
                if self.messages_source && prefix == self.config.postgres.message_prefix {
                    // It would go out even if its transaction rolled back: not an outbox message.
                    tracing::error!(%lsn, %prefix, "a message with the outbox prefix was emitted non-transactionally (pg_logical_emit_message(false, ...)): it is not published; emit outbox messages with transactional = true");
                    metrics::metrics().messages_ignored.inc();
                }
                self.confirm_when_idle(lsn)
            }
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                transactional: true,
            } if self.messages_source && prefix == self.config.postgres.message_prefix => {
                let Some(txn) = self.tracker.current() else {
                    return WalStep::Fatal(Error::Decode(
                        "a transactional message arrived outside a transaction".into(),
                    ));
                };
                match crate::source::message::decode(&content, &lsn.to_string()) {
                    Ok(event) => self.admit_stream_event(Arc::new(event), txn).await,
                    Err(row) => {
                        tracing::warn!(id = %row.id, reason = %row.reason, %lsn, "malformed outbox message: parked in retry state");
                        let cause = ParkCause {
                            failure: Some(Failure::Malformed(row.reason.clone())),
                            not_before: None,
                        };
                        self.admit_stream(Row::Malformed(*row), None, txn, Some(cause))
                            .await;
                    }
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { reached } => {
                return WalStep::StreamLost(format!("stream stopped at {reached}"));
            }
        }
        WalStep::Continue
    }

    pub(super) async fn admit_stream_event(&mut self, event: Arc<OutboxEvent>, txn: TxnId) {
        let delayed = event
            .scheduled_at
            .as_deref()
            .and_then(crate::time::pg_timestamp_to_unix_micros)
            .filter(|d| *d > now_micros());
        let (message, failure) = match self.encode(&event, self.commit_time) {
            Ok(message) => (Some(message), None),
            Err((message, failure)) => (message, Some(failure)),
        };
        let cause = (failure.is_some() || delayed.is_some()).then_some(ParkCause {
            failure,
            not_before: delayed,
        });
        self.admit_stream(Row::Event(event), message, txn, cause)
            .await;
    }

    /// The AMQP message of an event, or why it cannot be published (with the
    /// message when it could be encoded). A body that is surely too large is
    /// refused before it is encoded; headers are checked against the broker's
    /// `frame_max`.
    pub(super) fn encode(
        &self,
        event: &OutboxEvent,
        commit_time: i64,
    ) -> Result<Arc<sink::OutboundMessage>, (Option<Arc<sink::OutboundMessage>>, Failure)> {
        let limit = self.config.amqp.max_message_bytes;
        let wire = &self.config.amqp.wire;
        let at_least = sink::format::body_len_at_least(event, wire.body);
        if at_least > limit {
            return Err((
                None,
                Failure::TooLarge {
                    bytes: at_least,
                    limit,
                },
            ));
        }
        let message = match sink::format::encode_with(event, commit_time, wire) {
            Ok(m) => Arc::new(m),
            Err(e) => return Err((None, Failure::Unsendable(e.0))),
        };
        if message.body.len() > limit {
            let bytes = message.body.len();
            return Err((Some(message), Failure::TooLarge { bytes, limit }));
        }
        if message.header_len > self.frame_max {
            let bytes = message.header_len;
            let frame_max = self.frame_max;
            return Err((Some(message), Failure::HeadersTooLarge { bytes, frame_max }));
        }
        Ok(message)
    }

    /// Admits a stream message: parked behind its aggregate when that one has retry
    /// state, parked now when it has a cause of its own, else published.
    pub(super) async fn admit_stream(
        &mut self,
        row: Row,
        message: Option<Arc<sink::OutboundMessage>>,
        txn: TxnId,
        cause: Option<ParkCause>,
    ) {
        self.tracker.add_message(txn);
        let origin = Origin::Stream {
            txn,
            commit_time: self.commit_time,
        };
        if self.parked.is_parked(row.key()) {
            let seq = self.window.admit_parking(row, message, origin, cause);
            self.park(vec![seq]).await;
            return;
        }
        match self.window.admit(row, message, origin, cause) {
            Admitted::Sent | Admitted::Queued => {}
            Admitted::Park(seqs) => self.park(seqs).await,
        }
    }

    /// With nothing in flight, everything the server has sent is handled:
    /// confirm its position so unrelated WAL is not retained for this slot.
    pub(super) fn confirm_when_idle(&mut self, lsn: Lsn) {
        if self.tracker.is_idle() && lsn > self.applied {
            self.set_applied(lsn);
        }
    }

    pub(super) fn set_applied(&mut self, lsn: Lsn) {
        self.applied = lsn;
        self.liveness.last_progress = Instant::now();
        self.report();
    }
}
