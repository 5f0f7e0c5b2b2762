//! The soak's traffic: one business row (an order) and its outbox row per
//! transaction, at a steady rate over several sessions; each aggregate belongs
//! to one session, so its commit order is its orders' `n` order. 1 % of the
//! aggregates are `Parcel`s, whose routing key is bound to the receiver's queue
//! only half the time (unroutable, then routable again); every
//! `DELAY_EVERY`th row is scheduled a few seconds ahead (a delayed message).

use crate::setup::{self, EXCHANGE, ORDERS, OUTBOX, QUEUE, UNROUTABLE_KEY};
use anyhow::Result;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// One row in `DELAY_EVERY` is delayed by `DELAY`.
const DELAY_EVERY: i64 = 4000;
const DELAY: &str = "5 seconds";
/// Retries a row gets (the row's own `max_retries`): an unroutable message is
/// retried for as long as its key stays unbound, never given up.
const MAX_RETRIES: i32 = 1_000_000;
/// Sessions the producer writes over.
const SESSIONS: usize = 4;

pub struct Workload {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts writing `rate` rows/s over `aggregates` aggregates.
    pub fn start(rate: u32, aggregates: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let retried = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicI64::new(0));
        let unroutable = (aggregates / 100).max(1);
        let period = Duration::from_secs_f64(SESSIONS as f64 / rate as f64);
        let tasks = (0..SESSIONS)
            .map(|s| {
                let aggs: Vec<(String, &'static str)> = (0..aggregates)
                    .filter(|a| a % SESSIONS == s)
                    .map(|a| {
                        let kind = if a < unroutable { "Parcel" } else { "Order" };
                        (format!("agg-{a:04}"), kind)
                    })
                    .collect();
                let (stop, written, retried, next) =
                    (stop.clone(), written.clone(), retried.clone(), next.clone());
                tokio::spawn(
                    async move { session(aggs, period, stop, written, retried, next).await },
                )
            })
            .collect();
        Workload {
            stop,
            written,
            retried,
            tasks,
        }
    }

    /// Transactions whose outcome a lost session hid, written again (or found
    /// committed).
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Stops writing; returns once every session has committed its last row.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.written.load(Ordering::Relaxed)
    }
}

async fn session(
    aggs: Vec<(String, &'static str)>,
    period: Duration,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    next: Arc<AtomicI64>,
) {
    let mut db = connect().await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for k in 0.. {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (agg, kind) = &aggs[k % aggs.len()];
        let n = next.fetch_add(1, Ordering::Relaxed);
        let id = format!("o-{n:010}");
        // Until it is committed: a session lost mid-commit leaves its outcome
        // unknown, so a new session looks before writing it again.
        loop {
            match write(&mut db, &id, agg, kind, n).await {
                Ok(()) => break,
                Err(_) => {
                    retried.fetch_add(1, Ordering::Relaxed);
                    db = connect().await;
                    let committed = db
                        .query_opt(&format!("select 1 from {ORDERS} where id = $1"), &[&id])
                        .await;
                    if matches!(committed, Ok(Some(_))) {
                        break;
                    }
                }
            }
        }
        written.fetch_add(1, Ordering::Relaxed);
    }
}

async fn connect() -> Client {
    loop {
        if let Ok(db) = setup::pg(Duration::from_secs(60)).await {
            return db;
        }
    }
}

async fn write(db: &mut Client, id: &str, agg: &str, kind: &str, n: i64) -> Result<()> {
    let tx = db.transaction().await?;
    tx.execute(
        &format!("insert into {ORDERS} (id, agg, n) values ($1, $2, $3)"),
        &[&id, &agg, &(n as i32)],
    )
    .await?;
    let payload = serde_json::json!({"orderId": id, "agg": agg, "n": n}).to_string();
    let scheduled = if n % DELAY_EVERY == DELAY_EVERY - 1 {
        format!("now() + interval '{DELAY}'")
    } else {
        "null".to_string()
    };
    // Every NOT NULL column written by hand, as Event-Forge's models do.
    tx.execute(
        &format!(
            "insert into {OUTBOX} (id, aggregate_type, aggregate_id, event_type, payload, status, \
             retry_count, max_retries, scheduled_at, created_at, updated_at) \
             values ($1, $2, $3, 'order.placed', $4::text::json, 'pending', 0, $5, {scheduled}, \
             clock_timestamp(), clock_timestamp())"
        ),
        &[&id, &kind, &agg, &payload, &MAX_RETRIES],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Binds (`routable`) or unbinds the `Parcel` aggregates' routing key to the
/// receiver's queue, retrying across broker outages for up to a minute.
pub async fn set_routable(routable: bool) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let conn = setup::amqp(Duration::from_secs(10)).await?;
            let ch = conn.create_channel().await?;
            if routable {
                ch.queue_bind(
                    QUEUE.into(),
                    EXCHANGE.into(),
                    UNROUTABLE_KEY.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            } else {
                ch.queue_unbind(
                    QUEUE.into(),
                    EXCHANGE.into(),
                    UNROUTABLE_KEY.into(),
                    FieldTable::default(),
                )
                .await?;
            }
            let _ = conn.close(200, "soak routing".into()).await;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) if std::time::Instant::now() > deadline => {
                anyhow::bail!("binding {UNROUTABLE_KEY}: the broker did not answer")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
