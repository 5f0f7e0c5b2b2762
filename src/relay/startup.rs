//! Start-up: preflight (everything that would make the relay unable to run fails
//! here, once, clearly), opening the replication stream on the slot — waiting as
//! a hot standby while another process holds it — and the heartbeat task.

use crate::config::Config;
use crate::error::Error;
use crate::metrics::{self, Health, Problem, SlotLoss};
use crate::pg::slots::{self, SlotRecords};
use crate::pg::{catalog, connect::application_name, PgTarget};
use crate::source::{self, SourceSettings};
use crate::task::AbortOnDrop;
use crate::time::Backoff;
use pgwire_replication::{Lsn, ReplicationClient};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;

/// Checks Postgres once before anything starts: `wal_level`, the table and its
/// columns, the replication privilege; creates a missing publication and slot
/// when `create_missing` says so.
pub async fn preflight(config: &Config) -> Result<(), Error> {
    let pg = &config.postgres;
    let sql = pg.target.connect().await?;
    catalog::require_logical(&sql).await?;
    let messages = pg.source == crate::config::Source::Messages;
    if !messages {
        catalog::require_table(&sql, &pg.table, &pg.columns).await?;
    }
    if !catalog::can_replicate(&sql).await? {
        return Err(Error::NoReplicationPrivilege);
    }
    let shard = crate::pg::shards::chosen(&pg.sharding, "relay")?;
    // Under the set-up lock: a relay and its standby started together on a
    // fresh database must not both create the publication and the slot.
    crate::pg::setup_lock::locked(&sql, async {
        let created = if messages {
            catalog::ensure_message_publication(&sql, &pg.publication, pg.create_missing).await?
        } else {
            crate::pg::shards::ensure_publication(
                &sql,
                &pg.sharding,
                shard,
                &pg.table,
                &pg.columns.aggregate_id,
                pg.create_missing,
            )
            .await?
        };
        if created {
            tracing::info!(publication = %pg.publication, table = %pg.table, shard = %pg.sharding.label(), "created publication (inserts only)");
        }
        let records = SlotRecords::next_to(&pg.retry_table);
        slots::ensure_slot(
            &sql,
            &records,
            &pg.slot,
            &pg.target.dbname,
            &pg.table,
            crate::pg::shards::filter(pg, None).as_deref(),
            pg.create_missing,
        )
        .await?;
        Ok(())
    })
    .await
}

/// While the slot is lost (or a replay of it has not finished): says so — the
/// refusal in the log, `/readyz` and `outbox_relay_slot_lost{how}` — and checks
/// again every few seconds; returns once the slot can be streamed from (after
/// `replay --pending`), `false` when shutdown came first. Postgres being away
/// meanwhile is waited out too.
pub async fn wait_for_slot(
    config: &Config,
    health: &Health,
    mut why: Error,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, Error> {
    const CHECK_EVERY: Duration = Duration::from_secs(5);
    const REPEAT_LOG: Duration = Duration::from_secs(600);
    let mut logged: Option<(String, Instant)> = None;
    let result = loop {
        let text = why.to_string();
        if logged
            .as_ref()
            .is_none_or(|(t, at)| *t != text || at.elapsed() >= REPEAT_LOG)
        {
            tracing::error!("{text}; waiting (checking every {CHECK_EVERY:?})");
            logged = Some((text.clone(), Instant::now()));
        }
        health.set_problem(Problem::SlotLost, Some(text));
        for how in SlotLoss::ALL {
            let on = why.slot_loss() == Some(how);
            metrics::metrics()
                .slot_lost
                .with_label_values(&[how.label()])
                .set(i64::from(on));
        }
        tokio::select! {
            biased;
            _ = shutdown.as_mut() => break Ok(false),
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        match preflight(config).await {
            Ok(()) => {
                tracing::info!(slot = %config.postgres.slot, "the slot can be streamed from again: starting");
                break Ok(true);
            }
            Err(e) if e.waits_for_recovery() => why = e,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "checking the slot failed; trying again");
            }
            Err(e) => break Err(e),
        }
    };
    health.set_problem(Problem::SlotLost, None);
    for how in SlotLoss::ALL {
        metrics::metrics()
            .slot_lost
            .with_label_values(&[how.label()])
            .set(0);
    }
    result
}

/// Records where a cleanly stopping relay left its slot (best effort: the record
/// is what tells a later start that the slot existed).
pub async fn record_stop(config: &Config, applied: Lsn) {
    let pg = &config.postgres;
    let records = SlotRecords::next_to(&pg.retry_table);
    let recorded = async {
        let sql = pg.target.connect().await?;
        let server = catalog::server_identity(&sql).await.ok();
        records
            .seen(&sql, &pg.slot, &pg.table, Some(applied), server.as_ref())
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), recorded).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not record the slot's position at stop"),
        Err(_) => tracing::warn!(
            "could not record the slot's position at stop: Postgres did not answer within 5 s"
        ),
    }
}

/// Opens the replication stream from the slot's confirmed position, or from
/// `at_least` when that is newer (the relay's own applied LSN after a reconnect).
/// A slot lost meanwhile (dropped, invalidated, a fail-over) is the refusal that
/// says how, never a stream from somewhere else.
pub async fn open_stream(
    settings: &SourceSettings,
    config: &Config,
    at_least: Lsn,
    reported: Option<Lsn>,
) -> Result<(ReplicationClient, Lsn), Error> {
    let pg = &config.postgres;
    let sql = settings.target.connect().await?;
    let records = SlotRecords::next_to(&pg.retry_table);
    let filter = crate::pg::shards::filter(pg, None);
    let usable = || {
        slots::usable_slot(
            &sql,
            &records,
            &settings.slot,
            &pg.target.dbname,
            &pg.table,
            filter.as_deref(),
        )
    };
    let state = usable().await?.ok_or_else(|| Error::SlotMissing {
        slot: settings.slot.clone(),
    })?;
    let start = state.confirmed_flush.unwrap_or(at_least).max(at_least);
    // What the server hears as flushed: where the stream starts, or after a
    // reconnect what the relay had reported (marks may still be pending).
    let ack = reported.map_or(start, |r| r.max(state.confirmed_flush.unwrap_or(r)));
    match source::start(settings, start, ack).await {
        Ok(client) => Ok((client, start)),
        // Lost between the look and the start (say, invalidated at a checkpoint
        // in between): the refusal that says how, not the server's raw error.
        Err(e) => match usable().await {
            Err(lost) if lost.waits_for_recovery() => Err(lost),
            _ => Err(e),
        },
    }
}

/// Starts replication on the slot. While another process holds it: as a standby,
/// waits (with backoff) until it is released; otherwise gives up after
/// `slot_wait` naming the holder. `None`: shutdown came first.
pub async fn take_slot(
    settings: &SourceSettings,
    config: &Config,
    health: &Health,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<(ReplicationClient, Lsn)>, Error> {
    let standby = config.postgres.standby;
    let deadline = Instant::now() + config.postgres.slot_wait;
    // A standby asks again with a growing wait (up to 2 s: its take-over time);
    // a relay that is not one, every 250 ms until `slot_wait`.
    let mut backoff = Backoff::exact(
        Duration::from_millis(250),
        if standby {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(250)
        },
    );
    let mut logged_pid = None;
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown.as_mut() => return Ok(None),
            r = open_stream(settings, config, Lsn::from_u64(0), None) => r,
        };
        match result {
            Ok(taken) => {
                if logged_pid.is_some() {
                    tracing::info!(slot = %settings.slot, "slot released by its holder: taking over");
                }
                health.set_standby(None);
                return Ok(Some(taken));
            }
            Err(Error::SlotBusy { slot, pid }) if standby || Instant::now() < deadline => {
                if standby {
                    health.set_standby(Some(pid));
                }
                if logged_pid != Some(pid) {
                    let role = if standby {
                        "waiting as a hot standby"
                    } else {
                        "waiting for it to be released"
                    };
                    tracing::info!(%slot, pid, "slot is held by another process (pid {pid}): {role}");
                    logged_pid = Some(pid);
                }
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return Ok(None),
                    _ = tokio::time::sleep(backoff.fail()) => {}
                }
            }
            // Postgres went away (a restart, a fail-over) while this process
            // waited for the slot it has seen held: a standby waits on (the
            // server it reached before will be back), as does a relay within
            // `slot_wait`. A first attempt that fails is a refusal at start-up.
            Err(e)
                if logged_pid.is_some()
                    && (e.is_transient() || e.server_stopping())
                    && (standby || Instant::now() < deadline) =>
            {
                tracing::warn!(slot = %settings.slot, "waiting for the slot: {e}; trying again");
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return Ok(None),
                    _ = tokio::time::sleep(backoff.fail()) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `application_name` of the heartbeat's session.
pub fn heartbeat_application_name(slot: &str) -> String {
    application_name("heartbeat", slot)
}

/// The heartbeat task: emits a non-transactional logical message every
/// `interval` (when configured) so an otherwise idle slot keeps moving (the relay
/// confirms it when nothing is in flight), and on demand (`probe`) when the
/// replication connection has been silent: a message that comes back through the
/// stream proves it alive.
pub struct Heartbeat {
    probe: std::sync::Arc<tokio::sync::Notify>,
    _task: AbortOnDrop,
}

impl Heartbeat {
    pub fn spawn(target: PgTarget, slot: &str, interval: Option<Duration>) -> Heartbeat {
        let application_name = heartbeat_application_name(slot);
        let probe = std::sync::Arc::new(tokio::sync::Notify::new());
        let asked = probe.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut tick = interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                // Priority: a probe, then the periodic beat.
                tokio::select! {
                    biased;
                    _ = asked.notified() => {}
                    _ = async {
                        match tick.as_mut() {
                            Some(t) => { t.tick().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
                if client.is_none() {
                    client = target.connect_as(&application_name).await.ok();
                }
                if let Some(c) = &client {
                    if let Err(e) = c
                        .batch_execute(&format!(
                            "select pg_logical_emit_message(false, '{}', '')",
                            crate::config::HEARTBEAT_PREFIX
                        ))
                        .await
                    {
                        tracing::warn!(error = %e, "heartbeat failed; reconnecting for the next one");
                        client = None;
                    }
                }
            }
        });
        Heartbeat {
            probe,
            _task: AbortOnDrop(task),
        }
    }

    /// Emits one message now.
    pub fn probe(&self) {
        self.probe.notify_one();
    }
}
