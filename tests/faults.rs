//! Fault tests that restart or disturb shared services (RabbitMQ, Postgres).
//! They run serially (`--test-threads=1`, see README) in their own binary.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{ids, wait_for, Fixture};

const T: Duration = Duration::from_secs(60);

fn sh(cmd: &str) {
    let status = Command::new("bash").args(["-c", cmd]).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

fn pg_restart() {
    sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main restart");
}

/// Writes `ids` in transactions of 10 rows from a task of its own, retrying across outages.
fn write_in_background(table: String, all: Vec<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut db = support::pg_retry(T).await;
        for chunk in all.chunks(10) {
            let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
            for (i, id) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "('{id}', 'Order', 'agg-{}', 'streamed', '{{}}')",
                    i % 7
                ));
            }
            sql.push_str(" on conflict (id) do nothing");
            loop {
                match db.batch_execute(&sql).await {
                    Ok(()) => break,
                    Err(_) => db = support::pg_retry(T).await,
                }
            }
        }
    })
}

/// After a broker fault: every id arrived, the slot moved past the last commit and
/// the window holds nothing (unconfirmed messages were not written off as acked).
async fn assert_recovered(f: &Fixture, relay: &mut support::Relay, all: &[String]) {
    f.consumer().wait_ids(all, Duration::from_secs(180)).await;
    // A fresh session: the fixture's own may have died with a Postgres restart.
    let db = support::pg_retry(T).await;
    let lsn = |sql: &'static str| {
        let db = &db;
        let slot = f.slot.clone();
        async move {
            let row = db.query_one(sql, &[&slot]).await.unwrap();
            support::lsn_to_u64(&row.get::<_, String>(0))
        }
    };
    let end = lsn("select pg_current_wal_lsn()::text where $1::text is not null").await;
    wait_for(T, "slot past the last commit after the fault", || async {
        lsn("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1").await
            >= end
    })
    .await;
    support::wait_window_empty(&relay.metrics_addr().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_connections_mid_stream_loses_nothing() {
    let f = Fixture::new("f_amqp_close", true).await;
    let mut relay = f.spawn(&[]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    let all = ids("close", 10_000);
    let writer = write_in_background(f.table.clone(), all.clone());
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 2000
    })
    .await;
    sh("rabbitmqctl -q close_all_connections 'fault test'");
    relay.wait_log("broker connection lost", T).await;
    wait_for(T, "more delivered after reconnect", || async {
        f.consumer().ids().len() >= 6000
    })
    .await;
    sh("rabbitmqctl -q close_all_connections 'fault test again'");
    writer.await.unwrap();
    assert_recovered(&f, &mut relay, &all).await;
    let metrics = support::http_get(&addr, "/metrics").await.1;
    assert!(
        support::metric_value(&metrics, "outbox_relay_reconnects_total{peer=\"amqp\"}").unwrap()
            >= 2.0,
        "both closes were noticed and recovered from: {metrics}"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Publishes the broker never read (it blocks publishers during a memory alarm)
/// die with the connection: they must be published again, not written off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_lost_with_a_closed_connection_are_published_again() {
    let f = Fixture::new("f_amqp_lost", true).await;
    let mut relay = f.spawn(&[]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    let unblock = Unblock;
    sh("rabbitmqctl -q set_vm_memory_high_watermark 0");
    let all = ids("lost", 200);
    let rows: Vec<(String, String, String)> = all
        .iter()
        .map(|id| (id.clone(), id.clone(), "e".to_string()))
        .collect();
    f.insert_batch(&rows).await;
    wait_for(T, "all 200 published and unconfirmed", || async {
        let m = support::http_get(&addr, "/metrics").await.1;
        support::metric_value(&m, "outbox_relay_inflight_messages") == Some(200.0)
    })
    .await;
    assert!(
        f.consumer().ids().is_empty(),
        "the blocked broker routed nothing"
    );
    sh("rabbitmqctl -q close_all_connections 'fault test: frames lost'");
    relay.wait_log("broker connection lost", T).await;
    drop(unblock);
    assert_recovered(&f, &mut relay, &all).await;
    assert!(f.parked().await.is_empty(), "an outage parks nothing");
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let f = Fixture::new("f_amqp_restart", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let all = ids("brestart", 10_000);
    let writer = write_in_background(f.table.clone(), all.clone());
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 2000
    })
    .await;
    sh("rabbitmqctl -q stop_app && rabbitmqctl -q start_app");
    writer.await.unwrap();
    assert_recovered(&f, &mut relay, &all).await;
    // An outage is not a per-message failure: nothing was counted or parked.
    assert!(
        f.parked().await.is_empty(),
        "messages parked during a broker outage"
    );
    assert!(
        !relay.log_text().contains("publish failed"),
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_nothing() {
    let f = Fixture::new("f_pg_restart", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let all = ids("pgrestart", 10_000);
    let writer = write_in_background(f.table.clone(), all.clone());
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 2000
    })
    .await;
    pg_restart();
    relay
        .wait_log("replication stream resumed", Duration::from_secs(90))
        .await;
    writer.await.unwrap();
    assert_recovered(&f, &mut relay, &all).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Restores the broker's memory watermark even when the test panics.
struct Unblock;

impl Drop for Unblock {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "set_vm_memory_high_watermark", "0.4"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_confirm_times_out_into_retry_state() {
    let f = Fixture::new("f_timeout", true).await;
    let mut relay = f.spawn(&[("retry", "publish_timeout = \"1s\"")]);
    relay.wait_streaming().await;
    // A memory alarm blocks publishers: frames are accepted by TCP, confirms never come.
    let unblock = Unblock;
    sh("rabbitmqctl -q set_vm_memory_high_watermark 0");
    f.insert_batch(&[("timed-out".into(), "t".into(), "e".into())])
        .await;
    let end = f.current_lsn().await;
    f.wait_head_failed_with("no confirm within retry.publish_timeout")
        .await;
    f.wait_slot_past(end, "slot past the timed-out message")
        .await;
    drop(unblock);
    f.consumer().wait_ids(&["timed-out".into()], T).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_broker_is_away_and_200_when_it_returns() {
    let f = Fixture::new("f_readyz", true).await;
    let mut relay = f.spawn(&[]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    wait_for(T, "ready", || async {
        support::http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    sh("rabbitmqctl -q stop_app");
    let restart = Restart;
    wait_for(T, "not ready without the broker", || async {
        let (code, body) = support::http_get(&addr, "/readyz").await;
        code == 503 && body.contains("broker")
    })
    .await;
    assert_eq!(
        support::http_get(&addr, "/healthz").await.0,
        200,
        "alive all the same"
    );
    drop(restart);
    wait_for(T, "ready again", || async {
        support::http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    let metrics = support::http_get(&addr, "/metrics").await.1;
    assert!(
        support::metric_value(&metrics, "outbox_relay_reconnects_total{peer=\"amqp\"}").unwrap()
            >= 1.0,
        "{metrics}"
    );
    f.insert_batch(&[("after-outage".into(), "a".into(), "e".into())])
        .await;
    f.consumer().wait_ids(&["after-outage".into()], T).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_counts_a_reconnect() {
    let f = Fixture::new("f_pg_reconnect", true).await;
    let mut relay = f.spawn(&[]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    pg_restart();
    relay
        .wait_log("replication stream resumed", Duration::from_secs(90))
        .await;
    let metrics = support::http_get(&addr, "/metrics").await.1;
    assert!(
        support::metric_value(&metrics, "outbox_relay_reconnects_total{peer=\"postgres\"}")
            .unwrap()
            >= 1.0,
        "{metrics}"
    );
    wait_for(T, "ready again", || async {
        support::http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Starts the broker again even when the test panics.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
    }
}
