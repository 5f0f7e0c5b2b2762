//! Operator commands: `init` (create what is missing) and `check` (preflight).

use crate::catalog::{self, PgTarget, PublicationState, TableName};
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::event::ColumnMapping;
use crate::sink::{self, SinkSettings};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::ExchangeKind;

fn target_and_table(config: &Config) -> Result<(PgTarget, TableName), Error> {
    let target =
        PgTarget::parse(config.postgres.url.expose()).map_err(|message| ConfigError::Invalid {
            key: "postgres.url".into(),
            message,
        })?;
    let table =
        TableName::parse(&config.postgres.table).map_err(|message| ConfigError::Invalid {
            key: "postgres.table".into(),
            message,
        })?;
    Ok((target, table))
}

/// Creates the outbox table, the publication and the slot when missing.
/// Returns one line per object saying what was done.
pub async fn init(config: &Config) -> Result<Vec<String>, Error> {
    let (target, table) = target_and_table(config)?;
    let sql = target.connect().await?;
    let mut lines = Vec::new();
    let existed = catalog::table_columns(&sql, &table).await?.is_some();
    catalog::create_outbox_table(&sql, &table).await?;
    lines.push(format!(
        "table {table}: {}",
        if existed { "exists" } else { "created" }
    ));
    catalog::require_table(&sql, &table, &ColumnMapping::EVENT_FORGE).await?;
    let created =
        catalog::ensure_publication(&sql, &config.postgres.publication, &table, true).await?;
    lines.push(format!(
        "publication {}: {}",
        config.postgres.publication,
        if created {
            "created (inserts only)"
        } else {
            "exists"
        }
    ));
    let retry_table =
        TableName::parse(&config.postgres.retry_table).map_err(|message| ConfigError::Invalid {
            key: "postgres.retry_table".into(),
            message,
        })?;
    let existed = catalog::table_columns(&sql, &retry_table).await?.is_some();
    catalog::create_parked_table(&sql, &retry_table).await?;
    lines.push(format!(
        "retry table {retry_table}: {}",
        if existed { "exists" } else { "created" }
    ));
    catalog::require_logical(&sql).await?;
    let existed = catalog::slot_state(&sql, &config.postgres.slot)
        .await?
        .is_some();
    let slot = catalog::ensure_slot(&sql, &config.postgres.slot, &target.dbname, true).await?;
    lines.push(format!(
        "slot {}: {} at {}",
        config.postgres.slot,
        if existed { "exists" } else { "created" },
        slot.confirmed_flush
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into())
    ));
    Ok(lines)
}

/// One preflight check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4}  {:<22} {}",
            if self.ok { "ok" } else { "FAIL" },
            self.name,
            self.detail
        )
    }
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: false,
        detail: detail.into(),
    }
}

/// Runs every preflight check; a check that depends on a failed one is reported as skipped.
pub async fn check(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    let (target, table) = match target_and_table(config) {
        Ok(v) => v,
        Err(e) => {
            out.push(fail("configuration", e.to_string()));
            return out;
        }
    };
    match target.connect().await {
        Err(e) => {
            out.push(fail("postgres reachable", e.to_string()));
            for name in [
                "wal_level",
                "outbox table",
                "replication privilege",
                "publication",
                "slot",
            ] {
                out.push(fail(name, "skipped: Postgres is not reachable"));
            }
        }
        Ok(sql) => {
            out.push(pass("postgres reachable", target.redacted()));
            out.push(match catalog::require_logical(&sql).await {
                Ok(()) => pass("wal_level", "logical"),
                Err(e) => fail("wal_level", e.to_string()),
            });
            out.push(
                match catalog::require_table(&sql, &table, &ColumnMapping::EVENT_FORGE).await {
                    Ok(()) => pass("outbox table", format!("{table} has the required columns")),
                    Err(e) => fail("outbox table", e.to_string()),
                },
            );
            out.push(match catalog::can_replicate(&sql).await {
                Ok(true) => pass("replication privilege", "role may replicate"),
                Ok(false) => fail(
                    "replication privilege",
                    Error::NoReplicationPrivilege.to_string(),
                ),
                Err(e) => fail("replication privilege", e.to_string()),
            });
            let publication = &config.postgres.publication;
            out.push(
                match catalog::publication_state(&sql, publication, &table).await {
                    Ok(PublicationState::Missing) if config.postgres.create_missing => pass(
                        "publication",
                        format!("{publication} missing; `run` creates it (create_missing = true)"),
                    ),
                    Ok(PublicationState::Missing) => fail(
                        "publication",
                        Error::PublicationMissing {
                            publication: publication.clone(),
                            table: table.to_string(),
                        }
                        .to_string(),
                    ),
                    Ok(PublicationState::Present {
                        covers_table: false,
                        ..
                    }) => fail(
                        "publication",
                        Error::PublicationMismatch {
                            publication: publication.clone(),
                            table: table.to_string(),
                        }
                        .to_string(),
                    ),
                    Ok(PublicationState::Present {
                        publishes_insert: false,
                        ..
                    }) => fail(
                        "publication",
                        Error::PublicationNoInsert {
                            publication: publication.clone(),
                        }
                        .to_string(),
                    ),
                    Ok(PublicationState::Present { .. }) => pass(
                        "publication",
                        format!("{publication} publishes inserts of {table}"),
                    ),
                    Err(e) => fail("publication", e.to_string()),
                },
            );
            let slot = &config.postgres.slot;
            out.push(match catalog::slot_state(&sql, slot).await {
                Ok(None) if config.postgres.create_missing => pass(
                    "slot",
                    format!("{slot} missing; `run` creates it (create_missing = true)"),
                ),
                Ok(None) => fail(
                    "slot",
                    Error::SlotMissing { slot: slot.clone() }.to_string(),
                ),
                Ok(Some(s))
                    if s.plugin.as_deref() != Some("pgoutput")
                        || s.database.as_deref() != Some(target.dbname.as_str()) =>
                {
                    fail(
                        "slot",
                        Error::SlotMismatch {
                            slot: slot.clone(),
                            plugin: s.plugin.unwrap_or_else(|| "physical".into()),
                            database: s.database.unwrap_or_default(),
                            expected_database: target.dbname.clone(),
                        }
                        .to_string(),
                    )
                }
                Ok(Some(s)) => {
                    let at = s
                        .confirmed_flush
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "?".into());
                    let lag = s
                        .lag_bytes
                        .map(|b| format!(", {b} bytes behind"))
                        .unwrap_or_default();
                    match s.active_pid {
                        Some(pid) => pass(
                            "slot",
                            format!("{slot} at {at}{lag}; active, held by pid {pid}"),
                        ),
                        None => pass("slot", format!("{slot} at {at}{lag}; inactive")),
                    }
                }
                Err(e) => fail("slot", e.to_string()),
            });
        }
    }
    // `check` only looks: it never declares the exchange.
    let settings = SinkSettings {
        declare_exchange: false,
        ..SinkSettings::from_config(&config.amqp)
    };
    match sink::connect(&settings).await {
        Err(e) => {
            out.push(fail("broker reachable", e.to_string()));
            out.push(fail("exchange", "skipped: the broker is not reachable"));
        }
        Ok(broker) => {
            out.push(pass(
                "broker reachable",
                sink::redact_amqp_url(&settings.url),
            ));
            let exchange = &config.amqp.exchange;
            let result = broker
                .channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        passive: !config.amqp.declare_exchange,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            out.push(match result {
                Ok(()) => pass("exchange", format!("{exchange} (topic, durable) declarable")),
                Err(e) if !config.amqp.declare_exchange => fail(
                    "exchange",
                    format!("{exchange} does not exist and declare_exchange = false: {e}; declare it or set [amqp] declare_exchange = true"),
                ),
                Err(e) => fail(
                    "exchange",
                    format!("cannot declare {exchange} as a durable topic exchange: {e}; if it exists with another type or durability, pick another [amqp] exchange"),
                ),
            });
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                broker.connection.close(200, "outbox-relay check".into()),
            )
            .await;
        }
    }
    out
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

fn retry_table(config: &Config) -> Result<TableName, Error> {
    Ok(
        TableName::parse(&config.postgres.retry_table).map_err(|message| ConfigError::Invalid {
            key: "postgres.retry_table".into(),
            message,
        })?,
    )
}

/// Dead messages of this relay's slot, oldest first.
pub async fn dead_list(config: &Config) -> Result<Vec<DeadMessage>, Error> {
    let (target, _) = target_and_table(config)?;
    let retry = retry_table(config)?;
    let sql = target.connect().await?;
    if catalog::table_columns(&sql, &retry).await?.is_none() {
        return Ok(Vec::new());
    }
    let rows = sql
        .query(
            &format!(
                "select id, aggregate_type, aggregate_id, event_type, attempts, error_message, \
                 to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                 from {} where slot = $1 and status = 'dead' order by seq",
                retry.quoted()
            ),
            &[&config.postgres.slot],
        )
        .await
        .map_err(|source| Error::Postgres {
            context: "listing dead messages".into(),
            source,
        })?;
    Ok(rows
        .iter()
        .map(|r| DeadMessage {
            id: r.get(0),
            aggregate_type: r.get(1),
            aggregate_id: r.get(2),
            event_type: r.get(3),
            attempts: r.get(4),
            last_error: r.get(5),
            dead_since: r.get(6),
        })
        .collect())
}

/// Gives dead messages (`ids`, or all with `None`) a fresh retry budget and wakes the
/// running relay. Returns the ids requeued; unknown ids are an error naming them.
pub async fn dead_requeue(config: &Config, ids: Option<&[String]>) -> Result<Vec<String>, Error> {
    let (target, table) = target_and_table(config)?;
    let retry = retry_table(config)?;
    let mut sql = target.connect().await?;
    if catalog::table_columns(&sql, &retry).await?.is_none() {
        return Err(Error::Requeue(format!(
            "retry table {retry} does not exist: nothing is dead"
        )));
    }
    let mirror = catalog::table_columns(&sql, &table)
        .await?
        .is_some_and(|cols| {
            catalog::RETRY_COLUMNS
                .iter()
                .all(|c| cols.iter().any(|h| h == c))
        });
    let tx = sql.transaction().await.map_err(|source| Error::Postgres {
        context: "starting the requeue".into(),
        source,
    })?;
    let all = ids.is_none();
    let wanted: Vec<String> = ids.map(|v| v.to_vec()).unwrap_or_default();
    let rows = tx
        .query(
            &format!(
                "update {} set status = 'parked', attempts = 0, scheduled_at = now(), updated_at = now() \
                 where slot = $1 and status = 'dead' and ($2 or id = any($3)) returning id",
                retry.quoted()
            ),
            &[&config.postgres.slot, &all, &wanted],
        )
        .await
        .map_err(|source| Error::Postgres { context: "requeueing dead messages".into(), source })?;
    let requeued: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let unknown: Vec<&String> = wanted.iter().filter(|id| !requeued.contains(id)).collect();
    if !unknown.is_empty() {
        tx.rollback().await.ok();
        return Err(Error::Requeue(format!(
            "not dead in slot {}: {} (see `outbox-relay dead list`)",
            config.postgres.slot,
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if mirror && !requeued.is_empty() {
        let id_type = catalog::table_column_types(&tx, &table)
            .await?
            .into_iter()
            .find(|(n, _, _)| n == "id")
            .map(|(_, _, t)| t)
            .unwrap_or_else(|| "text".into());
        tx.execute(
            &format!(
                "update {} set status = 'failed', retry_count = 0, scheduled_at = now(), updated_at = now() \
                 where id = any($1::text[]::{id_type}[])",
                table.quoted()
            ),
            &[&requeued],
        )
        .await
        .map_err(|source| Error::Postgres { context: "showing the requeue in the outbox rows".into(), source })?;
    }
    tx.batch_execute(&format!(
        "notify {}",
        catalog::quote_ident(&crate::retry::requeue_channel(&config.postgres.slot))
    ))
    .await
    .map_err(|source| Error::Postgres {
        context: "notifying the relay".into(),
        source,
    })?;
    tx.commit().await.map_err(|source| Error::Postgres {
        context: "committing the requeue".into(),
        source,
    })?;
    Ok(requeued)
}

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
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.slot;
        if !s.exists {
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
                "lag             {} bytes",
                s.lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        writeln!(f, "retries pending {}", self.retries_pending)?;
        writeln!(f, "dead letters    {}", self.dead_letters)?;
        match self.oldest_pending_age_seconds {
            Some(age) => write!(f, "oldest pending  {age:.1} s"),
            None => write!(f, "oldest pending  -"),
        }
    }
}

/// Reads the slot and the retry table.
pub async fn status(config: &Config) -> Result<Status, Error> {
    let (target, _) = target_and_table(config)?;
    let retry = retry_table(config)?;
    let sql = target.connect().await?;
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
    let (retries_pending, dead_letters, oldest) = if catalog::table_columns(&sql, &retry)
        .await?
        .is_some()
    {
        let row = sql
            .query_one(
                &format!(
                    "select count(*) filter (where status = 'parked'), count(*) filter (where status = 'dead'), \
                     extract(epoch from now() - min(parked_at) filter (where status = 'parked'))::float8 \
                     from {} where slot = $1",
                    retry.quoted()
                ),
                &[&config.postgres.slot],
            )
            .await
            .map_err(|source| Error::Postgres { context: "reading the retry table".into(), source })?;
        (row.get(0), row.get(1), row.get(2))
    } else {
        (0, 0, None)
    };
    Ok(Status {
        slot,
        retries_pending,
        dead_letters,
        oldest_pending_age_seconds: oldest,
    })
}
