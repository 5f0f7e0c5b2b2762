//! `outbox-relay status`: the slot and the retry state, as text or JSON.

use super::retry_table;
use crate::config::Config;
use crate::error::Error;
use crate::pg::catalog;
use crate::pg::slots::SlotRecords;

/// The replication slot as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub holder_pid: Option<i32>,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
}

/// What `outbox-relay status` reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    pub slot: SlotStatus,
    /// Messages in retry state (failed, delayed or parked behind another).
    pub retries_pending: i64,
    pub dead_letters: i64,
    /// Age of the oldest message in retry state, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Outbox rows whose status is still 'pending' (Event-Forge tables; `null` otherwise).
    pub outbox_pending: Option<i64>,
    /// Age of the oldest of them, in seconds.
    pub outbox_oldest_pending_age_seconds: Option<f64>,
    /// When a relay last started on the slot or stopped cleanly (the slot record).
    pub slot_last_seen: Option<String>,
    /// Inbox rows by status, when `[inbox]` is configured and its table exists.
    pub inbox: Option<InboxBacklog>,
}

/// The inbox table's rows by status.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InboxBacklog {
    pub table: String,
    /// (status, rows), by status name.
    pub by_status: std::collections::BTreeMap<String, i64>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.slot;
        if !s.exists {
            match &self.slot_last_seen {
                Some(seen) => writeln!(
                    f,
                    "slot            {}: LOST — a relay held it until {seen}; rows committed since were not read: recover with `outbox-relay replay --pending`",
                    s.name
                )?,
                None => writeln!(
                    f,
                    "slot            {}: missing (`outbox-relay init` creates it)",
                    s.name
                )?,
            }
        } else {
            let holder = match (s.active, s.holder_pid) {
                (true, Some(pid)) => format!("active, held by pid {pid}"),
                _ => "inactive".to_string(),
            };
            writeln!(f, "slot            {}: {holder}", s.name)?;
            writeln!(
                f,
                "confirmed LSN   {}",
                s.confirmed_lsn.as_deref().unwrap_or("-")
            )?;
            writeln!(
                f,
                "lag             {} bytes",
                s.lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        writeln!(f, "retries pending {}", self.retries_pending)?;
        writeln!(f, "dead letters    {}", self.dead_letters)?;
        match self.oldest_pending_age_seconds {
            Some(age) => writeln!(f, "oldest pending  {age:.1} s")?,
            None => writeln!(f, "oldest pending  -")?,
        }
        match (self.outbox_pending, self.outbox_oldest_pending_age_seconds) {
            (Some(n), Some(age)) => {
                writeln!(f, "outbox pending  {n} row(s), the oldest {age:.1} s old")?
            }
            (Some(n), None) => writeln!(f, "outbox pending  {n} row(s)")?,
            (None, _) => writeln!(f, "outbox pending  - (the table has no status column)")?,
        }
        if let (true, Some(seen)) = (s.exists, &self.slot_last_seen) {
            writeln!(f, "slot last seen  {seen}")?;
        }
        if let Some(inbox) = &self.inbox {
            let counts: Vec<String> = inbox
                .by_status
                .iter()
                .map(|(status, n)| format!("{status} {n}"))
                .collect();
            let counts = if counts.is_empty() {
                "empty".to_string()
            } else {
                counts.join(", ")
            };
            writeln!(f, "inbox           {}: {counts}", inbox.table)?;
        }
        Ok(())
    }
}

/// Reads the slot and the retry table.
pub async fn status(config: &Config) -> Result<Status, Error> {
    let retry = retry_table(config);
    let sql = config.postgres.target.connect().await?;
    let slot = catalog::slot_state(&sql, &config.postgres.slot).await?;
    let slot = SlotStatus {
        name: config.postgres.slot.clone(),
        exists: slot.is_some(),
        active: slot.as_ref().is_some_and(|s| s.active_pid.is_some()),
        holder_pid: slot.as_ref().and_then(|s| s.active_pid),
        confirmed_lsn: slot
            .as_ref()
            .and_then(|s| s.confirmed_flush)
            .map(|l| l.to_string()),
        lag_bytes: slot.as_ref().and_then(|s| s.lag_bytes),
    };
    let summary = if retry.exists(&sql).await? {
        Some(retry.summary(&sql).await?)
    } else {
        None
    };
    let pending = catalog::pending_rows(&sql, &config.postgres.table).await?;
    let records = SlotRecords::next_to(&config.postgres.retry_table);
    let last_seen = match catalog::table_columns(&sql, records.name()).await? {
        Some(_) => records
            .get(&sql, &config.postgres.slot)
            .await?
            .map(|r| r.seen_at),
        None => None,
    };
    let inbox = match &config.inbox {
        Some(i) if crate::inbox::queries::exists(&sql, &i.table).await? => Some(InboxBacklog {
            table: i.table.to_string(),
            by_status: crate::inbox::queries::backlog(&sql, &i.table)
                .await?
                .into_iter()
                .collect(),
        }),
        _ => None,
    };
    Ok(Status {
        inbox,
        slot,
        outbox_pending: pending.as_ref().map(|p| p.count),
        outbox_oldest_pending_age_seconds: pending.and_then(|p| p.oldest_age_seconds),
        slot_last_seen: last_seen,
        retries_pending: summary.map_or(0, |s| s.parked),
        dead_letters: summary.map_or(0, |s| s.dead),
        oldest_pending_age_seconds: summary.and_then(|s| s.oldest_parked_seconds),
    })
}
