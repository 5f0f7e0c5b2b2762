//! kill -9 of the relay: nothing lost, and the replay stays small.

use crate::support::{ids, wait_for, Fixture};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let f = Fixture::new("kill9", true).await;
    let cfg = f.config(&[]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let all = ids("k9", 12_000);
    let writer = {
        let rows: Vec<(String, String, String)> = all
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id.clone(),
                    format!("agg-{}", i % 300),
                    "streamed".to_string(),
                )
            })
            .collect();
        let table = f.table.clone();
        tokio::spawn(async move {
            let db = crate::support::pg().await;
            for chunk in rows.chunks(10) {
                let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
                for (i, (id, agg, ev)) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("('{id}', 'Order', '{agg}', '{ev}', '{{}}')"));
                }
                db.batch_execute(&sql).await.unwrap();
            }
        })
    };
    wait_for(T, "a few thousand delivered", || async {
        f.consumer().ids().len() >= 3000
    })
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    writer.await.unwrap();
    f.consumer().wait_ids(&all, Duration::from_secs(180)).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_lsn_is_reported_within_about_a_second() {
    let f = Fixture::new("replay_small", true).await;
    // The default status interval (100 ms).
    let cfg = f.config(&[]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let first = f.insert_each("first", 200).await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&first, T).await;
    // The worker's default status interval is 10 s; the relay reports well within a second.
    wait_for(
        Duration::from_secs(2),
        "applied LSN reported to the server",
        || async { f.confirmed_lsn().await >= end },
    )
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let second = f.insert_each("second", 10).await;
    f.consumer().wait_ids(&second, T).await;
    let total = f.consumer().all().len();
    assert_eq!(
        total, 210,
        "kill -9 after the report: nothing replayed twice"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
