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
    f.consumer().wait_ids(all, Duration::from_secs(180)).await;
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
