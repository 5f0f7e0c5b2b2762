//! Never past the undelivered, never silently: partitioned tables publish via
//! their root, and a restart reads every page of parked aggregates. (Every way a
//! slot is lost, and `replay --pending`, is tested on scratch clusters in
//! tests/slots.rs.)

use crate::support::{wait_for, Fixture, Relay};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The Event-Forge table, partitioned by a hash of its id into two partitions.
async fn partitioned(f: &Fixture) {
    let ddl = outbox_relay::pg::catalog::outbox_ddl(
        &outbox_relay::pg::TableName::parse(&f.table).unwrap(),
    )
    .replacen(");\n", ") PARTITION BY HASH (id);\n", 1);
    f.db.batch_execute(&ddl).await.unwrap();
    for r in 0..2 {
        f.db.batch_execute(&format!(
            "create table {t}_p{r} partition of {t} for values with (modulus 2, remainder {r})",
            t = f.table
        ))
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_is_published_via_its_root() {
    let f = Fixture::bare("rec_part").await;
    partitioned(&f).await;
    let f = f.with_consumer(true).await;
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    let rows: Vec<(String, String, String)> = (0..200)
        .map(|i| {
            (
                format!("part-{i}"),
                format!("a-{}", i % 10),
                "e".to_string(),
            )
        })
        .collect();
    f.insert_batch(&rows).await;
    let end = f.current_lsn().await;
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&ids, T).await;
    f.wait_slot_past(end, "slot past the rows in the partitions")
        .await;
    wait_for(T, "rows in the partitions marked published", || async {
        f.row_state("part-199").await.0 == "published"
    })
    .await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_names_the_partitions_is_refused_with_a_hint_that_works() {
    let f = Fixture::bare("rec_part_pub").await;
    partitioned(&f).await;
    let f = f.with_consumer(true).await;
    f.db.batch_execute(&format!(
        "create publication {} for table {} with (publish = 'insert')",
        f.publication, f.table
    ))
    .await
    .unwrap();
    let cfg = f.config(&[]);
    let (code, out) = Relay::run_to_end(&["run"], &cfg, &f.dir).await;
    assert_ne!(code, 0, "{out}");
    let hint = format!(
        "ALTER PUBLICATION {} SET (publish = 'insert', publish_via_partition_root = true)",
        f.publication
    );
    assert!(out.contains(&hint), "{out}");
    let (code, out) = Relay::run_to_end(&["check"], &cfg, &f.dir).await;
    assert_eq!(code, 1);
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("publication") && l.contains(&hint)),
        "{out}"
    );
    // The hint, as printed, is what fixes it.
    f.db.batch_execute(&hint).await.unwrap();
    let mut relay = f.spawn(&[]);
    relay.wait_streaming().await;
    f.insert_batch(&[("after-hint".into(), "a".into(), "e".into())])
        .await;
    f.consumer().wait_ids(&["after-hint".into()], T).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// A restart reads the parked backlog's heads in pages of 1 000 aggregates: with
/// 1 500 parked aggregates the second page is read too, and every message of
/// every aggregate is delivered, in order, once the cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_every_page_of_parked_aggregates() {
    let f = Fixture::new("rec_heads_pages", false).await;
    let cfg = f.config(&[
        ("retry", "backoff_base = \"100ms\""),
        ("retry", "backoff_max = \"500ms\""),
    ]);
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    // Two unroutable messages for each of 1 500 aggregates, one transaction.
    let rows: Vec<(String, String, String)> = (0..3000)
        .map(|i| {
            let agg = format!("h{:04}", i % 1500);
            (format!("{agg}-{i}"), agg, "late".to_string())
        })
        .collect();
    f.insert_batch(&rows).await;
    wait_for(T, "every message parked", || async {
        f.parked().await.len() == 3000
    })
    .await;
    assert!(relay.terminate(T).await.success());
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    f.bind("Order.late").await;
    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&all, Duration::from_secs(120)).await;
    f.wait_retry_drained().await;
    crate::support::assert_in_order(&f.consumer().all());
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
