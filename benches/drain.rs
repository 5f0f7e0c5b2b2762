//! End-to-end benchmark against the local Postgres and RabbitMQ, one table:
//!
//! - the ceiling: a plain lapin publisher with confirms (same window, same body
//!   size, same durable queue), measured in the same run;
//! - the relay draining a backlog of Event-Forge rows (default `mark_published`, and
//!   `keep`), timed until the slot's confirmed LSN passes the last commit, with its
//!   peak RSS and CPU seconds next to the broker's;
//! - the same for a 10x larger backlog (peak RSS must not grow with the backlog);
//! - live: a steady insert rate, one row per transaction, commit-to-consumer latency.
//!
//! Run with `cargo bench --bench drain`. Environment: BENCH_ROWS=100000,
//! BENCH_WINDOW=2048, BENCH_BIG_ROWS=1000000 (0 skips the large backlog),
//! BENCH_LIVE_RATE=1000, BENCH_LIVE_SECS=10, BENCH_PERF=FILE (profile the relay).
//!
//! Needs the local services prepared by scripts/setup-services.sh.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_postgres::{Client, NoTls};

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

async fn pg() -> Client {
    let (db, conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    db
}

async fn amqp_setup() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
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
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

async fn amqp_teardown() {
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
    let _ = conn.close(200, "bye".into()).await;
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

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Peak resident set size in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn broker_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "beam.smp"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Plain lapin publisher: confirms on, `window` publishes in flight, mandatory, the
/// same message (body, properties, headers) as the relay sends.
async fn lapin_ceiling(
    rows: usize,
    window: usize,
    message: &outbox_relay::sink::OutboundMessage,
) -> (f64, f64) {
    let (conn, ch) = amqp_setup().await;
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let props = message.properties.clone();
    let body = &message.body;
    let broker = broker_pid();
    let broker_cpu0 = broker.map(cpu_seconds).unwrap_or(0.0);
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
    let broker_cpu = broker.map(cpu_seconds).unwrap_or(0.0) - broker_cpu0;
    assert_eq!(queue_depth(&ch).await as usize, rows);
    let _ = conn.close(200, "bye".into()).await;
    (rows as f64 / secs, broker_cpu * 100_000.0 / rows as f64)
}

/// Drops and recreates table, publication and slot.
async fn fresh_outbox(db: &Client) {
    let _ = db
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1", &[&SLOT])
        .await;
    db.batch_execute(&format!(
        "drop publication if exists {SLOT}; drop table if exists {TABLE}; drop table if exists public.bench_parked"
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
}

async fn drop_outbox(db: &Client) {
    let _ = db
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1", &[&SLOT])
        .await;
    let _ = db
        .batch_execute(&format!(
            "drop publication if exists {SLOT}; drop table if exists {TABLE}; drop table if exists public.bench_parked"
        ))
        .await;
}

/// Writes `rows` rows, 1 000 per transaction, 1 000 aggregates. Returns the LSN after the last commit.
async fn write_backlog(db: &Client, rows: usize) -> String {
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
    db.query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn spawn_relay(window: usize, on_success: &str) -> std::process::Child {
    let dir = std::env::temp_dir().join("outbox-relay-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[postgres]\nurl = \"{PG_URL}\"\ntable = \"{TABLE}\"\nslot = \"{SLOT}\"\npublication = \"{SLOT}\"\n\
             retry_table = \"public.bench_parked\"\non_success = \"{on_success}\"\n\
             [amqp]\nurl = \"{AMQP_URL}\"\nexchange = \"{EXCHANGE}\"\nmax_in_flight = {window}\nmax_in_flight_bytes = 268435456\n\
             [metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("relay.log")).unwrap();
    // BENCH_PERF=FILE records a CPU profile of the relay with `perf record`.
    let mut command = match std::env::var("BENCH_PERF") {
        Ok(out) => {
            let mut c = Command::new("perf");
            c.args([
                "record",
                "-F",
                "999",
                "-g",
                "-o",
                &out,
                "--",
                env!("CARGO_BIN_EXE_outbox-relay"),
            ]);
            c
        }
        Err(_) => Command::new(env!("CARGO_BIN_EXE_outbox-relay")),
    };
    command
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

struct Drain {
    rate: f64,
    rss_mb: f64,
    relay_cpu: f64,
    broker_cpu: f64,
}

/// Drains a backlog of `rows` rows; timed from the relay's start until the slot's
/// confirmed LSN passes the last commit (and every message is in the queue).
async fn relay_drain(rows: usize, window: usize, on_success: &str) -> Drain {
    let db = pg().await;
    fresh_outbox(&db).await;
    let t = Instant::now();
    let end_lsn = write_backlog(&db, rows).await;
    eprintln!(
        "backlog of {rows} rows written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (amqp, ch) = amqp_setup().await;
    let broker = broker_pid();
    let broker_cpu0 = broker.map(cpu_seconds).unwrap_or(0.0);
    let start = Instant::now();
    let mut child = spawn_relay(window, on_success);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let confirmed: Option<String> = db
            .query_one(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap()
            .get(0);
        if confirmed.is_some_and(|c| lsn(&c) >= lsn(&end_lsn))
            && queue_depth(&ch).await as usize >= rows
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not drain the backlog in 30 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "relay exited early; see the log in {}",
            std::env::temp_dir().join("outbox-relay-bench").display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let drain = Drain {
        rate: rows as f64 / secs,
        rss_mb: peak_rss_mb(pid),
        relay_cpu: cpu_seconds(pid),
        broker_cpu: broker.map(cpu_seconds).unwrap_or(0.0) - broker_cpu0,
    };
    stop(&mut child);
    let _ = amqp.close(200, "bye".into()).await;
    drop_outbox(&db).await;
    drain
}

/// Steady inserts, one row per transaction, for `secs`; commit-to-consumer latency.
async fn live(rate: usize, secs: usize, window: usize) -> (f64, f64, f64, usize) {
    let db = pg().await;
    fresh_outbox(&db).await;
    let (amqp, ch) = amqp_setup().await;
    let mut child = spawn_relay(window, "mark_published");
    // Wait until the relay streams: one probe row arrives.
    db.batch_execute(&format!("insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload) values ('probe', 'P', 'p', 'e', '{{}}')"))
        .await
        .unwrap();
    let consumer_ch = amqp.create_channel().await.unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            QUEUE.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = consumer.next().await.unwrap().unwrap();
    first.ack(BasicAckOptions::default()).await.unwrap();
    let total = rate * secs;
    let writers = 4;
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(async move {
            let db = pg().await;
            let stmt = db
                .prepare(&format!("insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload) values ($1, 'Order', $2, 'order.placed', $3::text::json)"))
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_micros((1_000_000 * writers / rate) as u64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in (w..total).step_by(writers) {
                tick.tick().await;
                db.execute(&stmt, &[&format!("live-{i}"), &format!("order-{}", i % 1000), &payload(i)]).await.unwrap();
            }
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("live messages stopped")
            .unwrap()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        let created = body["createdAt"].as_str().unwrap();
        let created_micros = parse_iso_micros(created);
        latencies.push((now - created_micros) as f64 / 1000.0);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop(&mut child);
    let _ = amqp.close(200, "bye".into()).await;
    let _ = ch;
    drop_outbox(&db).await;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (pct(0.5), pct(0.99), latencies[latencies.len() - 1], total)
}

/// `2026-11-27T06:00:00.123456+00:00` to Unix microseconds (UTC offsets only).
fn parse_iso_micros(s: &str) -> i64 {
    let date = &s[..10];
    let (y, m, d): (i64, i64, i64) = (
        date[..4].parse().unwrap(),
        date[5..7].parse().unwrap(),
        date[8..10].parse().unwrap(),
    );
    let (h, mi, se): (i64, i64, i64) = (
        s[11..13].parse().unwrap(),
        s[14..16].parse().unwrap(),
        s[17..19].parse().unwrap(),
    );
    let micros = if s.as_bytes().get(19) == Some(&b'.') {
        s[20..26].parse::<i64>().unwrap()
    } else {
        0
    };
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (days * 86400 + h * 3600 + mi * 60 + se) * 1_000_000 + micros
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("BENCH_ROWS", 100_000);
    let big_rows = env_usize("BENCH_BIG_ROWS", 1_000_000);
    let window = env_usize("BENCH_WINDOW", 2048);
    let live_rate = env_usize("BENCH_LIVE_RATE", 1000);
    let live_secs = env_usize("BENCH_LIVE_SECS", 10);

    let event = outbox_relay::event::OutboxEvent {
        id: "00000000-bench".into(),
        aggregate_type: "Order".into(),
        aggregate_id: "order-0".into(),
        event_type: "order.placed".into(),
        payload: bytes::Bytes::from(payload(0)),
        metadata: None,
        created_at: Some("2026-11-27 06:00:00.123456+00".into()),
        scheduled_at: None,
        max_retries: None,
    };
    let message = outbox_relay::sink::format::encode(&event, 0).unwrap();
    let body_len = message.body.len();

    let (ceiling, ceiling_broker_cpu) = lapin_ceiling(rows, window, &message).await;
    let marked = relay_drain(rows, window, "mark_published").await;
    let kept = relay_drain(rows, window, "keep").await;
    let (p50, p99, max, live_n) = live(live_rate, live_secs, window).await;
    let big = if big_rows > 0 {
        Some(relay_drain(big_rows, window, "keep").await)
    } else {
        None
    };
    amqp_teardown().await;

    let per100k = |d: &Drain, n: usize| {
        (
            d.relay_cpu * 100_000.0 / n as f64,
            d.broker_cpu * 100_000.0 / n as f64,
        )
    };
    println!();
    println!("outbox-relay end-to-end benchmark: body {body_len} bytes, window {window}, one durable queue, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!("| measurement | msg/s | ratio to ceiling | relay peak RSS | relay CPU s / 100k | broker CPU s / 100k |");
    println!("|---|---|---|---|---|---|");
    println!("| plain lapin publisher with confirms, same messages (ceiling), {rows} msgs | {ceiling:.0} | 1.00 | | | {ceiling_broker_cpu:.2} |");
    let (rc, bc) = per100k(&marked, rows);
    println!("| relay drains {rows} rows, on_success = mark_published | {:.0} | {:.2} | {:.1} MB | {rc:.2} | {bc:.2} |", marked.rate, marked.rate / ceiling, marked.rss_mb);
    let (rc, bc) = per100k(&kept, rows);
    println!("| relay drains {rows} rows, on_success = keep | {:.0} | {:.2} | {:.1} MB | {rc:.2} | {bc:.2} |", kept.rate, kept.rate / ceiling, kept.rss_mb);
    if let Some(big) = &big {
        let (rc, bc) = per100k(big, big_rows);
        println!("| relay drains {big_rows} rows, on_success = keep | {:.0} | {:.2} | {:.1} MB | {rc:.2} | {bc:.2} |", big.rate, big.rate / ceiling, big.rss_mb);
    }
    println!();
    println!("live: {live_n} inserts at {live_rate}/s, one row per transaction: commit-to-consumer latency p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
}
