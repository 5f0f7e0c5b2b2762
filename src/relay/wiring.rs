//! `run`: connects the relay's tasks (store, housekeeping, sink, source) with
//! their bounded channels, takes the slot, and hands everything to the loop.

use super::main_loop::{Channels, Relay, Stream};
use super::parked::MAX_LOADING;
use super::startup;
use crate::amqp::AmqpSettings;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::{self, Health};
use crate::outbox_table::housekeeping::{
    housekeeping_application_name, Chore, Housekeeping, HousekeepingSettings,
};
use crate::pg::connect::session_timeouts;
use crate::retry::{Store, StoreCommand, StoreSettings};
use crate::sink;
use crate::source::SourceSettings;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Runs the relay until `shutdown` resolves (then drains and exits cleanly) or
/// an error that the relay cannot recover from. While its slot is lost (at
/// start-up, or found lost on a reconnect) it streams nothing and waits, saying
/// why, until `replay --pending` has recovered it; then it starts afresh.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    tokio::pin!(shutdown);
    // /healthz answers from the start; /readyz says why it is not ready yet.
    let health = Arc::new(Health::default());
    let _metrics_server = crate::metrics::server::spawn(&config, &health).await?;
    loop {
        let result = match startup::preflight(&config).await {
            Ok(()) => stream(config.clone(), &health, &mut shutdown).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.waits_for_recovery() => {
                health.set_streaming(false);
                health.set_broker(None);
                if !startup::wait_for_slot(&config, &health, e, &mut shutdown).await? {
                    tracing::info!("stopped while waiting for the slot to be recovered");
                    return Ok(());
                }
            }
            other => return other,
        }
    }
}

/// Streams from the slot (preflight passed) until shutdown, or an error.
async fn stream(
    config: Config,
    health: &Arc<Health>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    let pg = &config.postgres;
    let (chores_tx, chores_rx) = mpsc::channel(256);
    let (stopping_tx, server_stopping) = tokio::sync::watch::channel(0);
    let (marked_tx, marked) = tokio::sync::watch::channel(0);
    let (store, housekeeping) =
        open_sessions(&config, health, chores_tx.clone(), stopping_tx, marked_tx).await?;
    let sink_settings = AmqpSettings::from_config(&config.amqp);
    let broker = crate::amqp::connect(&sink_settings).await?;
    let frame_max = broker.frame_max();
    let source_settings = SourceSettings {
        target: pg.target.clone(),
        slot: pg.slot.clone(),
        publication: pg.publication.clone(),
        status_interval: pg.status_interval,
        // Rows buffered ahead of the window (each event is one row): small, so the
        // memory beyond the window stays bounded; larger buffers measured no faster.
        buffer_events: 256,
    };
    let Some((client, start_lsn)) =
        startup::take_slot(&source_settings, &config, health, shutdown).await?
    else {
        tracing::info!("stopped while waiting for the slot");
        return Ok(());
    };
    health.set_streaming(true);
    tracing::info!(
        postgres = %pg.target.redacted(),
        table = %pg.table,
        slot = %pg.slot,
        publication = %pg.publication,
        shard = %pg.sharding.label(),
        amqp = %config.amqp.redacted(),
        exchange = %config.amqp.exchange,
        start_lsn = %start_lsn,
        ordering = ?config.relay.ordering,
        "outbox-relay {} holds the slot; reading the retry state",
        env!("CARGO_PKG_VERSION")
    );
    metrics::metrics()
        .confirmed_lsn
        .set(start_lsn.as_u64() as f64);
    let heartbeat = startup::Heartbeat::spawn(
        pg.target.clone(),
        &pg.slot,
        (!pg.heartbeat_interval.is_zero()).then_some(pg.heartbeat_interval),
    );

    let window = config.amqp.max_in_flight;
    let (cmd_tx, cmd_rx) = mpsc::channel(window * 2 + 16);
    let (ev_tx, ev_rx) = mpsc::channel(window * 4 + 64);
    let sink_task = tokio::spawn(sink::run(sink_settings, broker, cmd_rx, ev_tx));
    // Answers outstanding at once: parks (each holds window space), one command per
    // retried head in flight (window) and loads (capped): the event channel always
    // has room, so the store never blocks and the main loop never waits on it for long.
    let (store_tx, store_rx) = mpsc::channel(window * 2 + MAX_LOADING + 16);
    let (loads_tx, loads_rx) = mpsc::channel(MAX_LOADING + 16);
    let (parks_tx, parks_rx) = mpsc::channel(window + 16);
    let (store_ev_tx, store_ev_rx) = mpsc::channel(window * 2 + MAX_LOADING * 2 + 64);
    let store_task = tokio::spawn(store.run(parks_rx, store_rx, loads_rx, store_ev_tx));
    let housekeeping_task = tokio::spawn(housekeeping.run(chores_rx));

    let mut relay = Relay::new(
        config,
        health.clone(),
        Stream {
            client,
            settings: source_settings,
            start_lsn,
            heartbeat,
            server_stopping,
            marked,
        },
        Channels {
            sink: cmd_tx,
            store: store_tx,
            loads: loads_tx,
            parks: parks_tx,
            chores: chores_tx,
        },
        frame_max,
    );
    // The retry state is read now that the slot is held (a standby reads it when
    // it takes over, not when it started), before any WAL is published.
    let _ = relay.store.send(StoreCommand::Reload).await;
    let result = relay.main_loop(ev_rx, store_ev_rx, shutdown.as_mut()).await;
    if result.is_ok() {
        startup::record_stop(&relay.config, relay.reported).await;
    }
    // Closing the command channels ends the sink task (which closes the broker
    // connection) and the store task (after it flushes pending on_success updates).
    drop(relay);
    let _ = tokio::time::timeout(Duration::from_secs(5), sink_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), store_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), housekeeping_task).await;
    result
}

/// The retry store's and the housekeeping task's sessions, opened (and the
/// tables they need checked) before the slot is taken.
async fn open_sessions(
    config: &Config,
    health: &Arc<Health>,
    chores: mpsc::Sender<Chore>,
    stopping: tokio::sync::watch::Sender<u64>,
    marked: tokio::sync::watch::Sender<u64>,
) -> Result<(Store, Housekeeping), Error> {
    let pg = &config.postgres;
    let session_options = session_timeouts(pg.statement_timeout, pg.lock_timeout);
    let store = Store::open(
        StoreSettings {
            target: pg.target.clone(),
            slot: pg.slot.clone(),
            table: pg.table.clone(),
            retry_table: pg.retry_table.clone(),
            mapping: pg.columns.clone(),
            tableless: pg.source == crate::config::Source::Messages,
            on_dead: config.retry.on_dead,
            on_success: pg.on_success,
            reconnect_backoff_max: pg.reconnect_backoff_max,
            session_options: session_options.clone(),
        },
        health.clone(),
        chores,
        stopping,
    )
    .await?;
    let housekeeping = Housekeeping::open(
        HousekeepingSettings {
            target: pg.target.clone(),
            application_name: housekeeping_application_name(&pg.slot),
            session_options,
            on_success: pg.on_success,
            retention: pg.retention,
            dead_retention: config.retry.dead_retention,
            reconnect_backoff_max: pg.reconnect_backoff_max,
        },
        store.outbox().clone(),
        store.retry_table().clone(),
        marked,
    )
    .await?;
    Ok((store, housekeeping))
}
