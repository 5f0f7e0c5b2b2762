//! The library API: `outbox::enqueue` and `inbox::Processor` against Postgres.

use crate::support::inbox::InboxFixture;
use crate::support::wait_for;
use outbox_relay::inbox::{InboxMessage, Processor, ProcessorOptions};
use outbox_relay::outbox::{enqueue_into, NewEvent};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Transaction;

const T: Duration = Duration::from_secs(60);

fn options() -> ProcessorOptions {
    ProcessorOptions {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        notify_channel: None,
        ..Default::default()
    }
}

/// Inserts `received` rows: (message_id, event_type, payload).
async fn insert_rows(
    f: &InboxFixture,
    rows: &[(String, &str, serde_json::Value)],
    max_retries: i32,
) {
    for (id, event_type, payload) in rows {
        f.db.execute(
            &format!(
                "insert into {} (id, message_id, source, event_type, payload, max_retries) \
                 values (gen_random_uuid()::text, $1, 'test', $2, $3::text::json, $4)",
                f.table
            ),
            &[id, event_type, &payload.to_string(), &max_retries],
        )
        .await
        .unwrap();
    }
}

async fn effects_table(f: &InboxFixture) -> String {
    let t = format!("public.inb_fx_{}", f.name);
    f.db.batch_execute(&format!(
        "drop table if exists {t}; create table {t} (seq bigserial primary key, message_id text not null, agg text)"
    ))
    .await
    .unwrap();
    t
}

async fn statuses(f: &InboxFixture) -> Vec<(String, String, i32)> {
    f.db.query(
        &format!(
            "select message_id, status, retry_count from {} order by message_id",
            f.table
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The `error_message` of the row with `message_id`.
async fn error_message(f: &InboxFixture, message_id: &str) -> Option<String> {
    f.db.query_one(
        &format!(
            "select error_message from {} where message_id = $1",
            f.table
        ),
        &[&message_id],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_processor_effects_commit_with_processed_and_failures_back_off() {
    let f = InboxFixture::new("proc_effects").await;
    let fx = effects_table(&f).await;
    insert_rows(
        &f,
        &[
            ("ok".into(), "done", serde_json::json!({"n": 1})),
            ("flaky".into(), "flaky", serde_json::json!({"n": 2})),
            ("bad".into(), "bad", serde_json::json!({"n": 3})),
            ("other".into(), "nobody.handles", serde_json::json!({})),
            ("swallow".into(), "swallow", serde_json::json!({"n": 4})),
        ],
        1,
    )
    .await;
    // JSON Postgres takes and serde_json::Value cannot read: it fails with the
    // reason, its handler never sees a null payload.
    f.db.execute(
        &format!(
            "insert into {} (id, message_id, source, event_type, payload, max_retries) \
             values (gen_random_uuid()::text, 'huge', 'test', 'done', '{{\"n\": 1e400}}', 1)",
            f.table
        ),
        &[],
    )
    .await
    .unwrap();
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let calls = flaky_calls.clone();
    let bad_calls = Arc::new(AtomicUsize::new(0));
    let bad_counter = bad_calls.clone();
    let (fx1, fx2, fx3, fx4) = (fx.clone(), fx.clone(), fx.clone(), fx.clone());
    let processor = Processor::new(crate::support::PG_URL, &f.table)
        .unwrap()
        .options(options())
        .handler("done", move |tx: &Transaction<'_>, m: &InboxMessage| {
            let (sql, id) = (
                format!("insert into {fx1} (message_id) values ($1)"),
                m.message_id.clone(),
            );
            Box::pin(async move {
                tx.execute(&sql, &[&id]).await?;
                Ok(())
            })
        })
        .handler("flaky", move |tx: &Transaction<'_>, m: &InboxMessage| {
            let (sql, id) = (
                format!("insert into {fx2} (message_id) values ($1)"),
                m.message_id.clone(),
            );
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                // The write happens, then the failure: it must be rolled back.
                tx.execute(&sql, &[&id]).await?;
                if first {
                    return Err("first attempt fails".into());
                }
                Ok(())
            })
        })
        .handler("bad", move |tx: &Transaction<'_>, m: &InboxMessage| {
            let (sql, id) = (
                format!("insert into {fx3} (message_id) values ($1)"),
                m.message_id.clone(),
            );
            bad_counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tx.execute(&sql, &[&id]).await?;
                Err("always fails".into())
            })
        })
        .handler("swallow", move |tx: &Transaction<'_>, m: &InboxMessage| {
            let (sql, id) = (
                format!("insert into {fx4} (message_id) values ($1)"),
                m.message_id.clone(),
            );
            Box::pin(async move {
                // Writes, then ignores a failed statement and reports success: its
                // write is void, so the row fails and the batch's others commit.
                tx.execute(&sql, &[&id]).await?;
                let _ = tx.execute("select 1 / 0", &[]).await;
                Ok(())
            })
        });
    let mut client = crate::support::pg().await;
    let want: Vec<(String, String, i32)> = vec![
        ("bad".into(), "permanently_failed".into(), 2),
        ("flaky".into(), "processed".into(), 1),
        ("huge".into(), "permanently_failed".into(), 2),
        ("ok".into(), "processed".into(), 0),
        ("other".into(), "received".into(), 0),
        ("swallow".into(), "permanently_failed".into(), 2),
    ];
    // Retries come due after their backoff: process until the states settle.
    let deadline = std::time::Instant::now() + T;
    loop {
        processor.process_due(&mut client).await.unwrap();
        let got = statuses(&f).await;
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "states did not settle: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A failing handler runs once per attempt: its failure that rolls the batch
    // back is recorded as it is, not run again (two attempts: max_retries 1).
    assert_eq!(bad_calls.load(Ordering::SeqCst), 2);
    // A handler that succeeded in a batch a sibling's failure rolled back runs
    // again in the redo (its writes once): one failed attempt, then at least one
    // that succeeded.
    assert!(flaky_calls.load(Ordering::SeqCst) >= 2);
    let effects: Vec<String> =
        f.db.query(
            &format!("select message_id from {fx} order by message_id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        effects,
        vec!["flaky", "ok"],
        "failed attempts left no effects"
    );
    assert_eq!(
        error_message(&f, "bad").await.as_deref(),
        Some("always fails")
    );
    let error = error_message(&f, "huge").await.unwrap_or_default();
    assert!(
        error.contains("the payload cannot be read as a serde_json::Value"),
        "{error}"
    );
    let error = error_message(&f, "swallow").await.unwrap_or_default();
    assert!(
        error.contains("returned success after one of its statements had failed"),
        "{error}"
    );
    f.db.batch_execute(&format!("drop table {fx}"))
        .await
        .unwrap();
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_processor_recovers_rows_stuck_in_processing() {
    let f = InboxFixture::new("proc_stuck").await;
    insert_rows(
        &f,
        &[
            ("stuck".into(), "e", serde_json::json!({})),
            ("stuck-often".into(), "e", serde_json::json!({})),
            ("fresh".into(), "e", serde_json::json!({})),
        ],
        3,
    )
    .await;
    f.db.batch_execute(&format!(
        "update {t} set status = 'processing', updated_at = now() - interval '1 hour' where message_id like 'stuck%';
         update {t} set recovery_attempts = 3 where message_id = 'stuck-often';
         update {t} set status = 'processing' where message_id = 'fresh';",
        t = f.table
    ))
    .await
    .unwrap();
    let processor = Processor::new(crate::support::PG_URL, &f.table)
        .unwrap()
        .options(options())
        .handler("e", |_tx: &Transaction<'_>, _m: &InboxMessage| {
            Box::pin(async { Ok(()) })
        });
    let mut client = crate::support::pg().await;
    assert_eq!(processor.recover_stuck(&client).await.unwrap(), 2);
    processor.process_due(&mut client).await.unwrap();
    let rows: Vec<(String, String, i32, Option<String>)> = f
        .db
        .query(
            &format!(
                "select message_id, status, recovery_attempts, recovery_reason from {} order by message_id",
                f.table
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(rows[0].0, "fresh");
    assert_eq!(
        rows[0].1, "processing",
        "a row still being worked on is left alone"
    );
    assert_eq!((rows[1].1.as_str(), rows[1].2), ("processed", 1));
    assert!(rows[1]
        .3
        .as_deref()
        .unwrap()
        .contains("stuck in processing"));
    assert_eq!((rows[2].1.as_str(), rows[2].2), ("permanently_failed", 4));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_processors_share_the_work_and_keep_aggregate_order() {
    let f = InboxFixture::new("proc_share").await;
    let fx = effects_table(&f).await;
    let rows: Vec<(String, &str, serde_json::Value)> = (0..300)
        .map(|i| {
            (
                format!("m-{i:04}"),
                "e",
                serde_json::json!({"agg": format!("a{}", i % 5), "i": i}),
            )
        })
        .collect();
    insert_rows(&f, &rows, 3).await;
    let make = || {
        let fx = fx.clone();
        Processor::new(crate::support::PG_URL, &f.table)
            .unwrap()
            .options(ProcessorOptions {
                ordering_field: Some("agg".into()),
                notify_channel: Some(f.channel.clone()),
                ..options()
            })
            .handler("e", move |tx: &Transaction<'_>, m: &InboxMessage| {
                let sql = format!("insert into {fx} (message_id, agg) values ($1, $2)");
                let id = m.message_id.clone();
                let agg = m.payload["agg"].as_str().unwrap_or_default().to_string();
                Box::pin(async move {
                    tx.execute(&sql, &[&id, &agg]).await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Ok(())
                })
            })
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let p = make();
        let mut stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            p.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    let count = || async {
        f.db.query_one(&format!("select count(*) from {fx}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for(T, "every row processed", || async { count().await == 300 }).await;
    // Woken by NOTIFY: rows added now are processed without any timer.
    insert_rows(
        &f,
        &[("late".into(), "e", serde_json::json!({"agg": "z"}))],
        3,
    )
    .await;
    f.db.execute("select pg_notify($1, 'x')", &[&f.channel])
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the late row processed on NOTIFY",
        || async { count().await == 301 },
    )
    .await;
    let _ = stop.send(true);
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let distinct: i64 =
        f.db.query_one(&format!("select count(distinct message_id) from {fx}"), &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(distinct, 301, "each row once");
    for agg in 0..5 {
        let order: Vec<String> =
            f.db.query(
                &format!("select message_id from {fx} where agg = $1 order by seq"),
                &[&format!("a{agg}")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "aggregate a{agg} in arrival order");
    }
    f.db.batch_execute(&format!("drop table {fx}"))
        .await
        .unwrap();
    f.cleanup().await;
}

/// A claim looks at the oldest unprocessed rows first (a window of 1 000):
/// when all of them wait behind a failed row that is not due yet, the rows of
/// other aggregates after them are still claimed (the claim then looks at every
/// unprocessed row), and nothing of the held-back aggregate runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_an_aggregate_held_back_past_the_claim_window_does_not_hold_back_others() {
    let f = InboxFixture::new("proc_window").await;
    let fx = effects_table(&f).await;
    // The held-back aggregate: a failed head due in an hour, 1 500 rows behind it;
    // then 5 rows of another aggregate. created_at spaced so the order is theirs.
    f.db.batch_execute(&format!(
        "insert into {t} (id, message_id, source, event_type, payload, status, retry_count, max_retries, scheduled_at, created_at) \
         values (gen_random_uuid()::text, 'held-0', 'test', 'e', '{{\"agg\": \"held\"}}', 'failed', 1, 3, now() + interval '1 hour', now() - interval '1 hour'); \
         insert into {t} (id, message_id, source, event_type, payload, max_retries, created_at) \
         select gen_random_uuid()::text, 'held-' || g, 'test', 'e', '{{\"agg\": \"held\"}}', 3, now() - interval '1 hour' + g * interval '1 ms' \
         from generate_series(1, 1500) g; \
         insert into {t} (id, message_id, source, event_type, payload, max_retries, created_at) \
         select gen_random_uuid()::text, 'free-' || g, 'test', 'e', '{{\"agg\": \"free\"}}', 3, now() - interval '1 minute' + g * interval '1 ms' \
         from generate_series(1, 5) g;",
        t = f.table
    ))
    .await
    .unwrap();
    let processor = {
        let fx = fx.clone();
        Processor::new(crate::support::PG_URL, &f.table)
            .unwrap()
            .options(ProcessorOptions {
                ordering_field: Some("agg".into()),
                ..options()
            })
            .handler("e", move |tx: &Transaction<'_>, m: &InboxMessage| {
                let sql = format!("insert into {fx} (message_id, agg) values ($1, $2)");
                let id = m.message_id.clone();
                let agg = m.payload["agg"].as_str().unwrap_or_default().to_string();
                Box::pin(async move {
                    tx.execute(&sql, &[&id, &agg]).await?;
                    Ok(())
                })
            })
    };
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(async move {
        processor
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    let ran = |agg: &'static str| {
        let (db, fx) = (&f.db, &fx);
        async move {
            db.query_one(
                &format!("select count(*) from {fx} where agg = $1"),
                &[&agg],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    wait_for(T, "the free aggregate's rows processed", || async {
        ran("free").await == 5
    })
    .await;
    assert_eq!(ran("held").await, 0, "nothing runs behind the failed head");
    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    f.db.batch_execute(&format!("drop table {fx}"))
        .await
        .unwrap();
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_enqueue_writes_in_the_callers_transaction() {
    let mut db = crate::support::pg().await;
    let table = outbox_relay::pg::TableName::parse("public.inb_outbox_enqueue").unwrap();
    db.batch_execute(&format!(
        "drop table if exists {t}; drop table if exists inb_orders_enqueue; create table inb_orders_enqueue (id text primary key);",
        t = table.quoted()
    ))
    .await
    .unwrap();
    db.batch_execute(&outbox_relay::pg::catalog::outbox_ddl(&table))
        .await
        .unwrap();
    let event = |aggregate: &str| NewEvent {
        id: None,
        aggregate_type: "Order".into(),
        aggregate_id: aggregate.into(),
        event_type: "order.placed".into(),
        payload: serde_json::json!({"id": aggregate, "big": 12345678901234567u64}),
        metadata: Some(serde_json::json!({"traceId": "t"})),
        max_retries: None,
    };
    let tx = db.transaction().await.unwrap();
    tx.execute("insert into inb_orders_enqueue values ('o-1')", &[])
        .await
        .unwrap();
    let id = enqueue_into(&tx, &table, event("o-1")).await.unwrap();
    tx.commit().await.unwrap();
    let tx = db.transaction().await.unwrap();
    tx.execute("insert into inb_orders_enqueue values ('o-2')", &[])
        .await
        .unwrap();
    enqueue_into(&tx, &table, event("o-2")).await.unwrap();
    tx.rollback().await.unwrap();
    let rows = db
        .query(
            &format!(
                "select id, aggregate_id, payload::text, metadata::text, status from {}",
                table.quoted()
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        1,
        "the rolled back event is gone with its order"
    );
    assert_eq!(rows[0].get::<_, String>(0), id);
    assert_eq!(id.len(), 36);
    assert_eq!(rows[0].get::<_, String>(1), "o-1");
    assert_eq!(
        rows[0].get::<_, String>(2),
        r#"{"big":12345678901234567,"id":"o-1"}"#
    );
    assert_eq!(rows[0].get::<_, String>(4), "pending");
    db.batch_execute(&format!(
        "drop table {}; drop table inb_orders_enqueue",
        table.quoted()
    ))
    .await
    .unwrap();
}

/// A handler write that Postgres refuses only at commit (a deferred constraint)
/// rolls back the whole batch: the rows are claimed again one at a time, the row
/// to blame is marked failed with the reason (and dies after its budget), and the
/// others are processed, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_a_write_refused_at_commit_fails_its_row_not_the_batch() {
    let f = InboxFixture::new("proc_deferred").await;
    let fx = format!("public.inb_fx_{}", f.name);
    f.db.batch_execute(&format!(
        "drop table if exists {fx}; create table {fx} (k text, \
         constraint inb_fx_{}_k unique (k) deferrable initially deferred)",
        f.name
    ))
    .await
    .unwrap();
    insert_rows(
        &f,
        &[
            ("a".into(), "e", serde_json::json!({"k": "a"})),
            (
                "poison".into(),
                "e",
                serde_json::json!({"k": "p", "twice": true}),
            ),
            ("b".into(), "e", serde_json::json!({"k": "b"})),
        ],
        1,
    )
    .await;
    let sql = format!("insert into {fx} (k) values ($1)");
    let processor = Processor::new(crate::support::PG_URL, &f.table)
        .unwrap()
        .options(options())
        .handler("e", move |tx: &Transaction<'_>, m: &InboxMessage| {
            let sql = sql.clone();
            let k = m.payload["k"].as_str().unwrap_or_default().to_string();
            let twice = m.payload["twice"].as_bool().unwrap_or(false);
            Box::pin(async move {
                tx.execute(&sql, &[&k]).await?;
                if twice {
                    // Accepted now, refused at commit.
                    tx.execute(&sql, &[&k]).await?;
                }
                Ok(())
            })
        });
    let mut client = crate::support::pg().await;
    let want: Vec<(String, String, i32)> = vec![
        ("a".into(), "processed".into(), 0),
        ("b".into(), "processed".into(), 0),
        ("poison".into(), "permanently_failed".into(), 2),
    ];
    let deadline = std::time::Instant::now() + T;
    loop {
        processor.process_due(&mut client).await.unwrap();
        let got = statuses(&f).await;
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "states did not settle: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let effects: Vec<String> =
        f.db.query(&format!("select k from {fx} order by k"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(
        effects,
        vec!["a", "b"],
        "each committed once, none of the poison's"
    );
    let error: String =
        f.db.query_one(
            &format!(
                "select error_message from {} where message_id = 'poison'",
                f.table
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("refused at commit"), "{error}");
    f.db.batch_execute(&format!("drop table {fx}"))
        .await
        .unwrap();
    f.cleanup().await;
}

/// Claims take the oldest rows off the index of unfinished rows, also when the
/// planner's statistics were taken before a backlog was worked off (every row
/// `received`) and Event-Forge's plain `created_at` index offers the same
/// order with an incremental sort on `id`: that path walks every processed
/// row on each claim (found by the benchmark: 3 200 rows/s against 17 000,
/// Postgres' cost per claim growing with the processed history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_claims_walk_the_index_of_unfinished_rows_not_the_processed_history() {
    let f = InboxFixture::new("proc_claim_index").await;
    f.db.batch_execute(&format!(
        "insert into {t} (id, message_id, source, event_type, payload, status, retry_count, max_retries, \
           created_at, updated_at, recovery_attempts) \
         select gen_random_uuid()::text, 'm-' || g, 'test', 'order.placed', \
           json_build_object('orderId', g, 'note', repeat('x', 400)), 'received', 0, 3, \
           clock_timestamp(), clock_timestamp(), 0 \
         from generate_series(1, 30000) g",
        t = f.table
    ))
    .await
    .unwrap();
    f.db.batch_execute(&format!("vacuum analyze {}", f.table))
        .await
        .unwrap();
    let processor = Processor::new(crate::support::PG_URL, &f.table)
        .unwrap()
        .options(options())
        .handler(
            "order.placed",
            |_tx: &Transaction<'_>, _m: &InboxMessage| Box::pin(async { Ok(()) }),
        );
    let index_scans = || async {
        let rows = f
            .db
            .query(
                "select indexrelname::text, idx_scan from pg_stat_user_indexes \
                 where relid = to_regclass($1) and indexrelname::text like any(array['%_created', '%_unfinished'])",
                &[&f.table],
            )
            .await
            .unwrap();
        let scans = |suffix: &str| {
            rows.iter()
                .find(|r| r.get::<_, String>(0).ends_with(suffix))
                .map(|r| r.get::<_, i64>(1))
                .expect("the index exists")
        };
        (scans("_created"), scans("_unfinished"))
    };
    let before = index_scans().await;
    let mut client = crate::support::pg().await;
    let mut done = 0;
    while done < 20_000 {
        done += processor.process_batch(&mut client).await.unwrap();
    }
    drop(client);
    // Statistics reach the views once the session is idle or gone.
    wait_for(T, "the claims' index scans counted", || async {
        index_scans().await.1 >= before.1 + 200
    })
    .await;
    let after = index_scans().await;
    assert_eq!(
        after.0 - before.0,
        0,
        "no claim walked the plain created_at index"
    );
    f.cleanup().await;
}
