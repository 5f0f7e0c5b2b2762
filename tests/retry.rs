//! Durable retry state: failures parked in Postgres, retried with backoff,
//! dead-lettered, delayed messages, per-aggregate order under failure.

use crate::support::{holds_for, ids, wait_for, Fixture, Relay};
use std::process::Command;
use std::time::{Duration, SystemTime};

const T: Duration = Duration::from_secs(60);

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_parked_and_delivered_once_the_cause_is_removed() {
    let f = Fixture::new("retry_nack", true).await;
    // A full queue that rejects publishes: the broker nacks.
    let policy = "outbox_relay_test_retry_nack";
    rabbitmqctl(&[
        "set_policy",
        policy,
        "^q_retry_nack$",
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    f.insert_batch(&[("nacked-1".into(), "n".into(), "e".into())])
        .await;
    f.wait_head_failed_with("nacked").await;
    // The Event-Forge row shows it too (the status mirror runs off the park path).
    wait_for(T, "row shows the failure", || async {
        f.row_state("nacked-1").await.0 == "failed"
    })
    .await;
    rabbitmqctl(&["clear_policy", policy]);
    f.consumer().wait_ids(&["nacked-1".into()], T).await;
    f.wait_retry_drained().await;
    wait_for(T, "row marked published", || async {
        f.row_state("nacked-1").await.0 == "published"
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_parked_and_delivered_after_the_limit_is_raised() {
    let f = Fixture::new("retry_size", true).await;
    let mut relay = f.spawn(&[("amqp", "max_message_bytes = 2000")]);
    relay.wait_streaming().await;
    let big = "x".repeat(5000);
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('big-1', 'Order', 'b', 'e', '{{\"blob\": \"{big}\"}}'); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('small-1', 'Order', 's', 'e', '{{}}')",
            t = f.table
        ))
        .await
        .unwrap();
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&["small-1".into()], T).await;
    f.wait_head_failed_with("exceeds amqp.max_message_bytes")
        .await;
    f.wait_slot_past(end, "slot past the oversized message")
        .await;
    assert!(relay.terminate(T).await.success());
    // The cause removed: a larger limit. The restarted relay finds the parked message itself.
    let mut relay = f.spawn(&[("amqp", "max_message_bytes = 100000")]);
    relay.wait_streaming().await;
    f.consumer().wait_ids(&["big-1".into()], T).await;
    let got = f.consumer().all();
    let big_msg = got.iter().find(|r| r.message_id() == "big-1").unwrap();
    assert_eq!(
        big_msg.json()["payload"]["blob"].as_str().unwrap().len(),
        5000
    );
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_row_is_parked_and_delivered_once_fixed_debezium_style() {
    let f = Fixture::bare("retry_malformed").await;
    // A Debezium-style outbox: no Event-Forge columns; retry state lives in the relay's table.
    f.db
        .batch_execute(&format!(
            "create table {} (id uuid primary key, aggregatetype text not null, aggregateid text not null, type text not null, payload text)",
            f.table
        ))
        .await
        .unwrap();
    let f = f.with_consumer(true).await;
    let mut relay = f.spawn(&[
        ("postgres", "mapping = \"debezium\""),
        ("postgres", "on_success = \"delete\""),
    ]);
    relay.wait_streaming().await;
    let bad = "00000000-0000-4000-8000-00000000000b";
    let good = "00000000-0000-4000-8000-00000000000a";
    let after = "00000000-0000-4000-8000-00000000000c";
    let t = &f.table;
    f.db.batch_execute(&format!(
        "insert into {t} values ('{good}', 'Invoice', 'i-1', 'invoice.created', '{{\"n\": 1}}'); \
             insert into {t} values ('{bad}', 'Invoice', 'i-2', 'invoice.created', 'not json'); \
             insert into {t} values ('{after}', 'Invoice', 'i-2', 'invoice.paid', '{{\"n\": 3}}');"
    ))
    .await
    .unwrap();
    f.consumer().wait_ids(&[good.into()], T).await;
    wait_for(
        T,
        "malformed row parked with its reason, the next one behind it",
        || async {
            let p = f.parked().await;
            p.len() == 2
                && p[0].0 == bad
                && p[0]
                    .3
                    .as_deref()
                    .unwrap_or("")
                    .contains("payload is not valid JSON")
                && p[1].0 == after
        },
    )
    .await;
    assert!(
        !f.consumer().ids().contains(after),
        "a later message of the aggregate overtook the malformed one"
    );
    // The operator fixes the row; the next retry reads it again.
    f.db.execute(
        &format!("update {t} set payload = '{{\"n\": 2}}' where id = $1::text::uuid"),
        &[&bad],
    )
    .await
    .unwrap();
    f.consumer().wait_ids(&[bad.into(), after.into()], T).await;
    assert_in_order_by_payload(&f, &[bad, after]);
    let msg = f
        .consumer()
        .all()
        .into_iter()
        .find(|r| r.message_id() == bad)
        .unwrap();
    assert_eq!(msg.routing_key, "Invoice.invoice.created");
    assert_eq!(msg.json()["payload"], serde_json::json!({"n": 2}));
    // on_success = "delete": delivered rows leave the outbox table.
    wait_for(T, "delivered rows deleted", || async {
        f.db.query_one(&format!("select count(*) from {t}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

fn assert_in_order_by_payload(f: &Fixture, order: &[&str]) {
    let got: Vec<String> = f.consumer().all().iter().map(|r| r.message_id()).collect();
    let pos: Vec<usize> = order
        .iter()
        .map(|id| got.iter().position(|g| g == id).unwrap())
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "arrival order {got:?}, expected {order:?} in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_the_dead_letter_exchange_and_requeue_revives_them() {
    let f = Fixture::new("retry_dead", false).await;
    f.bind("Order.ok").await;
    // The dead-letter exchange and a queue on it.
    let dlx = "dlx_retry_dead";
    let dlq = "dlq_retry_dead";
    let conn = crate::support::amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.queue_delete(dlq.into(), Default::default()).await;
    crate::support::declare_bound_queue(&ch, dlx, dlq, true).await;

    let dlx_line = format!("dead_letter_exchange = \"{dlx}\"");
    let mut relay = f.spawn(&[("amqp", &dlx_line), ("retry", "on_dead = \"skip\"")]);
    relay.wait_streaming().await;
    let t = &f.table;
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('doomed', 'Order', 'd', 'lost', '{{\"v\": 1}}', 1); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('behind', 'Order', 'd', 'ok', '{{}}')"
        ))
        .await
        .unwrap();
    // Two attempts (the first and one retry, max_retries = 1 on the row), then dead-lettered.
    let got = wait_dead_letter(&ch, dlq).await;
    let headers = got.properties.headers().clone().unwrap();
    let h = |k: &str| match headers.inner().get(k).expect(k) {
        lapin::types::AMQPValue::LongString(s) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => format!("{other:?}"),
    };
    assert!(h("x-outbox-error").contains("unroutable"), "{headers:?}");
    assert!(h("x-outbox-attempts").contains('2'), "{headers:?}");
    assert!(
        h("x-outbox-original-exchange").contains("ex_retry_dead"),
        "{headers:?}"
    );
    assert!(
        h("x-outbox-original-routing-key").contains("Order.lost"),
        "{headers:?}"
    );
    assert_eq!(
        got.properties.message_id().as_ref().unwrap().as_str(),
        "doomed"
    );
    // on_dead = skip: the message behind it is released.
    f.consumer().wait_ids(&["behind".into()], T).await;
    wait_for(T, "row permanently failed", || async {
        f.row_state("doomed").await.0 == "permanently_failed"
    })
    .await;
    let (code, out) = Relay::run_to_end(&["dead", "list", "--json"], &f.config(&[]), &f.dir).await;
    assert_eq!(code, 0, "{out}");
    let json_start = out.find('[').unwrap();
    let list: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    assert_eq!(list[0]["id"], "doomed");
    assert_eq!(list[0]["attempts"], 2);
    assert!(list[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("unroutable"));
    // Requeue after fixing the cause: delivered with a fresh budget.
    f.bind("Order.lost").await;
    let (code, out) = Relay::run_to_end(
        &["dead", "requeue", "--id", "doomed"],
        &f.config(&[]),
        &f.dir,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requeued 1 message"), "{out}");
    f.consumer().wait_ids(&["doomed".into()], T).await;
    let (code, out) =
        Relay::run_to_end(&["dead", "requeue", "--id", "nope"], &f.config(&[]), &f.dir).await;
    assert_ne!(code, 0);
    assert!(out.contains("not dead in slot s_retry_dead: nope"), "{out}");
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    let _ = ch.queue_delete(dlq.into(), Default::default()).await;
    let _ = ch.exchange_delete(dlx.into(), Default::default()).await;
    f.cleanup().await;
}

/// `dead requeue --all` pages by aggregate, then seq: more than two pages of dead messages all
/// come back, once each, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_all_pages_through_every_dead_message() {
    let f = Fixture::new("retry_requeue_pages", false).await;
    let mut relay = f.spawn(&[("retry", "on_dead = \"skip\"")]);
    relay.wait_streaming().await;
    // 2 500 unroutable messages over 50 aggregates, five transactions; the rows'
    // `max_retries = 0` kills each after its one attempt.
    let ids: Vec<String> = (0..2500).map(|i| format!("rq-{i:04}")).collect();
    for c in 0..5 {
        f.db.batch_execute(&format!(
            "insert into {} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) \
             select 'rq-' || lpad(i::text, 4, '0'), 'Order', 'a' || (i % 50), 'lost', '{{}}', 0 \
             from generate_series({}, {}) i order by i",
            f.table,
            c * 500,
            c * 500 + 499
        ))
        .await
        .unwrap();
    }
    wait_for(T, "2 500 dead", || async {
        f.parked().await.iter().filter(|p| p.1 == "dead").count() == 2500
    })
    .await;
    f.bind("Order.lost").await;
    let (code, out) =
        Relay::run_to_end(&["dead", "requeue", "--all"], &f.config(&[]), &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requeued 2500 message(s)"), "{out}");
    f.consumer().wait_ids(&ids, T).await;
    let got: Vec<String> = f
        .consumer()
        .all()
        .iter()
        .map(|r| r.message_id())
        .filter(|id| id.starts_with("rq-"))
        .collect();
    assert_eq!(got.len(), 2500, "each requeued message delivered once");
    for a in 0..50 {
        let mine: Vec<&String> = got
            .iter()
            .filter(|id| id[3..].parse::<usize>().unwrap() % 50 == a)
            .collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted, "aggregate a{a} in order");
    }
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

async fn wait_dead_letter(ch: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(m) = ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing dead-lettered within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_dead_block_holds_the_aggregate_until_requeued() {
    let f = Fixture::new("retry_block", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[("retry", "on_dead = \"block\"")]);
    relay.wait_streaming().await;
    let t = &f.table;
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) values ('blocker', 'Order', 'k', 'lost', '{{}}', 0); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('held', 'Order', 'k', 'ok', '{{}}'); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('free', 'Order', 'other', 'ok', '{{}}')"
        ))
        .await
        .unwrap();
    f.consumer().wait_ids(&["free".into()], T).await;
    wait_for(T, "blocker dead", || async {
        f.parked().await.first().is_some_and(|p| p.1 == "dead")
    })
    .await;
    holds_for(
        Duration::from_secs(2),
        "the aggregate stays blocked",
        || async { !f.consumer().ids().contains("held") },
    )
    .await;
    f.bind("Order.lost").await;
    let (code, out) =
        Relay::run_to_end(&["dead", "requeue", "--all"], &f.config(&[]), &f.dir).await;
    assert_eq!(code, 0, "{out}");
    f.consumer()
        .wait_ids(&["blocker".into(), "held".into()], T)
        .await;
    assert_in_order_by_payload(&f, &["blocker", "held"]);
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_arrive_after_their_time_in_aggregate_order() {
    let f = Fixture::new("retry_delay", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let t = &f.table;
    let row = f
        .db
        .query_one(
            &format!(
                "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, scheduled_at) \
                 values ('later', 'Order', 'dl', 'e', '{{}}', now() + interval '2 seconds') \
                 returning extract(epoch from scheduled_at)::float8"
            ),
            &[],
        )
        .await
        .unwrap();
    let scheduled: f64 = row.get(0);
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('after-later', 'Order', 'dl', 'e', '{{}}'); \
             insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('unrelated', 'Order', 'x', 'e', '{{}}')"
        ))
        .await
        .unwrap();
    f.consumer().wait_ids(&["unrelated".into()], T).await;
    f.consumer()
        .wait_ids(&["later".into(), "after-later".into()], T)
        .await;
    let all = f.consumer().all();
    let at = |id: &str| {
        all.iter()
            .find(|r| r.message_id() == id)
            .unwrap()
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert!(
        at("later") >= scheduled,
        "delayed message arrived {}s early",
        scheduled - at("later")
    );
    assert!(
        at("unrelated") < scheduled,
        "other aggregates are not delayed"
    );
    assert_in_order_by_payload(&f, &["later", "after-later"]);
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_retry_state_and_republish_loses_nothing() {
    let f = Fixture::new("retry_kill9", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[
        ("retry", "backoff_base = \"1s\""),
        ("retry", "backoff_max = \"2s\""),
    ]);
    relay.wait_streaming().await;
    let mut rows = Vec::new();
    for i in 0..50 {
        let ev = if i % 10 == 3 { "parked" } else { "ok" };
        rows.push((format!("k9r-{i}"), format!("agg-{}", i % 5), ev.to_string()));
    }
    f.insert_batch(&rows).await;
    let end = f.current_lsn().await;
    wait_for(T, "failures parked and the slot past them", || async {
        f.confirmed_lsn().await >= end && !f.parked().await.is_empty()
    })
    .await;
    relay.kill9();
    // The cause goes away while no relay runs; the next one finds the parked messages.
    f.bind("Order.parked").await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&all, T).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_with_nothing_failed_queries_nothing() {
    let f = Fixture::new("retry_idle", true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let expected = f.insert_each("idle", 20).await;
    f.consumer().wait_ids(&expected, T).await;
    wait_for(T, "rows marked published", || async {
        f.row_state("idle-19").await.0 == "published"
    })
    .await;
    let stats = || async {
        f.db.batch_execute("select pg_stat_clear_snapshot()")
            .await
            .unwrap();
        let scans: i64 = f
            .db
            .query_one(
                "select coalesce(sum(seq_scan + coalesce(idx_scan, 0) + n_tup_upd + n_tup_del), 0)::bigint from pg_stat_user_tables \
                 where relname = any($1)",
                &[&vec![f.table.trim_start_matches("public.").to_string(), f.retry_table.trim_start_matches("public.").to_string()]],
            )
            .await
            .unwrap()
            .get(0);
        let last_query: Option<String> =
            f.db.query_opt(
                "select state_change::text from pg_stat_activity where application_name = $1",
                &[&outbox_relay::retry::store_application_name(&f.slot)],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0));
        (scans, last_query)
    };
    // Let the on_success batch and its statistics settle (backends report at most
    // once a second), then watch for 3 s: nothing may move.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut before = stats().await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = stats().await;
        if now == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never settled"
        );
        before = now;
    }
    assert!(
        before.1.is_some(),
        "the retry store's session is visible in pg_stat_activity"
    );
    holds_for(
        Duration::from_secs(3),
        "no scans, no queries while idle",
        || async { stats().await == before },
    )
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_50k_messages_500_aggregates_failures_inside_busy_aggregates() {
    let f = Fixture::new("retry_soak", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[
        ("retry", "backoff_base = \"200ms\""),
        ("retry", "backoff_max = \"1s\""),
    ]);
    relay.wait_streaming().await;
    let n = 50_000usize;
    let all = ids("soak", n);
    // One message in 997 fails at first (routed to Order.flaky, unbound for the first
    // part of the run). 997 and 500 are coprime, so the failures land in the middle of
    // 50 different aggregates whose other messages route fine: those before a failure
    // are delivered, those after it are parked behind it until it gets through.
    let flaky = |i: usize| i % 997 == 13;
    let started = std::time::Instant::now();
    let writer = {
        let table = f.table.clone();
        let all = all.clone();
        tokio::spawn(async move {
            let db = crate::support::pg().await;
            for (c, chunk) in all.chunks(50).enumerate() {
                let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
                for (j, id) in chunk.iter().enumerate() {
                    let i = c * 50 + j;
                    let ev = if flaky(i) { "flaky" } else { "ok" };
                    if j > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!(
                        "('{id}', 'Order', 'agg{}', '{ev}', '{{\"i\": {i}}}')",
                        i % 500
                    ));
                }
                db.batch_execute(&sql).await.unwrap();
            }
        })
    };
    // Watch the retry table while the failures pile up: the failed messages with
    // their reason, and the ones parked behind them (no reason of their own).
    let mut peak = (0usize, 0usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while f.consumer().ids().len() < n / 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "a fifth not delivered within 120 s"
        );
        let parked = f.parked().await;
        let failed = parked.iter().filter(|p| p.3.is_some()).count();
        if parked.len() > peak.0 + peak.1 {
            peak = (failed, parked.len() - failed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        peak.0 >= 1 && peak.1 >= 1,
        "failures inside busy aggregates park what follows them: peak (failed, behind) = {peak:?}"
    );
    f.bind("Order.flaky").await;
    writer.await.unwrap();
    f.consumer().wait_ids(&all, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    // Per-aggregate order, with ids soak-{i} and aggregates agg{i % 500}, counting
    // every delivery (a redelivery of an earlier message after a later one fails).
    let mut last: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let received = f.consumer().all();
    for r in &received {
        let i: usize = r.message_id().trim_start_matches("soak-").parse().unwrap();
        if let Some(prev) = last.insert(i % 500, i) {
            assert!(
                i >= prev,
                "aggregate agg{}: {i} delivered after {prev}",
                i % 500
            );
        }
    }
    wait_for(T, "nothing left pending", || async {
        f.parked().await.is_empty()
    })
    .await;
    wait_for(T, "every row marked published", || async {
        f.db.query_one(
            &format!(
                "select count(*) from {} where status <> 'published'",
                f.table
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 0
    })
    .await;
    println!(
        "soak: {n} messages, 500 aggregates, {} failing at first; peak parked {} failed + {} behind; {} deliveries ({} duplicates); {:.1} s, {:.0} msg/s",
        (0..n).filter(|i| flaky(*i)).count(),
        peak.0,
        peak.1,
        received.len(),
        received.len() - n,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_matched_to_their_own_publish_under_pipelining() {
    // lapin hands a returned message to whichever confirm it resolves next; with
    // multiple-acks that is often another publish. Every 10th message is unroutable,
    // each in its own aggregate, in large transactions: exactly those must be parked.
    let f = Fixture::new("retry_returns", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let rows: Vec<(String, String, String)> = (0..20_000)
        .map(|i| {
            let ev = if i % 10 == 4 { "nowhere" } else { "ok" };
            (format!("ret-{i}"), format!("agg-{i}"), ev.to_string())
        })
        .collect();
    for chunk in rows.chunks(2000) {
        f.insert_batch(chunk).await;
    }
    let routable: Vec<String> = rows
        .iter()
        .filter(|r| r.2 == "ok")
        .map(|r| r.0.clone())
        .collect();
    let unroutable: std::collections::BTreeSet<String> = rows
        .iter()
        .filter(|r| r.2 != "ok")
        .map(|r| r.0.clone())
        .collect();
    f.consumer().wait_ids(&routable, T).await;
    wait_for(T, "every unroutable message parked", || async {
        f.parked().await.len() >= unroutable.len()
    })
    .await;
    let parked: std::collections::BTreeSet<String> =
        f.parked().await.into_iter().map(|p| p.0).collect();
    assert_eq!(
        parked, unroutable,
        "parked set differs from the unroutable set"
    );
    assert!(f
        .consumer()
        .ids()
        .is_disjoint(&unroutable.iter().cloned().collect()));
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_past_retention_are_deleted_in_the_background() {
    let f = Fixture::new("retry_retention", true).await;
    let mut relay = f.spawn(&[("postgres", "retention = \"2s\"")]);
    relay.wait_streaming().await;
    let expected = f.insert_each("ret", 30).await;
    f.consumer().wait_ids(&expected, T).await;
    let db = &f.db;
    let table = f.table.clone();
    let count = |status: &'static str| {
        let table = table.clone();
        async move {
            db.query_one(
                &format!("select count(*) from {table} where status = $1"),
                &[&status],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    wait_for(T, "rows marked published", || async {
        count("published").await == 30
    })
    .await;
    let marked = std::time::Instant::now();
    wait_for(T, "published rows deleted after the retention", || async {
        count("published").await == 0
    })
    .await;
    assert!(
        marked.elapsed() >= Duration::from_millis(1500),
        "deleted before the retention passed"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_retries_are_counted_durably_and_a_restart_continues_the_count() {
    let f = Fixture::new("retry_count", false).await;
    f.bind("Order.ok").await;
    let extra = [
        ("retry", "backoff_base = \"100ms\""),
        ("retry", "backoff_max = \"200ms\""),
    ];
    let mut relay = f.spawn(&extra);
    relay.wait_streaming().await;
    let t = &f.table;
    // 200 aggregates, each with a message no queue takes, in one transaction: their
    // retries fail at the same pace, so the store records them together.
    let lost: Vec<String> = (0..200).map(|i| format!("lost-{i}")).collect();
    f.db.batch_execute(&format!(
        "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) \
             select 'lost-' || g, 'Order', 'c' || g, 'lost', '{{}}' from generate_series(0, 199) g"
    ))
    .await
    .unwrap();
    let r = &f.retry_table;
    let attempts = || async {
        let row = f
            .db
            .query_one(
                &format!(
                    "select count(*)::int, coalesce(min(attempts), 0), coalesce(max(attempts), 0), \
                     bool_and(error_message like '%unroutable%'), bool_and(scheduled_at > parked_at) from {r}"
                ),
                &[],
            )
            .await
            .unwrap();
        let (n, min, max): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
        let (reason, scheduled): (Option<bool>, Option<bool>) = (row.get(3), row.get(4));
        (n, min, max, reason == Some(true) && scheduled == Some(true))
    };
    // Every failed retry is written: count, reason and the next due time.
    wait_for(T, "each message's failed retries recorded", || async {
        let (n, min, _, recorded) = attempts().await;
        n == 200 && min >= 4 && recorded
    })
    .await;
    assert!(relay.terminate(T).await.success());
    let (_, _, max_before, _) = attempts().await;
    // A new process continues each message's count from the table.
    let mut relay = f.spawn(&extra);
    relay.wait_streaming().await;
    wait_for(
        T,
        "the count goes on past what the first process reached",
        || async { attempts().await.1 > max_before },
    )
    .await;
    f.bind("Order.lost").await;
    f.consumer().wait_ids(&lost, T).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
