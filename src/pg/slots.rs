//! The relay's own record of the slots it consumes (`sql/outbox_relay_slots.sql`),
//! and the one place a slot is created: on the very first start of a relay for
//! its table, by `init`, or by `replay` when an operator recovers a lost one.
//!
//! A slot a relay held before can be lost three ways, each named: **dropped**
//! (gone from the server that had it), **invalidated** (still listed but
//! unreadable: `wal_status = 'lost'` once it fell more than
//! `max_slot_wal_keep_size` behind, or a conflict on a standby), and a
//! **fail-over** to a server without it (the record holds the server's system
//! identifier and timeline: a promoted standby writes a new timeline). Each is
//! a refusal that says what may be missing and that `replay --pending`
//! recovers; a relay never reads past a lost slot.

use super::catalog::{self, ServerIdentity, SlotState};
use super::names::TableName;
use super::query_err;
use crate::error::Error;
use crate::metrics::SlotLoss;
use pgwire_replication::Lsn;
use tokio_postgres::Client;

/// DDL of the slot record table.
pub const SLOTS_DDL: &str = include_str!("../../sql/outbox_relay_slots.sql");

/// Columns added after the table's first version: added by `init` (or by a
/// relay that may), read as missing where they are not.
const ADDED_COLUMNS: [(&str, &str); 5] = [
    ("system_id", "text"),
    ("timeline", "bigint"),
    ("replaying_since", "timestamptz"),
    ("broker_node", "text"),
    ("broker_since", "timestamptz"),
];

/// The record table, next to the retry table (same schema).
#[derive(Debug, Clone)]
pub struct SlotRecords {
    table: TableName,
}

/// What the record says about one slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SlotRecord {
    pub outbox: String,
    pub created_at: String,
    pub seen_at: String,
    pub seen_lsn: Option<String>,
    /// The server the relay last held it on (system identifier, timeline).
    #[serde(default)]
    pub system_id: Option<String>,
    #[serde(default)]
    pub timeline: Option<i64>,
    /// A `replay --pending` started then and has not finished.
    #[serde(default)]
    pub replaying_since: Option<String>,
    /// The RabbitMQ node (`host:port`) the relay on this slot last connected to.
    #[serde(default)]
    pub broker_node: Option<String>,
    #[serde(default)]
    pub broker_since: Option<String>,
}

impl SlotRecords {
    /// `outbox_relay_slots` in the retry table's schema.
    pub fn next_to(retry_table: &TableName) -> Self {
        Self {
            table: retry_table.sibling("outbox_relay_slots"),
        }
    }

    pub fn name(&self) -> &TableName {
        &self.table
    }

    pub fn ddl(&self) -> String {
        SLOTS_DDL.replace("public.outbox_relay_slots", &self.table.quoted())
    }

    /// Creates the table when missing, and adds the columns a table of an older
    /// version lacks (when the role may: the owner, or `init`); true: created.
    pub async fn create_if_missing(&self, client: &Client) -> Result<bool, Error> {
        let Some(columns) = catalog::table_columns(client, &self.table).await? else {
            client
                .batch_execute(&self.ddl())
                .await
                .map_err(query_err(
                    "creating the slot record table (needs CREATE on its schema; or run `outbox-relay init` as the owner)",
                ))?;
            return Ok(true);
        };
        let missing: Vec<String> = ADDED_COLUMNS
            .iter()
            .filter(|(c, _)| !columns.iter().any(|have| have == c))
            .map(|(c, ty)| format!("add column if not exists {c} {ty}"))
            .collect();
        if !missing.is_empty() {
            let alter = format!("alter table {} {}", self.table.quoted(), missing.join(", "));
            if let Err(e) = client.batch_execute(&alter).await {
                // Not the owner: the relay works without them; a fail-over then reads
                // as a dropped slot, and `replay` asks for `init`.
                tracing::warn!(error = %e, table = %self.table, "the slot record table lacks columns of this version; run `outbox-relay init` as its owner to add them");
            }
        }
        Ok(false)
    }

    /// The record of `slot`, whichever columns the table has.
    pub async fn get(&self, client: &Client, slot: &str) -> Result<Option<SlotRecord>, Error> {
        const CONTEXT: &str = "reading the slot record";
        let row = client
            .query_opt(
                &format!(
                    "select (to_jsonb(r) || jsonb_build_object( \
                     'created_at', to_char(r.created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                     'seen_at', to_char(r.seen_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                     'replaying_since', to_char((to_jsonb(r) ->> 'replaying_since')::timestamptz at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                     'broker_since', to_char((to_jsonb(r) ->> 'broker_since')::timestamptz at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')))::text \
                     from {} r where r.slot = $1",
                    self.table.quoted()
                ),
                &[&slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        let Some(r) = row else { return Ok(None) };
        let text: String = super::get(&r, 0, CONTEXT)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Decode(format!("the slot record of {slot} ({text}): {e}")))
    }

    /// Records that a relay holds (or created) `slot`, now, at `lsn`, on `server`.
    pub async fn seen(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
        lsn: Option<Lsn>,
        server: Option<&ServerIdentity>,
    ) -> Result<(), Error> {
        self.upsert(client, slot, outbox, lsn, server, false).await
    }

    /// Records a new slot in place of a lost one (`replay`): created and seen now.
    pub async fn replace(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
        lsn: Lsn,
        server: Option<&ServerIdentity>,
    ) -> Result<(), Error> {
        self.upsert(client, slot, outbox, Some(lsn), server, true)
            .await
    }

    async fn upsert(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
        lsn: Option<Lsn>,
        server: Option<&ServerIdentity>,
        created: bool,
    ) -> Result<(), Error> {
        let lsn = lsn.map(|l| l.to_string());
        let created_cols = if created {
            "created_at = now(), created_lsn = excluded.created_lsn, "
        } else {
            ""
        };
        let t = self.table.quoted();
        let with_server = format!(
            "insert into {t} (slot, outbox, created_lsn, seen_lsn, system_id, timeline) \
             values ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn, $4, $5) \
             on conflict (slot) do update set outbox = excluded.outbox, {created_cols}seen_at = now(), \
             seen_lsn = excluded.seen_lsn, system_id = excluded.system_id, timeline = excluded.timeline"
        );
        let system_id = server.map(|s| s.system_id.clone());
        let timeline = server.map(|s| s.timeline);
        let result = client
            .execute(
                &with_server,
                &[&slot, &outbox.to_string(), &lsn, &system_id, &timeline],
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // A record table of an older version (not migrated: no owner yet ran init).
            Err(e) if e.code().is_some_and(|c| c.code() == "42703") => {
                let plain = format!(
                    "insert into {t} (slot, outbox, created_lsn, seen_lsn) values ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn) \
                     on conflict (slot) do update set outbox = excluded.outbox, {created_cols}seen_at = now(), seen_lsn = excluded.seen_lsn"
                );
                client
                    .execute(&plain, &[&slot, &outbox.to_string(), &lsn])
                    .await
                    .map_err(query_err("recording the slot"))?;
                Ok(())
            }
            Err(e) => Err(query_err("recording the slot")(e)),
        }
    }

    /// Marks a `replay --pending` of `slot` as started (a relay waits until it
    /// ends). The record exists from then on.
    pub async fn start_replay(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
    ) -> Result<(), Error> {
        let t = self.table.quoted();
        client
            .execute(
                &format!(
                    "insert into {t} (slot, outbox, replaying_since) values ($1, $2, now()) \
                     on conflict (slot) do update set replaying_since = now()"
                ),
                &[&slot, &outbox.to_string()],
            )
            .await
            .map_err(|e| {
                if e.code().is_some_and(|c| c.code() == "42703") {
                    Error::Replay(format!(
                        "{} lacks the columns of this version: run `outbox-relay init --config FILE` once as its owner, then replay",
                        self.table
                    ))
                } else {
                    query_err("marking the replay as started in the slot record")(e)
                }
            })?;
        Ok(())
    }

    /// Records the broker node the relay on `slot` connected to (for `status`).
    /// A table without the column (its owner has not run this version's `init`)
    /// is not an error: the node is then only in the log, `/readyz` and metrics.
    pub async fn broker_node(&self, client: &Client, slot: &str, node: &str) -> Result<(), Error> {
        let columns = catalog::table_columns(client, &self.table).await?;
        if !columns.is_some_and(|c| c.iter().any(|have| have == "broker_node")) {
            return Ok(());
        }
        client
            .execute(
                &format!(
                    "update {} set broker_node = $2, broker_since = now() where slot = $1",
                    self.table.quoted()
                ),
                &[&slot, &node],
            )
            .await
            .map_err(query_err("recording the broker node in the slot record"))?;
        Ok(())
    }

    /// Marks the replay of `slot` as finished: a waiting relay starts.
    pub async fn finish_replay(&self, client: &Client, slot: &str) -> Result<(), Error> {
        client
            .execute(
                &format!(
                    "update {} set replaying_since = null, seen_at = now() where slot = $1",
                    self.table.quoted()
                ),
                &[&slot],
            )
            .await
            .map_err(query_err(
                "marking the replay as finished in the slot record",
            ))?;
        Ok(())
    }
}

/// The slot as this relay may use it. A missing slot is created only when no
/// relay has recorded it before (and `create` allows it); a recorded slot that is
/// lost (dropped, invalidated, or a fail-over to a server without it) is a loud
/// refusal that says what was lost, as is a replay that has not finished.
pub async fn ensure_slot(
    client: &Client,
    records: &SlotRecords,
    slot: &str,
    dbname: &str,
    outbox: &TableName,
    filter: Option<&str>,
    create: bool,
) -> Result<SlotState, Error> {
    records.create_if_missing(client).await?;
    let server = catalog::server_identity(client).await.ok();
    if let Some(state) = usable_slot(client, records, slot, dbname, outbox, filter).await? {
        records
            .seen(client, slot, outbox, state.confirmed_flush, server.as_ref())
            .await?;
        return Ok(state);
    }
    if !create {
        return Err(Error::SlotMissing {
            slot: slot.to_string(),
        });
    }
    let lsn = catalog::create_slot(client, slot).await?;
    records
        .seen(client, slot, outbox, Some(lsn), server.as_ref())
        .await?;
    tracing::info!(%slot, %lsn, "created replication slot (first start of a relay on it)");
    catalog::slot_state(client, slot)
        .await?
        .ok_or_else(|| Error::SlotMissing {
            slot: slot.to_string(),
        })
}

/// The slot when a relay may stream from it; `None` when it does not exist and
/// no relay recorded it (a first start); the refusal when it is lost or a replay
/// of it has not finished. `filter`: the rows this slot carries (a shard's),
/// when not the whole table.
pub async fn usable_slot(
    client: &Client,
    records: &SlotRecords,
    slot: &str,
    dbname: &str,
    outbox: &TableName,
    filter: Option<&str>,
) -> Result<Option<SlotState>, Error> {
    let record = if catalog::table_columns(client, records.name())
        .await?
        .is_some()
    {
        records.get(client, slot).await?
    } else {
        None
    };
    match catalog::slot_state(client, slot).await? {
        Some(state) => {
            catalog::check_slot(&state, slot, dbname)?;
            if let Some(reason) = &state.invalidated {
                return Err(lost(
                    client,
                    slot,
                    (outbox, filter),
                    record.as_ref(),
                    SlotLoss::Invalidated,
                    reason.clone(),
                )
                .await);
            }
            if let Some(since) = record.as_ref().and_then(|r| r.replaying_since.clone()) {
                return Err(Error::SlotReplaying {
                    slot: slot.to_string(),
                    since,
                });
            }
            Ok(Some(state))
        }
        None => match record {
            Some(record) => {
                let (how, detail) = match catalog::server_identity(client).await {
                    Ok(now) => how_lost(&record, &now),
                    Err(_) => (SlotLoss::Dropped, String::new()),
                };
                Err(lost(client, slot, (outbox, filter), Some(&record), how, detail).await)
            }
            None => Ok(None),
        },
    }
}

/// How a recorded slot that is missing here was lost: the server it was last
/// held on is another one (a new system identifier) or this one on an earlier
/// timeline (a promoted standby), else it was dropped.
pub fn how_lost(record: &SlotRecord, now: &ServerIdentity) -> (SlotLoss, String) {
    match (&record.system_id, record.timeline) {
        (Some(id), _) if *id != now.system_id => (
            SlotLoss::Failover,
            format!(
                "this is another server (system identifier {}, the relay last held the slot on {id})",
                now.system_id
            ),
        ),
        (_, Some(tl)) if tl != now.timeline => (
            SlotLoss::Failover,
            format!(
                "the server is on timeline {}, the relay last held the slot on timeline {tl}: a standby was promoted",
                now.timeline
            ),
        ),
        (None, None) => (
            SlotLoss::Dropped,
            "(or a fail-over to a server without it: this record predates the server identity)"
                .into(),
        ),
        _ => (SlotLoss::Dropped, String::new()),
    }
}

/// The refusal for a recorded slot that is lost, with what the outbox still holds.
async fn lost(
    client: &Client,
    slot: &str,
    (outbox, filter): (&TableName, Option<&str>),
    record: Option<&SlotRecord>,
    how: SlotLoss,
    detail: String,
) -> Error {
    let pending = match catalog::pending_rows(client, outbox, filter).await {
        Ok(Some(p)) if p.count == 0 => "no outbox row is still 'pending'".to_string(),
        Ok(Some(p)) => format!(
            "{} outbox row(s) are still 'pending', the oldest created {}{}",
            p.count,
            p.oldest.unwrap_or_else(|| "at an unknown time".into()),
            p.oldest_age_seconds
                .map(|s| format!(" ({} ago)", age(s)))
                .unwrap_or_default()
        ),
        // No table at all: the messages source (a table source is refused before this).
        Ok(None) if !matches!(catalog::table_exists(client, outbox).await, Ok(true)) => format!(
            "there is no table {outbox} (postgres.source = \"messages\"?): the messages emitted while the slot was lost cannot be re-published (docs/mapping.md#outbox-without-a-table)"
        ),
        Ok(None) => format!(
            "{outbox} has no status column, so the relay cannot tell which rows were not delivered"
        ),
        Err(e) => format!("the pending rows could not be counted ({e})"),
    };
    Error::SlotLost {
        how,
        slot: slot.to_string(),
        detail,
        seen_at: record
            .map(|r| r.seen_at.clone())
            .unwrap_or_else(|| "at an unknown time".into()),
        seen_lsn: record
            .and_then(|r| r.seen_lsn.clone())
            .unwrap_or_else(|| "an unknown LSN".into()),
        pending,
    }
}

/// An age in whole seconds, minutes, hours or days.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(match s {
        0..=59 => s,
        60..=3599 => s - s % 60,
        3600..=86_399 => s - s % 3600,
        _ => s - s % 86_400,
    }))
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(system_id: Option<&str>, timeline: Option<i64>) -> SlotRecord {
        SlotRecord {
            outbox: "public.outbox_messages".into(),
            created_at: "2026-12-01T00:00:00Z".into(),
            seen_at: "2026-12-01T00:00:00Z".into(),
            seen_lsn: Some("0/1000".into()),
            system_id: system_id.map(String::from),
            timeline,
            replaying_since: None,
            broker_node: None,
            broker_since: None,
        }
    }

    #[test]
    fn a_missing_slot_is_told_apart_by_the_server_it_was_held_on() {
        let now = ServerIdentity {
            system_id: "7001".into(),
            timeline: 2,
        };
        let (how, why) = how_lost(&record(Some("7001"), Some(1)), &now);
        assert_eq!(how, SlotLoss::Failover);
        assert!(
            why.contains("timeline 2") && why.contains("promoted"),
            "{why}"
        );
        let (how, why) = how_lost(&record(Some("6999"), Some(2)), &now);
        assert_eq!(how, SlotLoss::Failover);
        assert!(why.contains("another server"), "{why}");
        assert_eq!(
            how_lost(&record(Some("7001"), Some(2)), &now).0,
            SlotLoss::Dropped
        );
        let (how, why) = how_lost(&record(None, None), &now);
        assert_eq!(how, SlotLoss::Dropped);
        assert!(why.contains("fail-over"), "{why}");
    }

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(42.7), "42s");
        assert_eq!(age(3725.0), "1h");
        assert_eq!(age(125.0), "2m");
        assert_eq!(age(200_000.0), "2days");
    }

    #[test]
    fn a_record_of_the_first_version_reads() {
        let r: SlotRecord = serde_json::from_str(
            r#"{"slot":"s","outbox":"public.t","created_at":"x","created_lsn":"0/1","seen_at":"y","seen_lsn":null,"replaying_since":null}"#,
        )
        .unwrap();
        assert_eq!(
            (r.system_id, r.timeline, r.replaying_since),
            (None, None, None)
        );
    }
}
