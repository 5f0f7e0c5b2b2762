//! `outbox-relay check`: one line per preflight check, each failure with its fix.

use super::privileges;
use crate::amqp::{self, AmqpSettings};
use crate::config::Config;
use crate::error::Error;
use crate::pg::catalog::{self, PublicationState};
use crate::pg::shards;
use crate::pg::slots::{self, SlotRecords};

/// Every check's result, in order.
#[derive(Debug, Clone)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    pub fn all_ok(&self) -> bool {
        self.0.iter().all(|c| c.ok)
    }
}

impl std::fmt::Display for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.0 {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
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
pub async fn check(config: &Config) -> Checks {
    let mut out = Vec::new();
    let configured = &config.postgres.target;
    let session = match configured.primary().await {
        Ok(target) => target.connect().await.map(|sql| (target, sql)),
        Err(e) => Err(e),
    };
    match session {
        Err(e) => {
            out.push(fail("postgres reachable", e.to_string()));
            for name in [
                "wal_level",
                "outbox table",
                "replication privilege",
                "publication",
                "slot",
                "privileges",
            ] {
                out.push(fail(name, "skipped: Postgres is not reachable"));
            }
        }
        Ok((target, sql)) => {
            out.push(pass(
                "postgres reachable",
                match configured.hosts().len() {
                    1 => target.redacted(),
                    _ => format!(
                        "{} (of {}: the host that takes writes now)",
                        target.redacted(),
                        configured.redacted()
                    ),
                },
            ));
            out.push(match catalog::require_logical(&sql).await {
                Ok(()) => pass("wal_level", "logical"),
                Err(e) => fail("wal_level", e.to_string()),
            });
            out.push(outbox_table_check(&sql, config).await);
            if config.postgres.source == crate::config::Source::Messages {
                out.push(message_writers_check(&sql, config).await);
            }
            out.push(match catalog::can_replicate(&sql).await {
                Ok(true) => pass("replication privilege", "role may replicate"),
                Ok(false) => fail(
                    "replication privilege",
                    Error::NoReplicationPrivilege.to_string(),
                ),
                Err(e) => fail("replication privilege", e.to_string()),
            });
            for shard in config.selected_shards() {
                let label = shard.postgres.sharding.label();
                let mut checks = [
                    publication_check(&sql, &shard).await,
                    slot_check(&sql, &shard).await,
                ];
                if !label.is_empty() {
                    for c in &mut checks {
                        c.detail = format!("{label}: {}", c.detail);
                    }
                }
                out.extend(checks);
            }
            out.extend(privileges_check(&sql, config).await);
            if config.inbox.is_some() {
                out.push(inbox_table_check(&sql, config).await);
            }
        }
    }
    // The exchanges are declared only where the relay would declare them
    // (`declare_exchange`), else checked to exist.
    let settings = AmqpSettings::from_config(&config.amqp);
    let exchanges = amqp::exchanges(&settings);
    if settings.exchange.is_none() {
        let what = if settings.declare_exchange {
            "declared (topic, durable)"
        } else {
            "checked to exist"
        };
        out.push(pass(
            "exchange",
            format!(
                "a template ({:?}): each exchange it names is {what} the first time a message goes to it; a message whose exchange cannot be used is parked with the broker's reason",
                config.amqp.exchange
            ),
        ));
    }
    match reach_nodes(&settings).await {
        (None, report) => {
            out.push(fail("broker reachable", report));
            for (key, _) in &exchanges {
                out.push(fail(
                    exchange_check(key),
                    "skipped: the broker is not reachable",
                ));
            }
        }
        (Some(connection), report) => {
            out.push(pass("broker reachable", report));
            for (key, exchange) in exchanges {
                let what = if settings.declare_exchange {
                    "declared (topic, durable)"
                } else {
                    "exists"
                };
                out.push(
                    match amqp::ensure_exchange(
                        &connection,
                        key,
                        exchange,
                        settings.declare_exchange,
                    )
                    .await
                    {
                        Ok(()) => pass(exchange_check(key), format!("{exchange} {what}")),
                        Err(e) => fail(exchange_check(key), e.to_string()),
                    },
                );
            }
            close_quickly(&connection).await;
        }
    }
    Checks(out)
}

/// Connects to each node of `amqp.url` in turn: a connection to the first that
/// answers (to check the exchanges on), and a report naming each node's state —
/// with a cluster, a node down is named even though the relay can run.
async fn reach_nodes(settings: &AmqpSettings) -> (Option<lapin::Connection>, String) {
    let mut first = None;
    let mut report = Vec::new();
    for url in &settings.nodes {
        let one = AmqpSettings {
            nodes: vec![url.clone()],
            ..settings.clone()
        };
        match amqp::open(&one).await {
            Ok(connection) => {
                report.push(format!("{} reachable", url.redacted()));
                match first {
                    None => first = Some(connection),
                    Some(_) => close_quickly(&connection).await,
                }
            }
            // One node: its error alone (it names the key to fix).
            Err(e) if settings.nodes.len() == 1 => return (None, e.to_string()),
            Err(e) => report.push(format!("{} NOT reachable: {e}", url.node())),
        }
    }
    (first, report.join("; "))
}

/// Closes a connection `check` opened, without waiting on a broker that went away.
async fn close_quickly(connection: &lapin::Connection) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        connection.close(200, "outbox-relay check".into()),
    )
    .await;
}

/// The outbox table has the mapping's columns. For the Event-Forge layout, a NOT
/// NULL column without a default that `outbox::enqueue` (and the README's insert)
/// does not write is named: the relay reads such rows fine, but those writers fail.
async fn outbox_table_check(sql: &tokio_postgres::Client, config: &Config) -> Check {
    let table = &config.postgres.table;
    if config.postgres.source == crate::config::Source::Messages {
        return pass(
            "outbox table",
            format!(
                "none: postgres.source = \"messages\" publishes pg_logical_emit_message(true, '{}', content)",
                config.postgres.message_prefix
            ),
        );
    }
    if let Err(e) = catalog::require_table(sql, table, &config.postgres.columns).await {
        return fail("outbox table", e.to_string());
    }
    let mut detail = format!("{table} has the required columns");
    if config.postgres.mapping == crate::config::Mapping::EventForge {
        match catalog::unfilled_not_null(sql, table, &crate::outbox::WRITTEN).await {
            Ok(unfilled) if !unfilled.is_empty() => detail.push_str(&format!(
                "; note: NOT NULL column(s) without a default that outbox::enqueue does not write: {} (your own writers must fill them; else {})",
                unfilled.join(", "),
                catalog::unfilled_fix(table, &unfilled)
            )),
            Ok(_) => {}
            Err(e) => return fail("outbox table", e.to_string()),
        }
    }
    pass("outbox table", detail)
}

/// With the messages source, who may write to the outbox: every role that may
/// run `pg_logical_emit_message`, which PostgreSQL grants to PUBLIC.
async fn message_writers_check(sql: &tokio_postgres::Client, config: &Config) -> Check {
    let public = sql
        .query_one(
            "select has_function_privilege('public', 'pg_logical_emit_message(boolean,text,text)', 'execute') \
             or has_function_privilege('public', 'pg_logical_emit_message(boolean,text,bytea)', 'execute')",
            &[],
        )
        .await;
    match public {
        Err(e) => fail("message writers", crate::pg::query_err("checking who may emit messages")(e).to_string()),
        Ok(row) if row.get::<_, bool>(0) => fail(
            "message writers",
            format!(
                "every role may run pg_logical_emit_message (PostgreSQL grants it to PUBLIC), so any role that can connect can have the relay publish a message with prefix {:?}; fix: REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC; then GRANT EXECUTE on them to the writers' roles and to the relay's (its heartbeat), or make outbox_emit (sql/outbox_emit.sql) SECURITY DEFINER and grant only that",
                config.postgres.message_prefix
            ),
        ),
        Ok(_) => pass(
            "message writers",
            "pg_logical_emit_message is not granted to PUBLIC: only the roles granted it can write to the outbox",
        ),
    }
}

/// The inbox table of `[inbox]` exists, takes the receiver's insert (its unique
/// key) and has no NOT NULL column the receiver leaves empty.
async fn inbox_table_check(sql: &tokio_postgres::Client, config: &Config) -> Check {
    let Some(inbox) = &config.inbox else {
        return pass("inbox table", "no [inbox] section");
    };
    let table = &inbox.table;
    match crate::inbox::queries::exists(sql, table).await {
        Ok(true) => {}
        Ok(false) => {
            return fail(
                "inbox table",
                Error::InboxTableMissing {
                    table: table.to_string(),
                }
                .to_string(),
            )
        }
        Err(e) => return fail("inbox table", e.to_string()),
    }
    if let Err(e) = sql.prepare(&crate::inbox::queries::insert_sql(table)).await {
        return fail(
            "inbox table",
            Error::InboxTableUnusable {
                table: table.to_string(),
                message: e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string()),
            }
            .to_string(),
        );
    }
    match catalog::unfilled_not_null(sql, table, &crate::inbox::queries::WRITTEN).await {
        Ok(unfilled) if unfilled.is_empty() => {
            pass("inbox table", format!("{table} takes the receiver's rows"))
        }
        Ok(unfilled) => fail(
            "inbox table",
            format!(
                "{table} has NOT NULL column(s) without a default that the receiver does not write: {}; it would refuse every delivery (the receiver pauses until fixed): {}",
                unfilled.join(", "),
                catalog::unfilled_fix(table, &unfilled)
            ),
        ),
        Err(e) => fail("inbox table", e.to_string()),
    }
}

/// One line when the role holds every privilege the configured mode needs, else
/// one line per missing privilege with the GRANT that adds it.
async fn privileges_check(sql: &tokio_postgres::Client, config: &Config) -> Vec<Check> {
    let missing = match privileges::needed(sql, config).await {
        Ok(needs) => privileges::missing(sql, needs).await,
        Err(e) => Err(e),
    };
    match missing {
        Err(e) => vec![fail("privileges", e.to_string())],
        Ok(m) if m.needs.is_empty() => vec![pass(
            "privileges",
            format!(
                "role {} holds every table privilege that on_success = \"{}\" and the retry state need",
                m.role,
                config.postgres.on_success.as_str()
            ),
        )],
        Ok(m) => m
            .needs
            .iter()
            .map(|need| {
                fail(
                    "privileges",
                    format!("role {} lacks {need}; fix: {}", m.role, need.grant(&m.role)),
                )
            })
            .collect(),
    }
}

/// The name of the check line for the exchange under `key`.
fn exchange_check(key: &str) -> &'static str {
    if key == "amqp.dead_letter_exchange" {
        "dead-letter exchange"
    } else {
        "exchange"
    }
}

async fn publication_check(sql: &tokio_postgres::Client, config: &Config) -> Check {
    let (publication, table) = (&config.postgres.publication, &config.postgres.table);
    if config.postgres.source == crate::config::Source::Messages {
        return match catalog::ensure_message_publication(sql, publication, false).await {
            Ok(_) => pass(
                "publication",
                format!("{publication} exists (messages need no table in it)"),
            ),
            Err(_) if config.postgres.create_missing => pass(
                "publication",
                format!("{publication} missing; `run` creates it (create_missing = true)"),
            ),
            Err(e) => fail("publication", e.to_string()),
        };
    }
    let sharding = &config.postgres.sharding;
    let layout = match shards::layout(sql, sharding).await {
        Ok(l) => l,
        Err(e) => return fail("publication", e.to_string()),
    };
    if let Err(e) = shards::check_layout(&layout, sharding, table, &sharding.base_slot) {
        return fail("publication", e.to_string());
    }
    let state = match catalog::publication_state(sql, publication, table).await {
        Ok(s) => s,
        Err(e) => return fail("publication", e.to_string()),
    };
    if state == PublicationState::Missing && config.postgres.create_missing {
        return pass(
            "publication",
            format!("{publication} missing; `run` creates it (create_missing = true)"),
        );
    }
    let partitioned = match catalog::is_partitioned(sql, table).await {
        Ok(p) => p,
        Err(e) => return fail("publication", e.to_string()),
    };
    match catalog::publication_problem(&state, publication, table, partitioned) {
        Some(e) => fail("publication", e.to_string()),
        None if partitioned => pass(
            "publication",
            format!("{publication} publishes inserts of the partitioned {table} via its root"),
        ),
        None => pass(
            "publication",
            format!("{publication} publishes inserts of {table}"),
        ),
    }
}

async fn slot_check(sql: &tokio_postgres::Client, config: &Config) -> Check {
    let pg = &config.postgres;
    let slot = &pg.slot;
    let records = SlotRecords::next_to(&pg.retry_table);
    let filter = crate::pg::shards::filter(pg, None);
    let usable = slots::usable_slot(
        sql,
        &records,
        slot,
        &pg.target.dbname,
        &pg.table,
        filter.as_deref(),
    );
    let s = match usable.await {
        Err(e) => return fail("slot", e.to_string()),
        Ok(None) if pg.create_missing => {
            return pass(
                "slot",
                format!(
                    "{slot} missing; `run` creates it on its first start (create_missing = true)"
                ),
            )
        }
        Ok(None) => {
            return fail(
                "slot",
                Error::SlotMissing { slot: slot.clone() }.to_string(),
            )
        }
        Ok(Some(s)) => s,
    };
    let at = s
        .confirmed_flush
        .map(|l| l.to_string())
        .unwrap_or_else(|| "?".into());
    let lag = s
        .lag_bytes
        .map(|b| format!(", {b} bytes behind"))
        .unwrap_or_default();
    // `unreserved`: past max_wal_size; the server invalidates it once it falls
    // max_slot_wal_keep_size behind.
    let wal = match s.wal_status.as_deref() {
        Some("unreserved") => "; wal_status unreserved: the server invalidates it if it falls further behind (max_slot_wal_keep_size)".to_string(),
        _ => String::new(),
    };
    // With several hosts a fail-over is planned for: say whether the slot survives it.
    let failover = match (pg.target.hosts().len() > 1, s.failover) {
        (false, _) => "",
        (true, Some(true)) => "; a fail-over slot: kept on the standbys in synchronized_standby_slots (with sync_replication_slots on them)",
        (true, Some(false)) => "; not a fail-over slot (created before PostgreSQL 17, or by hand): a fail-over loses it; see docs/recovery.md",
        (true, None) => "; PostgreSQL before 17 keeps slots on the primary only: a fail-over loses it (replay --pending recovers; see docs/recovery.md)",
    };
    match s.active_pid {
        Some(pid) => pass(
            "slot",
            format!("{slot} at {at}{lag}; active, held by pid {pid}{wal}{failover}"),
        ),
        None => pass(
            "slot",
            format!("{slot} at {at}{lag}; inactive{wal}{failover}"),
        ),
    }
}
