//! Writing rows across outages and checking, after a fault, that every id
//! arrived and the relay moved on: shared by the fault and cluster tests.

use super::{wait_for, Fixture, Relay};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Writes `ids` in transactions of 10 rows from a task of its own, retrying
/// across outages; a transaction's rows go to aggregates `agg-0` to `agg-6`.
pub fn write_in_background(table: String, all: Vec<String>) -> tokio::task::JoinHandle<()> {
    let rows = all
        .chunks(10)
        .flat_map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), format!("agg-{}", i % 7)))
        })
        .collect();
    write_rows_in_background(table, rows)
}

/// Writes `(id, aggregate_id)` rows in transactions of 10, in order, from a task
/// of its own, retrying across outages.
pub fn write_rows_in_background(
    table: String,
    rows: Vec<(String, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut db = super::pg_retry(T).await;
        for chunk in rows.chunks(10) {
            let values: Vec<String> = chunk
                .iter()
                .map(|(id, agg)| format!("('{id}', 'Order', '{agg}', 'streamed', '{{}}')"))
                .collect();
            let sql = format!(
                "insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values {} on conflict (id) do nothing",
                values.join(",")
            );
            loop {
                match db.batch_execute(&sql).await {
                    Ok(()) => break,
                    Err(_) => db = super::pg_retry(T).await,
                }
            }
        }
    })
}

/// After a broker fault: every id arrived, the slot moved past the last commit and
/// the window holds nothing (unconfirmed messages were not written off as acked).
pub async fn assert_recovered(f: &Fixture, relay: &mut Relay, all: &[String]) {
    assert_recovered_or(f, relay, all, String::new).await
}

/// [`assert_recovered`]; when an id is missing, the failure also shows the
/// relay's window and parked rows, the end of its log and what `diagnose` says
/// (the broker's side).
pub async fn assert_recovered_or(
    f: &Fixture,
    relay: &mut Relay,
    all: &[String],
    diagnose: impl FnOnce() -> String,
) {
    if let Err(missing) = f
        .consumer()
        .try_wait_ids(all, Duration::from_secs(180))
        .await
    {
        let addr = relay.metrics_addr().await;
        let (_, metrics) = super::http_get(&addr, "/metrics").await;
        let window: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                [
                    "inflight",
                    "broker_node",
                    "paused",
                    "retries_pending",
                    "messages_published",
                    "publish_failures",
                    "reconnects",
                    "slot_lag",
                ]
                .iter()
                .any(|m| l.starts_with(&format!("outbox_relay_{m}")))
            })
            .collect();
        let parked = f.parked().await;
        let log = relay.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{missing}\nrelay metrics:\n{}\nparked: {} rows (first: {:?})\nbroker: {}\nrelay log (last 60 lines):\n{}",
            window.join("\n"),
            parked.len(),
            parked.first(),
            diagnose(),
            tail.join("\n")
        );
    }
    // A fresh session: the fixture's own may have died with a Postgres restart.
    let db = super::pg_retry(T).await;
    let lsn = |sql: &'static str| {
        let db = &db;
        let slot = f.slot.clone();
        async move {
            let row = db.query_one(sql, &[&slot]).await.unwrap();
            super::lsn_to_u64(&row.get::<_, String>(0))
        }
    };
    let end = lsn("select pg_current_wal_lsn()::text where $1::text is not null").await;
    wait_for(T, "slot past the last commit after the fault", || async {
        lsn("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1").await
            >= end
    })
    .await;
    super::wait_window_empty(&relay.metrics_addr().await).await;
}
