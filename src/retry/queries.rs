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
use tokio_postgres::{Client, GenericClient, Transaction};

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
    /// `parked`, or `dead` (a dead row that holds its aggregate).
    pub status: String,
    /// Not before this time (Unix µs).
    pub due: i64,
    pub id: String,
    pub event_type: Option<String>,
    pub payload: Option<String>,
    pub metadata: Option<String>,
    pub created_at: Option<String>,
    pub commit_time: i64,
    pub attempts: i32,
    pub max_retries: i32,
    /// The last failure, if it failed at all.
    pub error_message: Option<String>,
}

/// One parked row as inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub seq: i64,
    /// Not before this time (Unix µs).
    pub due: i64,
    /// It is now the head of its aggregate's queue.
    pub head: bool,
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

    /// Inserts the items in one statement, in their order (so `seq` follows it);
    /// returns for each, in the same order, its `seq`, its due time (Unix µs) and
    /// whether it is now the head of its aggregate's queue (nothing held the
    /// aggregate before, and it is the batch's first row of that aggregate).
    pub async fn insert_many(
        &self,
        client: &impl GenericClient,
        items: &[ParkItem],
    ) -> Result<Vec<Inserted>, Error> {
        const CONTEXT: &str = "parking messages in the retry table";
        let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let types: Vec<&str> = items.iter().map(|i| i.aggregate_type.as_str()).collect();
        let agg_ids: Vec<&str> = items.iter().map(|i| i.aggregate_id.as_str()).collect();
        let event_types: Vec<Option<&str>> =
            items.iter().map(|i| i.event_type.as_deref()).collect();
        let payloads: Vec<Option<String>> = items.iter().map(|i| text(&i.payload)).collect();
        let metadata: Vec<Option<String>> = items.iter().map(|i| text(&i.metadata)).collect();
        let created: Vec<Option<&str>> = items.iter().map(|i| i.created_at.as_deref()).collect();
        let commit_times: Vec<i64> = items.iter().map(|i| i.commit_time).collect();
        let attempts: Vec<i32> = items
            .iter()
            .map(|i| i32::from(i.failure.is_some()))
            .collect();
        let max_retries: Vec<i32> = items.iter().map(|i| i.max_retries).collect();
        let errors: Vec<Option<&str>> = items.iter().map(|i| i.failure.as_deref()).collect();
        let not_before: Vec<Option<i64>> = items.iter().map(|i| i.not_before).collect();
        let rows = client
            .query(
                &format!(
                    // The data-modifying CTE's rows are invisible to the `not exists`
                    // below, which therefore sees only what held the aggregate before.
                    "with ins as (insert into {t} (slot, id, aggregate_type, aggregate_id, event_type, payload, metadata, created_at, commit_time, \
                     attempts, max_retries, error_message, scheduled_at) \
                     select $1, u.id, u.aggregate_type, u.aggregate_id, u.event_type, u.payload, u.metadata, u.created_at, u.commit_time, \
                     u.attempts, u.max_retries, u.error_message, coalesce(to_timestamp(u.not_before / 1000000.0), now()) \
                     from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], \
                     $10::int[], $11::int[], $12::text[], $13::bigint[]) with ordinality \
                     as u(id, aggregate_type, aggregate_id, event_type, payload, metadata, created_at, commit_time, \
                     attempts, max_retries, error_message, not_before, ord) \
                     order by u.ord \
                     returning seq, aggregate_type, aggregate_id, scheduled_at), \
                     firsts as (select distinct on (aggregate_type, aggregate_id) seq from ins order by aggregate_type, aggregate_id, seq) \
                     select i.seq, (extract(epoch from i.scheduled_at) * 1000000)::bigint, \
                     i.seq in (select seq from firsts) and not exists (select 1 from {t} r where r.slot = $1 \
                     and r.aggregate_type = i.aggregate_type and r.aggregate_id = i.aggregate_id and {blockers}) \
                     from ins i order by i.seq",
                    t = self.table.quoted(),
                    blockers = self.blockers.replace("status", "r.status"),
                ),
                &[
                    &self.slot,
                    &ids,
                    &types,
                    &agg_ids,
                    &event_types,
                    &payloads,
                    &metadata,
                    &created,
                    &commit_times,
                    &attempts,
                    &max_retries,
                    &errors,
                    &not_before,
                ],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        // Sequence numbers are taken in the insert's (ordered) row order, and the
        // rows come back sorted by them.
        rows.iter()
            .map(|r| {
                Ok(Inserted {
                    seq: get(r, 0, CONTEXT)?,
                    due: get(r, 1, CONTEXT)?,
                    head: get(r, 2, CONTEXT)?,
                })
            })
            .collect()
    }

    /// For each of several aggregates `(type, id, after_seq)`, up to `limit` rows
    /// that hold it (parked, or dead with `on_dead = "block"`) after `after_seq`,
    /// in commit order; in one statement. Returns (request index, row) pairs.
    pub async fn pages(
        &self,
        client: &impl GenericClient,
        requests: &[(&str, &str, i64)],
        limit: i64,
    ) -> Result<Vec<(usize, ParkedRow)>, Error> {
        const CONTEXT: &str = "loading messages from the retry table";
        let types: Vec<&str> = requests.iter().map(|r| r.0).collect();
        let ids: Vec<&str> = requests.iter().map(|r| r.1).collect();
        let afters: Vec<i64> = requests.iter().map(|r| r.2).collect();
        let rows = client
            .query(
                &format!(
                    "select a.ord, p.seq, p.status, (extract(epoch from p.scheduled_at) * 1000000)::bigint, p.id, p.event_type, \
                     p.payload, p.metadata, p.created_at, p.commit_time, p.attempts, p.max_retries, p.error_message \
                     from unnest($2::text[], $3::text[], $4::bigint[]) with ordinality as a(t, i, after_seq, ord) \
                     cross join lateral (select * from {} r where r.slot = $1 and r.aggregate_type = a.t \
                     and r.aggregate_id = a.i and r.seq > a.after_seq and {} order by r.seq limit $5) p \
                     order by a.ord, p.seq",
                    self.table.quoted(),
                    self.blockers.replace("status", "r.status")
                ),
                &[&self.slot, &types, &ids, &afters, &limit],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        rows.iter()
            .map(|r| {
                let ord: i64 = get(r, 0, CONTEXT)?;
                Ok((
                    (ord - 1) as usize,
                    ParkedRow {
                        seq: get(r, 1, CONTEXT)?,
                        status: get(r, 2, CONTEXT)?,
                        due: get(r, 3, CONTEXT)?,
                        id: get(r, 4, CONTEXT)?,
                        event_type: get(r, 5, CONTEXT)?,
                        payload: get(r, 6, CONTEXT)?,
                        metadata: get(r, 7, CONTEXT)?,
                        created_at: get(r, 8, CONTEXT)?,
                        commit_time: get(r, 9, CONTEXT)?,
                        attempts: get(r, 10, CONTEXT)?,
                        max_retries: get(r, 11, CONTEXT)?,
                        error_message: get(r, 12, CONTEXT)?,
                    },
                ))
            })
            .collect()
    }

    /// Removes delivered rows; how many went.
    pub async fn delete_many(
        &self,
        client: &impl GenericClient,
        seqs: &[i64],
    ) -> Result<u64, Error> {
        client
            .execute(
                &format!("delete from {} where seq = any($1)", self.table.quoted()),
                &[&seqs],
            )
            .await
            .map_err(query_err(
                "removing delivered messages from the retry table",
            ))
    }

    /// Deletes up to 1 000 dead rows of this slot last touched before `older_than` ago.
    pub async fn purge_dead(
        &self,
        client: &impl GenericClient,
        older_than: Duration,
    ) -> Result<u64, Error> {
        let t = self.table.quoted();
        client
            .execute(
                &format!(
                    "delete from {t} where seq = any(array(select seq from {t} where slot = $1 and status = 'dead' \
                     and updated_at < now() - $2::bigint * interval '1 microsecond' limit 1000))"
                ),
                &[&self.slot, &(older_than.as_micros() as i64)],
            )
            .await
            .map_err(query_err("deleting dead rows past retry.dead_retention"))
    }

    /// Counts a failed attempt of each `(seq, attempts, reason, delay)` and schedules
    /// its next one, all in one statement; how many rows were still there.
    pub async fn record_failures(
        &self,
        client: &impl GenericClient,
        failures: &[(i64, i32, &str, Duration)],
    ) -> Result<u64, Error> {
        let seqs: Vec<i64> = failures.iter().map(|f| f.0).collect();
        let attempts: Vec<i32> = failures.iter().map(|f| f.1).collect();
        let reasons: Vec<&str> = failures.iter().map(|f| f.2).collect();
        let delays: Vec<i64> = failures.iter().map(|f| f.3.as_micros() as i64).collect();
        client
            .execute(
                &format!(
                    "update {} as r set attempts = u.attempts, error_message = u.reason, \
                     scheduled_at = now() + u.delay * interval '1 microsecond', updated_at = now() \
                     from unnest($1::bigint[], $2::int[], $3::text[], $4::bigint[]) as u(seq, attempts, reason, delay) \
                     where r.seq = u.seq",
                    self.table.quoted()
                ),
                &[&seqs, &attempts, &reasons, &delays],
            )
            .await
            .map_err(query_err("recording failed retries"))
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

    /// Up to `limit` aggregates' heads, after the aggregate `after` (keyset
    /// paging: start-up and requeues load them page by page). Read in a
    /// transaction of its own with the aggregate index's order fixed
    /// (`INDEX_ORDER_PLAN`): each page reads only its aggregates' rows, where
    /// the plan for a table the planner takes for empty sorted every row after
    /// `after` for each page (quadratic in the backlog at start-up).
    pub async fn heads_page(
        &self,
        client: &mut Client,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<Vec<Head>, Error> {
        const CONTEXT: &str = "loading the retry queue";
        let (after_type, after_id) = match after {
            Some((t, i)) => (Some(t.as_str()), Some(i.as_str())),
            None => (None, None),
        };
        let tx = client.transaction().await.map_err(query_err(CONTEXT))?;
        tx.batch_execute(INDEX_ORDER_PLAN)
            .await
            .map_err(query_err(CONTEXT))?;
        let rows = tx
            .query(
                &format!(
                    "select distinct on (aggregate_type, aggregate_id) aggregate_type, aggregate_id, status, \
                     (extract(epoch from scheduled_at) * 1000000)::bigint \
                     from {} where slot = $1 and {} \
                     and ($2::text is null or (aggregate_type, aggregate_id) > ($2::text, $3::text)) \
                     order by aggregate_type, aggregate_id, seq limit $4",
                    self.table.quoted(),
                    self.blockers
                ),
                &[&self.slot, &after_type, &after_id, &limit],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        tx.commit().await.map_err(query_err(CONTEXT))?;
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

    /// Dead rows of this slot, oldest first: `limit` of them after skipping `offset`.
    pub async fn dead(
        &self,
        client: &impl GenericClient,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<DeadMessage>, Error> {
        const CONTEXT: &str = "listing dead messages";
        let rows = client
            .query(
                &format!(
                    "select id, aggregate_type, aggregate_id, event_type, attempts, error_message, \
                     to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                     from {} where slot = $1 and status = 'dead' order by seq limit $2 offset $3",
                    self.table.quoted()
                ),
                &[&self.slot, &limit, &offset],
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

    /// Gives up to `limit` dead rows (of `ids`, or any with `None`) after the key
    /// `after` a fresh retry budget; returns their ids and the page's last key.
    ///
    /// Pages go by aggregate, then seq (the aggregate index), so each page revives
    /// whole aggregates the running relay can drain at once, instead of one row of
    /// every aggregate per page; the keyset never walks rows earlier pages
    /// requeued. The last key is computed by Postgres, in its own collation. Runs
    /// in the caller's transaction, whose plan it fixes (`INDEX_ORDER_PLAN`).
    pub async fn requeue(
        &self,
        tx: &Transaction<'_>,
        ids: Option<&[String]>,
        after: &RequeueKey,
        limit: i64,
    ) -> Result<RequeuePage, Error> {
        const CONTEXT: &str = "requeueing dead messages";
        let all = ids.is_none();
        let wanted: Vec<String> = ids.map(|v| v.to_vec()).unwrap_or_default();
        let t = self.table.quoted();
        // 130 ms of sorting plus 125 ms of JIT a page at 100 000 dead rows without it.
        tx.batch_execute(INDEX_ORDER_PLAN)
            .await
            .map_err(query_err(CONTEXT))?;
        let row = tx
            .query_one(
                &format!(
                    "with page as (select seq, aggregate_type, aggregate_id from {t} \
                     where slot = $1 and status = 'dead' and ($2 or id = any($3)) \
                     and (aggregate_type, aggregate_id, seq) > ($5::text, $6::text, $7::bigint) \
                     order by aggregate_type, aggregate_id, seq limit $4), \
                     done as (update {t} set status = 'parked', attempts = 0, scheduled_at = now(), \
                     updated_at = now() where seq = any(array(select seq from page)) returning id) \
                     select array(select id from done), l.aggregate_type, l.aggregate_id, l.seq \
                     from (values (1)) v left join lateral (select * from page \
                     order by aggregate_type desc, aggregate_id desc, seq desc limit 1) l on true"
                ),
                &[
                    &self.slot,
                    &all,
                    &wanted,
                    &limit,
                    &after.aggregate_type,
                    &after.aggregate_id,
                    &after.seq,
                ],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        let ids: Vec<String> = get(&row, 0, CONTEXT)?;
        let last = match get::<Option<i64>>(&row, 3, CONTEXT)? {
            Some(seq) => Some(RequeueKey {
                aggregate_type: get(&row, 1, CONTEXT)?,
                aggregate_id: get(&row, 2, CONTEXT)?,
                seq,
            }),
            None => None,
        };
        Ok(RequeuePage { ids, last })
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

/// `SET LOCAL`s that make a keyset page walk its index in order. The retry table
/// fills between ANALYZE runs, so the planner often takes it for nearly empty and
/// would sort every row after the key instead (and, with the disabled plans'
/// cost penalty, JIT-compile the statement): this transaction only.
const INDEX_ORDER_PLAN: &str = "set local enable_sort = off; set local enable_bitmapscan = off; \
     set local enable_seqscan = off; set local jit = off";

/// Where a `requeue` page starts: after this (aggregate, seq) in the aggregate
/// index's order; `Default` is before every row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequeueKey {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub seq: i64,
}

/// One `requeue` page: the ids it revived and its last key (`None`: empty).
#[derive(Debug, Clone)]
pub struct RequeuePage {
    pub ids: Vec<String>,
    pub last: Option<RequeueKey>,
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
