//! Scale-out benchmark, against the local Postgres and RabbitMQ and a scratch
//! three-node RabbitMQ cluster:
//!
//! - **shards**: a backlog split over three shards (`init --shards 3`), three
//!   relays (`run --shard I`) each publishing to a queue of its own, timed from
//!   their start until all three slots pass the last commit; against three plain
//!   lapin publishers with confirms, one per queue, same messages, measured in
//!   the same round; and one relay on the same backlog and one queue, for how much
//!   the shards add on this machine;
//! - **quorum queue**: on the cluster, a plain publisher to a quorum queue
//!   against the same publisher to a classic queue on the same node (what the
//!   quorum queue costs), and the relay draining to the quorum queue (its `url`
//!   listing the three nodes) against the plain publisher to it.
//!
//! Rounds interleave the plain publishers with the relays; figures are medians
//! over rounds, ratios per round. Run with `cargo bench --bench scale`.
//! Environment: BENCH_ROWS=100000 (the shards' backlog), BENCH_CLUSTER_ROWS=50000,
//! BENCH_WINDOW=2048, BENCH_ROUNDS=3, BENCH_CLUSTER=0 skips the cluster part.
//! Needs the local services prepared by scripts/setup-services.sh.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

mod common;
use common::{env_usize, lsn, median, payload, queue_depth, relay_binary, settle_broker};
#[allow(dead_code)]
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/support/scratch.rs"]
mod scratch;

const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SHARDS: u32 = 3;
const AGGREGATES: usize = 10_000;
/// The scratch cluster's first AMQP port (the tests use 56810).
const CLUSTER_PORT: u16 = 56910;

/// What the relay publishes, and what the plain publishers send.
fn message() -> outbox_relay::sink::OutboundMessage {
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
    outbox_relay::sink::format::encode(&event, 0).unwrap()
}

async fn pg() -> Client {
    let (db, conn) = tokio_postgres::connect(PG_URL, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    db
}

/// A fresh durable queue (quorum or classic) bound with `#` to a topic exchange.
async fn fresh_queue(url: &str, exchange: &str, queue: &str, quorum: bool) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args).await.unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// Messages in `queue`.
async fn depth(url: &str, queue: &str) -> usize {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let n = queue_depth(&ch, queue).await as usize;
    let _ = conn.close(200, "bye".into()).await;
    n
}

/// Plain lapin publishers with confirms, one connection each, all at once: each
/// publishes `rows` messages to its exchange with `window` in flight. Seconds.
async fn plain_publishers(targets: &[(String, String)], rows: usize, window: usize) -> f64 {
    let message = message();
    let mut channels = Vec::new();
    for (url, _) in targets {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        channels.push((conn, ch));
    }
    settle_broker().await;
    let start = Instant::now();
    let publishers =
        channels
            .iter()
            .zip(targets)
            .enumerate()
            .map(|(p, ((_, ch), (_, exchange)))| {
                let message = &message;
                async move {
                    let mut inflight = FuturesUnordered::new();
                    for i in 0..rows {
                        if inflight.len() >= window {
                            let c: lapin::Confirmation = inflight.next().await.unwrap();
                            assert!(c.is_ack());
                        }
                        let props = message
                            .properties
                            .clone()
                            .with_message_id(format!("plain-{p}-{i}").into());
                        let options = BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        };
                        let confirm = ch
                            .basic_publish(
                                exchange.as_str().into(),
                                "Order.order.placed".into(),
                                options,
                                &message.body,
                                props,
                            )
                            .await
                            .unwrap();
                        inflight.push(async move { confirm.await.unwrap() });
                    }
                    while let Some(c) = inflight.next().await {
                        assert!(c.is_ack());
                    }
                }
            });
    futures_util::future::join_all(publishers).await;
    let secs = start.elapsed().as_secs_f64();
    for (conn, _) in channels {
        let _ = conn.close(200, "bye".into()).await;
    }
    secs
}

/// One outbox for the relays: table, retry table, slots and publications of
/// `base` (sharded or not), dropped and made again.
struct Outbox {
    table: String,
    base: String,
}

impl Outbox {
    async fn fresh(db: &Client, base: &str) -> Outbox {
        let o = Outbox {
            table: format!("public.{base}_outbox"),
            base: base.to_string(),
        };
        o.drop(db).await;
        db.batch_execute(&outbox_relay::pg::catalog::outbox_ddl(
            &outbox_relay::pg::TableName::parse(&o.table).unwrap(),
        ))
        .await
        .unwrap();
        o
    }

    async fn drop(&self, db: &Client) {
        let names: Vec<String> = std::iter::once(self.base.clone())
            .chain((0..SHARDS).map(|i| format!("{}_{i}", self.base)))
            .collect();
        for name in &names {
            let _ = db
                .execute(
                    "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
                    &[name],
                )
                .await;
            let _ = db
                .batch_execute(&format!("drop publication if exists {name}"))
                .await;
            let _ = db
                .execute(
                    "delete from public.outbox_relay_slots where slot = $1",
                    &[name],
                )
                .await;
        }
        let _ = db
            .batch_execute(&format!(
                "drop table if exists {}; drop table if exists public.{}_parked",
                self.table, self.base
            ))
            .await;
    }

    /// The config of a relay on this outbox: `extra` lines for `[postgres]`,
    /// `amqp` the `[amqp]` url line, `exchange` its exchange.
    fn config(
        &self,
        name: &str,
        extra: &str,
        amqp: &str,
        exchange: &str,
        window: usize,
    ) -> PathBuf {
        let dir = std::env::temp_dir().join("outbox-relay-bench-scale");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[postgres]\nurl = \"{PG_URL}\"\ntable = \"{t}\"\nslot = \"{b}\"\npublication = \"{b}\"\n\
                 retry_table = \"public.{b}_parked\"\n{extra}\n\
                 [amqp]\n{amqp}\nexchange = \"{exchange}\"\nmax_in_flight = {window}\n\
                 [metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n",
                t = self.table,
                b = self.base
            ),
        )
        .unwrap();
        path
    }

    /// `rows` rows over `AGGREGATES` aggregates, 100 per transaction. The LSN
    /// after the last commit.
    async fn backlog(&self, db: &Client, rows: usize) -> u64 {
        let body = payload(0);
        for chunk in (0..rows).step_by(100 * 100) {
            let mut sql = String::new();
            for lo in (chunk..(chunk + 100 * 100).min(rows)).step_by(100) {
                let hi = (lo + 100).min(rows) - 1;
                // One transaction each: BEGIN and COMMIT inside the batch.
                sql.push_str(&format!(
                    "begin; insert into {} (id, aggregate_type, aggregate_id, event_type, payload) \
                     select 'b-' || g, 'Order', 'order-' || (g % {AGGREGATES}), 'order.placed', '{body}'::json \
                     from generate_series({lo}, {hi}) g; commit;",
                    self.table
                ));
            }
            db.batch_execute(&sql).await.unwrap();
        }
        let end: String = db
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        lsn(&end)
    }
}

fn spawn(args: &[&str], config: &std::path::Path) -> Child {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    Command::new(relay_binary())
        .args(&all)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Waits until every slot passed `end` and the queues hold `rows` in all.
/// Seconds since `start`.
async fn drained(
    db: &Client,
    slots: &[String],
    end: u64,
    queues: &[(String, String)],
    rows: usize,
    start: Instant,
) -> f64 {
    let deadline = start + Duration::from_secs(1800);
    loop {
        let mut confirmed = true;
        for slot in slots {
            let at: Option<String> = db
                .query_one(
                    "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                    &[slot],
                )
                .await
                .unwrap()
                .get(0);
            confirmed &= at.is_some_and(|a| lsn(&a) >= end);
        }
        if confirmed {
            let mut total = 0;
            for (url, queue) in queues {
                total += depth(url, queue).await;
            }
            if total >= rows {
                return start.elapsed().as_secs_f64();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the relays did not drain in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three shards, three relays, three queues. Messages per second.
async fn sharded_relays(rows: usize, window: usize) -> f64 {
    let db = pg().await;
    let outbox = Outbox::fresh(&db, "bench_shard").await;
    let queues: Vec<(String, String)> = (0..SHARDS)
        .map(|i| (AMQP_URL.to_string(), format!("bench_shard_{i}")))
        .collect();
    for (url, q) in &queues {
        fresh_queue(url, q, q, false).await;
    }
    let base = outbox.config(
        "shard",
        "shards = 3",
        &format!("url = \"{AMQP_URL}\""),
        "bench_shard_0",
        window,
    );
    let init = spawn(&["init"], &base).wait_with_output().unwrap();
    assert!(init.status.success(), "init --shards failed");
    let end = outbox.backlog(&db, rows).await;
    settle_broker().await;
    let start = Instant::now();
    let relays: Vec<Child> = (0..SHARDS)
        .map(|i| {
            let extra = format!("shards = 3\nshard = {i}");
            let cfg = outbox.config(
                &format!("shard-{i}"),
                &extra,
                &format!("url = \"{AMQP_URL}\""),
                &format!("bench_shard_{i}"),
                window,
            );
            spawn(&["run"], &cfg)
        })
        .collect();
    let slots: Vec<String> = (0..SHARDS).map(|i| format!("bench_shard_{i}")).collect();
    let secs = drained(&db, &slots, end, &queues, rows, start).await;
    relays.into_iter().for_each(stop);
    outbox.drop(&db).await;
    rows as f64 / secs
}

/// One relay draining an outbox to `queue` through `amqp` (a url line).
/// Messages per second.
async fn one_relay(rows: usize, window: usize, amqp: &str, queue: (&str, &str), base: &str) -> f64 {
    let db = pg().await;
    let outbox = Outbox::fresh(&db, base).await;
    let cfg = outbox.config(base, "", amqp, queue.1, window);
    let init = spawn(&["init"], &cfg).wait_with_output().unwrap();
    assert!(init.status.success(), "init failed");
    let end = outbox.backlog(&db, rows).await;
    settle_broker().await;
    let start = Instant::now();
    let relay = spawn(&["run"], &cfg);
    let queues = [(queue.0.to_string(), queue.1.to_string())];
    let secs = drained(&db, &[base.to_string()], end, &queues, rows, start).await;
    stop(relay);
    outbox.drop(&db).await;
    rows as f64 / secs
}

fn row(label: &str, rates: &[f64], baselines: &[f64]) {
    let ratios: Vec<f64> = rates.iter().zip(baselines).map(|(r, b)| r / b).collect();
    let lo = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().cloned().fold(0.0, f64::max);
    println!(
        "| {label} | {:.0} | {:.2} ({lo:.2}–{hi:.2}) |",
        median(rates.to_vec()),
        median(ratios)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("BENCH_ROWS", 100_000);
    let cluster_rows = env_usize("BENCH_CLUSTER_ROWS", 50_000);
    let window = env_usize("BENCH_WINDOW", 2048);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    // Shards: three queues on the local broker.
    let targets: Vec<(String, String)> = (0..SHARDS)
        .map(|i| (AMQP_URL.to_string(), format!("bench_shard_{i}")))
        .collect();
    let (mut plain3, mut shards3, mut plain1, mut relay1) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        for (url, q) in &targets {
            fresh_queue(url, q, q, false).await;
        }
        let per = rows / SHARDS as usize;
        let p3 = (per * SHARDS as usize) as f64 / plain_publishers(&targets, per, window).await;
        let s3 = sharded_relays(rows, window).await;
        fresh_queue(AMQP_URL, "bench_one", "bench_one", false).await;
        let one = [(AMQP_URL.to_string(), "bench_one".to_string())];
        let p1 = rows as f64 / plain_publishers(&one, rows, window).await;
        fresh_queue(AMQP_URL, "bench_one", "bench_one", false).await;
        let url = format!("url = \"{AMQP_URL}\"");
        let r1 = one_relay(rows, window, &url, (AMQP_URL, "bench_one"), "bench_one").await;
        eprintln!("round {round}/{rounds}: 3 plain {p3:.0}, 3 shards {s3:.0}, 1 plain {p1:.0}, 1 relay {r1:.0} msg/s");
        plain3.push(p3);
        shards3.push(s3);
        plain1.push(p1);
        relay1.push(r1);
    }
    for (url, q) in targets
        .iter()
        .chain(&[(AMQP_URL.to_string(), "bench_one".to_string())])
    {
        fresh_queue(url, q, q, false).await;
    }

    println!();
    println!("outbox-relay scale-out benchmark: {rows} rows over {AGGREGATES} aggregates, 100 per transaction, window {window} per relay and publisher, {cores} cores, median of {rounds} rounds");
    println!("| measurement | msg/s | ratio to its baseline (range) |");
    println!("|---|---|---|");
    row("3 plain publishers, 3 queues (baseline)", &plain3, &plain3);
    row(
        "3 sharded relays, 3 queues / 3 plain publishers",
        &shards3,
        &plain3,
    );
    row("1 plain publisher, 1 queue (baseline)", &plain1, &plain1);
    row("1 relay, 1 queue / 1 plain publisher", &relay1, &plain1);
    row("3 sharded relays / 1 relay", &shards3, &relay1);

    if env_usize("BENCH_CLUSTER", 1) == 0 {
        return;
    }
    let cluster = cluster::ScratchCluster::start("bench", CLUSTER_PORT).await;
    let node = cluster.url(0);
    let (mut classic, mut quorum, mut relay_q) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        fresh_queue(&node, "bench_cq", "bench_cq", false).await;
        let c = cluster_rows as f64
            / plain_publishers(&[(node.clone(), "bench_cq".into())], cluster_rows, window).await;
        fresh_queue(&node, "bench_qq", "bench_qq", true).await;
        let q = cluster_rows as f64
            / plain_publishers(&[(node.clone(), "bench_qq".into())], cluster_rows, window).await;
        fresh_queue(&node, "bench_qq", "bench_qq", true).await;
        let r = one_relay(
            cluster_rows,
            window,
            &cluster.toml_urls(),
            (&node, "bench_qq"),
            "bench_qq",
        )
        .await;
        eprintln!("round {round}/{rounds}: cluster classic {c:.0}, quorum {q:.0}, relay to quorum {r:.0} msg/s");
        classic.push(c);
        quorum.push(q);
        relay_q.push(r);
    }
    drop(cluster);
    println!();
    println!("three-node RabbitMQ cluster (scratch nodes on this machine), {cluster_rows} messages, median of {rounds} rounds");
    println!("| measurement | msg/s | ratio (range) |");
    println!("|---|---|---|");
    row(
        "plain publisher, classic queue on node 1 (baseline)",
        &classic,
        &classic,
    );
    row("plain publisher, quorum queue / classic", &quorum, &classic);
    row(
        "relay (url = the three nodes), quorum queue / plain publisher to it",
        &relay_q,
        &quorum,
    );
}
