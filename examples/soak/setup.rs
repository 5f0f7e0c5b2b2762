//! The soak's own objects: a schema with Event-Forge's tables exactly as its
//! models create them (no server defaults), the business and effect tables,
//! the slot, publication, exchange and queue, and the configuration file the
//! relays and the receiver share. Made afresh at the start, dropped at the end.

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Event-Forge 1.5.0's DDL, verbatim (the tests' fixture).
const EVENT_FORGE_DDL: &str = include_str!("../../tests/fixtures/event_forge_1_5_0.sql");

pub const SCHEMA: &str = "soak";
pub const OUTBOX: &str = "soak.outbox_messages";
pub const INBOX: &str = "soak.inbox_messages";
pub const ORDERS: &str = "soak.orders";
pub const EFFECTS: &str = "soak.effects";
pub const RETRY: &str = "soak.outbox_relay_parked";
pub const SLOT: &str = "soak";
pub const PUBLICATION: &str = "soak";
pub const EXCHANGE: &str = "soak.events";
pub const QUEUE: &str = "soak.inbox";
pub const CHANNEL: &str = "soak_inbox";
pub const DLX: &str = "soak.dlx";
/// The routing keys the receiver's queue is bound with: `Order` aggregates'
/// events; `Parcel` ones are unroutable until [`UNROUTABLE_KEY`] is bound.
pub const BOUND_KEY: &str = "Order.#";
pub const UNROUTABLE_KEY: &str = "Parcel.#";

/// A Postgres session, retried for `timeout` (the server may be restarting).
pub async fn pg(timeout: Duration) -> Result<Client> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio_postgres::connect(PG_URL, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return Ok(client);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("connecting to Postgres at 127.0.0.1:5432")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A broker connection, retried for `timeout`.
pub async fn amqp(timeout: Duration) -> Result<Connection> {
    let deadline = Instant::now() + timeout;
    loop {
        match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("connecting to RabbitMQ at 127.0.0.1:5672")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Drops whatever an earlier soak left, then makes the schema, the tables and
/// the exchange; writes the configuration into `dir`, its path.
pub async fn prepare(dir: &Path) -> Result<PathBuf> {
    let db = pg(Duration::from_secs(30)).await?;
    drop_all(&db).await?;
    db.batch_execute(&format!(
        "create schema {SCHEMA}; set search_path = {SCHEMA}; {EVENT_FORGE_DDL}; reset search_path;
         create table {ORDERS} (id text primary key, agg text not null, n int not null);
         create table {EFFECTS} (seq bigserial primary key, order_id text not null, agg text not null, n int not null);"
    ))
    .await
    .context("creating the soak's tables")?;
    let conn = amqp(Duration::from_secs(30)).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "soak set up".into()).await;

    let config = format!(
        r#"[postgres]
url = "{PG_URL}"
table = "{OUTBOX}"
slot = "{SLOT}"
publication = "{PUBLICATION}"
retry_table = "{RETRY}"
standby = true
slot_wait = "30s"
reconnect_backoff_max = "2s"

[amqp]
url = "{AMQP_URL}"
exchange = "{EXCHANGE}"
reconnect_backoff_max = "2s"

[retry]
backoff_base = "200ms"
backoff_max = "2s"

[inbox]
queue = "{QUEUE}"
table = "{INBOX}"
declare = true
bind_exchange = "{EXCHANGE}"
bind_keys = ["{BOUND_KEY}"]
notify_channel = "{CHANNEL}"
dead_letter_exchange = "{DLX}"

[metrics]
listen = "127.0.0.1:0"

[log]
level = "info"
"#
    );
    let path = dir.join("soak.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// Drops the slot (waiting for its walsender to go), the publication, the
/// schema, the queue and the exchange.
pub async fn drop_all(db: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = db
            .execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                 where slot_name = $1 and not active",
                &[&SLOT],
            )
            .await?;
        let left = db
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = $1",
                &[&SLOT],
            )
            .await?
            .get::<_, i64>(0);
        if dropped > 0 || left == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "slot {SLOT} still active after 30 s: stop what holds it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.batch_execute(&format!(
        "drop publication if exists {PUBLICATION}; drop schema if exists {SCHEMA} cascade;"
    ))
    .await?;
    let conn = amqp(Duration::from_secs(30)).await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    for exchange in [EXCHANGE, DLX] {
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "soak cleaned up".into()).await;
    Ok(())
}
