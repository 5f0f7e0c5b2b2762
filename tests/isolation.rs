//! A message can only fail itself: one row with huge headers, a dead-letter
//! exchange that does not exist or vanishes, a broker that stops answering —
//! that one message fails (parked, with its reason) and everything else flows.

use crate::support::{http_get, metric_value, wait_for, Fixture, Relay, StallingProxy};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// 300 rows of other aggregates, one transaction each, ids `{prefix}-{i}`.
async fn others(f: &Fixture, prefix: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..300 {
        let id = format!("{prefix}-{i}");
        f.insert_batch(&[(id.clone(), format!("o-{}", i % 30), "ok".into())])
            .await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_larger_than_the_frame_max_fail_only_their_message() {
    let f = Fixture::new("iso_headers", true).await;
    // A table whose aggregate id is unbounded text: a 200 KB id becomes a 200 KB
    // x-aggregate-id header, larger than the broker's frame_max (128 KB).
    f.db.batch_execute(&format!(
        "alter table {} alter column aggregate_id type text",
        f.table
    ))
    .await
    .unwrap();
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    let huge = "h".repeat(200_000);
    f.db.batch_execute(&format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload) values ('huge-headers', 'Order', '{huge}', 'ok', '{{}}')",
        f.table
    ))
    .await
    .unwrap();
    let rest = others(&f, "after-huge").await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&rest, T).await;
    f.wait_head_failed_with("frame_max").await;
    f.wait_slot_past(end, "slot past the refused message").await;
    assert!(!f.consumer().ids().contains("huge-headers"));
    let m = http_get(&addr, "/metrics").await.1;
    assert_eq!(
        metric_value(&m, "outbox_relay_reconnects_total{peer=\"amqp\"}"),
        Some(0.0),
        "checked before publishing: the broker never closed the connection"
    );
    assert!(
        metric_value(
            &m,
            "outbox_relay_publish_failures_total{reason=\"too_large\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200kb_trace_id_builds_no_traceparent_and_the_message_flows() {
    let f = Fixture::new("iso_trace", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let trace = "a".repeat(200_000);
    f.db.batch_execute(&format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, metadata) values \
         ('big-trace', 'Order', 't', 'ok', '{{}}', '{{\"traceId\": \"{trace}\", \"spanId\": \"00f067aa0ba902b7\"}}')",
        f.table
    ))
    .await
    .unwrap();
    let rest = others(&f, "after-trace").await;
    f.consumer().wait_ids(&rest, T).await;
    f.consumer().wait_ids(&["big-trace".into()], T).await;
    let m = f
        .consumer()
        .all()
        .into_iter()
        .find(|r| r.message_id() == "big-trace")
        .unwrap();
    assert_eq!(m.header("traceparent"), None, "not a W3C trace id");
    assert_eq!(
        m.json()["metadata"]["traceId"].as_str().map(str::len),
        Some(200_000),
        "the metadata itself is delivered as written"
    );
    assert!(f.parked().await.is_empty());
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_that_does_not_exist_is_refused_at_start_up_and_by_check() {
    let f = Fixture::new("iso_dlx_missing", true).await;
    let extra = [
        ("amqp", "dead_letter_exchange = \"dlx_iso_never_declared\""),
        ("amqp", "declare_exchange = false"),
    ];
    let cfg = f.config(&extra);
    let mut check = Relay::command(&["check", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    assert_eq!(check.wait_exit(T).await.code(), Some(1));
    let out = check.log_text();
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("dead-letter exchange")
            && l.contains("amqp.dead_letter_exchange")),
        "{out}"
    );
    let mut relay = f.spawn(&extra);
    let status = relay.wait_exit(T).await;
    assert!(!status.success());
    let log = relay.log_text();
    assert!(
        log.contains("amqp.dead_letter_exchange = \"dlx_iso_never_declared\" cannot be used")
            && log.contains("declare it"),
        "{log}"
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_deleted_while_running_fails_only_its_copies() {
    let f = Fixture::new("iso_dlx_gone", false).await;
    f.bind("Order.ok").await;
    let dlx = "dlx_iso_dlx_gone";
    let dlq = "dlq_iso_dlx_gone";
    let conn = crate::support::amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.queue_delete(dlq.into(), Default::default()).await;
    let _ = ch.exchange_delete(dlx.into(), Default::default()).await;
    let line = format!("dead_letter_exchange = \"{dlx}\"");
    let mut relay = f.spawn(&[("amqp", &line)]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    // Declared at start-up; now it disappears under the relay.
    ch.exchange_delete(dlx.into(), Default::default())
        .await
        .unwrap();
    f.db.batch_execute(&format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('doomed', 'Order', 'd', 'nowhere', '{{}}', 0)",
        f.table
    ))
    .await
    .unwrap();
    relay
        .wait_log("dead-letter publish failed; retrying", T)
        .await;
    let rest = others(&f, "while-dlx-gone").await;
    f.consumer().wait_ids(&rest, T).await;
    let m = http_get(&addr, "/metrics").await.1;
    assert_eq!(
        metric_value(&m, "outbox_relay_reconnects_total{peer=\"amqp\"}"),
        Some(0.0),
        "only the dead-letter channel closed: {m}"
    );
    // The exchange comes back: the copy gets through.
    crate::support::declare_bound_queue(&ch, dlx, dlq, true).await;
    wait_for(T, "the dead-letter copy arrives", || async {
        ch.basic_get(dlq.into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some_and(|m| {
                m.properties.message_id().as_ref().map(|s| s.as_str()) == Some("doomed")
            })
    })
    .await;
    wait_for(T, "the dead message is recorded", || async {
        f.parked().await.first().is_some_and(|p| p.1 == "dead")
    })
    .await;
    assert!(relay.terminate(T).await.success());
    let _ = ch.queue_delete(dlq.into(), Default::default()).await;
    let _ = ch.exchange_delete(dlx.into(), Default::default()).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_confirm_times_out_into_retry_state() {
    let f = Fixture::new("iso_timeout", true).await;
    // The relay talks to the broker through a proxy that can stall: frames are
    // accepted, nothing is answered, no connection.blocked either.
    let proxy = StallingProxy::start("127.0.0.1:5672").await;
    let url = format!("url = \"{}\"", proxy.amqp_url());
    let mut relay = f.spawn(&[("amqp", &url), ("retry", "publish_timeout = \"1s\"")]);
    relay.wait_streaming().await;
    proxy.stall(true);
    f.insert_batch(&[("timed-out".into(), "t".into(), "e".into())])
        .await;
    let end = f.current_lsn().await;
    f.wait_head_failed_with("no confirm within retry.publish_timeout")
        .await;
    f.wait_slot_past(end, "slot past the timed-out message")
        .await;
    proxy.stall(false);
    f.consumer().wait_ids(&["timed-out".into()], T).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
