//! End-to-end benchmark against the local Postgres and RabbitMQ, one table:
//!
//! - the ceiling: a plain lapin publisher with confirms (same messages, same window,
//!   one fresh durable queue), measured in every round;
//! - the relay draining a backlog of Event-Forge rows, timed from its start until the
//!   slot's confirmed LSN passes the last commit, with its peak RSS and the CPU seconds
//!   of the relay, the broker and Postgres, for several backlog shapes: 10 000
//!   aggregates with `mark_published` (the Event-Forge default) and `keep`, and 1 000
//!   hot aggregates with strict and relaxed ordering;
//! - a 10x larger backlog next to its own ceiling (peak RSS must not grow with it);
//! - live: a steady insert rate, one row per transaction, commit-to-consumer latency;
//! - the shapes production sees beyond the easy one: a backlog of one-row
//!   transactions, a stream whose every message is parked (a missing binding), one
//!   aggregate in ten parked while the others drain, and the recovery of 100 000
//!   parked (or dead and requeued) messages once the cause is fixed.
//!
//! Rounds interleave the ceiling with the relay runs (the ceiling first in odd rounds,
//! last in even ones); each figure is the median over rounds, each ratio range is the
//! relay runs over their own round's ceiling. Before each run the broker is left to
//! settle and the backlog is vacuumed and checkpointed, so one run's leftovers are not
//! billed to the next.
//!
//! Run with `cargo bench --bench drain`. Environment: BENCH_ROWS=100000,
//! BENCH_WINDOW=2048, BENCH_ROUNDS=3, BENCH_AGGREGATES=10000, BENCH_BIG_ROWS=1000000
//! (0 skips the large backlog), BENCH_LIVE_RATE=1000, BENCH_LIVE_SECS=10,
//! BENCH_SHAPES=0,1 (only these rows: 0–8 drains, 9 recovery, 10 requeue), BENCH_WRITER_TXNS=3000, BENCH_PERF=FILE (perf profile of each
//! relay run into FILE-<pid>), BENCH_CEILING_CHANNELS=N (only the ceiling, on 1..=N
//! channels), BENCH_RELAY=PATH (another relay binary, to compare two builds).
//!
//! Needs the local services prepared by scripts/setup-services.sh.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_postgres::{Client, NoTls};

mod common;
use common::{
    broker_pid, env_usize, lsn, median, parse_iso_micros, payload, peak_rss_mb, queue_depth,
    relay_binary, settle_broker, CpuUse,
};

const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TABLE: &str = "public.bench_outbox";
const SLOT: &str = "bench_drain";
const EXCHANGE: &str = "bench_drain";
const QUEUE: &str = "bench_drain";

async fn pg() -> Client {
    let (db, conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    db
}

/// A fresh queue bound to the exchange with `#` (everything routes).
async fn amqp_setup() -> (Connection, lapin::Channel) {
    amqp_setup_bound("#").await
}

/// A fresh queue bound with `pattern` only (other routing keys are unroutable).
async fn amqp_setup_bound(pattern: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // A fresh queue for every run: each one starts from the same broker state.
    ch.queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
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
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

/// The routing key every failing row is published with (never bound while it fails).
const LOST: &str = "order.lost";

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

/// Plain lapin publisher: confirms on, `window` publishes in flight, mandatory, the
/// same message (body, properties, headers) as the relay sends.
async fn lapin_ceiling(
    rows: usize,
    window: usize,
    message: &outbox_relay::sink::OutboundMessage,
    channels: usize,
) -> Ceiling {
    let (conn, ch) = amqp_setup().await;
    let mut pub_channels = Vec::new();
    for _ in 0..channels {
        let pub_ch = conn.create_channel().await.unwrap();
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        pub_channels.push(pub_ch);
    }
    let props = &message.properties;
    let body = &message.body;
    settle_broker().await;
    let (own, broker) = (Some(std::process::id()), broker_pid());
    let cpu0 = CpuUse::now(own, broker);
    let start = Instant::now();
    // Each channel publishes its share with its share of the window.
    let publishers = pub_channels
        .iter()
        .enumerate()
        .map(|(c, pub_ch)| async move {
            let window = (window / channels).max(1);
            let mut inflight = FuturesUnordered::new();
            for i in (c..rows).step_by(channels) {
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
        });
    futures_util::future::join_all(publishers).await;
    let secs = start.elapsed().as_secs_f64();
    let cpu = CpuUse::now(own, broker).per_100k_since(cpu0, rows);
    assert_eq!(queue_depth(&ch, QUEUE).await as usize, rows);
    let _ = conn.close(200, "bye".into()).await;
    Ceiling {
        rate: rows as f64 / secs,
        cpu,
    }
}

struct Ceiling {
    rate: f64,
    /// Per 100k; the process is this benchmark (the plain publisher).
    cpu: CpuUse,
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
    db.batch_execute(&outbox_relay::pg::catalog::outbox_ddl(
        &outbox_relay::pg::TableName::parse(TABLE).unwrap(),
    ))
    .await
    .unwrap();
    // Failing rows keep retrying until they are let through (the requeue scenario
    // sets its own budget on its rows).
    db.batch_execute(&format!(
        "alter table {TABLE} alter column max_retries set default 1000000"
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

/// Which rows of a backlog fail (routed to `Order.order.lost`, which no queue is
/// bound to).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failing {
    None,
    All,
    /// Every row of one aggregate in ten.
    TenthOfAggregates,
}

impl Failing {
    /// The SQL expression of a row's event type, for row number `i` of `aggregates`.
    fn event_type(self, aggregates: usize) -> String {
        match self {
            Failing::None => "'order.placed'".into(),
            Failing::All => format!("'{LOST}'"),
            Failing::TenthOfAggregates => format!(
                "case when (g % {aggregates}) % 10 = 0 then '{LOST}' else 'order.placed' end"
            ),
        }
    }

    /// How many of `rows` rows over `aggregates` route.
    fn routable(self, rows: usize, aggregates: usize) -> usize {
        match self {
            Failing::None => rows,
            Failing::All => 0,
            Failing::TenthOfAggregates => (0..rows)
                .filter(|i| !(i % aggregates).is_multiple_of(10))
                .count(),
        }
    }
}

/// The SQL expression of row `g`'s payload: the same ~400 bytes as `payload(g)`.
fn payload_sql() -> &'static str {
    "format('{\"orderId\":\"order-%s\",\"customer\":{\"id\":\"cust-%s\",\"email\":\"customer%s@example.com\",\"tier\":\"gold\"},\"lines\":[{\"sku\":\"SKU-%s\",\"qty\":2,\"price\":19.99},{\"sku\":\"SKU-%s\",\"qty\":1,\"price\":5.25}],\"total\":45.23,\"currency\":\"EUR\",\"shipping\":{\"method\":\"standard\",\"address\":\"Example Street 12, 10115 Berlin\"},\"note\":\"benchmark row\"}', \
     lpad(g::text, 8, '0'), lpad((g % 100000)::text, 6, '0'), g % 100000, lpad((g % 50000)::text, 5, '0'), lpad(((g * 7) % 50000)::text, 5, '0'))::json"
}

/// Writes `rows` rows, `per_txn` per transaction, round robin over `aggregates`
/// aggregates, with `max_retries` on each when given. Returns the LSN after the
/// last commit.
async fn write_backlog(
    db: &Client,
    rows: usize,
    aggregates: usize,
    per_txn: usize,
    failing: Failing,
    max_retries: Option<i32>,
    messages: bool,
) -> String {
    let event_type = failing.event_type(aggregates);
    let retries = max_retries.map_or("1000000".to_string(), |m| m.to_string());
    let insert = |from: usize, to: usize| {
        if messages {
            return format!(
                "select count(pg_logical_emit_message(true, 'bench', json_build_object('id', lpad(g::text, 8, '0') || '-bench', \
                 'aggregate_type', 'Order', 'aggregate_id', 'order-' || (g % {aggregates}), 'event_type', {event_type}, \
                 'payload', {})::text)) from generate_series({from}, {to}) g",
                payload_sql()
            );
        }
        format!(
            "insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) \
             select lpad(g::text, 8, '0') || '-bench', 'Order', 'order-' || (g % {aggregates}), {event_type}, {}, {retries} \
             from generate_series({from}, {to}) g",
            payload_sql()
        )
    };
    if per_txn == 1 {
        // One transaction per row, written by the server itself (a procedure may
        // commit), without waiting for each commit's flush: 100 000 round trips and
        // flushes would take longer than the run.
        db.batch_execute("set synchronous_commit = off")
            .await
            .unwrap();
        for start in (0..rows).step_by(10_000) {
            let end = (start + 10_000).min(rows) - 1;
            db.batch_execute(&format!(
                "do $$ begin for r in {start}..{end} loop {}; commit; end loop; end $$",
                insert(0, 0)
                    .replace("generate_series(0, 0) g", "(select r) as x(g)")
                    .replace("select count(", "perform (")
            ))
            .await
            .unwrap();
        }
        db.batch_execute("set synchronous_commit = on")
            .await
            .unwrap();
    } else {
        for start in (0..rows).step_by(per_txn) {
            let end = (start + per_txn).min(rows) - 1;
            db.batch_execute(&insert(start, end)).await.unwrap();
        }
    }
    db.query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// What a drain run looks like: the backlog's aggregates, transactions and
/// failures, and the relay's settings.
#[derive(Clone, Copy)]
struct Shape {
    aggregates: usize,
    on_success: &'static str,
    ordering: &'static str,
    per_txn: usize,
    failing: Failing,
    /// Lines added to `[amqp]` (the wire templates).
    wire: &'static str,
    /// The backlog as logical decoding messages (`postgres.source = "messages"`).
    messages: bool,
}

impl Shape {
    const fn new(aggregates: usize, on_success: &'static str, ordering: &'static str) -> Shape {
        Shape {
            aggregates,
            on_success,
            ordering,
            per_txn: 1000,
            failing: Failing::None,
            wire: "",
            messages: false,
        }
    }

    fn label(&self, rows: usize) -> String {
        let txns = if self.per_txn == 1 {
            "one-row transactions".to_string()
        } else {
            format!("{}-row transactions", self.per_txn)
        };
        let failing = match self.failing {
            Failing::None => "",
            Failing::All => ", every message unroutable (all parked)",
            Failing::TenthOfAggregates => {
                ", one aggregate in ten unroutable (parked), msg/s of the others"
            }
        };
        let wire = if self.wire.is_empty() {
            ""
        } else {
            ", routing key, two headers and two properties from templates"
        };
        if self.messages {
            return format!(
                "relay drains {rows} logical decoding messages ({txns}, no table) over {} aggregates, ordering = {}",
                self.aggregates, self.ordering
            );
        }
        format!(
            "relay drains {rows} rows ({txns}) over {} aggregates, on_success = {}, ordering = {}{failing}{wire}",
            self.aggregates, self.on_success, self.ordering
        )
    }
}

fn spawn_relay(window: usize, shape: Shape) -> std::process::Child {
    spawn_relay_with(window, shape, "")
}

/// `retry_section`: lines for `[retry]` (the failure scenarios retry quickly).
fn spawn_relay_with(window: usize, shape: Shape, retry_section: &str) -> std::process::Child {
    let Shape {
        on_success,
        ordering,
        wire,
        messages,
        ..
    } = shape;
    let source = if messages {
        "source = \"messages\"\nmessage_prefix = \"bench\"\n"
    } else {
        ""
    };
    let dir = std::env::temp_dir().join("outbox-relay-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[postgres]\nurl = \"{PG_URL}\"\ntable = \"{TABLE}\"\nslot = \"{SLOT}\"\npublication = \"{SLOT}\"\n\
             retry_table = \"public.bench_parked\"\non_success = \"{on_success}\"\n{source}\
             [amqp]\nurl = \"{AMQP_URL}\"\nexchange = \"{EXCHANGE}\"\nmax_in_flight = {window}\n{wire}\n\
             [relay]\nordering = \"{ordering}\"\n[retry]\n{retry_section}\n[metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("relay.log")).unwrap();
    let binary = relay_binary();
    Command::new(binary)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// BENCH_PERF=FILE: `perf record` attached to the relay (FILE-<pid>), stopped with it.
fn profile(pid: u32) -> Option<std::process::Child> {
    let out = std::env::var("BENCH_PERF").ok()?;
    Command::new("perf")
        .args([
            "record",
            "-F",
            "499",
            "--call-graph",
            "dwarf,32768",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(format!("{out}-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn stop(child: &mut std::process::Child) {
    signal(child, "-TERM");
}

fn signal(child: &mut std::process::Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let _ = child.wait();
}

struct Drain {
    rate: f64,
    /// Seconds until every message was in the queue (the slot confirms after that).
    delivered_secs: f64,
    secs: f64,
    rss_mb: f64,
    /// Per 100k; the process is the relay.
    cpu: CpuUse,
}

/// Retries of the failure scenarios: quick, so a parked backlog is due soon.
const QUICK_RETRIES: &str = "backoff_base = \"100ms\"\nbackoff_max = \"1s\"";

/// Drains a backlog of `rows` rows; timed from the relay's start until the slot's
/// confirmed LSN passes the last commit (every message in the queue, or parked).
async fn relay_drain(rows: usize, window: usize, shape: Shape) -> Drain {
    let db = pg().await;
    fresh_outbox(&db).await;
    let t = Instant::now();
    let end_lsn = write_backlog(
        &db,
        rows,
        shape.aggregates,
        shape.per_txn,
        shape.failing,
        None,
        shape.messages,
    )
    .await;
    let routable = shape.failing.routable(rows, shape.aggregates);
    // What autovacuum would do to a freshly loaded table, and a checkpoint, before
    // the clock starts rather than at some point during the run.
    db.batch_execute(&format!("vacuum analyze {TABLE}"))
        .await
        .unwrap();
    db.batch_execute("checkpoint").await.unwrap();
    eprintln!(
        "backlog of {rows} rows written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (amqp, ch) = if shape.failing == Failing::None {
        amqp_setup().await
    } else {
        amqp_setup_bound("Order.order.placed").await
    };
    settle_broker().await;
    let broker = broker_pid();
    let cpu0 = CpuUse::now(None, broker);
    let start = Instant::now();
    // Retries at the defaults (5 s and up): a drain run sees the parked heads
    // retried once or twice, as production would.
    let mut child = spawn_relay(window, shape);
    let pid = child.id();
    let mut perf = profile(pid);
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut delivered_secs = None;
    let mut first_secs = None;
    loop {
        let depth = queue_depth(&ch, QUEUE).await as usize;
        if first_secs.is_none() && depth > 0 {
            first_secs = Some(start.elapsed().as_secs_f64());
        }
        if delivered_secs.is_none() && depth >= routable {
            delivered_secs = Some(start.elapsed().as_secs_f64());
        }
        let confirmed: Option<String> = db
            .query_one(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap()
            .get(0);
        if confirmed.is_some_and(|c| lsn(&c) >= lsn(&end_lsn)) && delivered_secs.is_some() {
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("  first message after {:.2} s, all in queue after {:.2} s, slot confirmed after {secs:.2} s", first_secs.unwrap_or(0.0), delivered_secs.unwrap_or(0.0));
    let drain = Drain {
        rate: match shape.failing {
            // The others' rate: what routes, until it is all in the queue.
            Failing::TenthOfAggregates => routable as f64 / delivered_secs.unwrap_or(secs),
            _ => rows as f64 / secs,
        },
        delivered_secs: delivered_secs.unwrap_or(secs),
        secs,
        rss_mb: peak_rss_mb(pid),
        cpu: CpuUse::now(Some(pid), broker).per_100k_since(cpu0, rows),
    };
    if let Some(perf) = perf.as_mut() {
        signal(perf, "-INT");
    }
    stop(&mut child);
    let _ = amqp.close(200, "bye".into()).await;
    drop_outbox(&db).await;
    drain
}

/// A parked backlog and the moment its cause is fixed.
#[derive(Clone, Copy)]
enum Recovery {
    /// Everything parked because its routing key had no binding; then bound.
    Parked,
    /// Everything dead (no retries left); then bound and `dead requeue --all`.
    Requeued,
}

impl Recovery {
    fn label(&self, rows: usize) -> String {
        match self {
            Recovery::Parked => format!(
                "recovery: {rows} parked messages over 1000 aggregates reach the broker once the binding exists (strict order)"
            ),
            Recovery::Requeued => format!(
                "recovery: `dead requeue --all` of {rows} dead messages over 1000 aggregates"
            ),
        }
    }
}

async fn count_parked(db: &Client, status: &str) -> i64 {
    db.query_one(
        "select count(*) from public.bench_parked where status = $1",
        &[&status],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(-1)
}

/// Parks (or kills) a backlog of `rows` unroutable messages over 1 000 aggregates,
/// then fixes the cause; timed from the fix until every message is in the queue
/// and the retry table is empty.
async fn recover(rows: usize, window: usize, how: Recovery) -> Drain {
    let db = pg().await;
    fresh_outbox(&db).await;
    let max_retries = match how {
        Recovery::Parked => None,
        Recovery::Requeued => Some(0),
    };
    let shape = Shape {
        failing: Failing::All,
        ..Shape::new(1000, "mark_published", "strict")
    };
    let end_lsn = write_backlog(&db, rows, 1000, 1000, Failing::All, max_retries, false).await;
    db.batch_execute(&format!("vacuum analyze {TABLE}"))
        .await
        .unwrap();
    let (amqp, ch) = amqp_setup_bound("Order.order.placed").await;
    let mut child = spawn_relay_with(window, shape, QUICK_RETRIES);
    let pid = child.id();
    let waiting = match how {
        Recovery::Parked => "parked",
        Recovery::Requeued => "dead",
    };
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
            && count_parked(&db, waiting).await == rows as i64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not {waiting} in 30 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "relay exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("  {rows} messages {waiting}");
    settle_broker().await;
    let broker = broker_pid();
    let cpu0 = CpuUse::now(Some(pid), broker);
    let start = Instant::now();
    ch.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        format!("Order.{LOST}").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    if let Recovery::Requeued = how {
        let cfg = std::env::temp_dir()
            .join("outbox-relay-bench")
            .join("bench.toml");
        let binary = relay_binary();
        let began = Instant::now();
        let out = Command::new(binary)
            .args([
                "dead",
                "requeue",
                "--all",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        if !out.status.success() {
            // The relay must not outlive the benchmark (it would hold the slot).
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}", String::from_utf8_lossy(&out.stderr));
        }
        eprintln!(
            "  the requeue command took {:.2} s ({} pages run again after a deadlock or lock timeout)",
            began.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr)
                .matches("trying it again")
                .count()
        );
    }
    loop {
        if queue_depth(&ch, QUEUE).await as usize >= rows
            && count_parked(&db, "parked").await == 0
            && count_parked(&db, "dead").await == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not recovered in 30 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "relay exited early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("  recovered in {secs:.2} s");
    let drain = Drain {
        rate: rows as f64 / secs,
        delivered_secs: secs,
        secs,
        rss_mb: peak_rss_mb(pid),
        cpu: CpuUse::now(Some(pid), broker).per_100k_since(cpu0, rows),
    };
    stop(&mut child);
    let _ = amqp.close(200, "bye".into()).await;
    drop_outbox(&db).await;
    drain
}

/// Steady inserts, one row per transaction, for `secs`; commit-to-consumer latency.
struct Live {
    /// Messages per second achieved from the first insert to the last delivery.
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    rss_mb: f64,
    /// Per 100k; the process is the relay.
    cpu: CpuUse,
}

async fn live(rate: usize, secs: usize, window: usize) -> Live {
    let db = pg().await;
    fresh_outbox(&db).await;
    let (amqp, ch) = amqp_setup().await;
    let mut child = spawn_relay(window, Shape::new(1000, "mark_published", "strict"));
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
    let (pid, broker) = (child.id(), broker_pid());
    let cpu0 = CpuUse::now(Some(pid), broker);
    let total = rate * secs;
    let started = Instant::now();
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
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    let cpu = CpuUse::now(Some(pid), broker).per_100k_since(cpu0, total);
    let rss_mb = peak_rss_mb(pid);
    stop(&mut child);
    let _ = amqp.close(200, "bye".into()).await;
    let _ = ch;
    drop_outbox(&db).await;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Live {
        rate: achieved,
        p50: pct(0.5),
        p99: pct(0.99),
        max: latencies[latencies.len() - 1],
        rss_mb,
        cpu,
    }
}

/// One row of the table: the median of `runs`, its ratio to the median ceiling,
/// and the range of the per-round ratios.
fn drain_row(label: &str, runs: &[Drain], ceilings: &[f64]) {
    let rate = median(runs.iter().map(|d| d.rate).collect());
    let ceiling = median(ceilings.to_vec());
    let ratios: Vec<f64> = runs.iter().zip(ceilings).map(|(d, c)| d.rate / c).collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "| {label} | {rate:.0} | {:.2} ({lo:.2}–{hi:.2}) | {:.1} MB | {:.2} | {:.2} | {:.2} | {:.2} s / {:.2} s |",
        rate / ceiling,
        runs.iter().map(|d| d.rss_mb).fold(0.0, f64::max),
        median(runs.iter().map(|d| d.cpu.process).collect()),
        median(runs.iter().map(|d| d.cpu.broker).collect()),
        median(runs.iter().map(|d| d.cpu.postgres).collect()),
        median(runs.iter().map(|d| d.delivered_secs).collect()),
        median(runs.iter().map(|d| d.secs).collect()),
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // One benchmark at a time on this machine (another checkout's run would share
    // the tables, the slot, the queue and the cores): held until the process ends.
    let (guard, guard_conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = guard_conn.await;
    });
    if !guard
        .query_one("select pg_try_advisory_lock(7243001)", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        eprintln!("another drain benchmark is running on this machine; waiting for it to finish");
        guard
            .batch_execute("select pg_advisory_lock(7243001)")
            .await
            .unwrap();
    }
    let rows = env_usize("BENCH_ROWS", 100_000);
    let big_rows = env_usize("BENCH_BIG_ROWS", 1_000_000);
    let window = env_usize("BENCH_WINDOW", 2048);
    let live_rate = env_usize("BENCH_LIVE_RATE", 1000);
    let live_secs = env_usize("BENCH_LIVE_SECS", 10);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);

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
        extra: Vec::new(),
    };
    let message = outbox_relay::sink::format::encode(&event, 0).unwrap();
    let body_len = message.body.len();

    let aggregates = env_usize("BENCH_AGGREGATES", 10_000);
    let shapes = [
        Shape::new(aggregates, "mark_published", "strict"),
        Shape::new(aggregates, "keep", "strict"),
        // Hot aggregates: strict ordering allows one unconfirmed message per
        // aggregate, so the broker sees at most 1 000 in flight whatever the window.
        Shape::new(1000, "mark_published", "strict"),
        Shape::new(1000, "mark_published", "relaxed"),
        // What an OLTP application writes: one row per business transaction.
        Shape {
            per_txn: 1,
            ..Shape::new(aggregates, "mark_published", "strict")
        },
        // A deploy that forgot a binding: everything is parked.
        Shape {
            failing: Failing::All,
            ..Shape::new(aggregates, "mark_published", "strict")
        },
        // One aggregate in ten parked: the others must keep their pace.
        Shape {
            failing: Failing::TenthOfAggregates,
            ..Shape::new(aggregates, "mark_published", "strict")
        },
        // The first row with its wire shape from templates (docs/mapping.md): the
        // cost of rendering them, against row 0.
        Shape {
            wire: "routing_key = \"{aggregate_type}.{event_type}\"\n\
                   headers = { x-stream = \"{aggregate_type}/{aggregate_id}\", x-kind = \"{event_type}\" }\n\
                   properties = { type = \"{event_type}\", correlation_id = \"{aggregate_id}\" }",
            ..Shape::new(aggregates, "mark_published", "strict")
        },
        // Row 1 (keep) as logical decoding messages: no table at all.
        Shape {
            messages: true,
            ..Shape::new(aggregates, "keep", "strict")
        },
    ];
    let recoveries = [Recovery::Parked, Recovery::Requeued];

    // BENCH_CEILING_CHANNELS=N: only the ceiling, on 1..=N channels (is one channel the limit?).
    if let Some(n) = std::env::var("BENCH_CEILING_CHANNELS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        for round in 1..=rounds {
            for channels in 1..=n {
                let c = lapin_ceiling(rows, window, &message, channels).await;
                println!("round {round}: ceiling on {channels} channel(s): {:.0} msg/s, broker CPU {:.2} s / 100k", c.rate, c.cpu.broker);
            }
        }
        amqp_teardown().await;
        return;
    }

    // BENCH_SHAPES=0,2 runs only those rows of the table (0-based), e.g. to profile one.
    let only: Option<Vec<usize>> = std::env::var("BENCH_SHAPES")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let shapes: Vec<Shape> = shapes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| only.as_ref().is_none_or(|o| o.contains(i)))
        .map(|(_, s)| s)
        .collect();

    // Rounds interleave the ceiling with the relay runs, so that both see the same
    // machine (the ceiling goes first in odd rounds, last in even ones): each ratio
    // is a relay run over the ceiling of its own round.
    let mut ceiling_runs: Vec<Ceiling> = Vec::new();
    let mut drains: Vec<Vec<Drain>> = shapes.iter().map(|_| Vec::new()).collect();
    let recoveries: Vec<Recovery> = recoveries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| only.as_ref().is_none_or(|o| o.contains(&(i + 9))))
        .map(|(_, r)| r)
        .collect();
    let mut recovered: Vec<Vec<Drain>> = recoveries.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        if round % 2 == 1 {
            ceiling_runs.push(lapin_ceiling(rows, window, &message, 1).await);
        }
        for (shape, runs) in shapes.iter().zip(drains.iter_mut()) {
            let d = relay_drain(rows, window, *shape).await;
            eprintln!(
                "round {round}/{rounds}: {}: {:.0} msg/s",
                shape.label(rows),
                d.rate
            );
            runs.push(d);
        }
        for (r, runs) in recoveries.iter().zip(recovered.iter_mut()) {
            let d = recover(rows, window, *r).await;
            eprintln!(
                "round {round}/{rounds}: {}: {:.0} msg/s",
                r.label(rows),
                d.rate
            );
            runs.push(d);
        }
        if round % 2 == 0 {
            ceiling_runs.push(lapin_ceiling(rows, window, &message, 1).await);
        }
        eprintln!(
            "round {round}/{rounds}: ceiling {:.0} msg/s",
            ceiling_runs.last().unwrap().rate
        );
    }
    let ceilings: Vec<f64> = ceiling_runs.iter().map(|c| c.rate).collect();
    let live = live(live_rate, live_secs, window).await;
    let big_shape = Shape::new(aggregates, "keep", "strict");
    let big = if big_rows > 0 {
        let c = lapin_ceiling(big_rows, window, &message, 1).await.rate;
        Some((relay_drain(big_rows, window, big_shape).await, c))
    } else {
        None
    };
    amqp_teardown().await;
    let writer_txns = env_usize("BENCH_WRITER_TXNS", 3000);
    let writers = writer_cost(writer_txns).await;

    println!();
    println!(
        "outbox-relay end-to-end benchmark: body {body_len} bytes, window {window}, one durable queue, {} cores, median of {rounds} rounds",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("| measurement | msg/s | ratio to ceiling (range) | relay peak RSS | relay CPU s / 100k | broker CPU s / 100k | Postgres CPU s / 100k | time: all in queue / slot confirmed |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| plain lapin publisher with confirms, same messages (ceiling), {rows} msgs | {:.0} | 1.00 | | {:.2} (the publisher) | {:.2} | | |",
        median(ceilings.clone()),
        median(ceiling_runs.iter().map(|c| c.cpu.process).collect()),
        median(ceiling_runs.iter().map(|c| c.cpu.broker).collect()),
    );
    for (shape, runs) in shapes.iter().zip(&drains) {
        drain_row(&shape.label(rows), runs, &ceilings);
    }
    for (r, runs) in recoveries.iter().zip(&recovered) {
        drain_row(&r.label(rows), runs, &ceilings);
    }
    if let Some((big, c)) = big {
        drain_row(
            &format!(
                "{} (ceiling: {big_rows} msgs, {c:.0} msg/s)",
                big_shape.label(big_rows)
            ),
            &[big],
            &[c],
        );
    }
    println!(
        "| live: {live_rate} inserts/s for {live_secs} s, one row per transaction, 1000 aggregates, on_success = mark_published | {:.0} | | {:.1} MB | {:.2} | {:.2} | {:.2} | commit to consumer: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        live.rate, live.rss_mb, live.cpu.process, live.cpu.broker, live.cpu.postgres, live.p50, live.p99, live.max
    );
    println!();
    println!("| the writer: {writer_txns} one-row transactions, one session, synchronous_commit on | µs per transaction (median of 3) | WAL bytes per transaction |");
    println!("|---|---|---|");
    for (label, micros, wal) in writers {
        println!("| {label} | {micros:.0} | {wal:.0} |");
    }
}

/// The writer's cost of one outbox write per transaction: a row as
/// `outbox::enqueue` writes it, against a message as `outbox::emit` sends it
/// (`postgres.source = "messages"`), alternating three times on one session.
async fn writer_cost(txns: usize) -> Vec<(&'static str, f64, f64)> {
    let db = pg().await;
    fresh_outbox(&db).await;
    // No slot while measuring: the writer's own cost, not a walsender's.
    let _ = db
        .execute("select pg_drop_replication_slot($1)", &[&SLOT])
        .await;
    let row = format!(
        "insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload, metadata, status, retry_count, \
         max_retries, created_at, updated_at) values (gen_random_uuid()::text, 'Order', $1, 'order.placed', $2::text::json, \
         null, 'pending', 0, 3, clock_timestamp(), clock_timestamp())"
    );
    let message = "select pg_logical_emit_message(true, 'bench', json_build_object('id', gen_random_uuid()::text, \
         'aggregate_type', 'Order', 'aggregate_id', $1::text, 'event_type', 'order.placed', 'payload', $2::text::json)::text)";
    let body = payload(0);
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut wal: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, sql) in [row.as_str(), message].iter().enumerate() {
            let statement = db.prepare(sql).await.unwrap();
            let before: String = db
                .query_one("select pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            let t = Instant::now();
            for n in 0..txns {
                db.execute(&statement, &[&format!("order-{}", n % 1000), &body])
                    .await
                    .unwrap();
            }
            times[i].push(t.elapsed().as_secs_f64() * 1e6 / txns as f64);
            let after: String = db
                .query_one("select pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            wal[i].push((lsn(&after) - lsn(&before)) as f64 / txns as f64);
        }
    }
    drop_outbox(&db).await;
    vec![
        (
            "an outbox row (`outbox::enqueue`'s insert)",
            median(times[0].clone()),
            median(wal[0].clone()),
        ),
        (
            "a logical decoding message (`outbox::emit`)",
            median(times[1].clone()),
            median(wal[1].clone()),
        ),
    ]
}
