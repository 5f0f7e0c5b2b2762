//! The retry store never wedges on one row or one lock, parks never wait for
//! housekeeping, and `/readyz` tells the truth while something holds the relay.

use crate::support::{http_get, wait_for, Fixture, Relay, StallingProxy};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A session of its own in a transaction that ran `sql` (taking a lock), held
/// until [`release`].
async fn hold(sql: String) -> tokio_postgres::Client {
    let session = crate::support::pg().await;
    session
        .batch_execute(&format!("begin; {sql}"))
        .await
        .unwrap();
    session
}

async fn release(session: tokio_postgres::Client) {
    session.batch_execute("rollback").await.unwrap();
}

/// `n` routable rows (`Order.ok`), one transaction each, ids `{prefix}-{i}`.
async fn routable(f: &Fixture, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        f.insert_batch(&[(id.clone(), format!("r-{}", i % 7), "ok".into())])
            .await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_while_a_message_is_parked_wedges_nothing() {
    let f = Fixture::new("st_drop_column", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
    relay.wait_streaming().await;
    f.insert_batch(&[("drop-0".into(), "d".into(), "late".into())])
        .await;
    f.wait_head_failed_with("unroutable").await;
    // The table changes under the parked message: its re-read named every column.
    f.db.batch_execute(&format!("alter table {} drop column locked_by", f.table))
        .await
        .unwrap();
    f.insert_batch(&[("behind-drop".into(), "d".into(), "ok".into())])
        .await;
    let others = routable(&f, "after-drop", 20).await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&others, T).await;
    f.wait_slot_past(end, "slot past the messages after the ALTER")
        .await;
    wait_for(T, "later rows still marked published", || async {
        f.row_state("after-drop-19").await.0 == "published"
    })
    .await;
    // An operator fixes the parked row (after the DROP COLUMN): the retry reads the
    // row again with the table's current columns and sends it as fixed — the
    // parked copy (unroutable) would stay stuck.
    f.db.batch_execute(&format!(
        "update {} set event_type = 'ok', payload = '{{\"fixed\": true}}' where id = 'drop-0'",
        f.table
    ))
    .await
    .unwrap();
    f.consumer()
        .wait_ids(&["drop-0".into(), "behind-drop".into()], T)
        .await;
    let got = f.consumer().all();
    let fixed = got.iter().find(|r| r.message_id() == "drop-0").unwrap();
    assert_eq!(fixed.routing_key, "Order.ok");
    assert_eq!(fixed.json()["payload"], serde_json::json!({"fixed": true}));
    let order: Vec<String> = got
        .iter()
        .map(|r| r.message_id())
        .filter(|id| id == "drop-0" || id == "behind-drop")
        .collect();
    assert_eq!(order[0], "drop-0", "{order:?}");
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parks_never_wait_for_housekeeping_stuck_on_a_locked_row() {
    let f = Fixture::new("st_housekeeping", false).await;
    f.bind("Order.ok").await;
    let cfg = f.config(&[
        ("postgres", "lock_timeout = \"500ms\""),
        ("retry", "max_retries = 1000"),
    ]);
    let mut init = Relay::command(&["init", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert!(init.wait_exit(T).await.success(), "{}", init.log_text());
    // Before the relay runs: a refused message whose outbox row another session
    // holds locked, so its status mirror (housekeeping) cannot be written.
    f.insert_batch(&[("held".into(), "h".into(), "late".into())])
        .await;
    let lock = hold(format!(
        "select * from {} where id = 'held' for update",
        f.table
    ))
    .await;
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    f.wait_head_failed_with("unroutable").await;
    // More refusals park, and the stream flows, while housekeeping waits on the lock.
    f.insert_batch(&[("held-2".into(), "h2".into(), "late".into())])
        .await;
    let others = routable(&f, "while-locked", 20).await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&others, T).await;
    wait_for(T, "the second refusal parked too", || async {
        f.parked().await.iter().any(|p| p.0 == "held-2")
    })
    .await;
    f.wait_slot_past(end, "slot moves while housekeeping is stuck")
        .await;
    assert_eq!(
        f.row_state("held").await.0,
        "pending",
        "its status could not be written yet"
    );
    release(lock).await;
    wait_for(T, "the status shows once the lock is gone", || async {
        f.row_state("held").await.0 == "failed"
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// A delivered retry's outbox row is marked in the store's own transaction:
/// when another session holds that row locked, the store waits 50 ms, not
/// the session's `lock_timeout` (10 minutes here, as is `statement_timeout`),
/// hands the mark to the
/// housekeeping task and goes on parking; the row shows `published` once the
/// lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_retry_whose_row_is_locked_does_not_hold_the_store() {
    let f = Fixture::new("st_retry_locked", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[
        ("postgres", "lock_timeout = \"10min\""),
        ("postgres", "statement_timeout = \"10min\""),
        ("retry", "max_retries = 1000"),
    ]);
    relay.wait_streaming().await;
    f.insert_batch(&[("held".into(), "h".into(), "late".into())])
        .await;
    f.wait_head_failed_with("unroutable").await;
    wait_for(T, "its park shown in the row", || async {
        f.row_state("held").await.0 == "failed"
    })
    .await;
    let lock = hold(format!(
        "select * from {} where id = 'held' for update",
        f.table
    ))
    .await;
    f.bind("Order.late").await;
    f.consumer().wait_ids(&["held".to_string()], T).await;
    // The store is not waiting on the lock: a new refusal parks.
    f.insert_batch(&[("later".into(), "l".into(), "later".into())])
        .await;
    wait_for(T, "a refusal after the locked retry parked", || async {
        f.parked().await.iter().any(|p| p.0 == "later")
    })
    .await;
    assert_eq!(f.row_state("held").await.0, "failed", "still locked");
    release(lock).await;
    wait_for(
        T,
        "the delivered retry marked once the lock is gone",
        || async { f.row_state("held").await.0 == "published" },
    )
    .await;
    relay
        .wait_log(
            "their outbox rows could not be marked in the transaction",
            T,
        )
        .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_the_store_is_failing_and_the_relay_stalled_while_the_retry_table_is_locked() {
    let f = Fixture::new("st_readyz", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[
        ("postgres", "lock_timeout = \"200ms\""),
        ("relay", "stall_timeout = \"2s\""),
        ("retry", "max_retries = 1000"),
    ]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    wait_for(T, "ready", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    let lock = hold(format!(
        "lock table {} in access exclusive mode",
        f.retry_table
    ))
    .await;
    f.insert_batch(&[("cannot-park".into(), "c".into(), "late".into())])
        .await;
    wait_for(T, "readyz: store failing and no progress", || async {
        let (code, body) = http_get(&addr, "/readyz").await;
        code == 503 && body.contains("retry store keeps failing") && body.contains("no progress")
    })
    .await;
    assert_eq!(
        http_get(&addr, "/healthz").await.0,
        200,
        "alive all the same"
    );
    release(lock).await;
    f.wait_head_failed_with("unroutable").await;
    wait_for(T, "ready again", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replication_connection_is_probed_then_replaced() {
    let f = Fixture::new("st_silent", true).await;
    // Postgres through a proxy that can go silent, like a network partition
    // neither end notices.
    let proxy = StallingProxy::start("127.0.0.1:5432").await;
    let url = format!(
        "url = \"postgresql://postgres@127.0.0.1:{}/test\"",
        proxy.port
    );
    let mut relay = f.spawn(&[
        ("postgres", &url),
        ("postgres", "replication_timeout = \"4s\""),
    ]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    f.insert_batch(&[("before-silence".into(), "s".into(), "e".into())])
        .await;
    f.consumer().wait_ids(&["before-silence".into()], T).await;
    proxy.stall(true);
    relay
        .wait_log("the replication connection was silent for", T)
        .await;
    wait_for(T, "readyz: not streaming while it reconnects", || async {
        let (code, body) = http_get(&addr, "/readyz").await;
        code == 503 && body.contains("not streaming")
    })
    .await;
    proxy.stall(false);
    relay
        .wait_log("replication stream resumed", Duration::from_secs(90))
        .await;
    f.insert_batch(&[("after-silence".into(), "s".into(), "e".into())])
        .await;
    f.consumer().wait_ids(&["after-silence".into()], T).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_rows_are_listed_in_pages_and_purged_after_their_retention() {
    let f = Fixture::new("st_dead", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[("retry", "dead_retention = \"3s\"")]);
    relay.wait_streaming().await;
    let t = &f.table;
    f.db.batch_execute(&format!(
        "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values \
         ('dead-a', 'Order', 'a', 'lost', '{{}}', 0), ('dead-b', 'Order', 'b', 'lost', '{{}}', 0), ('dead-c', 'Order', 'c', 'lost', '{{}}', 0)"
    ))
    .await
    .unwrap();
    wait_for(T, "three dead", || async {
        f.parked().await.iter().filter(|p| p.1 == "dead").count() == 3
    })
    .await;
    let cfg = f.config(&[("retry", "dead_retention = \"3s\"")]);
    let mut list = Relay::command(
        &[
            "dead",
            "list",
            "--json",
            "--limit",
            "2",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &f.dir,
        &[],
    );
    assert!(list.wait_exit(T).await.success());
    let out = list.log_text();
    let page: serde_json::Value = serde_json::from_str(&out[out.find('[').unwrap()..]).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 2, "{page}");
    let mut list = Relay::command(
        &[
            "dead",
            "list",
            "--json",
            "--limit",
            "2",
            "--offset",
            "2",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &f.dir,
        &[],
    );
    assert!(list.wait_exit(T).await.success());
    let out = list.log_text();
    let page: serde_json::Value = serde_json::from_str(&out[out.find('[').unwrap()..]).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 1, "{page}");
    wait_for(T, "dead rows purged after dead_retention", || async {
        f.parked().await.is_empty()
    })
    .await;
    assert_eq!(
        f.row_state("dead-a").await.0,
        "permanently_failed",
        "the outbox row keeps its status"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_dead_letter_does_not_hold_the_shutdown() {
    let f = Fixture::new("st_shutdown", false).await;
    let dlx = "dlx_st_shutdown";
    let line = format!("dead_letter_exchange = \"{dlx}\"");
    let mut relay = f.spawn(&[("amqp", &line), ("relay", "shutdown_timeout = \"30s\"")]);
    relay.wait_streaming().await;
    // The dead-letter exchange vanishes: the dead copy keeps failing, in backoff.
    let conn = crate::support::amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(dlx.into(), Default::default())
        .await
        .unwrap();
    f.db.batch_execute(&format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('stuck', 'Order', 's', 'lost', '{{}}', 0)",
        f.table
    ))
    .await
    .unwrap();
    relay
        .wait_log("dead-letter publish failed; retrying", T)
        .await;
    let asked = std::time::Instant::now();
    let status = relay.terminate(T).await;
    assert!(status.success(), "{}", relay.log_text());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "a message that cannot be answered held the shutdown for {:?}",
        asked.elapsed()
    );
    assert_eq!(
        f.parked().await.len(),
        1,
        "the dead message stays in the retry table"
    );
    f.cleanup().await;
}
