//! Operability: metrics, health endpoints, status, heartbeat, hot standby,
//! and the least-privilege role.

use crate::support::{http_get, ids, metric_value, wait_for, Fixture, Relay};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load_and_under_a_failure() {
    let f = Fixture::new("op_metrics", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[]);
    let addr = relay.metrics_addr().await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    relay.wait_streaming().await;
    wait_for(T, "ready", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    let scrape = || async { http_get(&addr, "/metrics").await.1 };
    let before = scrape().await;
    assert_eq!(
        metric_value(&before, "outbox_relay_messages_published_total"),
        Some(0.0)
    );
    let rows: Vec<_> = (0..100)
        .map(|i| (format!("m-{i}"), format!("a{}", i % 10), "ok".to_string()))
        .collect();
    f.insert_batch(&rows).await;
    let ok: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&ok, T).await;
    // An injected failure: unroutable, with no retries left after the first attempt.
    f.db
        .batch_execute(&format!(
            "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('m-bad', 'Order', 'z', 'bad', '{{}}', 0)",
            f.table
        ))
        .await
        .unwrap();
    wait_for(T, "failure, dead letter and lag visible", || async {
        let m = scrape().await;
        metric_value(&m, "outbox_relay_dead_letters_total") == Some(1.0)
    })
    .await;
    assert_eq!(
        metric_value(
            &scrape().await,
            "outbox_relay_publish_failures_total{reason=\"returned\"}"
        ),
        Some(1.0),
        "no retries left after the first attempt: published once, then dead"
    );
    let m = scrape().await;
    assert_eq!(
        metric_value(&m, "outbox_relay_messages_published_total"),
        Some(100.0),
        "{m}"
    );
    assert!(
        metric_value(&m, "outbox_relay_delivery_latency_seconds_count").unwrap() >= 100.0,
        "{m}"
    );
    assert!(metric_value(&m, "outbox_relay_confirmed_lsn").unwrap() > 0.0);
    assert!(
        metric_value(&m, "outbox_relay_slot_lag_bytes").is_some(),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_retries_pending"),
        Some(0.0),
        "the dead one is no longer pending: {m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_inflight_messages"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_publish_failures_total{reason=\"nack\"}"),
        Some(0.0)
    );
    assert!(
        m.contains("outbox_relay_reconnects_total{peer=\"amqp\"} 0"),
        "{m}"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_matches_the_database() {
    let f = Fixture::new("op_status", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let t = &f.table;
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('s-1', 'Order', 'p', 'held', '{{}}'); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('s-2', 'Order', 'p', 'ok', '{{}}'); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('s-3', 'Order', 'q', 'held', '{{}}', 0)"
        ))
        .await
        .unwrap();
    wait_for(T, "two pending, one dead", || async {
        let p = f.parked().await;
        p.iter().filter(|r| r.1 == "parked").count() == 2
            && p.iter().filter(|r| r.1 == "dead").count() == 1
    })
    .await;
    let cfg = f.config(&[]);
    let mut cmd = Relay::command(
        &["status", "--json", "--config", cfg.to_str().unwrap()],
        &f.dir,
        &[],
    );
    assert!(cmd.wait_exit(T).await.success());
    let out = cmd.log_text();
    let status: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let row = f
        .db
        .query_one(
            "select active_pid, confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&f.slot],
        )
        .await
        .unwrap();
    let pid: i32 = row.get(0);
    assert_eq!(status["slot"]["name"], f.slot.as_str());
    assert_eq!(status["slot"]["active"], true);
    assert_eq!(status["slot"]["holder_pid"], pid);
    assert!(status["slot"]["confirmed_lsn"].is_string());
    assert!(status["slot"]["lag_bytes"].as_i64().unwrap() >= 0);
    assert_eq!(status["retries_pending"], 2);
    assert_eq!(status["dead_letters"], 1);
    assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    // The human form says the same.
    let mut cmd = Relay::command(&["status", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert!(cmd.wait_exit(T).await.success());
    let text = cmd.log_text();
    assert!(
        text.contains(&format!("held by pid {pid}"))
            && text.contains("retries pending 2")
            && text.contains("dead letters    1"),
        "{text}"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_standby_takes_over_after_kill_9_and_nothing_is_lost() {
    let f = Fixture::new("op_standby", true).await;
    let cfg = f.config(&[("postgres", "standby = true")]);
    let mut active = Relay::spawn(&cfg, &f.dir, &[]);
    active.wait_streaming().await;
    let holder = f.slot_active_pid().await.expect("slot held");
    let mut standby = Relay::spawn(&cfg, &f.dir, &[]);
    let standby_addr = standby.metrics_addr().await;
    standby
        .wait_log(&format!("held by another process (pid {holder})"), T)
        .await;
    let (code, body) = http_get(&standby_addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("standby"), "{body}");
    let all = ids("sb", 6000);
    let writer = {
        let table = f.table.clone();
        let all = all.clone();
        tokio::spawn(async move {
            let db = crate::support::pg().await;
            for chunk in all.chunks(20) {
                let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
                for (i, id) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("('{id}', 'Order', 'agg-{}', 'e', '{{}}')", i % 9));
                }
                db.batch_execute(&sql).await.unwrap();
            }
        })
    };
    wait_for(T, "some delivered by the active relay", || async {
        f.consumer().ids().len() >= 1500
    })
    .await;
    active.kill9();
    let killed_at = std::time::Instant::now();
    standby.wait_log("taking over", T).await;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(15), "take-over took {took:?}");
    wait_for(T, "standby ready", || async {
        http_get(&standby_addr, "/readyz").await.0 == 200
    })
    .await;
    writer.await.unwrap();
    f.consumer().wait_ids(&all, Duration::from_secs(120)).await;
    println!(
        "standby took over {:.1} s after kill -9",
        took.as_secs_f64()
    );
    assert!(standby.terminate(T).await.success());
    f.cleanup().await;
}

/// An active relay and its standbys deployed together on a fresh database:
/// each finds the publication and the slot missing, but under the set-up lock
/// one creates them and the others find them made. Without the lock the
/// others failed with "publication ... already exists" (or the slot's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_started_together_on_a_fresh_database_all_come_up() {
    let f = Fixture::new("op_together", true).await;
    let cfg = f.config(&[("postgres", "standby = true")]);
    let mut relays: Vec<Relay> = (0..4).map(|_| Relay::spawn(&cfg, &f.dir, &[])).collect();
    let mut streaming = 0;
    for relay in relays.iter_mut() {
        let addr = relay.metrics_addr().await;
        wait_for(T, "streaming or waiting as a standby", || async {
            let text = relay.log_text();
            assert!(
                !text.contains("outbox-relay run: "),
                "a relay started with the others failed:\n{text}"
            );
            text.contains("held by another process") || http_get(&addr, "/readyz").await.0 == 200
        })
        .await;
        if http_get(&addr, "/readyz").await.0 == 200 {
            streaming += 1;
        }
    }
    assert_eq!(streaming, 1, "one relay streams, the others wait");
    let all = f.insert_each("together", 500).await;
    f.consumer().wait_ids(&all, T).await;
    for relay in relays.iter_mut() {
        assert!(relay.terminate(T).await.success());
    }
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_retained_wal_small_while_another_table_writes_100mb() {
    let f = Fixture::new("op_heartbeat", true).await;
    let mut relay = f.spawn(&[("postgres", "heartbeat_interval = \"1s\"")]);
    relay.wait_streaming().await;
    // The heartbeat emits a logical message every second on its own session.
    let heartbeat_at = || async {
        f.db
            .query_opt(
                "select state_change::text from pg_stat_activity where application_name = $1 and query like '%pg_logical_emit_message%'",
                &[&outbox_relay::relay::heartbeat_application_name(&f.slot)],
            )
            .await
            .unwrap()
            .and_then(|r| r.get::<_, Option<String>>(0))
    };
    wait_for(T, "a heartbeat was emitted", || async {
        heartbeat_at().await.is_some()
    })
    .await;
    let first = heartbeat_at().await;
    wait_for(T, "another heartbeat followed", || async {
        heartbeat_at().await != first
    })
    .await;
    let other = format!("{}_busy", f.table);
    f.db.batch_execute(&format!(
        "drop table if exists {other}; create table {other} (id bigserial primary key, pad text)"
    ))
    .await
    .unwrap();
    let start = f.current_lsn().await;
    // At least 100 MB of WAL on a table the relay does not publish.
    while f.current_lsn().await - start < 100 * 1024 * 1024 {
        f.db
            .batch_execute(&format!("insert into {other} (pad) select repeat(md5(g::text), 30) from generate_series(1, 20000) g"))
            .await
            .unwrap();
    }
    let written = f.current_lsn().await - start;
    let retained = || async {
        f.db
            .query_one(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots where slot_name = $1",
                &[&f.slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for(T, "the slot retains less than 16 MB", || async {
        retained().await < 16 * 1024 * 1024
    })
    .await;
    println!(
        "wrote {} MB on another table; slot retains {} kB",
        written / 1_048_576,
        retained().await / 1024
    );
    f.db.batch_execute(&format!("drop table {other}"))
        .await
        .unwrap();
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_role_runs_the_relay() {
    let f = Fixture::new("op_role", true).await;
    let role = "outbox_relay_op_role";
    // init as the owner creates the retry table, publication and slot.
    let cfg = f.config(&[]);
    let mut init = Relay::command(&["init", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert!(init.wait_exit(T).await.success(), "{}", init.log_text());
    let _ =
        f.db.batch_execute(&format!("drop owned by {role}; drop role if exists {role}"))
            .await;
    let sql = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/role.sql"))
        .unwrap()
        .replace(
            "public.outbox_relay_parked_seq_seq",
            &format!("{}_seq_seq", f.retry_table),
        )
        .replace("public.outbox_relay_parked", &f.retry_table)
        .replace("public.outbox_messages", &f.table)
        .replace("ROLE outbox_relay ", &format!("ROLE {role} "))
        .replace("TO outbox_relay", &format!("TO {role}"));
    f.db.batch_execute(&sql).await.unwrap();
    let url = format!("postgresql://{role}:change-me@127.0.0.1:5432/test");
    let mut relay = Relay::spawn(&cfg, &f.dir, &[("OUTBOX_RELAY_POSTGRES_URL", &url)]);
    relay.wait_streaming().await;
    let expected = f.insert_each("role", 20).await;
    f.consumer().wait_ids(&expected, T).await;
    wait_for(T, "rows marked published by the role", || async {
        f.row_state("role-19").await.0 == "published"
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
    let _ = f_drop_role(role).await;
}

async fn f_drop_role(role: &str) -> Result<(), tokio_postgres::Error> {
    let db = crate::support::pg().await;
    db.batch_execute(&format!("drop owned by {role}; drop role if exists {role}"))
        .await
}

#[test]
fn the_grafana_dashboard_uses_every_metric() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    // Every metric the relay registers, not a hand-kept list.
    let names: Vec<String> = outbox_relay::metrics::metrics()
        .registry
        .gather()
        .iter()
        .map(|family| family.name().to_string())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        assert!(
            exprs.iter().any(|e| e.contains(name.as_str())),
            "dashboard does not use {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reads_the_retry_state_when_it_takes_over() {
    let f = Fixture::new("op_standby_parked", false).await;
    f.bind("Order.ok").await;
    let cfg = f.config(&[
        ("postgres", "standby = true"),
        ("retry", "max_retries = 1000"),
    ]);
    let mut active = Relay::spawn(&cfg, &f.dir, &[]);
    active.wait_streaming().await;
    let holder = f.slot_active_pid().await.expect("slot held");
    // The standby starts while nothing is parked yet.
    let mut standby = Relay::spawn(&cfg, &f.dir, &[]);
    standby
        .wait_log(&format!("held by another process (pid {holder})"), T)
        .await;
    // Then the active relay parks a refused message of aggregate x, and the slot
    // moves past it: the standby can learn of it only from the retry state ...
    f.insert_batch(&[("sb-0".into(), "x".into(), "late".into())])
        .await;
    let end = f.current_lsn().await;
    f.wait_head_failed_with("unroutable").await;
    f.wait_slot_past(end, "slot past the parked message").await;
    active.kill9();
    standby.wait_log("taking over", T).await;
    standby.wait_log("retry state read", T).await;
    // ... and x's next message must wait behind it, not overtake it.
    f.insert_batch(&[("sb-1".into(), "x".into(), "ok".into())])
        .await;
    wait_for(
        T,
        "the successor parked behind the refused message",
        || async { f.parked().await.iter().any(|p| p.0 == "sb-1") },
    )
    .await;
    assert!(!f.consumer().ids().contains("sb-1"), "sb-1 overtook sb-0");
    f.bind("Order.late").await;
    f.consumer()
        .wait_ids(&["sb-0".into(), "sb-1".into()], T)
        .await;
    // The take-over may replay sb-0 from the slot once more (at least once); what
    // matters is that sb-1 comes after it.
    let order: Vec<String> = f.consumer().all().iter().map(|r| r.message_id()).collect();
    let first_1 = order.iter().position(|id| id == "sb-1").unwrap();
    assert!(
        order[..first_1].iter().any(|id| id == "sb-0")
            && order[first_1..].iter().all(|id| id == "sb-1"),
        "sb-1 must follow every delivery of sb-0: {order:?}"
    );
    assert!(standby.terminate(T).await.success());
    f.cleanup().await;
}

/// A relay whose replication stream is lost and comes back reads the retry state
/// again before it publishes: another process (a standby that took the slot
/// meanwhile) may have parked messages it does not know of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reads_the_retry_state_again_when_its_stream_comes_back() {
    let f = Fixture::new("op_reconnect_reread", false).await;
    f.bind("Order.ok").await;
    let proxy = crate::support::StallingProxy::start("127.0.0.1:5432").await;
    // B connects directly; A through a proxy that can stall all of A's sessions.
    let cfg_b = f.config(&[
        ("postgres", "standby = true"),
        ("retry", "max_retries = 1000"),
    ]);
    let cfg_b_path = f.dir.join("relay-b.toml");
    std::fs::copy(&cfg_b, &cfg_b_path).unwrap();
    let cfg_a = f.config(&[
        ("postgres", "standby = true"),
        ("postgres", "replication_timeout = \"2s\""),
        (
            "postgres",
            &format!(
                "url = \"postgresql://postgres@127.0.0.1:{}/test\"",
                proxy.port
            ),
        ),
        ("retry", "max_retries = 1000"),
    ]);
    let mut a = Relay::spawn(&cfg_a, &f.dir, &[]);
    a.wait_streaming().await;
    let holder = f.slot_active_pid().await.expect("slot held");
    let mut b = Relay::spawn(&cfg_b_path, &f.dir, &[]);
    b.wait_log(&format!("held by another process (pid {holder})"), T)
        .await;
    // A's Postgres goes silent, and its walsender away: B takes the slot.
    proxy.stall(true);
    f.db.execute("select pg_terminate_backend($1)", &[&holder])
        .await
        .unwrap();
    b.wait_log("taking over", T).await;
    b.wait_log("retry state read", T).await;
    // B parks a refused message of aggregate y, and the slot moves past it.
    f.insert_batch(&[("y-0".into(), "y".into(), "late".into())])
        .await;
    let end = f.current_lsn().await;
    f.wait_head_failed_with("unroutable").await;
    f.wait_slot_past(end, "slot past the message B parked")
        .await;
    b.kill9();
    // A comes back and takes the slot again.
    proxy.stall(false);
    a.wait_log("replication stream resumed", T).await;
    // y's next message must wait behind y-0, which only the retry state tells A of.
    f.insert_batch(&[("y-1".into(), "y".into(), "ok".into())])
        .await;
    wait_for(T, "y-1 parked behind y-0", || async {
        f.parked().await.iter().any(|p| p.0 == "y-1")
    })
    .await;
    assert!(!f.consumer().ids().contains("y-1"), "y-1 overtook y-0");
    f.bind("Order.late").await;
    f.consumer()
        .wait_ids(&["y-0".into(), "y-1".into()], T)
        .await;
    let order: Vec<String> = f.consumer().all().iter().map(|r| r.message_id()).collect();
    let first_1 = order.iter().position(|id| id == "y-1").unwrap();
    assert!(
        order[..first_1].iter().any(|id| id == "y-0"),
        "y-1 must follow y-0: {order:?}"
    );
    assert!(a.terminate(T).await.success(), "{}", a.log_text());
    f.cleanup().await;
}
