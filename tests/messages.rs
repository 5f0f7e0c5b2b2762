//! An outbox without a table (`postgres.source = "messages"`): transactional
//! logical decoding messages written three ways (the client crate's `emit`, the
//! SQL function of sql/outbox_emit.sql, a bare `pg_logical_emit_message`),
//! delivered through three kill -9s with nothing lost and each aggregate in
//! order; rolled-back and non-transactional messages never published; a
//! malformed one parked with its reason.

use crate::support::order::assert_in_order;
use crate::support::{wait_for, Fixture, Relay};
use outbox_relay_client::outbox::{emit, NewEvent};
use std::collections::HashSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const PREFIX: &str = "outbox_msg_src";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_three_kill_9s_and_rollbacks_are_never_published() {
    let f = Fixture::bare("msg_src").await.with_consumer(true).await;
    f.db.batch_execute(include_str!("../sql/outbox_emit.sql"))
        .await
        .unwrap();
    let cfg = f.config(&[
        ("postgres", "source = \"messages\""),
        ("postgres", &format!("message_prefix = \"{PREFIX}\"")),
    ]);
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;

    // 40 aggregates; transactions of 1 to 4 messages; every fifth rolled back.
    const AGGREGATES: usize = 40;
    const TXNS: usize = 900;
    let writer = tokio::spawn(async move {
        let mut db = crate::support::pg().await;
        let mut next = vec![0usize; AGGREGATES];
        let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
        for t in 0..TXNS {
            let rollback = t % 5 == 4;
            let tx = db.transaction().await.unwrap();
            for m in 0..(1 + t % 4) {
                let agg = (t * 7 + m) % AGGREGATES;
                let id = if rollback {
                    format!("rb{t}x{m}-0")
                } else {
                    next[agg] += 1;
                    format!("a{agg}-{}", next[agg] - 1)
                };
                let payload = serde_json::json!({"t": t, "m": m});
                match t % 3 {
                    0 => {
                        let mut e = NewEvent::new("Order", format!("a{agg}"), "placed", payload);
                        e.id = Some(id.clone());
                        e.metadata = Some(serde_json::json!({"by": "emit"}));
                        emit(&tx, PREFIX, e).await.unwrap();
                    }
                    1 => {
                        tx.execute(
                            "select outbox_emit('Order', $1, 'placed', $2::text::json, null, $3, $4)",
                            &[&format!("a{agg}"), &payload.to_string(), &id, &PREFIX],
                        )
                        .await
                        .unwrap();
                    }
                    _ => {
                        let content = serde_json::json!({
                            "id": id, "aggregate_type": "Order", "aggregate_id": format!("a{agg}"),
                            "event_type": "placed", "payload": payload,
                        });
                        tx.execute(
                            "select pg_logical_emit_message(true, $1, $2::text)",
                            &[&PREFIX, &content.to_string()],
                        )
                        .await
                        .unwrap();
                    }
                }
                if rollback {
                    rolled_back.push(id);
                } else {
                    committed.push(id);
                }
            }
            if rollback {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
        // Not an event, and not transactional: parked, and never published.
        db.execute(
            "select pg_logical_emit_message(true, $1, 'not json')",
            &[&PREFIX],
        )
        .await
        .unwrap();
        db.execute(
            "select pg_logical_emit_message(false, $1, $2::text)",
            &[
                &PREFIX,
                &r#"{"id":"nontx-0","aggregate_type":"Order","aggregate_id":"x","event_type":"e","payload":1}"#,
            ],
        )
        .await
        .unwrap();
        (committed, rolled_back)
    });

    for (kill, at_least) in [(1, 150), (2, 700), (3, 1300)] {
        wait_for(
            T,
            &format!("{at_least} messages before kill -9 #{kill}"),
            || async { f.consumer().ids().len() >= at_least },
        )
        .await;
        assert!(
            !writer.is_finished(),
            "kill -9 #{kill} comes while messages are still being written"
        );
        relay.kill9();
        relay = Relay::spawn(&cfg, &f.dir, &[]);
        relay.wait_streaming().await;
    }
    let (committed, rolled_back) = writer.await.unwrap();
    f.consumer()
        .wait_ids(&committed, Duration::from_secs(120))
        .await;
    wait_for(
        T,
        "the malformed message parked with its reason",
        || async {
            f.parked().await.iter().any(|p| {
                p.0.starts_with("lsn:")
                    && p.3.as_deref().unwrap_or("").contains("not a JSON object")
            })
        },
    )
    .await;
    assert!(relay.terminate(T).await.success());

    let received = f.consumer().all();
    let ids: HashSet<String> = received.iter().map(|r| r.message_id()).collect();
    for id in &rolled_back {
        assert!(!ids.contains(id), "rolled-back message {id} was published");
    }
    assert!(
        !ids.contains("nontx-0"),
        "a non-transactional message was published"
    );
    assert_eq!(
        ids.len(),
        committed.len(),
        "exactly the committed messages, nothing else"
    );
    // First deliveries in order per aggregate: after a kill -9 the relay
    // publishes again, in order, what the slot had not confirmed, so a repeat of
    // an earlier message may follow a later one (at least once).
    assert_in_order(&received);
    let first = received.iter().find(|r| r.message_id() == "a0-0").unwrap();
    assert_eq!(first.routing_key, "Order.placed");
    assert_eq!(first.json()["aggregateId"], "a0");
    assert!(first.json()["payload"].is_object());
    assert!(relay.log_text().contains("emitted non-transactionally"));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_fails_is_retried_from_its_own_copy_in_order() {
    let f = Fixture::bare("msg_retry").await.with_consumer(false).await;
    f.bind("Order.placed").await;
    let prefix = "outbox_msg_retry";
    let cfg = f.config(&[
        ("postgres", "source = \"messages\""),
        ("postgres", &format!("message_prefix = \"{prefix}\"")),
        ("retry", "max_retries = 100000"),
    ]);
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let mut db = crate::support::pg().await;
    let tx = db.transaction().await.unwrap();
    for (id, agg, event, payload) in [
        // Nothing is bound to Order.held yet: returned, parked; r0-1 waits behind it.
        (
            "r0-0",
            "r0",
            "held",
            serde_json::json!({"n": 0, "text": "ünïcode \"q\""}),
        ),
        ("r0-1", "r0", "placed", serde_json::json!({"n": 1})),
        ("r1-0", "r1", "placed", serde_json::json!({"n": 2})),
        // A JSON null payload is a payload.
        ("r2-0", "r2", "placed", serde_json::Value::Null),
    ] {
        let mut e = NewEvent::new("Order", agg, event, payload);
        e.id = Some(id.to_string());
        e.metadata = Some(
            serde_json::json!({"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": "00f067aa0ba902b7"}),
        );
        emit(&tx, prefix, e).await.unwrap();
    }
    tx.commit().await.unwrap();
    f.consumer()
        .wait_ids(&["r1-0".into(), "r2-0".into()], T)
        .await;
    wait_for(T, "r0-0 parked as returned, r0-1 behind it", || async {
        let p = f.parked().await;
        p.len() == 2
            && p[0].0 == "r0-0"
            && p[0].3.as_deref().unwrap_or("").contains("NO_ROUTE")
            && p[1].0 == "r0-1"
    })
    .await;
    assert!(!f.consumer().ids().contains("r0-1"), "r0-1 overtook r0-0");
    f.bind("Order.held").await;
    f.consumer()
        .wait_ids(&["r0-0".into(), "r0-1".into()], T)
        .await;
    f.wait_retry_drained().await;
    let got = f.consumer().all();
    let order: Vec<String> = got
        .iter()
        .map(|r| r.message_id())
        .filter(|id| id.starts_with("r0-"))
        .collect();
    assert_eq!(order, ["r0-0", "r0-1"], "the aggregate in order");
    let retried = got.iter().find(|r| r.message_id() == "r0-0").unwrap();
    assert_eq!(
        retried.json()["payload"],
        serde_json::json!({"n": 0, "text": "ünïcode \"q\""}),
        "the parked copy carries the payload"
    );
    assert_eq!(retried.json()["metadata"]["spanId"], "00f067aa0ba902b7");
    assert_eq!(
        retried.header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let null = got.iter().find(|r| r.message_id() == "r2-0").unwrap();
    assert_eq!(null.json()["payload"], serde_json::Value::Null);
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_has_no_meaning_without_a_table_is_refused() {
    let f = Fixture::bare("msg_refuse").await;
    for (extra, words) in [
        (("postgres", "shards = 2"), "postgres.shards"),
        (
            ("postgres", "on_success = \"delete\""),
            "postgres.on_success",
        ),
        (("postgres", "mapping = \"debezium\""), "postgres.mapping"),
        (("mapping", "payload = \"body\""), "postgres.mapping"),
        (
            ("postgres", "message_prefix = \"\""),
            "postgres.message_prefix",
        ),
        (
            ("postgres", "message_prefix = \"outbox-relay-heartbeat\""),
            "postgres.message_prefix",
        ),
        (
            ("amqp", "routing_key = \"{tenant}.{event_type}\""),
            "names tenant",
        ),
    ] {
        let cfg = f.config(&[("postgres", "source = \"messages\""), extra]);
        let (code, log) = Relay::run_to_end(&["run"], &cfg, &f.dir).await;
        assert_ne!(code, 0, "{log}");
        assert!(log.contains(words), "{words}: {log}");
        assert!(
            log.contains("postgres.source = \"messages\"") || words == "postgres.message_prefix",
            "the refusal says it is about the messages source: {log}"
        );
    }
    let cfg = f.config(&[("postgres", "source = \"messages\"")]);
    let (code, log) = Relay::run_to_end(&["replay", "--pending"], &cfg, &f.dir).await;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("nothing is stored") && log.contains("pg_drop_replication_slot"),
        "replay says why not and what to do: {log}"
    );
    f.cleanup().await;
}
