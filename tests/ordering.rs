//! Per-aggregate commit order, and the LSN gate: the slot never passes a
//! commit whose messages the broker has not acked.

use crate::support::{wait_for, Fixture, Received};
use std::collections::HashMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Position of each message in its aggregate, from ids `{agg}-{i}`.
fn seq_of(r: &Received) -> (String, usize) {
    let id = r.message_id();
    let (agg, i) = id.rsplit_once('-').unwrap();
    (agg.to_string(), i.parse().unwrap())
}

/// Asserts each aggregate's first deliveries arrived in increasing order.
fn assert_in_order(received: &[Received]) {
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in received {
        if !seen.insert(r.message_id()) {
            continue; // a redelivery of something already seen
        }
        let (agg, i) = seq_of(r);
        if let Some(prev) = last.get(&agg) {
            assert!(i > *prev, "aggregate {agg}: {i} arrived after {prev}");
        }
        last.insert(agg, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_commit_order_is_kept() {
    let f = Fixture::new("order", true).await;
    let mut relay = f.spawn(&[("amqp", "max_in_flight = 64")]);
    relay.wait_streaming().await;
    // 20 aggregates x 100 events, interleaved, in transactions of 1 to 7 rows.
    let mut all_ids = Vec::new();
    let mut counters = [0usize; 20];
    let mut k = 0usize;
    while all_ids.len() < 2000 {
        let size = 1 + k % 7;
        let mut rows = Vec::new();
        for j in 0..size {
            let a = (k * 7 + j * 3) % 20;
            if counters[a] >= 100 {
                continue;
            }
            let id = format!("agg{a}-{}", counters[a]);
            counters[a] += 1;
            rows.push((id.clone(), format!("agg{a}"), "step".to_string()));
            all_ids.push(id);
        }
        if !rows.is_empty() {
            f.insert_batch(&rows).await;
        }
        k += 1;
    }
    f.consumer()
        .wait_ids(&all_ids, Duration::from_secs(120))
        .await;
    assert_in_order(&f.consumer().all());
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_holds_back_its_aggregate_only() {
    let f = Fixture::new("order_fail", false).await;
    f.bind("Order.step").await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    // victim-1 is unroutable (Order.late has no binding) until we bind it.
    let mut victim = Vec::new();
    for i in 0..10 {
        let ev = if i == 1 { "late" } else { "step" };
        victim.push((format!("victim-{i}"), "victim".to_string(), ev.to_string()));
    }
    f.insert_batch(&victim[..2]).await;
    let mut others = Vec::new();
    for i in 0..20 {
        for a in 0..10 {
            others.push(format!("other{a}-{i}"));
            f.insert_batch(&[(format!("other{a}-{i}"), format!("other{a}"), "step".into())])
                .await;
        }
        if i == 5 {
            f.insert_batch(&victim[2..]).await;
        }
    }
    let end = f.current_lsn().await;
    // Other aggregates flow at full speed while the victim is held.
    f.consumer().wait_ids(&others, T).await;
    f.consumer().wait_ids(&["victim-0".into()], T).await;
    relay.wait_log("broker refused a message", T).await;
    let got = f.consumer().ids();
    for i in 1..10 {
        assert!(
            !got.contains(&format!("victim-{i}")),
            "victim-{i} overtook the refused victim-1"
        );
    }
    assert!(
        f.confirmed_lsn().await < end,
        "slot passed a refused message"
    );
    f.bind("Order.late").await;
    let victims: Vec<String> = victim.iter().map(|v| v.0.clone()).collect();
    f.consumer().wait_ids(&victims, T).await;
    assert_in_order(&f.consumer().all());
    wait_for(
        T,
        "slot confirmed past everything once victim-1 is delivered",
        || async { f.confirmed_lsn().await >= end },
    )
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lsn_waits_for_an_unroutable_message() {
    let f = Fixture::new("lsn_gate", false).await;
    f.bind("Pass.#").await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let t = &f.table;
    let before = f.current_lsn().await;
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('gated', 'Gate', 'g', 'e', '{{}}')"
        ))
        .await
        .unwrap();
    // A later transaction of another aggregate is acked ...
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('passes', 'Pass', 'p', 'e', '{{}}')"
        ))
        .await
        .unwrap();
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&["passes".into()], T).await;
    // ... and the refused one has been retried for longer than two status
    // intervals (1 s each; backoff 100 ms doubling to 500 ms: 8 refusals > 3 s) ...
    wait_for(T, "eight refusals logged", || async {
        relay.log_text().matches("broker refused a message").count() >= 8
    })
    .await;
    // ... yet the slot has not moved past the refused message's commit, nor past the later one.
    let confirmed = f.confirmed_lsn().await;
    assert!(
        confirmed <= before,
        "slot at {confirmed} passed the unacked commit (before it: {before})"
    );
    assert!(!f.consumer().ids().contains("gated"));
    f.bind("Gate.#").await;
    f.consumer().wait_ids(&["gated".into()], T).await;
    wait_for(T, "slot moves on once the message is acked", || async {
        f.confirmed_lsn().await >= end
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
