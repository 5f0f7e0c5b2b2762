//! `outbox-relay check`: one line per preflight check, each failure with its fix.

use crate::config::Config;
use crate::error::Error;
use crate::pg::catalog::{self, PublicationState};
use crate::sink::{self, SinkSettings};

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
    let target = &config.postgres.target;
    let table = &config.postgres.table;
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
                match catalog::require_table(&sql, table, &config.postgres.columns).await {
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
                match catalog::publication_state(&sql, publication, table).await {
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
    // The exchanges are declared only where the relay would declare them
    // (`declare_exchange`), else checked to exist.
    let settings = SinkSettings::from_config(&config.amqp);
    let exchanges = sink::exchanges(&settings);
    match sink::open(&settings).await {
        Err(e) => {
            out.push(fail("broker reachable", e.to_string()));
            for (key, _) in &exchanges {
                out.push(fail(
                    exchange_check(key),
                    "skipped: the broker is not reachable",
                ));
            }
        }
        Ok(connection) => {
            out.push(pass("broker reachable", settings.url.redacted()));
            for (key, exchange) in exchanges {
                let what = if settings.declare_exchange {
                    "declared (topic, durable)"
                } else {
                    "exists"
                };
                out.push(
                    match sink::ensure_exchange(
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
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                connection.close(200, "outbox-relay check".into()),
            )
            .await;
        }
    }
    Checks(out)
}

/// The name of the check line for the exchange under `key`.
fn exchange_check(key: &str) -> &'static str {
    if key == "amqp.dead_letter_exchange" {
        "dead-letter exchange"
    } else {
        "exchange"
    }
}
