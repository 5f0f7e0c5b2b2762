//! Fault tests of `outbox-relay inbox` that disturb shared services (closing
//! every broker connection) or kill the receiver: serially, under the exclusive
//! services lock (`--test-threads=1`, see scripts/test.sh).

mod support;

use std::process::Command;
use std::time::Duration;
use support::inbox::{HoldingProxy, InboxFixture, Msg};
use support::{http_get, metric_value, wait_for, AMQP_URL};

const T: Duration = Duration::from_secs(60);

fn sh(cmd: &str) {
    let status = Command::new("bash").args(["-c", cmd]).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

async fn metric(addr: &str, name: &str) -> f64 {
    metric_value(&http_get(addr, "/metrics").await.1, name).unwrap_or(-1.0)
}

fn flood(prefix: &str, n: usize) -> Vec<Msg> {
    (0..n)
        .map(|i| Msg::event_forge(&format!("{prefix}-{i}")))
        .collect()
}

/// kill -9 after the rows committed and before the acks reached the broker: the
/// broker redelivers everything, the receiver acks it as counted duplicates, and
/// nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_kill9_between_insert_and_ack_redelivers_as_duplicates() {
    let f = InboxFixture::new("f_kill_ack").await;
    let proxy = HoldingProxy::start("127.0.0.1:5672").await;
    let mut r = f.spawn(&f.config_with(&[], &proxy.amqp_url()));
    r.wait_log("inbox consuming", T).await;
    // From now on nothing the receiver sends reaches the broker: its acks are held.
    proxy.hold(true);
    f.publish(&flood("inb-kill-ack", 300)).await;
    f.wait_count(300, T).await;
    r.kill9();
    proxy.cut();
    drop(proxy);
    // The broker requeues the unacked deliveries once it sees the connection gone.
    wait_for(T, "the deliveries back in the queue", || async {
        f.ready(&f.queue).await == 300
    })
    .await;
    let mut r = f.spawn(&f.config_with(&[], AMQP_URL));
    let addr = r.metrics_addr().await;
    wait_for(T, "every redelivery counted as a duplicate", || async {
        metric(&addr, "outbox_relay_inbox_duplicates_total").await == 300.0
    })
    .await;
    assert_eq!(
        metric(&addr, "outbox_relay_inbox_received_total").await,
        0.0
    );
    assert_eq!(f.count().await, 300, "nothing stored twice");
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0, "all acked this time");
    f.cleanup().await;
}

/// The broker closes every connection twice mid-stream: the receiver reconnects
/// with backoff and records everything, each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_broker_closing_connections_loses_nothing() {
    let f = InboxFixture::new("f_amqp_close").await;
    let all = flood("inb-close", 5000);
    // Declared by a first receiver, filled while it is stopped.
    let mut r = f.start(&[]).await;
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.publish(&all).await;
    let mut r = f.spawn(&f.config(&["prefetch = 50", "batch_size = 10"]));
    let addr = r.metrics_addr().await;
    wait_for(T, "some recorded", || async { f.count().await >= 1000 }).await;
    sh("rabbitmqctl -q close_all_connections 'inbox fault test'");
    r.wait_log("reconnecting", T).await;
    wait_for(T, "more recorded after the reconnect", || async {
        f.count().await >= 3000
    })
    .await;
    sh("rabbitmqctl -q close_all_connections 'inbox fault test again'");
    f.wait_count(5000, Duration::from_secs(180)).await;
    wait_for(T, "every delivery settled", || async {
        metric(&addr, "outbox_relay_inbox_received_total").await == 5000.0
    })
    .await;
    wait_for(T, "both closes noticed and recovered from", || async {
        metric(&addr, "outbox_relay_reconnects_total{peer=\"amqp\"}").await >= 2.0
    })
    .await;
    let distinct: i64 =
        f.db.query_one(
            &format!("select count(distinct message_id) from {}", f.table),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 5000);
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0);
    f.cleanup().await;
}

/// Postgres drops the receiver's session mid-stream (as in a restart, without
/// restarting the shared server): the store keeps its batch, reconnects with
/// backoff and records everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_a_lost_postgres_session_reconnects_and_loses_nothing() {
    let f = InboxFixture::new("f_pg_lost").await;
    let all = flood("inb-pg-lost", 3000);
    let mut r = f.start(&[]).await;
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.publish(&all).await;
    let mut r = f.spawn(&f.config(&["prefetch = 50", "batch_size = 10"]));
    let addr = r.metrics_addr().await;
    wait_for(T, "some recorded", || async { f.count().await >= 500 }).await;
    // Only the receiver's store session carries this name (its start-up check
    // session is closed by now).
    let killed: i64 =
        f.db.query_one(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name = 'outbox-relay inbox') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // More work after the loss, so the store meets it for certain.
    f.publish(&flood("inb-pg-lost-b", 1000)).await;
    f.wait_count(4000, Duration::from_secs(180)).await;
    wait_for(T, "the reconnect counted", || async {
        metric(&addr, "outbox_relay_reconnects_total{peer=\"postgres\"}").await >= 1.0
    })
    .await;
    assert!(r.log_text().contains("retrying it"), "{}", r.log_text());
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0);
    f.cleanup().await;
}
