//! Fault tests that restart or disturb shared services (RabbitMQ, Postgres).
//! They run serially (`--test-threads=1`, see scripts/test.sh) in their own binary.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{assert_recovered, http_get, ids, wait_for, write_in_background, Fixture, Relay};

const T: Duration = Duration::from_secs(60);

fn sh(cmd: &str) {
    let status = Command::new("bash").args(["-c", cmd]).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

fn pg_restart() {
    sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main restart");
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
    // The broker blocks as soon as the first publishes arrive (and the relay then
    // stops reading WAL): those publishes are on the wire, unconfirmed.
    wait_for(T, "publishes on the wire, unconfirmed", || async {
        let m = support::http_get(&addr, "/metrics").await.1;
        support::metric_value(&m, "outbox_relay_inflight_messages").unwrap_or(0.0) >= 1.0
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

/// A hot standby waiting for the slot waits on through a Postgres outage
/// (down 5 s: longer than the standby's 2 s between asks, so it meets the
/// server down): when the relay that holds the slot afterwards is killed -9,
/// the other one takes over and every id arrives. Before, the standby took
/// "the database system is shutting down" for a refusal at start-up and exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_through_a_postgres_outage_and_takes_over_later() {
    let f = Fixture::new("f_pg_standby", true).await;
    let cfg = f.config(&[("postgres", "standby = true")]);
    let mut relays = [
        Relay::spawn(&cfg, &f.dir, &[]),
        Relay::spawn(&cfg, &f.dir, &[]),
    ];
    let addrs = [
        relays[0].metrics_addr().await,
        relays[1].metrics_addr().await,
    ];
    let ready = |i: usize| {
        let addr = addrs[i].clone();
        async move { http_get(&addr, "/readyz").await.0 == 200 }
    };
    wait_for(T, "one relay streaming", || async {
        ready(0).await || ready(1).await
    })
    .await;
    let first = if ready(0).await { 0 } else { 1 };
    relays[1 - first]
        .wait_log("held by another process", T)
        .await;
    sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main stop");
    tokio::time::sleep(Duration::from_secs(5)).await;
    sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main start");
    wait_for(
        Duration::from_secs(90),
        "a relay streaming again",
        || async { ready(0).await || ready(1).await },
    )
    .await;
    let active = if ready(0).await { 0 } else { 1 };
    let other = 1 - active;
    let all = ids("pgstandby", 4000);
    let writer = write_in_background(f.table.clone(), all.clone());
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 500
    })
    .await;
    relays[active].kill9();
    wait_for(T, "the other relay took over", || ready(other)).await;
    writer.await.unwrap();
    f.consumer().wait_ids(&all, Duration::from_secs(120)).await;
    assert!(relays[other].terminate(T).await.success());
    f.cleanup().await;
}

/// A fast shutdown of Postgres waits for the walsender, and the walsender for
/// its client to confirm everything it sent. When confirming needs the retry
/// store (messages being parked: every other one is delayed here, and the
/// parks wait behind a lock until the shutdown ends the store's session), the
/// relay lets the stream go rather than hold the server up: Postgres restarts
/// within 20 s, every id arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_while_messages_are_being_parked() {
    let mut f = Fixture::new("f_pg_parking", true).await;
    // A small window: messages waiting to be parked fill it, and the relay
    // stops reading WAL, so the walsender cannot finish sending either.
    let mut relay = f.spawn(&[("amqp", "max_in_flight = 50")]);
    relay.wait_streaming().await;
    let all = ids("pgpark", 6000);
    let writer = {
        let (table, all) = (f.table.clone(), all.clone());
        tokio::spawn(async move {
            let mut db = support::pg_retry(T).await;
            for chunk in all.chunks(10) {
                let values: Vec<String> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let at = if i % 2 == 0 {
                            "now() + interval '1 second'"
                        } else {
                            "null"
                        };
                        format!(
                            "('{id}', 'Order', 'agg-{}', 'streamed', '{{}}', {at})",
                            i % 7
                        )
                    })
                    .collect();
                let sql = format!(
                    "insert into {table} (id, aggregate_type, aggregate_id, event_type, payload, scheduled_at) values {} on conflict (id) do nothing",
                    values.join(",")
                );
                while db.batch_execute(&sql).await.is_err() {
                    db = support::pg_retry(T).await;
                }
            }
        })
    };
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 1000
    })
    .await;
    // Parks wait behind a lock when the shutdown comes (the lock goes with it).
    let locker = support::pg().await;
    locker
        .batch_execute(&format!(
            "begin; lock table {} in access exclusive mode",
            f.retry_table
        ))
        .await
        .unwrap();
    wait_for(T, "a park waiting for the lock", || async {
        f.db.query_one(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and application_name like 'outbox-relay retry-store%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    })
    .await;
    let restart = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main restart -- -t 20";
    let restarted = Command::new("bash").args(["-c", restart]).status().unwrap();
    if !restarted.success() {
        let log = relay.log_text();
        relay.kill9();
        // Whatever state the failed restart left: stopped at once, started.
        let _ = Command::new("bash")
            .args(["-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main stop -m immediate"])
            .status();
        sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main start");
        panic!("Postgres did not shut down within 20 s: the relay held its walsender\n{log}");
    }
    relay
        .wait_log("replication stream resumed", Duration::from_secs(90))
        .await;
    writer.await.unwrap();
    assert_recovered(&f, &mut relay, &all).await;
    // The fixture's session died with the restart.
    f.db = support::pg_retry(T).await;
    f.wait_retry_drained().await;
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

/// A broker memory alarm blocks publishers for many publish timeouts: nothing is
/// counted against the messages, nothing is parked, each arrives once, and
/// `/readyz` says why while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_suspends_deadlines_and_counts_nothing() {
    let f = Fixture::new("f_blocked", true).await;
    let mut relay = f.spawn(&[("retry", "publish_timeout = \"1s\"")]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    let unblock = Unblock;
    sh("rabbitmqctl -q set_vm_memory_high_watermark 0");
    let all = ids("blocked", 50);
    let rows: Vec<(String, String, String)> = all
        .iter()
        .map(|id| (id.clone(), id.clone(), "e".to_string()))
        .collect();
    f.insert_batch(&rows).await;
    wait_for(T, "readyz says the broker blocks publishing", || async {
        let (code, body) = support::http_get(&addr, "/readyz").await;
        code == 503 && body.contains("blocks publishing")
    })
    .await;
    // Eight publish timeouts long.
    support::holds_for(
        Duration::from_secs(8),
        "nothing counted, nothing parked",
        || async {
            let m = support::http_get(&addr, "/metrics").await.1;
            let failures: f64 = outbox_relay::metrics::PUBLISH_FAILURE_REASONS
                .iter()
                .map(|r| {
                    support::metric_value(
                        &m,
                        &format!("outbox_relay_publish_failures_total{{reason=\"{r}\"}}"),
                    )
                    .unwrap_or(0.0)
                })
                .sum();
            failures == 0.0 && f.parked().await.is_empty()
        },
    )
    .await;
    assert!(
        f.consumer().ids().is_empty(),
        "the blocked broker routed nothing"
    );
    drop(unblock);
    f.consumer().wait_ids(&all, T).await;
    wait_for(T, "ready again", || async {
        support::http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    // Give late duplicates a moment to show up: there must be none.
    support::wait_window_empty(&addr).await;
    assert_eq!(f.consumer().all().len(), 50, "each message exactly once");
    assert!(f.parked().await.is_empty());
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Restores the broker's max_message_size even when the test panics.
struct MaxMessageSize;

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                "application:set_env(rabbit, max_message_size, 134217728).",
            ])
            .status();
    }
}

/// A message the broker closes the channel for (larger than its max_message_size,
/// which the relay cannot know): the relay publishes the unanswered messages one
/// at a time, finds that one, parks it with the broker's reason, and the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_closes_the_channel_for_is_found_and_parked() {
    let f = Fixture::new("f_refused", true).await;
    let restore = MaxMessageSize;
    sh("rabbitmqctl -q eval 'application:set_env(rabbit, max_message_size, 4096).'");
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
    let addr = relay.metrics_addr().await;
    relay.wait_streaming().await;
    let big = "x".repeat(8000);
    let mut all = Vec::new();
    let mut sql = format!(
        "insert into {} (id, aggregate_type, aggregate_id, event_type, payload) values ",
        f.table
    );
    for i in 0..200 {
        let id = format!("ref-{i}");
        let payload = if i == 57 {
            format!("{{\"blob\": \"{big}\"}}")
        } else {
            "{}".into()
        };
        if i > 0 {
            sql.push(',');
        }
        let agg = if i == 57 {
            "solo".to_string()
        } else {
            format!("a-{}", i % 20)
        };
        sql.push_str(&format!("('{id}', 'Order', '{agg}', 'e', '{payload}')"));
        if i != 57 {
            all.push(id);
        }
    }
    f.db.batch_execute(&sql).await.unwrap();
    f.consumer().wait_ids(&all, T).await;
    f.wait_head_failed_with("closed the channel in answer to this message")
        .await;
    let parked = f.parked().await;
    assert_eq!(parked[0].0, "ref-57", "{parked:?}");
    assert!(
        parked[0].3.as_deref().unwrap_or("").contains("406"),
        "{parked:?}"
    );
    let m = support::http_get(&addr, "/metrics").await.1;
    let reconnects =
        support::metric_value(&m, "outbox_relay_reconnects_total{peer=\"amqp\"}").unwrap();
    assert!(
        (1.0..=3.0).contains(&reconnects),
        "found with a couple of reconnects, not a storm: {reconnects}"
    );
    drop(restore);
    f.consumer().wait_ids(&["ref-57".into()], T).await;
    f.wait_retry_drained().await;
    wait_for(T, "ready again", || async {
        support::http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
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
