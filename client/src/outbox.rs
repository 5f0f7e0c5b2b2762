//! Writing outbox rows from a Rust service: [`enqueue`] inserts an Event-Forge
//! outbox row in the caller's transaction, so the event commits (or rolls back)
//! with the business change; the relay delivers it after the commit.

use crate::error::{query_err, Error};
use crate::table::TableName;
use tokio_postgres::Transaction;

/// An event to write to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The message id; `None`: a new UUID made by Postgres (36 characters, as
    /// Event-Forge's ids are).
    pub id: Option<String>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    /// May hold `traceId` and `spanId` (sent as `traceparent`).
    pub metadata: Option<serde_json::Value>,
    /// Retries after the first failure before the relay gives the message up;
    /// `None`: Event-Forge's default, 3.
    pub max_retries: Option<i32>,
}

impl NewEvent {
    /// An event with a new id, no metadata and Event-Forge's retry budget.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            id: None,
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            metadata: None,
            max_retries: None,
        }
    }
}

/// The default table, Event-Forge's.
pub const DEFAULT_TABLE: &str = "public.outbox_messages";

/// Event-Forge's retry budget of a new row.
pub const DEFAULT_MAX_RETRIES: i32 = 3;

/// The columns [`enqueue`] writes: every NOT NULL column of Event-Forge's table,
/// with Event-Forge's own values (its models keep the defaults in Python, so a
/// table they created has no server defaults).
pub const WRITTEN: [&str; 11] = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "metadata",
    "status",
    "retry_count",
    "max_retries",
    "created_at",
    "updated_at",
];

/// Writes `event` to `public.outbox_messages` inside `tx`; returns its id.
///
/// ```no_run
/// use outbox_relay_client::outbox::{enqueue, NewEvent};
///
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let tx = client.transaction().await?;
/// tx.execute("insert into orders (id) values ($1)", &[&"o-1"]).await?;
/// enqueue(
///     &tx,
///     NewEvent::new("Order", "o-1", "order.placed", serde_json::json!({"id": "o-1"})),
/// )
/// .await?;
/// tx.commit().await?; // the order and its event, or neither
/// # Ok(())
/// # }
/// ```
pub async fn enqueue(tx: &Transaction<'_>, event: NewEvent) -> Result<String, Error> {
    let table = TableName::parse(DEFAULT_TABLE).expect("valid default table");
    enqueue_into(tx, &table, event).await
}

/// Like [`enqueue`], into another Event-Forge outbox table.
pub async fn enqueue_into(
    tx: &Transaction<'_>,
    table: &TableName,
    event: NewEvent,
) -> Result<String, Error> {
    let payload = event.payload.to_string();
    let metadata = event.metadata.as_ref().map(|m| m.to_string());
    let max_retries = event.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    // clock_timestamp(): several events of one transaction keep their order in
    // created_at (what `replay --pending` orders by), unlike now().
    let row = tx
        .query_one(
            &format!(
                "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, metadata, \
                 status, retry_count, max_retries, created_at, updated_at) \
                 values (coalesce($1, gen_random_uuid()::text), $2, $3, $4, $5::text::json, $6::text::json, \
                 'pending', 0, $7, clock_timestamp(), clock_timestamp()) \
                 returning id",
                table.quoted()
            ),
            &[
                &event.id,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
                &payload,
                &metadata,
                &max_retries,
            ],
        )
        .await
        .map_err(query_err("writing an outbox row"))?;
    Ok(row.get(0))
}

/// The message prefix `postgres.source = "messages"` reads by default.
pub const DEFAULT_PREFIX: &str = "outbox";

/// Emits `event` as a transactional logical decoding message with `prefix`
/// inside `tx` (`pg_logical_emit_message(true, prefix, content)`): no table is
/// written, nothing is left to vacuum or purge. The relay publishes it after
/// the commit when it runs with `postgres.source = "messages"` and
/// `postgres.message_prefix = prefix`; a rollback discards it. Returns its id.
/// `max_retries` is not carried (the relay's `retry.max_retries` applies).
///
/// ```no_run
/// use outbox_relay_client::outbox::{emit, NewEvent, DEFAULT_PREFIX};
///
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let tx = client.transaction().await?;
/// tx.execute("insert into orders (id) values ($1)", &[&"o-1"]).await?;
/// emit(
///     &tx,
///     DEFAULT_PREFIX,
///     NewEvent::new("Order", "o-1", "order.placed", serde_json::json!({"id": "o-1"})),
/// )
/// .await?;
/// tx.commit().await?; // the order and its event, or neither
/// # Ok(())
/// # }
/// ```
pub async fn emit(tx: &Transaction<'_>, prefix: &str, event: NewEvent) -> Result<String, Error> {
    let payload = event.payload.to_string();
    let metadata = event.metadata.as_ref().map(|m| m.to_string());
    // One round trip: the id (made by Postgres when not given) and the message.
    let row = tx
        .query_one(
            EMIT_SQL,
            &[
                &prefix,
                &event.id,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
                &payload,
                &metadata,
            ],
        )
        .await
        .map_err(query_err("emitting an outbox message"))?;
    Ok(row.get(0))
}

/// What [`emit`] runs ($1 prefix, $2 id or NULL, $3 aggregate_type,
/// $4 aggregate_id, $5 event_type, $6 payload, $7 metadata or NULL); the SQL
/// function in `sql/outbox_emit.sql` does the same for other languages.
const EMIT_SQL: &str = "with m as (select coalesce($2::text, gen_random_uuid()::text) as id) \
    select id, pg_logical_emit_message(true, $1::text, json_build_object(\
    'id', id, 'aggregate_type', $3::text, 'aggregate_id', $4::text, 'event_type', $5::text, \
    'payload', $6::text::json, 'metadata', $7::text::json)::text) from m";
