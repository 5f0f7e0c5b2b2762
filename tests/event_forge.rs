//! Event-Forge's tables as Event-Forge's own models make them (the DDL its
//! SQLAlchemy models emit, verbatim, in tests/fixtures: NOT NULL columns without
//! server defaults, its own index names): `init`, `check`, `enqueue`, the
//! README's insert, the relay, the inbox receiver, the Processor and `status`
//! work on them as on tables from `init`. And a table that refuses rows is the
//! table's fault, not the messages'.

use crate::support::inbox::{InboxFixture, Msg};
use crate::support::{http_get, index_names, scrape_metric as metric, wait_for, Fixture, Relay};
use outbox_relay::inbox::{InboxMessage, Processor, ProcessorOptions};
use outbox_relay::outbox::{enqueue_into, NewEvent};
use std::time::Duration;
use tokio_postgres::Transaction;

const T: Duration = Duration::from_secs(60);

/// The README's `psql` insert, as printed there (the quick start's one line).
fn readme_insert() -> String {
    let readme = include_str!("../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("psql ") && l.contains("insert into outbox_messages"))
        .expect("the README shows a psql insert");
    let sql = &line[line.find("-c \"").expect("psql -c \"...\"") + 4..line.rfind('"').unwrap()];
    sql.replace("\\\"", "\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_forge_made_tables_work_end_to_end() {
    let f = Fixture::event_forge("ef_e2e", true).await;
    let schema = f.schema.clone().unwrap();
    let inbox_table = format!("{schema}.inbox_messages");
    let queue = "q_ef_e2e_inbox".to_string();
    let cfg = f.config(&[
        ("inbox", &format!("queue = \"{queue}\"")),
        ("inbox", &format!("table = \"{inbox_table}\"")),
        ("inbox", &format!("bind_exchange = \"{}\"", f.exchange)),
        ("inbox", "bind_keys = [\"#\"]"),
        ("inbox", "on_invalid = \"reject\""),
        ("inbox", "notify_channel = \"\""),
    ]);
    let outbox_before = index_names(&f.db, &f.table).await;
    let inbox_before = index_names(&f.db, &inbox_table).await;

    // init adds nothing that duplicates Event-Forge's own indexes (same columns,
    // other names), and adds the claim index its inbox table lacks.
    let (code, out) = Relay::run_to_end(&["init"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(index_names(&f.db, &f.table).await, outbox_before, "{out}");
    let mut inbox_after = inbox_before.clone();
    inbox_after.push("idx_inbox_unfinished".into());
    inbox_after.sort();
    assert_eq!(index_names(&f.db, &inbox_table).await, inbox_after, "{out}");
    assert!(
        out.contains(
            "idx_outbox_messages_status_scheduled (covered by idx_outbox_status_scheduled)"
        ) && out.contains("idx_inbox_status (covered by idx_inbox_status)"),
        "{out}"
    );
    let (code, again) = Relay::run_to_end(&["init"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{again}");
    assert_eq!(
        index_names(&f.db, &inbox_table).await,
        inbox_after,
        "init twice adds nothing"
    );

    let (code, out) = Relay::run_to_end(&["check"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("ok")
            && l.contains("inbox table")
            && l.contains("takes the receiver's rows")),
        "{out}"
    );
    assert!(!out.contains("note: NOT NULL"), "{out}");

    // (`f.spawn` would write the file again without the [inbox] lines.)
    let mut relay = Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let mut receiver = Relay::command(&["inbox", "--config", cfg.to_str().unwrap()], &f.dir, &[]);
    receiver.wait_log("inbox consuming", T).await;

    // enqueue writes every NOT NULL column itself; a rolled-back one never leaves.
    let mut db = crate::support::pg().await;
    let outbox = outbox_relay::pg::TableName::parse(&f.table).unwrap();
    let mut ids = Vec::new();
    for i in 0..120 {
        let tx = db.transaction().await.unwrap();
        let mut event = NewEvent::new(
            "Order",
            format!("agg-{}", i % 12),
            "order.placed",
            serde_json::json!({"n": i, "agg": format!("agg-{}", i % 12)}),
        );
        if i % 2 == 0 {
            event.id = Some(format!("ef-e2e-{i}"));
        }
        ids.push(enqueue_into(&tx, &outbox, event).await.unwrap());
        tx.commit().await.unwrap();
    }
    let tx = db.transaction().await.unwrap();
    enqueue_into(
        &tx,
        &outbox,
        NewEvent::new(
            "Order",
            "agg-0",
            "order.placed",
            serde_json::json!({"rolled": "back"}),
        ),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // The README's insert, as printed there, on Event-Forge's table.
    db.batch_execute(&format!(
        "set search_path = {schema}; {}; reset search_path",
        readme_insert()
    ))
    .await
    .unwrap();
    let readme_id: String = db
        .query_one(
            &format!("select id from {} where aggregate_id = 'order-1'", f.table),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ids.push(readme_id);
    for id in &ids {
        assert!(id.len() <= 36, "{id}");
    }
    f.consumer().wait_ids(&ids, T).await;
    let recorded =
        || async { db_count(&f.db, &format!("select count(*) from {inbox_table}")).await };
    wait_for(
        T,
        "every message recorded in Event-Forge's inbox table",
        || async { recorded().await == ids.len() as i64 },
    )
    .await;
    // Event-Forge's values in the columns its models would have filled.
    let bad = db_count(
        &f.db,
        &format!(
            "select count(*) from {inbox_table} where length(id) <> 36 or status <> 'received' \
             or retry_count <> 0 or recovery_attempts <> 0 or max_retries <> 3 or created_at is null"
        ),
    )
    .await;
    assert_eq!(bad, 0);

    // The Processor on Event-Forge's table: one effect per row, in order per aggregate.
    let effects = format!("{schema}.effects");
    f.db.batch_execute(&format!(
        "create table {effects} (seq bigserial primary key, agg text not null, n int not null)"
    ))
    .await
    .unwrap();
    let fx = effects.clone();
    let processor = Processor::new(crate::support::PG_URL, &inbox_table)
        .unwrap()
        .options(ProcessorOptions {
            notify_channel: None,
            ordering_field: Some("agg".into()),
            ..Default::default()
        })
        .handler(
            "order.placed",
            move |tx: &Transaction<'_>, m: &InboxMessage| {
                let sql = format!("insert into {fx} (agg, n) values ($1, $2)");
                let agg = m.payload["agg"].as_str().unwrap_or("readme").to_string();
                let n = m.payload["n"].as_i64().unwrap_or(-1) as i32;
                Box::pin(async move {
                    tx.execute(&sql, &[&agg, &n]).await?;
                    Ok(())
                })
            },
        );
    let mut client = crate::support::pg().await;
    let deadline = std::time::Instant::now() + T;
    loop {
        processor.process_due(&mut client).await.unwrap();
        let processed = db_count(
            &f.db,
            &format!("select count(*) from {inbox_table} where status = 'processed'"),
        )
        .await;
        if processed == ids.len() as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{processed} processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        db_count(&f.db, &format!("select count(*) from {effects}")).await,
        ids.len() as i64
    );
    let out_of_order = db_count(
        &f.db,
        &format!(
            "select count(*) from (select n < lag(n) over (partition by agg order by seq) as back from {effects} where agg <> 'readme') t where back"
        ),
    )
    .await;
    assert_eq!(out_of_order, 0, "effects in commit order per aggregate");

    // The relay marks Event-Forge's rows published; status reads them.
    wait_for(T, "every outbox row marked published", || async {
        db_count(
            &f.db,
            &format!(
                "select count(*) from {} where status = 'published'",
                f.table
            ),
        )
        .await
            == ids.len() as i64
    })
    .await;
    let (code, out) = Relay::run_to_end(&["status", "--json"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(status["outbox_pending"], 0, "{status}");
    assert_eq!(
        status["inbox"]["by_status"]["processed"],
        ids.len() as i64,
        "{status}"
    );
    assert!(
        receiver.terminate(T).await.success(),
        "{}",
        receiver.log_text()
    );
    assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
    delete_queue(&queue).await;
    f.cleanup().await;
}

async fn db_count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

async fn delete_queue(queue: &str) {
    let conn = crate::support::amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

fn flood(prefix: &str, n: usize) -> Vec<Msg> {
    (0..n)
        .map(|i| Msg::event_forge(&format!("{prefix}-{i}")))
        .collect()
}

/// A migration adds `tenant text not null` to Event-Forge's inbox table: every
/// row is refused the same way. That is the table's fault: the receiver holds
/// the deliveries unacked, says so in /readyz (the column and the fix) and a
/// metric, dead-letters nothing, and records everything by itself once the
/// column gets a default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_refuses_every_row_pauses_the_receiver_and_charges_no_message() {
    let f = InboxFixture::event_forge("tbl_fault").await;
    f.db.batch_execute(&format!(
        "alter table {} add column tenant text not null",
        f.table
    ))
    .await
    .unwrap();
    let cfg = f.config(&[]);
    let (code, out) = Relay::run_to_end(&["check"], &cfg, &f.dir).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("inbox table")
            && l.contains("tenant")
            && l.contains("DROP NOT NULL")),
        "{out}"
    );
    let mut r = f.spawn(&cfg);
    r.wait_log("inbox consuming", T).await;
    let addr = r.metrics_addr().await;
    // Said at start-up already: the table cannot take the receiver's rows.
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("tenant"), "{body}");
    f.publish(&flood("tbl-fault", 300)).await;
    wait_for(T, "the receiver paused on the table's fault", || async {
        metric(&addr, "outbox_relay_paused{cause=\"inbox_table\"}").await == 1.0
    })
    .await;
    wait_for(T, "readyz names the refusal and its fix", || async {
        let (code, body) = http_get(&addr, "/readyz").await;
        code == 503
            && body.contains("refuses every row the same way")
            && body.contains("tenant")
            && body.contains("DROP NOT NULL")
    })
    .await;
    // While it lasts: nothing recorded, nothing dead-lettered, nothing acked.
    crate::support::holds_for(
        Duration::from_secs(2),
        "nothing charged to the messages",
        || async {
            metric(
                &addr,
                "outbox_relay_inbox_invalid_total{reason=\"refused_by_table\"}",
            )
            .await
                == 0.0
                && f.count().await == 0
        },
    )
    .await;
    assert!(f.take_dead_letters().await.is_empty());
    // The column gets a default: everything is recorded by itself, once.
    f.db.batch_execute(&format!(
        "alter table {} alter column tenant set default 'acme'",
        f.table
    ))
    .await
    .unwrap();
    f.wait_count(300, T).await;
    assert_eq!(f.distinct().await, 300);
    wait_for(T, "readyz ready again", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        metric(&addr, "outbox_relay_paused{cause=\"inbox_table\"}").await,
        0.0
    );
    assert_eq!(
        metric(
            &addr,
            "outbox_relay_inbox_invalid_total{reason=\"refused_by_table\"}"
        )
        .await,
        0.0
    );
    assert!(
        f.take_dead_letters().await.is_empty(),
        "nothing dead-lettered"
    );
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0, "every delivery acked");
    f.cleanup().await;
}

/// A `CHECK` that one message's value breaks: that row alone is set aside
/// (dead-lettered with the reason) while the others are recorded — also when it
/// arrives alone at a quiet moment (held until the next row shows the table
/// takes rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_table_refuses_alone_is_set_aside() {
    let f = InboxFixture::event_forge("row_fault").await;
    f.db.batch_execute(&format!(
        "alter table {} add constraint no_poison check (message_id not like 'poison%')",
        f.table
    ))
    .await
    .unwrap();
    let mut r = f.start(&[]).await;
    let addr = r.metrics_addr().await;
    let mut msgs = flood("row-fault-a", 20);
    msgs.push(Msg::event_forge("poison-1"));
    msgs.extend(flood("row-fault-b", 20));
    f.publish(&msgs).await;
    f.wait_count(40, T).await;
    let dead = f.wait_dead_letters(1, T).await;
    assert_eq!(dead[0].0.as_deref(), Some("refused_by_table"));
    assert!(String::from_utf8_lossy(&dead[0].1).contains("poison-1"));
    // Alone at a quiet moment: held, not dead-lettered yet ...
    f.publish(&[Msg::event_forge("poison-2")]).await;
    wait_for(T, "the lone refusal held", || async {
        let (code, body) = http_get(&addr, "/readyz").await;
        code == 503 && body.contains("no_poison")
    })
    .await;
    assert!(f.take_dead_letters().await.is_empty());
    // ... until the next row goes in: then it was the message's own fault.
    f.publish(&[Msg::event_forge("row-fault-c")]).await;
    f.wait_count(41, T).await;
    let dead = f.wait_dead_letters(1, T).await;
    assert!(String::from_utf8_lossy(&dead[0].1).contains("poison-2"));
    wait_for(T, "ready again", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        metric(
            &addr,
            "outbox_relay_inbox_invalid_total{reason=\"refused_by_table\"}"
        )
        .await,
        2.0
    );
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0);
    f.cleanup().await;
}
