//! Inbox benchmark against the local Postgres and RabbitMQ:
//!
//! - the ceiling: a plain lapin consumer (manual acks, the receiver's prefetch, one multiple
//!   ack every `BENCH_INBOX_ACK_EVERY` deliveries, like the receiver's batches)
//!   draining a durable queue that holds N Event-Forge messages, measured in every
//!   round;
//! - the release `outbox-relay inbox` draining the same kind of queue into a fresh
//!   inbox table, timed from its start until every row is committed (counted from
//!   the receiver's NOTIFYs, which follow each commit), then checked: the table
//!   holds N rows and the queue is empty; with its peak RSS and the CPU seconds of
//!   the receiver, the broker and Postgres;
//! - `inbox::Processor` with an empty handler turning those N rows from
//!   `received` to `processed` (workers, each with its own session, claiming
//!   batches of a given size: one row per transaction, and the default 100);
//! - live: a steady publish rate while the receiver runs, publish (a timestamp in
//!   the message's metadata) to committed row (the NOTIFY after its commit).
//!
//! Rounds interleave the ceiling with the receiver (the ceiling first in odd
//! rounds, last in even ones); each figure is the median over rounds, each ratio
//! range is the receiver over its own round's ceiling. Before each timed run the
//! broker is left to settle.
//!
//! Run with `timeout 1800 flock -o -x /tmp/outbox-relay-services.lock cargo bench
//! --bench inbox` (the services are shared). Environment: BENCH_INBOX_ROWS=100000,
//! BENCH_ROUNDS=3, BENCH_INBOX_ACK_EVERY=500 (the receiver's default batch_size),
//! BENCH_INBOX_PROCESSORS=1x1,1x100,4x100 (processor runs, WORKERSxBATCH),
//! BENCH_INBOX_PROCESSOR_SECS=30 (a cap per processor
//! run), BENCH_INBOX_LIVE_RATE=1000, BENCH_INBOX_LIVE_SECS=10 (0 skips live),
//! BENCH_RELAY=PATH (another build of the binary).
//!
//! Queue, table and NOTIFY channel are `bench_inbox*`; all are dropped at the end.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox_relay::inbox::{HandlerError, InboxMessage, Processor, ProcessorOptions};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls, Transaction};

mod common;
use common::{
    broker_pid, busy_since, env_usize, machine_ticks, median, peak_rss_mb, queue_depth,
    relay_binary, settle_broker, CpuUse,
};

const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TABLE: &str = "public.bench_inbox_messages";
const QUEUE: &str = "bench_inbox";
const CHANNEL: &str = "bench_inbox";
const WINDOW: usize = 2048;

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// An Event-Forge message (~550 bytes): id, aggregate, eventType, a ~400-byte
/// payload, metadata with the publish time in Unix microseconds, createdAt.
fn body(id: &str, i: usize, published: i64) -> Vec<u8> {
    format!(
        "{{\"id\":\"{id}\",\"aggregateType\":\"Order\",\"aggregateId\":\"order-{agg}\",\"eventType\":\"order.placed\",\
         \"payload\":{{\"orderId\":\"order-{i:08}\",\"customer\":{{\"id\":\"cust-{c:06}\",\"email\":\"customer{c}@example.com\",\"tier\":\"gold\"}},\"lines\":[{{\"sku\":\"SKU-{a:05}\",\"qty\":2,\"price\":19.99}},{{\"sku\":\"SKU-{b:05}\",\"qty\":1,\"price\":5.25}}],\"total\":45.23,\"currency\":\"EUR\",\"shipping\":{{\"method\":\"standard\",\"address\":\"Example Street 12, 10115 Berlin\"}},\"note\":\"benchmark row\"}},\
         \"metadata\":{{\"publishedAt\":{published}}},\"createdAt\":\"2026-11-27T06:00:00.123Z\"}}",
        agg = i % 10_000,
        c = i % 100_000,
        a = i % 50_000,
        b = (i * 7) % 50_000
    )
    .into_bytes()
}

fn message_id(prefix: u32, i: usize) -> String {
    format!("00000000-{prefix:04x}-4000-8000-{i:012}")
}

fn properties(id: String) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

async fn pg() -> Client {
    let (db, conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    db
}

async fn amqp() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// A fresh, empty durable queue.
async fn fresh_queue(ch: &lapin::Channel) {
    ch.queue_delete(QUEUE.into(), QueueDeleteOptions::default())
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
}

/// Publishes `rows` persistent messages to the queue (default exchange), with
/// confirms and `WINDOW` in flight; not timed.
async fn publish_backlog(conn: &Connection, rows: usize, prefix: u32) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut inflight = FuturesUnordered::new();
    let published = now_micros();
    for i in 0..rows {
        if inflight.len() >= WINDOW {
            let c: lapin::Confirmation = inflight.next().await.unwrap();
            assert!(c.is_ack());
        }
        let id = message_id(prefix, i);
        let confirm = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                &body(&id, i, published),
                properties(id),
            )
            .await
            .unwrap();
        inflight.push(async move { confirm.await.unwrap() });
    }
    while let Some(c) = inflight.next().await {
        assert!(c.is_ack());
    }
    let _ = ch.close(200, "bye".into()).await;
}

/// One timed drain of the queue.
struct Run {
    rate: f64,
    /// From the first delivery (ceiling) or the first commit (receiver) to the
    /// last: the rate without start-up (the receiver's includes exec, connects
    /// and checks). Equal to `rate` where that does not apply.
    steady: f64,
    secs: f64,
    rss_mb: f64,
    /// Per 100k; the process is the consumer (this benchmark, or the receiver).
    cpu: CpuUse,
    /// How busy the machine's cores were, 0-1.
    busy: f64,
}

/// The plain lapin consumer: `prefetch`, manual acks, one multiple ack every
/// `ack_every` deliveries.
async fn ceiling(rows: usize, ack_every: usize, prefetch: u16, prefix: u32) -> Run {
    let (conn, ch) = amqp().await;
    fresh_queue(&ch).await;
    publish_backlog(&conn, rows, prefix).await;
    let consumer_ch = conn.create_channel().await.unwrap();
    consumer_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    settle_broker().await;
    let (own, broker) = (Some(std::process::id()), broker_pid());
    let cpu0 = CpuUse::now(own, broker);
    let machine0 = machine_ticks();
    let start = Instant::now();
    let mut consumer = consumer_ch
        .basic_consume(
            QUEUE.into(),
            "bench_inbox_ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut first = None;
    for n in 1..=rows {
        let d = consumer.next().await.unwrap().unwrap();
        first.get_or_insert_with(Instant::now);
        if n % ack_every == 0 || n == rows {
            d.ack(BasicAckOptions { multiple: true }).await.unwrap();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let steady = (rows - 1) as f64 / first.unwrap().elapsed().as_secs_f64();
    let cpu = CpuUse::now(own, broker).per_100k_since(cpu0, rows);
    let busy = busy_since(machine0);
    assert_eq!(queue_depth(&ch, QUEUE).await, 0);
    let _ = conn.close(200, "bye".into()).await;
    Run {
        rate: rows as f64 / secs,
        steady,
        secs,
        rss_mb: 0.0,
        cpu,
        busy,
    }
}

/// Drops and recreates the inbox table (the DDL `init --inbox-only` runs).
async fn fresh_table(db: &Client) {
    db.batch_execute(&format!("drop table if exists {TABLE}"))
        .await
        .unwrap();
    let table = outbox_relay::pg::TableName::parse(TABLE).unwrap();
    db.batch_execute(&outbox_relay::inbox::queries::inbox_ddl(&table))
        .await
        .unwrap();
}

/// A session LISTENing on the receiver's NOTIFY channel: each notification with the
/// time it arrived (Unix microseconds) and the new rows' ids.
async fn listen() -> (Client, mpsc::UnboundedReceiver<(i64, Vec<String>)>) {
    let (client, mut connection) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let at = now_micros();
                let ids = n
                    .payload()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                let _ = tx.send((at, ids));
            }
        }
    });
    client
        .batch_execute(&format!("listen {CHANNEL}"))
        .await
        .unwrap();
    (client, rx)
}

fn spawn_inbox() -> std::process::Child {
    let dir = std::env::temp_dir().join("outbox-relay-bench-inbox");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("inbox.toml");
    std::fs::write(
        &cfg,
        format!(
            "[postgres]\nurl = \"{PG_URL}\"\n[amqp]\nurl = \"{AMQP_URL}\"\n\
             [inbox]\nqueue = \"{QUEUE}\"\ntable = \"{TABLE}\"\nsource = \"bench\"\ndeclare = false\n\
             on_invalid = \"reject\"\nnotify_channel = \"{CHANNEL}\"\n\
             [metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("inbox.log")).unwrap();
    let binary = relay_binary();
    Command::new(binary)
        .args(["inbox", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// SIGTERM, then waits (at most 30 s) for the receiver to record and ack what it
/// holds and exit.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn count_rows(db: &Client) -> i64 {
    db.query_one(&format!("select count(*) from {TABLE}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The receiver draining a backlog of `rows` into a fresh table.
async fn receive(db: &Client, rows: usize, prefix: u32) -> Run {
    fresh_table(db).await;
    let (conn, ch) = amqp().await;
    fresh_queue(&ch).await;
    publish_backlog(&conn, rows, prefix).await;
    db.batch_execute("checkpoint").await.unwrap();
    let (_listener, mut notes) = listen().await;
    settle_broker().await;
    let broker = broker_pid();
    let cpu0 = CpuUse::now(None, broker);
    let machine0 = machine_ticks();
    let start = Instant::now();
    let mut child = spawn_inbox();
    let pid = child.id();
    let mut committed = 0;
    let mut first: Option<(Instant, usize)> = None;
    while committed < rows {
        match tokio::time::timeout(Duration::from_secs(1), notes.recv()).await {
            Ok(Some((_, ids))) => {
                committed += ids.len();
                first.get_or_insert((Instant::now(), committed));
            }
            Ok(None) => panic!("the LISTEN session ended"),
            Err(_) => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the receiver exited early (see {}/outbox-relay-bench-inbox/inbox.log)",
                    std::env::temp_dir().display()
                );
                assert!(start.elapsed() < Duration::from_secs(1800), "not drained");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (t1, n1) = first.unwrap();
    let steady = (rows - n1) as f64 / t1.elapsed().as_secs_f64();
    let cpu = CpuUse::now(Some(pid), broker).per_100k_since(cpu0, rows);
    let busy = busy_since(machine0);
    let rss_mb = peak_rss_mb(pid);
    // The acks follow the commits: the queue empties within moments.
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue_depth(&ch, QUEUE).await > 0 {
        assert!(Instant::now() < deadline, "the queue did not empty");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count_rows(db).await as usize, rows);
    stop(&mut child);
    let _ = conn.close(200, "bye".into()).await;
    Run {
        rate: rows as f64 / secs,
        steady,
        secs,
        rss_mb,
        cpu,
        busy,
    }
}

/// `inbox::Processor` with an empty handler and `workers` sessions, on the rows the
/// last receive run left in the table (all set back to `received` first); stops at
/// `cap` (then the rate is over what it did).
async fn process(db: &Client, workers: usize, batch: usize, cap: Duration) -> (Run, usize) {
    // One statement each: VACUUM cannot run inside the implicit transaction of several.
    for sql in [
        format!("update {TABLE} set status = 'received', processed_at = null where status <> 'received'"),
        format!("vacuum analyze {TABLE}"),
        "checkpoint".to_string(),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }
    let rows = count_rows(db).await as usize;
    let processor = Processor::new(PG_URL, TABLE)
        .unwrap()
        .options(ProcessorOptions {
            notify_channel: None,
            batch_size: batch,
            ..Default::default()
        })
        .handler(
            "order.placed",
            |_tx: &Transaction<'_>, _m: &InboxMessage| {
                Box::pin(async { Ok::<(), HandlerError>(()) })
            },
        );
    let mut clients = Vec::new();
    for _ in 0..workers {
        clients.push(pg().await);
    }
    let own = Some(std::process::id());
    let cpu0 = CpuUse::now(own, None);
    let machine0 = machine_ticks();
    let start = Instant::now();
    let deadline = start + cap;
    let done: usize = futures_util::future::join_all(clients.into_iter().map(|mut c| {
        let p = processor.clone();
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                match p.process_batch(&mut c).await.unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            n
        }
    }))
    .await
    .into_iter()
    .sum();
    let secs = start.elapsed().as_secs_f64();
    let cpu = CpuUse::now(own, None).per_100k_since(cpu0, done.max(1));
    let busy = busy_since(machine0);
    (
        Run {
            rate: done as f64 / secs,
            steady: done as f64 / secs,
            secs,
            rss_mb: 0.0,
            cpu,
            busy,
        },
        rows - done,
    )
}

struct Live {
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    rss_mb: f64,
    cpu: CpuUse,
}

/// Publishes `rate` msg/s for `secs` while the receiver runs; publish to commit.
async fn live(db: &Client, rate: usize, secs: usize) -> Live {
    fresh_table(db).await;
    let (conn, ch) = amqp().await;
    fresh_queue(&ch).await;
    let (_listener, mut notes) = listen().await;
    let mut child = spawn_inbox();
    let pid = child.id();
    // The receiver consumes once a probe message is committed.
    let id = message_id(0xffff, 0);
    ch.basic_publish(
        "".into(),
        QUEUE.into(),
        BasicPublishOptions::default(),
        &body(&id, 0, now_micros()),
        properties(id),
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), notes.recv())
        .await
        .expect("the receiver did not start")
        .unwrap();
    settle_broker().await;
    let broker = broker_pid();
    let cpu0 = CpuUse::now(Some(pid), broker);
    let total = rate * secs;
    let started = Instant::now();
    let publisher = {
        let ch = conn.create_channel().await.unwrap();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate as u64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..total {
                tick.tick().await;
                let id = message_id(0xfffe, i);
                ch.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body(&id, i, now_micros()),
                    properties(id),
                )
                .await
                .unwrap();
            }
        })
    };
    let lookup = db
        .prepare(&format!(
            "select (metadata->>'publishedAt')::int8 from {TABLE} where id = any($1)"
        ))
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        let (at, ids) = tokio::time::timeout(Duration::from_secs(60), notes.recv())
            .await
            .expect("live messages stopped")
            .unwrap();
        for row in db.query(&lookup, &[&ids]).await.unwrap() {
            let published: i64 = row.get(0);
            latencies.push((at - published) as f64 / 1000.0);
        }
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    publisher.await.unwrap();
    let cpu = CpuUse::now(Some(pid), broker).per_100k_since(cpu0, total);
    let rss_mb = peak_rss_mb(pid);
    stop(&mut child);
    let _ = conn.close(200, "bye".into()).await;
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

async fn cleanup(db: &Client) {
    let _ = db
        .batch_execute(&format!("drop table if exists {TABLE}"))
        .await;
    let (conn, ch) = amqp().await;
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

fn row(label: &str, runs: &[Run], ratio: &str, last: &str) {
    let rss = runs.iter().map(|r| r.rss_mb).fold(0.0, f64::max);
    println!(
        "| {label} | {:.0} | {ratio} | {} | {:.2} | {:.2} | {:.2} | {:.0} % | {last} |",
        median(runs.iter().map(|r| r.rate).collect()),
        if rss > 0.0 {
            format!("{rss:.1} MB")
        } else {
            String::new()
        },
        median(runs.iter().map(|r| r.cpu.process).collect()),
        median(runs.iter().map(|r| r.cpu.broker).collect()),
        median(runs.iter().map(|r| r.cpu.postgres).collect()),
        median(runs.iter().map(|r| r.busy * 100.0).collect()),
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("BENCH_INBOX_ROWS", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let ack_every = env_usize("BENCH_INBOX_ACK_EVERY", 500).max(1);
    // The ceiling's prefetch: the receiver's (its default, or the override the
    // receiver inherits from this environment).
    let prefetch = std::env::var("OUTBOX_RELAY_INBOX_PREFETCH")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(outbox_relay::config::InboxConfig::DEFAULT_PREFETCH);
    let cap = Duration::from_secs(env_usize("BENCH_INBOX_PROCESSOR_SECS", 30) as u64);
    let live_rate = env_usize("BENCH_INBOX_LIVE_RATE", 1000).max(1);
    let live_secs = env_usize("BENCH_INBOX_LIVE_SECS", 10);
    let workers: Vec<(usize, usize)> = std::env::var("BENCH_INBOX_PROCESSORS")
        .unwrap_or_else(|_| "1x1,1x100,4x100".into())
        .split(',')
        .filter_map(|w| {
            let (w, b) = w.trim().split_once('x')?;
            Some((w.parse().ok()?, b.parse().ok()?))
        })
        .filter(|(w, b)| *w > 0 && *b > 0)
        .collect();
    let body_len = body(&message_id(0, 0), 0, now_micros()).len();
    let db = pg().await;

    let mut ceilings: Vec<Run> = Vec::new();
    let mut receives: Vec<Run> = Vec::new();
    let mut processed: Vec<Vec<(Run, usize)>> = workers.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        let prefix = round as u32;
        if round % 2 == 1 {
            ceilings.push(ceiling(rows, ack_every, prefetch, prefix).await);
        }
        let r = receive(&db, rows, prefix).await;
        eprintln!(
            "round {round}/{rounds}: receiver {:.0} msg/s ({:.2} s)",
            r.rate, r.secs
        );
        receives.push(r);
        for ((w, b), runs) in workers.iter().zip(processed.iter_mut()) {
            let (p, left) = process(&db, *w, *b, cap).await;
            eprintln!(
                "round {round}/{rounds}: processor, {w} worker(s), batch {b}: {:.0} msg/s ({left} left)",
                p.rate
            );
            runs.push((p, left));
        }
        if round % 2 == 0 {
            ceilings.push(ceiling(rows, ack_every, prefetch, prefix).await);
        }
        let c = ceilings.last().unwrap();
        eprintln!(
            "round {round}/{rounds}: ceiling {:.0} msg/s ({:.2} s)",
            c.rate, c.secs
        );
    }
    let live = if live_secs > 0 {
        Some(live(&db, live_rate, live_secs).await)
    } else {
        None
    };
    cleanup(&db).await;

    let ceiling_rate = median(ceilings.iter().map(|c| c.rate).collect());
    let ratios: Vec<f64> = receives
        .iter()
        .zip(&ceilings)
        .map(|(r, c)| r.rate / c.rate)
        .collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let receive_rate = median(receives.iter().map(|r| r.rate).collect());
    let steady: Vec<f64> = receives
        .iter()
        .zip(&ceilings)
        .map(|(r, c)| r.steady / c.steady)
        .collect();
    let (slo, shi) = steady
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let ceiling_steady = median(ceilings.iter().map(|c| c.steady).collect());
    let receive_steady = median(receives.iter().map(|r| r.steady).collect());

    println!();
    println!(
        "outbox-relay inbox benchmark: body {body_len} bytes, one durable classic queue, prefetch {prefetch}, {} cores, median of {rounds} rounds",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| measurement | msg/s | ratio to ceiling (range) | peak RSS | consumer CPU s / 100k | broker CPU s / 100k | Postgres CPU s / 100k | cores busy | time |");
    println!("|---|---|---|---|---|---|---|---|---|");
    row(
        &format!("plain lapin consumer, manual acks (multiple every {ack_every}), prefetch {prefetch} (ceiling), {rows} msgs"),
        &ceilings,
        "1.00",
        &format!("{:.2} s", median(ceilings.iter().map(|c| c.secs).collect())),
    );
    row(
        &format!(
            "`outbox-relay inbox`, {rows} msgs into a fresh inbox table (start to last commit)"
        ),
        &receives,
        &format!("**{:.2}** ({lo:.2}–{hi:.2})", receive_rate / ceiling_rate),
        &format!("{:.2} s", median(receives.iter().map(|r| r.secs).collect())),
    );
    println!(
        "| the same two, steady state: consumer from its first delivery, receiver from its first commit, to the last | {receive_steady:.0} vs {ceiling_steady:.0} | **{:.2}** ({slo:.2}–{shi:.2}) | | | | | | |",
        receive_steady / ceiling_steady
    );
    for ((w, b), runs) in workers.iter().zip(&processed) {
        let left = runs.iter().map(|(_, l)| *l).max().unwrap_or(0);
        let runs: Vec<Run> = runs.iter().map(|(r, _)| Run { ..*r }).collect();
        row(
            &format!("`inbox::Processor`, empty handler, {w} worker(s), {b} row(s) per transaction, {rows} rows received → processed{}", if left > 0 { format!(" (capped: {left} left)") } else { String::new() }),
            &runs,
            "",
            &format!("{:.2} s", median(runs.iter().map(|r| r.secs).collect())),
        );
    }
    if let Some(l) = live {
        println!(
            "| live: {live_rate} msg/s published for {live_secs} s while `outbox-relay inbox` runs | {:.0} | | {:.1} MB | {:.2} | {:.2} | {:.2} | | publish to committed row: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
            l.rate, l.rss_mb, l.cpu.process, l.cpu.broker, l.cpu.postgres, l.p50, l.p99, l.max
        );
    }
}
