//! Live latency, with and without TLS: a steady rate of one-row transactions
//! written by a Rust producer over several sessions (so the producer is not the
//! bottleneck: its achieved rate is reported beside the target), the relay
//! publishing them, a consumer measuring each message's latency from its row's
//! `created_at` (the insert's transaction start, a little before its commit) to
//! its delivery.
//!
//! Both sides run on scratch instances made here, so plain and TLS are measured
//! against the same servers in the same run: a Postgres cluster with `ssl = on`
//! (`tests/support/tls.rs`, SCRAM over TLS) and a RabbitMQ node with a TLS
//! listener and a plain one. Plain: `sslmode=disable` and `amqp://`; TLS:
//! `sslmode=verify-full` with the CA made here and `amqps://`. The producer and
//! the consumer stay plain in both (they measure, they are not measured).
//!
//! Run with `timeout 1800 cargo bench --bench live`. Environment:
//! BENCH_LIVE_RATES=1000,2500,5000 (rows/s), BENCH_LIVE_SECS=10 (per run),
//! BENCH_ROUNDS=1 (each rate × plain/TLS, interleaved), BENCH_RELAY=PATH (another
//! build of the binary). Ports 55464 (Postgres), 56751 and 56754 (RabbitMQ TLS
//! and plain); everything is removed at the end.

#[path = "../tests/support/scratch.rs"]
#[allow(dead_code)]
mod scratch;
#[path = "../tests/support/tls.rs"]
#[allow(dead_code)]
mod tls;

mod common;
use common::{
    busy_since, cpu_seconds, env_usize, machine_ticks, median, parse_iso_micros, payload,
    peak_rss_mb, relay_binary, CpuUse,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tls::{Certs, MQ_MARKER, PG_MARKER};

const PG_PORT: u16 = 55464;
const MQ_TLS_PORT: u16 = 56751;
const TABLE: &str = "public.live_outbox";
const EXCHANGE: &str = "live_events";
const QUEUE: &str = "live_q";

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Plain,
    Tls,
}

impl Wire {
    fn label(self) -> &'static str {
        match self {
            Wire::Plain => "plain",
            Wire::Tls => "TLS both sides",
        }
    }
}

struct Live {
    target: usize,
    /// Rows per second the producer wrote (against `target`).
    written: f64,
    p50: f64,
    p99: f64,
    max: f64,
    rss_mb: f64,
    cpu: CpuUse,
    /// The bench's own CPU (the producer and the consumer), s per 100 000.
    bench_cpu: f64,
    /// How busy the machine's cores were during the run, 0-1.
    busy: f64,
}

fn relay_config(dir: &std::path::Path, certs: &Certs, wire: Wire) -> std::path::PathBuf {
    let pw = dir.join("pg.password");
    std::fs::write(&pw, PG_MARKER).unwrap();
    let (pg_url, mq_url, pg_extra, mq_extra) = match wire {
        Wire::Plain => (
            format!("postgresql://postgres@127.0.0.1:{PG_PORT}/postgres?sslmode=disable"),
            format!(
                "amqp://sec_user:{MQ_MARKER}@127.0.0.1:{}/%2f",
                MQ_TLS_PORT + 3
            ),
            "allow_insecure_password = true\n".to_string(),
            "allow_insecure_password = true\n".to_string(),
        ),
        Wire::Tls => (
            format!(
                "postgresql://postgres@localhost:{PG_PORT}/postgres?sslmode=verify-full&sslrootcert={}",
                certs.path("ca.pem")
            ),
            format!("amqps://sec_user:{MQ_MARKER}@localhost:{MQ_TLS_PORT}/%2f"),
            String::new(),
            format!("tls_ca_file = \"{}\"\n", certs.path("ca.pem")),
        ),
    };
    let path = dir.join(format!("{}.toml", wire.label().replace(' ', "-")));
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"{pg_url}\"\npassword_file = \"{}\"\n{pg_extra}table = \"{TABLE}\"\n\
             slot = \"live_slot\"\npublication = \"live_pub\"\nretry_table = \"public.live_parked\"\n\
             [amqp]\nurl = \"{mq_url}\"\n{mq_extra}exchange = \"{EXCHANGE}\"\n\
             [metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n",
            pw.display()
        ),
    )
    .unwrap();
    path
}

/// A plain session to the scratch cluster (the producer's and the setup's).
async fn pg() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={PG_PORT} user=postgres password={PG_MARKER} dbname=postgres sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
}

async fn broker() -> Connection {
    let url = format!(
        "amqp://sec_user:{MQ_MARKER}@127.0.0.1:{}/%2f",
        MQ_TLS_PORT + 3
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match Connection::connect(&url, ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("scratch rabbitmq did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The scratch node's Erlang VM (not the shared broker's, nor its wrapper script).
fn scratch_broker_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("sec_rabbit_{MQ_TLS_PORT}")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "beam.smp")
        })
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

async fn live(
    config: &std::path::Path,
    conn: &Connection,
    rate: usize,
    secs: usize,
    run: usize,
) -> Live {
    let db = pg().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    let mut child = Command::new(relay_binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            format!("live{run}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Streaming: a probe row arrives. The relay makes its slot at start, so a
    // probe written before that is never streamed: one a second until one comes.
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in 0.. {
        assert!(
            Instant::now() < deadline,
            "the relay did not deliver a probe row in 120 s: see its log beside the config"
        );
        db.execute(
            &format!("insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload) values ($1, 'P', 'p', 'probe', '{{}}')"),
            &[&format!("probe-{run}-{k}")],
        )
        .await
        .unwrap();
        if let Ok(Some(Ok(probe))) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            probe.ack(BasicAckOptions::default()).await.unwrap();
            break;
        }
    }
    let pid = child.id();
    let cpu0 = CpuUse::now(Some(pid), scratch_broker_pid());
    let bench0 = cpu_seconds(std::process::id());
    let machine0 = machine_ticks();
    // One writer per 250 rows/s (at least 4): each commits one row at a time
    // (about 0.5 ms with synchronous_commit on), well under its share.
    let writers = (rate / 250).max(4);
    let total = rate * secs;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(async move {
            let db = pg().await;
            let stmt = db
                .prepare(&format!("insert into {TABLE} (id, aggregate_type, aggregate_id, event_type, payload) values ($1, 'Order', $2, 'order.placed', $3::text::json)"))
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_micros(
                (1_000_000 * writers / rate) as u64,
            ));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in (w..total).step_by(writers) {
                tick.tick().await;
                db.execute(
                    &stmt,
                    &[&format!("live-{run}-{i}"), &format!("order-{}", i % 1000), &payload(i)],
                )
                .await
                .unwrap();
            }
            Instant::now()
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("live messages stopped")
            .unwrap()
            .unwrap();
        let now = now_micros();
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        if body["eventType"] == "probe" {
            continue; // a later probe of the start-up wait
        }
        let created = parse_iso_micros(body["createdAt"].as_str().unwrap());
        latencies.push((now - created) as f64 / 1000.0);
    }
    let mut last_write = started;
    for t in tasks {
        last_write = last_write.max(t.await.unwrap());
    }
    let written = total as f64 / (last_write - started).as_secs_f64();
    let cpu = CpuUse::now(Some(pid), scratch_broker_pid()).per_100k_since(cpu0, total);
    let bench_cpu = (cpu_seconds(std::process::id()) - bench0) * 100_000.0 / total as f64;
    let busy = busy_since(machine0);
    let rss_mb = peak_rss_mb(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let _ = ch.close(200, "bye".into()).await;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Live {
        target: rate,
        written,
        p50: pct(0.5),
        p99: pct(0.99),
        max: latencies[latencies.len() - 1],
        rss_mb,
        cpu,
        bench_cpu,
        busy,
    }
}

#[tokio::main]
async fn main() {
    let rates: Vec<usize> = std::env::var("BENCH_LIVE_RATES")
        .unwrap_or_else(|_| "1000,2500,5000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .expect("BENCH_LIVE_RATES: rows/s, comma-separated")
        })
        .collect();
    let secs = env_usize("BENCH_LIVE_SECS", 10).max(1);
    let rounds = env_usize("BENCH_ROUNDS", 1).max(1);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join("outbox-relay-bench-live");
    let _ = std::fs::remove_dir_all(&dir);
    let certs = Certs::make(&dir.join("certs"));
    let rabbit = tls::tls_rabbit_with(MQ_TLS_PORT, &certs, false, true);
    let pg_server = tls::tls_pg(PG_PORT, &certs);
    pg_server.psql(&outbox_relay::pg::catalog::outbox_ddl(
        &outbox_relay::pg::TableName::parse(TABLE).unwrap(),
    ));
    let conn = broker().await;
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
    let mut results: Vec<(Wire, Vec<Live>)> = Vec::new();
    let mut run = 0;
    for round in 0..rounds {
        for &rate in &rates {
            // Interleaved, the order flipped every round.
            let order = if round % 2 == 0 {
                [Wire::Plain, Wire::Tls]
            } else {
                [Wire::Tls, Wire::Plain]
            };
            for wire in order {
                run += 1;
                let config = relay_config(&dir, &certs, wire);
                let l = live(&config, &conn, rate, secs, run).await;
                eprintln!(
                    "round {}/{rounds}: {} {rate}/s: written {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, cores {:.0} % busy",
                    round + 1,
                    wire.label(),
                    l.written,
                    l.p50,
                    l.p99,
                    l.max,
                    l.busy * 100.0
                );
                match results
                    .iter_mut()
                    .find(|(w, runs)| *w == wire && runs[0].target == rate)
                {
                    Some((_, runs)) => runs.push(l),
                    None => results.push((wire, vec![l])),
                }
            }
        }
    }
    println!(
        "\noutbox-relay live latency: one row per transaction (synchronous_commit on), {secs} s per run, 1000 aggregates, on_success = mark_published, scratch Postgres and RabbitMQ, 2 cores, median of {rounds} round(s)"
    );
    println!("| rows/s | wire | written rows/s | insert → consumer p50 | p99 | max | relay peak RSS | relay CPU s / 100k | broker CPU s / 100k | Postgres CPU s / 100k | producer + consumer CPU s / 100k | cores busy |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    results.sort_by_key(|(w, runs)| (runs[0].target, *w == Wire::Tls));
    for (wire, runs) in &results {
        let m = |f: fn(&Live) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MB | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} % |",
            runs[0].target,
            wire.label(),
            m(|l| l.written),
            m(|l| l.p50),
            m(|l| l.p99),
            m(|l| l.max),
            m(|l| l.rss_mb),
            m(|l| l.cpu.process),
            m(|l| l.cpu.broker),
            m(|l| l.cpu.postgres),
            m(|l| l.bench_cpu),
            m(|l| l.busy * 100.0),
        );
    }
    // The slot goes with the cluster; the scratch instances stop on drop.
    drop(pg_server);
    drop(rabbit);
    let _ = std::fs::remove_dir_all(&dir);
}
