//! The relay's own record of the slots it consumes (`sql/outbox_relay_slots.sql`),
//! and the one place a slot is created: on the very first start of a relay for
//! its table, by `init`, or by `replay` when an operator recovers a lost one. A
//! relay that finds its recorded slot missing refuses to start: the rows
//! committed since it last held the slot were never read.

use super::catalog::{self, SlotState};
use super::names::TableName;
use super::{get, query_err};
use crate::error::Error;
use pgwire_replication::Lsn;
use tokio_postgres::Client;

/// DDL of the slot record table.
pub const SLOTS_DDL: &str = include_str!("../../sql/outbox_relay_slots.sql");

/// The record table, next to the retry table (same schema).
#[derive(Debug, Clone)]
pub struct SlotRecords {
    table: TableName,
}

/// What the record says about one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    pub outbox: String,
    pub created_at: String,
    pub seen_at: String,
    pub seen_lsn: Option<String>,
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

    /// Creates the table when missing; true: created.
    pub async fn create_if_missing(&self, client: &Client) -> Result<bool, Error> {
        if catalog::table_columns(client, &self.table).await?.is_some() {
            return Ok(false);
        }
        client
            .batch_execute(&self.ddl())
            .await
            .map_err(query_err(
                "creating the slot record table (needs CREATE on its schema; or run `outbox-relay init` as the owner)",
            ))?;
        Ok(true)
    }

    pub async fn get(&self, client: &Client, slot: &str) -> Result<Option<SlotRecord>, Error> {
        const CONTEXT: &str = "reading the slot record";
        let row = client
            .query_opt(
                &format!(
                    "select outbox, to_char(created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                     to_char(seen_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), seen_lsn::text \
                     from {} where slot = $1",
                    self.table.quoted()
                ),
                &[&slot],
            )
            .await
            .map_err(query_err(CONTEXT))?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(SlotRecord {
            outbox: get(&r, 0, CONTEXT)?,
            created_at: get(&r, 1, CONTEXT)?,
            seen_at: get(&r, 2, CONTEXT)?,
            seen_lsn: get(&r, 3, CONTEXT)?,
        }))
    }

    /// Records that a relay holds (or created) `slot`, now, at `lsn`.
    pub async fn seen(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
        lsn: Option<Lsn>,
    ) -> Result<(), Error> {
        let lsn = lsn.map(|l| l.to_string());
        client
            .execute(
                &format!(
                    "insert into {} (slot, outbox, created_lsn, seen_lsn) values ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn) \
                     on conflict (slot) do update set outbox = excluded.outbox, seen_at = now(), seen_lsn = excluded.seen_lsn",
                    self.table.quoted()
                ),
                &[&slot, &outbox.to_string(), &lsn],
            )
            .await
            .map_err(query_err("recording the slot"))?;
        Ok(())
    }

    /// Records a new slot in place of a lost one (`replay`): created and seen now.
    pub async fn replace(
        &self,
        client: &Client,
        slot: &str,
        outbox: &TableName,
        lsn: Lsn,
    ) -> Result<(), Error> {
        client
            .execute(
                &format!(
                    "insert into {} (slot, outbox, created_lsn, seen_lsn) values ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn) \
                     on conflict (slot) do update set outbox = excluded.outbox, created_at = now(), created_lsn = excluded.created_lsn, \
                     seen_at = now(), seen_lsn = excluded.seen_lsn",
                    self.table.quoted()
                ),
                &[&slot, &outbox.to_string(), &lsn.to_string()],
            )
            .await
            .map_err(query_err("recording the new slot"))?;
        Ok(())
    }
}

/// The slot as this relay may use it. A missing slot is created only when no
/// relay has recorded it before (and `create` allows it); a recorded slot that is
/// missing is a loud refusal that says what was lost.
pub async fn ensure_slot(
    client: &Client,
    records: &SlotRecords,
    slot: &str,
    dbname: &str,
    outbox: &TableName,
    create: bool,
) -> Result<SlotState, Error> {
    records.create_if_missing(client).await?;
    if let Some(state) = catalog::slot_state(client, slot).await? {
        catalog::check_slot(&state, slot, dbname)?;
        records
            .seen(client, slot, outbox, state.confirmed_flush)
            .await?;
        return Ok(state);
    }
    if let Some(lost) = missing_slot(client, records, slot, outbox).await? {
        return Err(lost);
    }
    if !create {
        return Err(Error::SlotMissing {
            slot: slot.to_string(),
        });
    }
    let lsn = catalog::create_slot(client, slot).await?;
    records.seen(client, slot, outbox, Some(lsn)).await?;
    tracing::info!(%slot, %lsn, "created replication slot (first start of a relay on it)");
    catalog::slot_state(client, slot)
        .await?
        .ok_or_else(|| Error::SlotMissing {
            slot: slot.to_string(),
        })
}

/// For a slot that does not exist: the refusal when a relay recorded it before
/// (the slot was lost), `None` when it never existed.
pub async fn missing_slot(
    client: &Client,
    records: &SlotRecords,
    slot: &str,
    outbox: &TableName,
) -> Result<Option<Error>, Error> {
    if catalog::table_columns(client, records.name())
        .await?
        .is_none()
    {
        return Ok(None);
    }
    Ok(match records.get(client, slot).await? {
        Some(record) => Some(lost(client, slot, outbox, &record).await),
        None => None,
    })
}

/// The refusal for a recorded slot that is gone, with what the outbox still holds.
async fn lost(client: &Client, slot: &str, outbox: &TableName, record: &SlotRecord) -> Error {
    let pending = match catalog::pending_rows(client, outbox).await {
        Ok(Some(p)) if p.count == 0 => "no outbox row is still 'pending'".to_string(),
        Ok(Some(p)) => format!(
            "{} outbox row(s) are still 'pending', the oldest created {}",
            p.count,
            p.oldest.unwrap_or_else(|| "at an unknown time".into())
        ),
        Ok(None) => format!(
            "{outbox} has no status column, so the relay cannot tell which rows were not delivered"
        ),
        Err(e) => format!("the pending rows could not be counted ({e})"),
    };
    Error::SlotLost {
        slot: slot.to_string(),
        seen_at: record.seen_at.clone(),
        seen_lsn: record
            .seen_lsn
            .clone()
            .unwrap_or_else(|| "an unknown LSN".into()),
        pending,
    }
}
