//! Writing outbox rows from a Rust service: [`enqueue`] inserts an Event-Forge
//! outbox row in the caller's transaction, so the event commits (or rolls back)
//! with the business change; the relay delivers it after the commit.

use crate::error::Error;
use crate::pg::names::TableName;
use crate::pg::query_err;
use tokio_postgres::Transaction;

/// An event to write to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The message id; `None`: a new UUID made by Postgres.
    pub id: Option<String>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    /// May hold `traceId` and `spanId` (sent as `traceparent`).
    pub metadata: Option<serde_json::Value>,
}

/// The default table, Event-Forge's.
pub const DEFAULT_TABLE: &str = "public.outbox_messages";

/// Writes `event` to `public.outbox_messages` inside `tx`; returns its id.
///
/// ```no_run
/// use outbox_relay::outbox::{enqueue, NewEvent};
///
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let tx = client.transaction().await?;
/// tx.execute("insert into orders (id) values ($1)", &[&"o-1"]).await?;
/// enqueue(&tx, NewEvent {
///     id: None,
///     aggregate_type: "Order".into(),
///     aggregate_id: "o-1".into(),
///     event_type: "order.placed".into(),
///     payload: serde_json::json!({"id": "o-1"}),
///     metadata: None,
/// })
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
    let row = tx
        .query_one(
            &format!(
                "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, metadata) \
                 values (coalesce($1, gen_random_uuid()::text), $2, $3, $4, $5::text::json, $6::text::json) \
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
            ],
        )
        .await
        .map_err(query_err("writing an outbox row"))?;
    Ok(row.get(0))
}
