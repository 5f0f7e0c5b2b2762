//! Per-aggregate commit order, and the LSN gate: the slot never passes a
//! commit whose messages the broker has not acked.

use crate::support::{
    assert_in_order, assert_in_order_with_redeliveries, holds_for, wait_for, Fixture, Received,
};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// 20 aggregates x 100 events, interleaved, in transactions of 1 to 7 rows; every
/// tenth event of each aggregate is refused at first (`Order.late` is bound only
/// later). Each aggregate's events still arrive in commit order: with strict
/// ordering a refused event's successors were never on the wire beside it (with
/// `relaxed` they would be, and overtake it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_commit_order_is_kept() {
    let f = Fixture::new("order", false).await;
    f.bind("Order.step").await;
    let mut relay = f.spawn(&[("amqp", "max_in_flight = 64")]);
    relay.wait_streaming().await;
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
            let n = counters[a];
            let id = format!("agg{a}-{n}");
            counters[a] += 1;
            let event = if n % 10 == 5 { "late" } else { "step" };
            rows.push((id.clone(), format!("agg{a}"), event.to_string()));
            all_ids.push(id);
        }
        if !rows.is_empty() {
            f.insert_batch(&rows).await;
        }
        k += 1;
    }
    let end = f.current_lsn().await;
    f.wait_slot_past(end, "every row published or parked").await;
    f.bind("Order.late").await;
    f.consumer()
        .wait_ids(&all_ids, Duration::from_secs(120))
        .await;
    assert_in_order(&f.consumer().all());
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_holds_back_its_aggregate_only() {
    let f = Fixture::new("order_fail", false).await;
    // Event-Forge rows carry their own retry budget (default 3); this test wants it unbounded.
    f.bind("Order.step").await;
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
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
    // The refused message and the ones behind it are durably parked: the slot moves on.
    f.wait_slot_past(end, "slot confirmed past the parked messages")
        .await;
    let parked = f.parked().await;
    assert_eq!(parked.len(), 9, "victim-1 and the 8 behind it: {parked:?}");
    assert_eq!(parked[0].0, "victim-1");
    assert!(
        parked[0]
            .3
            .as_deref()
            .unwrap_or("")
            .contains("returned as unroutable"),
        "{parked:?}"
    );
    wait_for(T, "the refused row shows its failure", || async {
        f.row_state("victim-1").await.0 == "failed"
    })
    .await;
    let (status, retries, error) = f.row_state("victim-1").await;
    assert_eq!(status, "failed");
    assert!(retries >= 1);
    assert!(error.unwrap_or_default().contains("unroutable"));
    let got = f.consumer().ids();
    for i in 1..10 {
        assert!(
            !got.contains(&format!("victim-{i}")),
            "victim-{i} overtook the refused victim-1"
        );
    }
    f.bind("Order.late").await;
    let victims: Vec<String> = victim.iter().map(|v| v.0.clone()).collect();
    f.consumer().wait_ids(&victims, T).await;
    assert_in_order(&f.consumer().all());
    f.wait_retry_drained().await;
    wait_for(T, "victims marked published", || async {
        f.row_state("victim-9").await.0 == "published"
    })
    .await;
    assert_eq!(f.row_state("victim-1").await.0, "published");
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lsn_waits_for_an_ack_or_durable_retry_state() {
    let f = Fixture::new("lsn_gate", false).await;
    f.bind("Pass.#").await;
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
    relay.wait_streaming().await;
    // Hold the retry table: a refused message cannot be parked while the lock is held.
    let mut locker = crate::support::pg().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "lock table {} in access exclusive mode",
        f.retry_table
    ))
    .await
    .unwrap();
    let t = &f.table;
    // The refused message's commit record, read exactly from the WAL: with nothing in
    // flight the relay may confirm a keepalive position (other tests commit all the
    // time, and Postgres reports their skipped transactions as progress, also between
    // this insert and its commit), but never past the start of this commit record.
    let mut writer = crate::support::pg().await;
    let gated = writer.transaction().await.unwrap();
    gated
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('gated', 'Gate', 'g', 'e', '{{}}')"
        ))
        .await
        .unwrap();
    let row = gated
        .query_one(
            "select pg_current_wal_insert_lsn()::text, pg_current_xact_id()::xid::text",
            &[],
        )
        .await
        .unwrap();
    let (from, xid): (String, String) = (row.get(0), row.get(1));
    gated.commit().await.unwrap();
    let before = crate::support::commit_record_lsn(&f.db, &from, &xid).await;
    // A later transaction of another aggregate is acked ...
    f.db
        .batch_execute(&format!(
            "insert into {t} (id, aggregate_type, aggregate_id, event_type, payload) values ('passes', 'Pass', 'p', 'e', '{{}}')"
        ))
        .await
        .unwrap();
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&["passes".into()], T).await;
    relay
        .wait_log("publish failed: parking in retry state", T)
        .await;
    // ... yet for three status intervals the slot stays before the refused message's
    // commit: it is neither acked nor durably parked.
    holds_for(
        Duration::from_secs(3),
        "slot before the unresolved commit",
        || async { f.confirmed_lsn().await <= before },
    )
    .await;
    assert!(!f.consumer().ids().contains("gated"));
    // Once the retry state commits, the slot moves past both transactions.
    lock.rollback().await.unwrap();
    f.wait_slot_past(end, "slot moves on once the message is parked")
        .await;
    assert!(!f.consumer().ids().contains("gated"), "still undeliverable");
    f.bind("Gate.#").await;
    f.consumer().wait_ids(&["gated".into()], T).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_whose_successors_are_already_queued_goes_first() {
    let f = Fixture::new("order_queued", false).await;
    f.bind("Order.ok").await;
    let mut relay = f.spawn(&[("retry", "max_retries = 1000")]);
    relay.wait_streaming().await;
    // 50 aggregates, each a refused message (Order.late has no binding yet) and two
    // routable ones, all in one transaction: with strict ordering the successors
    // wait in the window behind the refused one, unconfirmed, when it fails.
    let mut rows = Vec::new();
    for a in 0..50 {
        rows.push((format!("q{a}-0"), format!("q{a}"), "late".to_string()));
        rows.push((format!("q{a}-1"), format!("q{a}"), "ok".to_string()));
        rows.push((format!("q{a}-2"), format!("q{a}"), "ok".to_string()));
    }
    f.insert_batch(&rows).await;
    let free = "free-0".to_string();
    f.insert_batch(&[(free.clone(), "free".into(), "ok".into())])
        .await;
    f.consumer().wait_ids(&[free], T).await;
    wait_for(T, "every message of the 50 aggregates parked", || async {
        f.parked().await.len() == 150
    })
    .await;
    let parked = f.parked().await;
    for a in 0..50 {
        let pos = |i: usize| {
            parked
                .iter()
                .position(|p| p.0 == format!("q{a}-{i}"))
                .unwrap()
        };
        assert!(
            pos(0) < pos(1) && pos(1) < pos(2),
            "q{a} parked out of order"
        );
    }
    assert!(
        !f.consumer().ids().iter().any(|id| id.starts_with('q')),
        "a successor overtook its refused predecessor: {:?}",
        f.consumer().ids()
    );
    f.bind("Order.late").await;
    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&all, T).await;
    f.wait_retry_drained().await;
    let received: Vec<Received> = f
        .consumer()
        .all()
        .into_iter()
        .filter(|r| r.message_id().starts_with('q'))
        .collect();
    assert_in_order_with_redeliveries(&received);
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
