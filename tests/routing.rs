//! "This message is unroutable" against "nothing is routable any more": when
//! every publish across many routing keys is returned with no ack in between,
//! the fault is the topology's, and the relay pauses instead of spending retry
//! budgets or dead-lettering.

use crate::support::{
    amqp_connect, declare_bound_queue, holds_for, http_get, scrape_metric as metric, wait_for,
    Fixture,
};
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
/// Failures charged before the pattern is clear (`relay::routing::MIN_FAILURES - 1`).
const CHARGED_AT_MOST: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_that_routes_nothing_pauses_publishing_and_charges_no_message() {
    let f = Fixture::new("routing_fault", true).await;
    let dlx = "dlx_routing_fault";
    let dlq = "dlq_routing_fault";
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(dlq.into(), QueueDeleteOptions::default())
        .await;
    declare_bound_queue(&ch, dlx, dlq, true).await;
    // Retries at production pace (5 s): the eight failures that show the pattern
    // come well before the first parked message's retry is due. (At rates so low
    // that eight failures take longer than backoff_base, a message's retry can
    // fail before the pause: charged, as the first failures are.)
    let mut relay = f.spawn(&[
        ("amqp", &format!("dead_letter_exchange = \"{dlx}\"")),
        ("amqp", "max_in_flight = 16"),
        ("retry", "backoff_base = \"5s\""),
        ("retry", "backoff_max = \"5s\""),
    ]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    // Four event types, so four routing keys; one retry each before a row is dead.
    let insert = |prefix: &'static str, n: usize| {
        let t = f.table.clone();
        async move {
            let mut ids = Vec::new();
            let mut sql = String::new();
            for i in 0..n {
                let id = format!("{prefix}-{i}");
                sql.push_str(&format!(
                    "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload, max_retries) \
                     values ('{id}', 'Order', 'agg-{}', 'type{}', '{{\"n\": {i}}}', 1);",
                    i % 20,
                    i % 4
                ));
                ids.push(id);
            }
            (ids, sql)
        }
    };
    let (before, sql) = insert("rf-before", 40).await;
    f.db.batch_execute(&sql).await.unwrap();
    f.consumer().wait_ids(&before, T).await;

    // The queue loses its binding: nothing routes any more.
    ch.queue_unbind(
        f.queue.as_str().into(),
        f.exchange.as_str().into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (during, sql) = insert("rf-during", 200).await;
    for statement in sql.split_inclusive(';') {
        f.db.batch_execute(statement).await.unwrap();
    }
    wait_for(T, "publishing paused for the routing fault", || async {
        metric(&addr, "outbox_relay_paused{cause=\"routing\"}").await == 1.0
    })
    .await;
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("returned as unroutable") && body.contains("routes nothing"),
        "{body}"
    );
    // Past the retries' due time: nothing is dead, nothing reaches the dead-letter
    // exchange, and only the failures before the pattern was clear were charged
    // (one attempt each).
    // (Messages queued behind a parked one are parked with it, uncharged.)
    holds_for(
        Duration::from_secs(7),
        "no message charged while paused",
        || async {
            let parked = f.parked().await;
            parked
                .iter()
                .filter(|(_, _, attempts, _)| *attempts > 0)
                .count()
                <= CHARGED_AT_MOST
                && parked
                    .iter()
                    .all(|(_, status, attempts, _)| status == "parked" && *attempts <= 1)
        },
    )
    .await;
    assert_eq!(metric(&addr, "outbox_relay_dead_letters_total").await, 0.0);
    assert_eq!(dlq_depth(&ch, dlq).await, 0, "nothing dead-lettered");

    // The binding is back: the probe is acked, everything held goes out, in
    // order per aggregate, and the parked ones are retried.
    f.bind("#").await;
    f.consumer().wait_ids(&during, T).await;
    f.wait_retry_drained().await;
    wait_for(T, "publishing resumed", || async {
        metric(&addr, "outbox_relay_paused{cause=\"routing\"}").await == 0.0
            && http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    for (agg, msgs) in f.consumer().by_aggregate() {
        let mut last: Option<(usize, usize)> = None;
        for m in msgs {
            let id = m.message_id();
            let phase = usize::from(id.starts_with("rf-during"));
            let n: usize = id.rsplit('-').next().unwrap().parse().unwrap();
            if let Some(prev) = last {
                assert!(prev < (phase, n), "aggregate {agg}: {id} after {prev:?}");
            }
            last = Some((phase, n));
        }
    }
    assert_eq!(dlq_depth(&ch, dlq).await, 0);
    assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
    let _ = ch
        .queue_delete(dlq.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch.exchange_delete(dlx.into(), Default::default()).await;
    let _ = conn.close(200, "bye".into()).await;
    f.cleanup().await;
}

async fn dlq_depth(ch: &lapin::Channel, dlq: &str) -> u32 {
    ch.queue_declare(
        dlq.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}
