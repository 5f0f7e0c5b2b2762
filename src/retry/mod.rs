//! Durable retry state. One long-lived task ([`Store`]) owns an SQL connection and
//! is the only writer of the relay-owned retry table (`sql/outbox_relay_parked.sql`):
//! failed, delayed and parked-behind messages in commit order, per aggregate.
//! Every statement on that table is in [`queries`]. What the outbox rows
//! themselves show of it (the status mirror, `on_success`) is handed to the
//! housekeeping task of [`crate::outbox_table`], on its own session, so parks
//! never queue behind it — except a delivered retry's `on_success`, applied in
//! the transaction that removes its retry row, with a 50 ms lock wait (see
//! `Store::delivered`).
//!
//! The relay (main loop) decides; the store writes and answers over bounded
//! channels, one per priority: parks, then retry outcomes, then loads. It runs
//! no query unless told to: an idle relay with nothing failed queries nothing.
//! `dead requeue` wakes it with NOTIFY.

pub mod queries;
mod store;

pub use store::Store;

use crate::config::{ColumnMapping, OnDead, OnSuccess};
use crate::event::{AggregateKey, Row, RowRead};
use crate::pg::{connect::application_name, PgTarget, TableName};
use bytes::Bytes;
use std::time::Duration;

/// NOTIFY channel that `dead requeue` signals, per slot.
pub fn requeue_channel(slot: &str) -> String {
    format!("outbox_relay_requeue_{slot}")
}

/// `application_name` of the store's session, so operators can tell it apart.
pub fn store_application_name(slot: &str) -> String {
    application_name("retry-store", slot)
}

/// A message to park: its own failure, a delay, or waiting behind its aggregate.
#[derive(Debug, Clone)]
pub struct ParkItem {
    /// The window's sequence number, echoed back once the row is committed.
    pub token: u64,
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub id: String,
    pub event_type: Option<String>,
    pub payload: Option<Bytes>,
    pub metadata: Option<Bytes>,
    pub created_at: Option<String>,
    pub commit_time: i64,
    pub max_retries: i32,
    /// Why it failed (counts as an attempt); `None` when delayed or parked behind.
    pub failure: Option<String>,
    /// Not before this time (Unix microseconds): backoff after a failure, or `scheduled_at`.
    pub not_before: Option<i64>,
}

impl ParkItem {
    /// From a row: an event (failed, delayed or parked behind), or what could be read
    /// of a malformed one (its reason becomes the failure).
    pub fn from_row(token: u64, row: &Row, commit_time: i64, max_retries: i32) -> Self {
        match row {
            Row::Event(event) => ParkItem {
                token,
                key: event.key(),
                aggregate_type: event.aggregate_type.clone(),
                aggregate_id: event.aggregate_id.clone(),
                id: event.id.clone(),
                event_type: Some(event.event_type.clone()),
                payload: Some(event.payload.clone()),
                metadata: event.metadata.clone(),
                created_at: event.created_at.clone(),
                commit_time,
                max_retries: event.max_retries.unwrap_or(max_retries),
                failure: None,
                not_before: None,
            },
            Row::Malformed(m) => {
                let aggregate_type = m.aggregate_type.clone().unwrap_or_default();
                let aggregate_id = m.aggregate_id.clone().unwrap_or_default();
                ParkItem {
                    token,
                    key: AggregateKey::of(&aggregate_type, &aggregate_id),
                    aggregate_type,
                    aggregate_id,
                    id: m.id.clone(),
                    event_type: m.event_type.clone(),
                    payload: m.payload.clone(),
                    metadata: None,
                    created_at: None,
                    commit_time,
                    max_retries,
                    failure: Some(format!("malformed row: {}", m.reason)),
                    not_before: None,
                }
            }
        }
    }
}

/// The head of an aggregate's retry queue and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Unix microseconds.
    pub due: i64,
    /// The head is dead and `on_dead = "block"` holds the aggregate.
    pub blocked: bool,
}

/// A parked message loaded for a retry.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub parked_seq: i64,
    pub event: RowRead,
    pub commit_time: i64,
    pub attempts: i32,
    pub max_retries: i32,
    /// Why its last attempt failed, if one did.
    pub last_error: Option<String>,
}

impl Loaded {
    /// Bytes it holds in memory while it waits for its turn.
    pub fn weight(&self) -> usize {
        256 + match &self.event {
            Ok(e) => e.payload.len() + e.metadata.as_ref().map_or(0, |m| m.len()),
            Err(m) => m.payload.as_ref().map_or(0, |p| p.len()),
        }
    }
}

/// Where a page of an aggregate's queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEnd {
    /// The page is full: more may follow.
    More,
    /// The next row is not due before this time (Unix µs).
    Due(i64),
    /// The next row is dead and holds the aggregate (`on_dead = "block"`).
    Blocked,
    /// Nothing follows (as of the load).
    Empty,
}

/// Parks, on the highest-priority channel: they hold the relay's window and LSN.
#[derive(Debug)]
pub struct Park(pub Vec<ParkItem>);

/// A retry load, on the lowest-priority channel: the next rows of an aggregate's
/// queue after `after_seq`, at most `max_rows` and about `max_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub key: AggregateKey,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub after_seq: Option<i64>,
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// Retry outcomes and reloads, served after parks and before loads.
#[derive(Debug)]
pub enum StoreCommand {
    /// A retried message was acked: remove it, apply on_success.
    Delivered { parked_seq: i64, id: String },
    /// A retried message failed again: count the attempt, schedule the next one.
    Failed {
        parked_seq: i64,
        id: String,
        attempts: i32,
        reason: String,
        delay: Duration,
    },
    /// A message is out of retries (and dead-lettered when configured).
    Dead {
        parked_seq: i64,
        id: String,
        attempts: i32,
        reason: String,
    },
    /// Read every aggregate's head (after taking the slot, reconnecting the stream).
    Reload,
    /// The sink connected to this broker node (`host:port`): record it in the
    /// slot record for `status`.
    BrokerNode(String),
}

/// What the store tells the relay.
#[derive(Debug)]
pub enum StoreEvent {
    /// These window tokens are durably parked; these aggregates got a new head.
    Parked { tokens: Vec<u64>, heads: Vec<Head> },
    /// A page of an aggregate's queue.
    Loaded {
        key: AggregateKey,
        rows: Vec<Loaded>,
        end: PageEnd,
    },
    /// A page of every aggregate's head (a reload, or a requeue notification).
    Heads(Vec<Head>),
    /// The reload is complete.
    HeadsDone,
}

/// What the store needs to know.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub target: PgTarget,
    pub slot: String,
    pub table: TableName,
    pub retry_table: TableName,
    pub mapping: ColumnMapping,
    /// No outbox table (`postgres.source = "messages"`): retries use their parked copies.
    pub tableless: bool,
    pub on_dead: OnDead,
    /// What a delivered retry's outbox row gets, in the transaction that
    /// removes it from the retry table.
    pub on_success: OnSuccess,
    pub reconnect_backoff_max: Duration,
    /// `-c statement_timeout=... -c lock_timeout=...` for the store's session.
    pub session_options: String,
}
