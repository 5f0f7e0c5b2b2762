//! Committed rows arrive, in the Event-Forge wire format; nothing else does.

use crate::support::{ids, wait_for, Fixture};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_is_event_forge() {
    let f = Fixture::new("wire_format", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    f.db
        .batch_execute(&format!(
            "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, metadata, created_at) values \
             ('7d0c0f7e-1b8e-4a36-9d9e-000000000001', 'Order', 'order-42', 'order.placed', \
              '{{\"total\": 99.5, \"items\": [1, 2]}}', \
              '{{\"traceId\": \"4bf92f3577b34da6a3ce929d0e0e4736\", \"spanId\": \"00f067aa0ba902b7\"}}', \
              '2026-11-27 10:11:12.345678+00'), \
             ('7d0c0f7e-1b8e-4a36-9d9e-000000000002', 'User', 'u-1', 'user.created', '{{}}', null, '2026-01-02 03:04:05+00')",
            f.table
        ))
        .await
        .unwrap();
    f.consumer()
        .wait_ids(
            &[
                "7d0c0f7e-1b8e-4a36-9d9e-000000000001".into(),
                "7d0c0f7e-1b8e-4a36-9d9e-000000000002".into(),
            ],
            T,
        )
        .await;
    let all = f.consumer().all();
    let m = all.iter().find(|r| r.message_id().ends_with("01")).unwrap();
    assert_eq!(m.routing_key, "Order.order.placed");
    assert_eq!(
        m.json(),
        serde_json::json!({
            "id": "7d0c0f7e-1b8e-4a36-9d9e-000000000001",
            "aggregateType": "Order",
            "aggregateId": "order-42",
            "eventType": "order.placed",
            "payload": {"total": 99.5, "items": [1, 2]},
            "metadata": {"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": "00f067aa0ba902b7"},
            "createdAt": "2026-11-27T10:11:12.345678+00:00",
        })
    );
    let p = &m.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(
        *p.timestamp(),
        Some(1_795_774_272),
        "timestamp = created_at in unix seconds"
    );
    assert_eq!(m.header("x-aggregate-type").as_deref(), Some("Order"));
    assert_eq!(m.header("x-aggregate-id").as_deref(), Some("order-42"));
    assert_eq!(m.header("x-event-type").as_deref(), Some("order.placed"));
    assert_eq!(
        m.header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        p.headers().as_ref().unwrap().inner().len(),
        4,
        "exactly the Event-Forge headers"
    );

    let u = all.iter().find(|r| r.message_id().ends_with("02")).unwrap();
    assert_eq!(u.routing_key, "User.user.created");
    assert_eq!(u.json()["metadata"], serde_json::Value::Null);
    assert_eq!(u.json()["createdAt"], "2026-01-02T03:04:05+00:00");
    assert_eq!(
        u.header("traceparent"),
        None,
        "no traceparent without trace ids"
    );
    assert_eq!(u.properties.headers().as_ref().unwrap().inner().len(), 3);

    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_small_and_one_big_transaction_all_arrive() {
    let f = Fixture::new("bulk", true).await;
    // A window far smaller than the big transaction: it must flow before its Commit.
    let mut relay = f.spawn(&[("amqp", "max_in_flight = 128")]);
    relay.wait_streaming().await;
    let mut expected = f.insert_each("small", 1000).await;
    let big = ids("big", 5000);
    let rows: Vec<_> = big
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.clone(),
                format!("big-agg-{}", i % 50),
                "bulk.loaded".to_string(),
            )
        })
        .collect();
    f.insert_batch(&rows).await;
    let end = f.current_lsn().await;
    expected.extend(big);
    f.consumer()
        .wait_ids(&expected, Duration::from_secs(120))
        .await;
    f.wait_slot_past(end, "slot confirmed past the big transaction")
        .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_rows_are_never_published() {
    let f = Fixture::new("rollback", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let t = &f.table;
    let sql = format!(
        "begin; insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('rolled-back', 'Order', 'a', 'x', '{{}}'); rollback;
         begin; insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('kept-1', 'Order', 'a', 'x', '{{}}');
           savepoint s; insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('savepoint-rolled-back', 'Order', 'a', 'x', '{{}}');
           rollback to savepoint s;
           insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('kept-2', 'Order', 'a', 'x', '{{}}');
         commit;"
    );
    f.db.batch_execute(&sql).await.unwrap();
    let end = f.current_lsn().await;
    f.consumer()
        .wait_ids(&["kept-1".into(), "kept-2".into()], T)
        .await;
    f.wait_slot_past(end, "slot confirmed past the last commit")
        .await;
    let got = f.consumer().ids();
    assert!(
        !got.contains("rolled-back"),
        "rolled-back insert was published"
    );
    assert!(
        !got.contains("savepoint-rolled-back"),
        "insert of a rolled-back savepoint was published"
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_match_by_name_and_alter_table_while_running() {
    let f = Fixture::bare("columns").await;
    // Extra columns and another order than Event-Forge's; text payload (validated), no created_at.
    f.db
        .batch_execute(&format!(
            "create table {} (tenant text default 't1', payload text not null, event_type text not null, \
             id text primary key, aggregate_id text not null, aggregate_type text not null, metadata jsonb)",
            f.table
        ))
        .await
        .unwrap();
    let f = f.with_consumer(true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let t = &f.table;
    f.db
        .batch_execute(&format!(
            "insert into {t} (payload, event_type, id, aggregate_id, aggregate_type) values ('{{\"v\":1}}', 'e1', 'before-alter', 'a', 'Thing')"
        ))
        .await
        .unwrap();
    f.consumer().wait_ids(&["before-alter".into()], T).await;
    f.db
        .batch_execute(&format!(
            "alter table {t} add column priority int default 5; \
             insert into {t} (payload, event_type, id, aggregate_id, aggregate_type, priority) values ('[1,2]', 'e2', 'after-alter', 'a', 'Thing', 9)"
        ))
        .await
        .unwrap();
    f.consumer().wait_ids(&["after-alter".into()], T).await;
    let all = f.consumer().all();
    let after = all
        .iter()
        .find(|r| r.message_id() == "after-alter")
        .unwrap();
    assert_eq!(after.json()["payload"], serde_json::json!([1, 2]));
    assert_eq!(after.routing_key, "Thing.e2");
    // Without a created_at column, createdAt is the commit time.
    let created = after.json()["createdAt"].as_str().unwrap().to_string();
    assert!(
        created.starts_with("20") && created.ends_with("+00:00"),
        "{created}"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_the_final_lsn_and_exits_zero() {
    let f = Fixture::new("sigterm", true).await;
    let mut relay = f.spawn(&[("postgres", "status_interval = \"30s\"")]);
    relay.wait_streaming().await;
    let expected = f.insert_each("term", 50).await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&expected, T).await;
    // With a 30 s status interval only the shutdown's final status update can move the slot now.
    let status = relay.terminate(T).await;
    assert!(status.success(), "exit {status}:\n{}", relay.log_text());
    assert!(
        f.confirmed_lsn().await >= end,
        "final status update missing: slot at {} < {end}",
        f.confirmed_lsn().await
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outbox_does_not_hold_wal_while_other_tables_are_busy() {
    let f = Fixture::new("idle_wal", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let other = format!("{}_other", f.table);
    f.db.batch_execute(&format!(
        "drop table if exists {other}; create table {other} (id serial primary key, pad text)"
    ))
    .await
    .unwrap();
    for _ in 0..20 {
        f.db.batch_execute(&format!(
            "insert into {other} (pad) select repeat('x', 200) from generate_series(1, 500)"
        ))
        .await
        .unwrap();
    }
    let busy_end = f.current_lsn().await;
    // Keepalives report the WAL end while nothing is in flight; the slot follows
    // the unrelated writes instead of staying where the outbox last moved it.
    wait_for(
        Duration::from_secs(90),
        "slot confirmed past unrelated writes",
        || async { f.confirmed_lsn().await >= busy_end },
    )
    .await;
    f.db.batch_execute(&format!("drop table {other}"))
        .await
        .unwrap();
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Peak resident memory of a process, from /proc (bytes).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Writes a backlog of `n` rows (`{prefix}-{g}`, payload `payload`) over 1 000
/// aggregates before the relay starts, then runs it until the slot passes the
/// backlog and every row arrived; returns the relay and the peak of `gauge`
/// sampled meanwhile.
async fn drain_backlog(
    f: &Fixture,
    cfg: &std::path::Path,
    prefix: &str,
    n: usize,
    payload: &str,
    gauge: &str,
) -> (crate::support::Relay, f64) {
    f.db.batch_execute(&format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload) \
         select '{prefix}-' || g, 'Order', 'agg-' || (g % 1000), 'e', {payload} \
         from generate_series(0, {}) g",
        f.table,
        n - 1
    ))
    .await
    .unwrap();
    let end = f.current_lsn().await;
    let mut relay = crate::support::Relay::spawn(cfg, &f.dir, &[]);
    let addr = relay.metrics_addr().await;
    let mut peak = 0.0f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while f.confirmed_lsn().await < end {
        assert!(std::time::Instant::now() < deadline, "backlog not drained");
        let m = crate::support::http_get(&addr, "/metrics").await.1;
        peak = peak.max(crate::support::metric_value(&m, gauge).unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expected: Vec<String> = (0..n).map(|g| format!("{prefix}-{g}")).collect();
    f.consumer().wait_ids(&expected, T).await;
    (relay, peak)
}

/// The window's message bound: a backlog of small rows fills the window up to
/// `max_in_flight` messages (the byte limit is far away) and never beyond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_rows_is_held_to_max_in_flight_messages() {
    let f = Fixture::new("memory_count", true).await;
    let cfg = f.config(&[("amqp", "max_in_flight = 64")]);
    let mut init =
        crate::support::Relay::command(&["init", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert!(init.wait_exit(T).await.success(), "{}", init.log_text());
    let n = 20_000;
    let (mut relay, peak) =
        drain_backlog(&f, &cfg, "cnt", n, "'{}'", "outbox_relay_inflight_messages").await;
    assert!(peak <= 64.0, "{peak} messages in flight");
    assert!(
        peak >= 32.0,
        "the window never filled ({peak} messages): the test did not exercise it"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// The window's byte bound and the relay's memory: 60 MB of 2 KB rows drain with
/// the window held to `max_in_flight_bytes` (it binds long before the 64
/// messages do) and the process in bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_backlog_drains_within_the_window_and_in_bounded_memory() {
    let f = Fixture::new("memory", true).await;
    let cfg = f.config(&[
        ("amqp", "max_in_flight = 64"),
        ("amqp", "max_in_flight_bytes = 32768"),
    ]);
    // The slot first, then a backlog of 30 000 rows of ~2 KB (60 MB) for it.
    let mut init =
        crate::support::Relay::command(&["init", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert!(init.wait_exit(T).await.success(), "{}", init.log_text());
    let n = 30_000;
    let (mut relay, peak_bytes) = drain_backlog(
        &f,
        &cfg,
        "mem",
        n,
        "json_build_object('pad', repeat('x', 2000))",
        "outbox_relay_inflight_bytes",
    )
    .await;
    let rss = peak_rss(relay.pid());
    println!(
        "backlog {n} x 2 KB: in-flight peak {peak_bytes} bytes; relay peak RSS {} MB",
        rss / 1_048_576
    );
    // One message may go over the byte limit (it is admitted while the window is
    // below it); each weighs ~2.3 KB here.
    assert!(
        peak_bytes <= 32768.0 + 4096.0,
        "{peak_bytes} bytes in flight"
    );
    assert!(
        peak_bytes >= 16384.0,
        "the window never filled ({peak_bytes} bytes): the test did not exercise it"
    );
    assert!(
        rss < 56 * 1_048_576,
        "peak RSS {} MB for a 60 MB backlog",
        rss / 1_048_576
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
