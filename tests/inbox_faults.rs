//! Fault tests of `outbox-relay inbox` that disturb shared services (closing
//! every broker connection) or kill the receiver: serially, under the exclusive
//! services lock (`--test-threads=1`, see scripts/test.sh).

mod support;

use std::process::Command;
use std::time::Duration;
use support::inbox::{HoldingProxy, InboxFixture, Msg};
use support::{scrape_metric as metric, wait_for, Relay, AMQP_URL};

const T: Duration = Duration::from_secs(60);

fn sh(cmd: &str) {
    let status = Command::new("bash").args(["-c", cmd]).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

fn flood(prefix: &str, n: usize) -> Vec<Msg> {
    (0..n)
        .map(|i| Msg::event_forge(&format!("{prefix}-{i}")))
        .collect()
}

/// (ready, unacked) messages of `queue`, as the broker counts them.
fn queue_depths(queue: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&queue)).then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
        .unwrap_or((0, 0))
}

/// The receiver's core promise: nothing is acked before its row committed. With
/// the inbox table locked no insert can commit, so the broker must hold every
/// delivery unacked for as long as that lasts; kill -9 then, and the next
/// receiver records each message once, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_no_delivery_is_acked_before_its_row_commits() {
    let f = InboxFixture::new("f_no_early_ack").await;
    let mut r = f.start(&[]).await;
    let mut locker = support::pg().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!("lock table {} in exclusive mode", f.table))
        .await
        .unwrap();
    f.publish(&flood("inb-no-early-ack", 200)).await;
    wait_for(T, "every delivery at the receiver, unacked", || async {
        queue_depths(&f.queue) == (0, 200)
    })
    .await;
    support::holds_for(
        Duration::from_secs(3),
        "nothing acked while nothing can commit",
        || async { queue_depths(&f.queue) == (0, 200) },
    )
    .await;
    r.kill9();
    lock.rollback().await.unwrap();
    wait_for(T, "the deliveries back in the queue", || async {
        queue_depths(&f.queue) == (200, 0)
    })
    .await;
    assert_eq!(f.count().await, 0);
    let mut r = f.start(&[]).await;
    f.wait_count(200, T).await;
    assert_eq!(f.distinct().await, 200);
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(queue_depths(&f.queue), (0, 0));
    f.cleanup().await;
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
    let distinct = f.distinct().await;
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

/// The whole chain under load and crashes: a producer transaction writes a
/// business row and its outbox row (`enqueue_into`); the relay publishes it; the
/// inbox receiver records it; a Processor handler writes a side-effect row in the
/// transaction that marks it processed. The relay is killed (-9) three times, the
/// receiver three times, a processor is dropped mid-handler (its session dies
/// with its open transaction, as in a crash), and every broker connection is
/// closed once. At the end: one side effect per business row, none missing, none
/// doubled, and each aggregate's effects in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_chain_effects_once_under_crashes() {
    const N: usize = 1500;
    const AGGS: usize = 10;
    let relay_fx = support::Fixture::bare("inb_chain").await;
    let outbox = outbox_relay::pg::TableName::parse(&relay_fx.table).unwrap();
    relay_fx
        .db
        .batch_execute(&outbox_relay::pg::catalog::outbox_ddl(&outbox))
        .await
        .unwrap();
    let f = InboxFixture::new("chain").await;
    let orders = "public.inb_chain_orders";
    let effects = "public.inb_chain_effects";
    f.db.batch_execute(&format!(
        "drop table if exists {orders}; drop table if exists {effects};
         create table {orders} (id text primary key, agg text not null, n int not null);
         create table {effects} (seq bigserial primary key, order_id text not null, agg text not null, n int not null);"
    ))
    .await
    .unwrap();
    let inbox_config = f.config(&[
        &format!("bind_exchange = \"{}\"", relay_fx.exchange),
        "bind_keys = [\"#\"]",
    ]);
    let mut receiver = f.spawn(&inbox_config);
    receiver.wait_log("inbox consuming", T).await;
    let mut relay = relay_fx.spawn(&[]);
    relay.wait_streaming().await;

    // The producer: one order and its event per transaction.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut db = support::pg().await;
            for i in 0..N {
                let (id, agg) = (format!("order-{i:05}"), format!("agg-{}", i % AGGS));
                let tx = db.transaction().await.unwrap();
                tx.execute(
                    &format!("insert into {orders} (id, agg, n) values ($1, $2, $3)"),
                    &[&id, &agg, &(i as i32)],
                )
                .await
                .unwrap();
                outbox_relay::outbox::enqueue_into(
                    &tx,
                    &outbox,
                    outbox_relay::outbox::NewEvent {
                        id: Some(id.clone()),
                        aggregate_type: "Order".into(),
                        aggregate_id: agg.clone(),
                        event_type: "order.placed".into(),
                        payload: serde_json::json!({"orderId": id, "agg": agg, "n": i}),
                        metadata: None,
                        max_retries: None,
                    },
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };

    // The processor: its own process (examples/inbox_worker.rs), ordering by
    // aggregate; while `hold` exists its next handler waits with its transaction open.
    let hold = f.dir.join("hold");
    let _ = std::fs::remove_file(&hold);
    let worker_dir = f.dir.join("worker");
    let spawn_worker = || {
        Relay::example(
            "inbox_worker",
            &[
                support::PG_URL,
                &f.table,
                effects,
                &f.channel,
                hold.to_str().unwrap(),
            ],
            &worker_dir,
        )
    };
    let mut worker = spawn_worker();
    worker.wait_log("processing", T).await;

    let effects_count = || async {
        f.db.query_one(&format!("select count(*) from {effects}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    for round in 0..3 {
        wait_for(T, "progress", || async {
            effects_count().await >= ((round + 1) * N / 8) as i64
        })
        .await;
        relay.kill9();
        relay = relay_fx.spawn(&[]);
        receiver.kill9();
        receiver = f.spawn(&inbox_config);
        if round == 1 {
            // A processor is killed (-9) in the middle of a handler: its effect row is
            // written and its transaction open, so both die with its session.
            std::fs::write(&hold, b"").unwrap();
            worker.wait_log("mid-handler", T).await;
            let open: i64 = f
                .db
                .query_one(
                    &format!(
                        "select count(*) from pg_locks l join pg_class c on c.oid = l.relation \
                         where c.oid = '{effects}'::regclass and l.mode = 'RowExclusiveLock' and l.granted"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(open, 1, "a handler's uncommitted effect");
            worker.kill9();
            std::fs::remove_file(&hold).unwrap();
            worker = spawn_worker();
        }
        if round == 2 {
            receiver.wait_log("inbox consuming", T).await;
            relay.wait_streaming().await;
            sh("rabbitmqctl -q close_all_connections 'inbox chain test'");
        }
    }
    producer.await.unwrap();
    wait_for(Duration::from_secs(300), "every order's effect", || async {
        effects_count().await >= N as i64
    })
    .await;
    // Nothing more arrives late (a doubled effect would show up now).
    support::holds_for(Duration::from_secs(3), "no doubled effect", || async {
        effects_count().await == N as i64
    })
    .await;
    let missing: i64 = f
        .db
        .query_one(
            &format!(
                "select count(*) from {orders} o where not exists (select 1 from {effects} e where e.order_id = o.id)"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 0);
    for a in 0..AGGS {
        let ns: Vec<i32> =
            f.db.query(
                &format!("select n from {effects} where agg = $1 order by seq"),
                &[&format!("agg-{a}")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "agg-{a} effects in commit order");
    }
    worker.kill9();
    assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
    assert!(
        receiver.terminate(T).await.success(),
        "{}",
        receiver.log_text()
    );
    f.db.batch_execute(&format!("drop table {orders}; drop table {effects}"))
        .await
        .unwrap();
    relay_fx.cleanup().await;
    f.cleanup().await;
}
