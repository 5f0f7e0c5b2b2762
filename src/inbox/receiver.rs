//! `outbox-relay inbox`: checks the inbox table, starts the store and broker
//! tasks with their bounded channels, and stops them on the signal.

use super::{broker, queries, store};
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Health;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Runs `outbox-relay inbox` until `shutdown` resolves: the deliveries handed to
/// Postgres are recorded and acked before it returns (within
/// `relay.shutdown_timeout`; the rest are redelivered).
pub async fn receive(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let inbox = config.inbox.clone().ok_or(Error::InboxNotConfigured)?;
    let session_options = crate::pg::connect::session_timeouts(
        config.postgres.statement_timeout,
        config.postgres.lock_timeout,
    );
    let health = Arc::new(Health::default());
    check_table(&config, &inbox, &health).await?;
    // Postgres answered the table check; the store task reports later trouble.
    health.set_streaming(true);
    // The same endpoint as `run` (the slot's lag is the relay's, when one runs).
    let _metrics = crate::metrics::server::spawn(&config, &health).await?;

    let capacity = usize::from(inbox.prefetch);
    let (to_store, from_broker) = mpsc::channel(capacity);
    let (to_broker, from_store) = mpsc::channel(capacity);
    let (stop, stopped) = watch::channel(false);
    let store = tokio::spawn(store::run(
        store::StoreSettings {
            target: config.postgres.target.clone(),
            inbox: inbox.clone(),
            backoff_max: config.postgres.reconnect_backoff_max,
            session_options,
        },
        from_broker,
        to_broker,
        stopped.clone(),
        health.clone(),
    ));
    let broker = broker::run(
        broker::BrokerSettings {
            amqp: config.amqp.clone(),
            inbox,
            shutdown_timeout: config.relay.shutdown_timeout,
        },
        to_store,
        from_store,
        stopped,
        health,
    );
    tokio::pin!(broker);
    tokio::pin!(shutdown);
    // Priority: the broker task ending on its own (an error) first, then the signal.
    let result = tokio::select! {
        biased;
        r = &mut broker => r,
        _ = &mut shutdown => {
            tracing::info!("inbox: shutting down; recording what was handed to Postgres");
            let _ = stop.send(true);
            broker.await
        }
    };
    let _ = stop.send(true);
    // The broker task dropped its sender: the store ends after its batch.
    let _ = tokio::time::timeout(Duration::from_secs(10), store).await;
    if result.is_ok() {
        tracing::info!("inbox stopped");
    }
    result
}

/// The table exists and takes the insert (its unique key matches the ON CONFLICT).
async fn check_table(
    config: &Config,
    inbox: &crate::config::InboxConfig,
    health: &Health,
) -> Result<(), Error> {
    let client = config
        .postgres
        .target
        .connect_as("outbox-relay inbox")
        .await?;
    if !queries::exists(&client, &inbox.table).await? {
        return Err(Error::InboxTableMissing {
            table: inbox.table.to_string(),
        });
    }
    client
        .prepare(&queries::insert_sql(&inbox.table))
        .await
        .map_err(|e| Error::InboxTableUnusable {
            table: inbox.table.to_string(),
            message: e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        })?;
    // A NOT NULL column the insert does not write makes the table refuse every
    // row: say so now; the store holds the deliveries (nothing dead-lettered)
    // until the table takes a row.
    let unfilled =
        crate::pg::catalog::unfilled_not_null(&client, &inbox.table, &queries::WRITTEN).await?;
    if !unfilled.is_empty() {
        let why = format!(
            "inbox table {} has NOT NULL column(s) without a default that the receiver does not write ({}): every row will be refused until {}; deliveries are held unacked meanwhile, nothing is dead-lettered",
            inbox.table,
            unfilled.join(", "),
            crate::pg::catalog::unfilled_fix(&inbox.table, &unfilled)
        );
        tracing::warn!("{why}");
        health.set_problem(crate::metrics::Problem::InboxTable, Some(why));
    }
    Ok(())
}
