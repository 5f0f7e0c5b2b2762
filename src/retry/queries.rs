//! Every statement on the relay-owned retry table (`sql/outbox_relay_parked.sql`):
//! the store task and the operator commands (`dead list`, `dead requeue`,
//! `status`) both go through here.

use super::{Head, ParkItem};
use crate::config::OnDead;
use crate::error::Error;
use crate::event::AggregateKey;
use crate::pg::{catalog, get, query_err, TableName};
use bytes::Bytes;
use std::time::Duration;
use tokio_postgres::{Client, GenericClient};

/// DDL of the relay-owned retry table.
pub const PARKED_DDL: &str = include_str!("../../sql/outbox_relay_parked.sql");

/// The retry rows of one slot in one retry table.
#[derive(Debug, Clone)]
pub struct RetryTable {
    table: TableName,
    slot: String,
    /// Rows that hold their aggregate: parked ones, and dead ones with `on_dead = "block"`.
    blockers: &'static str,
}

/// A parked row as a retry loads it.
#[derive(Debug, Clone)]
pub struct ParkedRow {
    pub seq: i64,
    pub id: String,
    pub event_type: Option<String>,
    pub payload: Option<String>,
    pub metadata: Option<String>,
    pub created_at: Option<String>,
    pub commit_time: i64,
    pub attempts: i32,
    pub max_retries: i32,
}

/// A dead message as `dead list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadMessage {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dead_since: String,
}

/// Counts for `status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub parked: i64,
    pub dead: i64,
    /// Age of the oldest parked row, in seconds.
    pub oldest_parked_seconds: Option<f64>,
}

impl RetryTable {
    pub fn new(table: TableName, slot: impl Into<String>, on_dead: OnDead) -> Self {
        Self {
            table,
            slot: slot.into(),
            blockers: match on_dead {
                OnDead::Block => "status in ('parked', 'dead')",
                OnDead::Skip => "status = 'parked'",
            },
        }
    }

    pub fn name(&self) -> &TableName {
        &self.table
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The DDL of `sql/outbox_relay_parked.sql` for this table's name.
    pub fn ddl(&self) -> String {
        ddl(&self.table)
    }

    pub async fn exists(&self, client: &Client) -> Result<bool, Error> {
        Ok(catalog::table_columns(client, &self.table).await?.is_some())
    }

    /// Creates the table when missing (a role without CREATE on the schema can use
    /// one an owner created: nothing is created when it exists). True: created.
    pub async fn create_if_missing(&self, client: &Client) -> Result<bool, Error> {
        if self.exists(client).await? {
            return Ok(false);
        }
        client.batch_execute(&self.ddl()).await.map_err(query_err(
            "creating the retry table (needs CREATE on its schema)",
        ))?;
        Ok(true)
    }

    /// Parked (not dead) rows of this slot.
    pub async fn count_parked(&self, client: &impl GenericClient) -> Result<i64, Error> {
        const CONTEXT: &str = "counting pending retries";
        let row = client
            .query_one(
                &format!(
                    "select count(*) from {} where slot = $1 and status = 'parked'",
                    self.table.quoted()
                ),
                &[&self.slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        get(&row, 0, CONTEXT)
    }

    /// Inserts one item; returns its `seq` and due time (Unix µs).
    pub async fn insert(
        &self,
        client: &impl GenericClient,
        item: &ParkItem,
    ) -> Result<(i64, i64), Error> {
        const CONTEXT: &str = "parking a message in the retry table";
        let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let attempts: i32 = if item.failure.is_some() { 1 } else { 0 };
        let row = client
            .query_one(
                &format!(
                    "insert into {} (slot, id, aggregate_type, aggregate_id, event_type, payload, metadata, created_at, commit_time, \
                     attempts, max_retries, error_message, scheduled_at) \
                     values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                     coalesce(to_timestamp($13::bigint / 1000000.0), now())) \
                     returning seq, (extract(epoch from scheduled_at) * 1000000)::bigint",
                    self.table.quoted()
                ),
                &[
                    &self.slot,
                    &item.id,
                    &item.aggregate_type,
                    &item.aggregate_id,
                    &item.event_type,
                    &text(&item.payload),
                    &text(&item.metadata),
                    &item.created_at,
                    &item.commit_time,
                    &attempts,
                    &item.max_retries,
                    &item.failure,
                    &item.not_before,
                ],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        Ok((get(&row, 0, CONTEXT)?, get(&row, 1, CONTEXT)?))
    }

    /// No row of the aggregate holds it ahead of `seq`.
    pub async fn is_head(
        &self,
        client: &impl GenericClient,
        aggregate_type: &str,
        aggregate_id: &str,
        seq: i64,
    ) -> Result<bool, Error> {
        const CONTEXT: &str = "checking an aggregate's retry queue";
        let row = client
            .query_one(
                &format!(
                    "select not exists (select 1 from {} where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and seq < $4 and {})",
                    self.table.quoted(),
                    self.blockers
                ),
                &[&self.slot, &aggregate_type, &aggregate_id, &seq],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        get(&row, 0, CONTEXT)
    }

    /// The first parked row of an aggregate.
    pub async fn head(
        &self,
        client: &impl GenericClient,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<ParkedRow>, Error> {
        const CONTEXT: &str = "loading a message from the retry table";
        let row = client
            .query_opt(
                &format!(
                    "select seq, id, event_type, payload, metadata, created_at, commit_time, attempts, max_retries \
                     from {} where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and status = 'parked' order by seq limit 1",
                    self.table.quoted()
                ),
                &[&self.slot, &aggregate_type, &aggregate_id],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(ParkedRow {
            seq: get(&r, 0, CONTEXT)?,
            id: get(&r, 1, CONTEXT)?,
            event_type: get(&r, 2, CONTEXT)?,
            payload: get(&r, 3, CONTEXT)?,
            metadata: get(&r, 4, CONTEXT)?,
            created_at: get(&r, 5, CONTEXT)?,
            commit_time: get(&r, 6, CONTEXT)?,
            attempts: get(&r, 7, CONTEXT)?,
            max_retries: get(&r, 8, CONTEXT)?,
        }))
    }

    /// Removes a delivered row.
    pub async fn delete(&self, client: &impl GenericClient, seq: i64) -> Result<u64, Error> {
        client
            .execute(
                &format!("delete from {} where seq = $1", self.table.quoted()),
                &[&seq],
            )
            .await
            .map_err(query_err(
                "removing a delivered message from the retry table",
            ))
    }

    /// Counts a failed attempt and schedules the next one; the new due time, or
    /// `None` when the row is gone (removed by an operator).
    pub async fn record_failure(
        &self,
        client: &impl GenericClient,
        seq: i64,
        attempts: i32,
        reason: &str,
        delay: Duration,
    ) -> Result<Option<i64>, Error> {
        const CONTEXT: &str = "recording a failed retry";
        let row = client
            .query_opt(
                &format!(
                    "update {} set attempts = $2, error_message = $3, scheduled_at = now() + $4::bigint * interval '1 microsecond', \
                     updated_at = now() where seq = $1 returning (extract(epoch from scheduled_at) * 1000000)::bigint",
                    self.table.quoted()
                ),
                &[&seq, &attempts, &reason, &(delay.as_micros() as i64)],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        row.map(|r| get(&r, 0, CONTEXT)).transpose()
    }

    /// Marks a row dead; false when it is gone.
    pub async fn mark_dead(
        &self,
        client: &impl GenericClient,
        seq: i64,
        attempts: i32,
        reason: &str,
    ) -> Result<bool, Error> {
        let n = client
            .execute(
                &format!(
                    "update {} set status = 'dead', attempts = $2, error_message = $3, updated_at = now() where seq = $1",
                    self.table.quoted()
                ),
                &[&seq, &attempts, &reason],
            )
            .await
            .map_err(query_err("marking a message dead"))?;
        Ok(n > 0)
    }

    /// The row that now holds the aggregate, if any.
    pub async fn next_head(
        &self,
        client: &impl GenericClient,
        key: AggregateKey,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Head>, Error> {
        const CONTEXT: &str = "finding the next message of an aggregate";
        let row = client
            .query_opt(
                &format!(
                    "select status, (extract(epoch from greatest(scheduled_at, now())) * 1000000)::bigint from {} \
                     where slot = $1 and aggregate_type = $2 and aggregate_id = $3 and {} order by seq limit 1",
                    self.table.quoted(),
                    self.blockers
                ),
                &[&self.slot, &aggregate_type, &aggregate_id],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(Head {
            key,
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            due: get(&r, 1, CONTEXT)?,
            blocked: get::<String>(&r, 0, CONTEXT)? == "dead",
        }))
    }

    /// Every aggregate's head (start-up, and after a requeue).
    pub async fn heads(&self, client: &impl GenericClient) -> Result<Vec<Head>, Error> {
        const CONTEXT: &str = "loading the retry queue";
        let rows = client
            .query(
                &format!(
                    "select distinct on (aggregate_type, aggregate_id) aggregate_type, aggregate_id, status, \
                     (extract(epoch from scheduled_at) * 1000000)::bigint \
                     from {} where slot = $1 and {} order by aggregate_type, aggregate_id, seq",
                    self.table.quoted(),
                    self.blockers
                ),
                &[&self.slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        rows.iter()
            .map(|r| {
                let aggregate_type: String = get(r, 0, CONTEXT)?;
                let aggregate_id: String = get(r, 1, CONTEXT)?;
                Ok(Head {
                    key: AggregateKey::of(&aggregate_type, &aggregate_id),
                    aggregate_type,
                    aggregate_id,
                    blocked: get::<String>(r, 2, CONTEXT)? == "dead",
                    due: get(r, 3, CONTEXT)?,
                })
            })
            .collect()
    }

    /// Which of these aggregates (type, id) have rows that hold them.
    pub async fn held_among(
        &self,
        client: &impl GenericClient,
        aggregates: &[(String, String)],
    ) -> Result<Vec<(String, String)>, Error> {
        const CONTEXT: &str = "looking up which aggregates have retry state";
        let (types, ids): (Vec<&str>, Vec<&str>) = aggregates
            .iter()
            .map(|(t, i)| (t.as_str(), i.as_str()))
            .unzip();
        let rows = client
            .query(
                &format!(
                    "select distinct r.aggregate_type, r.aggregate_id from {} r \
                     join unnest($2::text[], $3::text[]) as a(t, i) on r.aggregate_type = a.t and r.aggregate_id = a.i \
                     where r.slot = $1 and {}",
                    self.table.quoted(),
                    self.blockers.replace("status", "r.status")
                ),
                &[&self.slot, &types, &ids],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        rows.iter()
            .map(|r| Ok((get(r, 0, CONTEXT)?, get(r, 1, CONTEXT)?)))
            .collect()
    }

    /// Dead rows of this slot, oldest first.
    pub async fn dead(&self, client: &impl GenericClient) -> Result<Vec<DeadMessage>, Error> {
        const CONTEXT: &str = "listing dead messages";
        let rows = client
            .query(
                &format!(
                    "select id, aggregate_type, aggregate_id, event_type, attempts, error_message, \
                     to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                     from {} where slot = $1 and status = 'dead' order by seq",
                    self.table.quoted()
                ),
                &[&self.slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        rows.iter()
            .map(|r| {
                Ok(DeadMessage {
                    id: get(r, 0, CONTEXT)?,
                    aggregate_type: get(r, 1, CONTEXT)?,
                    aggregate_id: get(r, 2, CONTEXT)?,
                    event_type: get(r, 3, CONTEXT)?,
                    attempts: get(r, 4, CONTEXT)?,
                    last_error: get(r, 5, CONTEXT)?,
                    dead_since: get(r, 6, CONTEXT)?,
                })
            })
            .collect()
    }

    /// Gives dead rows (`ids`, or all with `None`) a fresh retry budget; returns the ids.
    pub async fn requeue(
        &self,
        client: &impl GenericClient,
        ids: Option<&[String]>,
    ) -> Result<Vec<String>, Error> {
        const CONTEXT: &str = "requeueing dead messages";
        let all = ids.is_none();
        let wanted: Vec<String> = ids.map(|v| v.to_vec()).unwrap_or_default();
        let rows = client
            .query(
                &format!(
                    "update {} set status = 'parked', attempts = 0, scheduled_at = now(), updated_at = now() \
                     where slot = $1 and status = 'dead' and ($2 or id = any($3)) returning id",
                    self.table.quoted()
                ),
                &[&self.slot, &all, &wanted],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        rows.iter().map(|r| get(r, 0, CONTEXT)).collect()
    }

    /// Parked and dead counts, and the age of the oldest parked row.
    pub async fn summary(&self, client: &impl GenericClient) -> Result<Summary, Error> {
        const CONTEXT: &str = "reading the retry table";
        let row = client
            .query_one(
                &format!(
                    "select count(*) filter (where status = 'parked'), count(*) filter (where status = 'dead'), \
                     extract(epoch from now() - min(parked_at) filter (where status = 'parked'))::float8 \
                     from {} where slot = $1",
                    self.table.quoted()
                ),
                &[&self.slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        Ok(Summary {
            parked: get(&row, 0, CONTEXT)?,
            dead: get(&row, 1, CONTEXT)?,
            oldest_parked_seconds: get(&row, 2, CONTEXT)?,
        })
    }
}

/// The DDL of `sql/outbox_relay_parked.sql` for another table name.
pub fn ddl(table: &TableName) -> String {
    PARKED_DDL
        .replace("public.outbox_relay_parked", &table.quoted())
        .replace(
            "outbox_relay_parked_aggregate",
            &format!("{}_aggregate", table.name),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_renamed() {
        let ddl = ddl(&TableName::parse("relay.parked").unwrap());
        assert!(ddl.contains("\"relay\".\"parked\""));
        assert!(!ddl.contains("outbox_relay_parked"));
    }
}
