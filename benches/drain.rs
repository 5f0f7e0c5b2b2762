//! End-to-end benchmark: drain a backlog of outbox rows through the relay and
//! compare with the ceiling of a plain lapin publisher (confirms, same window,
//! same body size, same durable queue) measured in the same run.
//!
//!   cargo bench --bench drain            (BENCH_ROWS=100000 BENCH_WINDOW=2048)
//!
//! Needs the local Postgres (wal_level=logical) and RabbitMQ: scripts/setup-services.sh.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TABLE: &str = "public.bench_outbox";
const SLOT: &str = "bench_drain";
const EXCHANGE: &str = "bench_drain";
const QUEUE: &str = "bench_drain";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// A ~400-byte JSON payload, like a typical domain event.
fn payload(i: usize) -> String {
    format!(
        "{{\"orderId\":\"order-{i:08}\",\"customer\":{{\"id\":\"cust-{c:06}\",\"email\":\"customer{c}@example.com\",\"tier\":\"gold\"}},\"lines\":[{{\"sku\":\"SKU-{a:05}\",\"qty\":2,\"price\":19.99}},{{\"sku\":\"SKU-{b:05}\",\"qty\":1,\"price\":5.25}}],\"total\":45.23,\"currency\":\"EUR\",\"shipping\":{{\"method\":\"standard\",\"address\":\"Example Street 12, 10115 Berlin\"}},\"note\":\"benchmark row\"}}",
        c = i % 100_000,
        a = i % 50_000,
        b = (i * 7) % 50_000
    )
}

async fn amqp_setup() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
        .await;
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

async fn queue_depth(ch: &lapin::Channel) -> u32 {
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Plain lapin publisher: confirms on, `window` publishes in flight, persistent, mandatory.
async fn lapin_ceiling(rows: usize, window: usize, body: &[u8]) -> f64 {
    let (conn, ch) = amqp_setup().await;
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for i in 0..rows {
        if inflight.len() >= window {
            let c: lapin::Confirmation = inflight.next().await.unwrap();
            assert!(c.is_ack());
        }
        let confirm = pub_ch
            .basic_publish(
                EXCHANGE.into(),
                "Order.order.placed".into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props.clone().with_message_id(format!("ceiling-{i}").into()),
            )
            .await
            .unwrap();
        inflight.push(async move { confirm.await.unwrap() });
    }
    while let Some(c) = inflight.next().await {
        assert!(c.is_ack());
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(queue_depth(&ch).await as usize, rows);
    let _ = conn.close(200, "bye".into()).await;
    rows as f64 / secs
}

struct RelayRun {
    to_queue_rate: f64,
    to_confirmed_rate: f64,
    body_len: usize,
}

async fn relay_drain(rows: usize, window: usize) -> RelayRun {
    let (db, conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let _ = db
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1", &[&SLOT])
        .await;
    db.batch_execute(&format!(
        "drop publication if exists {SLOT}; drop table if exists {TABLE}"
    ))
    .await
    .unwrap();
    db.batch_execute(&outbox_relay::catalog::outbox_ddl(
        &outbox_relay::catalog::TableName::parse(TABLE).unwrap(),
    ))
    .await
    .unwrap();
    db.batch_execute(&format!(
        "create publication {SLOT} for table {TABLE} with (publish = 'insert')"
    ))
    .await
    .unwrap();
    db.batch_execute(&format!(
        "select pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"
    ))
    .await
    .unwrap();
    // The backlog: `rows` rows, 1 000 per transaction, ~400-byte payloads, 1 000 aggregates.
    let sample = payload(0);
    let load = Instant::now();
    for start in (0..rows).step_by(1000) {
        let end = (start + 1000).min(rows);
        let mut sql = format!(
            "insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload) values "
        );
        for i in start..end {
            if i > start {
                sql.push(',');
            }
            sql.push_str(&format!(
                "('{i:08}-bench', 'Order', 'order-{}', 'order.placed', '{}')",
                i % 1000,
                payload(i)
            ));
        }
        db.batch_execute(&sql).await.unwrap();
    }
    let end_lsn: String = db
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "backlog of {rows} rows written in {:.1} s",
        load.elapsed().as_secs_f64()
    );

    let (amqp, ch) = amqp_setup().await;
    let dir = std::env::temp_dir().join("outbox-relay-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[postgres]\nurl = \"{PG_URL}\"\ntable = \"{TABLE}\"\nslot = \"{SLOT}\"\npublication = \"{SLOT}\"\n\
             [amqp]\nurl = \"{AMQP_URL}\"\nexchange = \"{EXCHANGE}\"\nmax_in_flight = {window}\nmax_in_flight_bytes = 268435456\n\
             [log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("relay.log")).unwrap();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut queued_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let confirmed_at = loop {
        if queued_at.is_none() && queue_depth(&ch).await as usize >= rows {
            queued_at = Some(start.elapsed());
        }
        let confirmed: Option<String> = db
            .query_one(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap()
            .get(0);
        if queued_at.is_some() && confirmed.is_some_and(|c| lsn(&c) >= lsn(&end_lsn)) {
            break start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "relay did not drain the backlog in 10 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "relay exited early; see {}",
            dir.join("relay.log").display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = amqp.close(200, "bye".into()).await;
    let _ = db
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1", &[&SLOT])
        .await;
    db.batch_execute(&format!(
        "drop publication if exists {SLOT}; drop table if exists {TABLE}"
    ))
    .await
    .unwrap();
    let event = outbox_relay::event::OutboxEvent {
        id: "00000000-bench".into(),
        aggregate_type: "Order".into(),
        aggregate_id: "order-0".into(),
        event_type: "order.placed".into(),
        payload: bytes::Bytes::from(sample),
        metadata: None,
        created_at: Some("2026-11-27 06:00:00.123456+00".into()),
        scheduled_at: None,
        max_retries: None,
    };
    let body_len = outbox_relay::sink::format::encode(&event, 0)
        .unwrap()
        .body
        .len();
    RelayRun {
        to_queue_rate: rows as f64 / queued_at.unwrap().as_secs_f64(),
        to_confirmed_rate: rows as f64 / confirmed_at.as_secs_f64(),
        body_len,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("BENCH_ROWS", 100_000);
    let window = env_usize("BENCH_WINDOW", 2048);
    let relay = relay_drain(rows, window).await;
    let body = vec![b'x'; relay.body_len];
    let ceiling = lapin_ceiling(rows, window, &body).await;
    // Clean up the broker side.
    let (conn, ch) = amqp_setup().await;
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;

    println!();
    println!(
        "drain benchmark: {rows} rows, body {} bytes, window {window}, 1 durable queue",
        relay.body_len
    );
    println!("| measurement                                   | msg/s   | ratio to ceiling |");
    println!("|-----------------------------------------------|---------|------------------|");
    println!(
        "| plain lapin publisher, confirms (ceiling)     | {ceiling:>7.0} | 1.00             |"
    );
    println!(
        "| relay, backlog until all messages in queue    | {:>7.0} | {:.2}             |",
        relay.to_queue_rate,
        relay.to_queue_rate / ceiling
    );
    println!(
        "| relay, backlog until slot confirmed_flush_lsn | {:>7.0} | {:.2}             |",
        relay.to_confirmed_rate,
        relay.to_confirmed_rate / ceiling
    );
}
