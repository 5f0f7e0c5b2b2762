//! `outbox-relay status`: the slot and the retry state, as text or JSON.

use super::retry_table;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::SlotLoss;
use crate::pg::catalog;
use crate::pg::slots::{self, SlotRecords};

/// The replication slot as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub holder_pid: Option<i32>,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// How the slot was lost, when it was: `dropped`, `invalidated`, `failover`.
    pub lost: Option<SlotLoss>,
    /// Why a relay cannot stream from it now (a lost slot, an unfinished replay),
    /// with what may be missing and the command that recovers it.
    pub problem: Option<String>,
}

/// What `outbox-relay status` reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    /// Which shard, when the outbox is sharded (the figures are that shard's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardOf>,
    pub slot: SlotStatus,
    /// Messages in retry state (failed, delayed or parked behind another).
    pub retries_pending: i64,
    pub dead_letters: i64,
    /// Age of the oldest message in retry state, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Outbox rows whose status is still 'pending' (Event-Forge tables; `null` otherwise).
    pub outbox_pending: Option<i64>,
    /// `postgres.source = "messages"`: no table, nothing stored to count.
    pub messages_source: bool,
    /// Age of the oldest of them, in seconds.
    pub outbox_oldest_pending_age_seconds: Option<f64>,
    /// When a relay last started on the slot or stopped cleanly (the slot record).
    pub slot_last_seen: Option<String>,
    /// The RabbitMQ node (`host:port`) the relay on the slot last connected to,
    /// and since when (the slot record).
    pub broker_node: Option<String>,
    pub broker_since: Option<String>,
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

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShardOf {
    pub index: u32,
    pub count: u32,
}

/// `status` of every shard (one when not sharded): printed one after another;
/// as JSON the one status, or an array of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Statuses(pub Vec<Status>);

impl serde::Serialize for Statuses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            all => all.serialize(s),
        }
    }
}

impl std::fmt::Display for Statuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, status) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{status}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ShardOf { index, count }) = self.shard {
            writeln!(f, "shard           {index} of {count}")?;
        }
        let s = &self.slot;
        if let Some(problem) = &s.problem {
            let how = s
                .lost
                .map(|h| format!(" ({})", h.label()))
                .unwrap_or_default();
            writeln!(f, "slot            {}: LOST{how} — {problem}", s.name)?;
        } else if !s.exists {
            writeln!(
                f,
                "slot            {}: missing (`outbox-relay init` creates it)",
                s.name
            )?;
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
                "lag             {} bytes{}",
                s.lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.wal_status
                    .as_deref()
                    .map(|w| format!(" (wal_status {w})"))
                    .unwrap_or_default()
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
            (None, _) if self.messages_source => writeln!(
                f,
                "outbox pending  - (postgres.source = \"messages\": nothing is stored; the slot holds what is not yet delivered)"
            )?,
            (None, _) => writeln!(f, "outbox pending  - (the table has no status column)")?,
        }
        if let (true, Some(seen)) = (s.exists, &self.slot_last_seen) {
            writeln!(f, "slot last seen  {seen}")?;
        }
        if let Some(node) = &self.broker_node {
            let since = self.broker_since.as_deref().unwrap_or("-");
            writeln!(
                f,
                "broker node     {node} (the relay connected to it at {since})"
            )?;
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

/// The status of every shard (the one named, or the outbox when not sharded).
pub async fn statuses(config: &Config) -> Result<Statuses, Error> {
    let mut all = Vec::new();
    for shard in config.selected_shards() {
        all.push(status(&shard).await?);
    }
    Ok(Statuses(all))
}

/// Reads the slot and the retry table.
pub async fn status(config: &Config) -> Result<Status, Error> {
    let retry = retry_table(config);
    let sql = config.postgres.target.connect().await?;
    let pg = &config.postgres;
    let records = SlotRecords::next_to(&pg.retry_table);
    let state = catalog::slot_state(&sql, &pg.slot).await?;
    let filter = crate::pg::shards::filter(pg, None);
    let usable = slots::usable_slot(
        &sql,
        &records,
        &pg.slot,
        &pg.target.dbname,
        &pg.table,
        filter.as_deref(),
    );
    let problem = match usable.await {
        Ok(_) => None,
        Err(e) if e.waits_for_recovery() => Some(e),
        Err(e) if e.sql_trouble().is_some() => return Err(e),
        Err(e) => Some(e),
    };
    let slot = SlotStatus {
        name: pg.slot.clone(),
        exists: state.is_some(),
        active: state.as_ref().is_some_and(|s| s.active_pid.is_some()),
        holder_pid: state.as_ref().and_then(|s| s.active_pid),
        confirmed_lsn: state
            .as_ref()
            .and_then(|s| s.confirmed_flush)
            .map(|l| l.to_string()),
        lag_bytes: state.as_ref().and_then(|s| s.lag_bytes),
        wal_status: state.as_ref().and_then(|s| s.wal_status.clone()),
        lost: problem.as_ref().and_then(Error::slot_loss),
        problem: problem.map(|e| e.to_string()),
    };
    let summary = if retry.exists(&sql).await? {
        Some(retry.summary(&sql).await?)
    } else {
        None
    };
    let messages_source = config.postgres.source == crate::config::Source::Messages;
    let pending = if messages_source {
        None
    } else {
        catalog::pending_rows(&sql, &config.postgres.table, filter.as_deref()).await?
    };
    let record = match catalog::table_columns(&sql, records.name()).await? {
        Some(_) => records.get(&sql, &config.postgres.slot).await?,
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
    let shard = pg.sharding.index.map(|index| ShardOf {
        index,
        count: pg.sharding.count,
    });
    Ok(Status {
        shard,
        inbox,
        slot,
        outbox_pending: pending.as_ref().map(|p| p.count),
        messages_source,
        outbox_oldest_pending_age_seconds: pending.and_then(|p| p.oldest_age_seconds),
        broker_node: record.as_ref().and_then(|r| r.broker_node.clone()),
        broker_since: record.as_ref().and_then(|r| r.broker_since.clone()),
        slot_last_seen: record.map(|r| r.seen_at),
        retries_pending: summary.map_or(0, |s| s.parked),
        dead_letters: summary.map_or(0, |s| s.dead),
        oldest_pending_age_seconds: summary.and_then(|s| s.oldest_parked_seconds),
    })
}
