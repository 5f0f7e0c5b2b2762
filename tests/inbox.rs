//! `outbox-relay inbox`: a queue recorded into the Event-Forge inbox table once.

use crate::support::inbox::{headers, InboxFixture, Msg};
use crate::support::{scrape_metric as metric, wait_for, AMQP_URL};
use lapin::BasicProperties;
use std::collections::HashSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_bad_input_is_dead_lettered_with_its_reason_and_never_blocks_the_queue() {
    let f = InboxFixture::new("bad_input").await;
    let mut r = f.start(&["max_message_bytes = 1000"]).await;
    let addr = r.metrics_addr().await;
    let long_id = "x".repeat(300);
    let mut msgs = vec![
        Msg::raw(b"this is not json"),
        Msg::raw(br#"{"payload": {"no": "id"}}"#),
        Msg::raw(format!(r#"{{"id": "big", "payload": "{}"}}"#, "y".repeat(2000)).as_bytes()),
        Msg::raw(format!(r#"{{"id": "{long_id}"}}"#).as_bytes()),
        Msg::raw(&[0xff, 0xfe, b'{']),
    ];
    msgs.push(Msg::event_forge("inb-bad-after"));
    f.publish(&msgs).await;
    // The valid message behind the bad ones is recorded: nothing blocks.
    f.wait_count(1, T).await;
    let dead = f.wait_dead_letters(5, T).await;
    let reasons: Vec<Option<String>> = dead.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(
        reasons,
        [
            "not_json",
            "missing_id",
            "too_large",
            "bad_field",
            "not_json"
        ]
        .map(|s| Some(s.to_string()))
        .to_vec()
    );
    assert_eq!(dead[0].1, b"this is not json", "the body travels unchanged");
    for (reason, n) in [
        ("not_json", 2.0),
        ("missing_id", 1.0),
        ("too_large", 1.0),
        ("bad_field", 1.0),
    ] {
        let name = format!("outbox_relay_inbox_invalid_total{{reason=\"{reason}\"}}");
        wait_for(T, &name, || async { metric(&addr, &name).await == n }).await;
    }
    // Everything was acked: after a clean stop nothing comes back to the queue.
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0);
    assert_eq!(f.ready(&f.dlq).await, 0);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_without_a_dead_letter_exchange_it_refuses_to_start_unless_told_to_reject() {
    let f = InboxFixture::new("no_dlx").await;
    let mut r = f.spawn(&f.config(&["dead_letter_exchange = \"\""]));
    let status = r.wait_exit(T).await;
    assert_eq!(status.code(), Some(2), "{}", r.log_text());
    let log = r.log_text();
    assert!(
        log.contains("inbox.on_invalid") && log.contains("dead_letter_exchange"),
        "{log}"
    );
    // on_invalid = "reject": a bad delivery is rejected without requeue; the queue
    // (declared by the test with a dead-letter exchange of its own) dead-letters it.
    let conn = crate::support::amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        f.queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        headers(&[("x-dead-letter-exchange", &f.dlx)]),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    let mut r = f
        .start(&[
            "dead_letter_exchange = \"\"",
            "on_invalid = \"reject\"",
            "declare = false",
        ])
        .await;
    f.publish(&[Msg::raw(b"not json"), Msg::event_forge("inb-reject-ok")])
        .await;
    f.wait_count(1, T).await;
    let dead = f.wait_dead_letters(1, T).await;
    assert_eq!(dead[0].1, b"not json");
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_a_duplicate_flood_is_stored_once_and_all_acked() {
    let f = InboxFixture::new("flood").await;
    let mut r = f.start(&[]).await;
    let addr = r.metrics_addr().await;
    let msgs: Vec<Msg> = (0..10_000)
        .map(|i| Msg::event_forge(&format!("inb-flood-{i}")))
        .collect();
    f.publish(&msgs).await;
    f.publish(&msgs).await;
    wait_for(
        Duration::from_secs(180),
        "every delivery settled",
        || async {
            metric(&addr, "outbox_relay_inbox_received_total").await
                + metric(&addr, "outbox_relay_inbox_duplicates_total").await
                == 20_000.0
        },
    )
    .await;
    assert_eq!(f.count().await, 10_000);
    assert_eq!(
        metric(&addr, "outbox_relay_inbox_received_total").await,
        10_000.0
    );
    assert_eq!(
        metric(&addr, "outbox_relay_inbox_duplicates_total").await,
        10_000.0
    );
    let distinct = f.distinct().await;
    assert_eq!(distinct, 10_000);
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    assert_eq!(f.ready(&f.queue).await, 0, "all acked: nothing requeued");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_mapping_follows_event_forge() {
    let f = InboxFixture::new("mapping").await;
    let mut r = f.start(&["source = \"inb-src\"", "max_retries = 5"]).await;
    let big = "123456789012345678901234567890";
    f.publish(&[
        // The Event-Forge wire format: property, header, payload and metadata.
        Msg {
            properties: BasicProperties::default()
                .with_message_id("m-prop".into())
                .with_headers(headers(&[("x-event-type", "header.type")])),
            body: format!(
                r#"{{"id":"body-id","eventType":"body.type","payload":{{"n":{big}}},"metadata":{{"traceId":"t1"}}}}"#
            )
            .into_bytes(),
        },
        // The body's id and eventType; no payload: the whole body.
        Msg::raw(br#"{"id":"m-body","eventType":"body.type","x":1}"#),
        // The type property.
        Msg {
            properties: BasicProperties::default().with_type("prop.type".into()),
            body: br#"{"id":"m-type","payload":[1]}"#.to_vec(),
        },
        // Nothing else: the routing key (here the queue's name); a numeric id.
        Msg::raw(br#"{"id":42,"payload":"s","metadata":null}"#),
    ])
    .await;
    f.wait_count(4, T).await;
    let rows =
        f.db.query(
            &format!(
                "select message_id, event_type, payload::text, metadata::text, source, status, \
                 retry_count, max_retries, length(id) from {} order by message_id",
                f.table
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("42".into(), f.queue.clone(), "\"s\"".into(), None),
            (
                "m-body".into(),
                "body.type".into(),
                r#"{"id":"m-body","eventType":"body.type","x":1}"#.into(),
                None
            ),
            (
                "m-prop".into(),
                "header.type".into(),
                format!(r#"{{"n":{big}}}"#),
                Some(r#"{"traceId":"t1"}"#.into())
            ),
            ("m-type".into(), "prop.type".into(), "[1]".into(), None),
        ]
    );
    for row in &rows {
        assert_eq!(row.get::<_, String>(4), "inb-src");
        assert_eq!(row.get::<_, String>(5), "received");
        assert_eq!(row.get::<_, i32>(6), 0);
        assert_eq!(row.get::<_, i32>(7), 5);
        assert_eq!(row.get::<_, i32>(8), 36, "a UUID string id");
    }
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_notify_after_commit_carries_the_new_ids() {
    use futures_util::StreamExt;
    let f = InboxFixture::new("notify").await;
    let (client, mut conn) = tokio_postgres::connect(crate::support::PG_URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("listen {}", f.channel))
        .await
        .unwrap();
    let mut r = f.start(&[]).await;
    let msgs: Vec<Msg> = (0..50)
        .map(|i| Msg::event_forge(&format!("inb-notify-{i}")))
        .collect();
    f.publish(&msgs).await;
    f.wait_count(50, T).await;
    let mut notified = HashSet::new();
    let deadline = tokio::time::Instant::now() + T;
    while notified.len() < 50 {
        let payload = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("notifications for every new row")
            .unwrap();
        notified.extend(payload.split(',').map(String::from));
    }
    let ids: HashSet<String> =
        f.db.query(&format!("select id from {}", f.table), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(notified, ids);
    // A duplicate makes no row and no notification.
    f.publish(&msgs[..1]).await;
    let addr = r.metrics_addr().await;
    wait_for(T, "the duplicate counted", || async {
        metric(&addr, "outbox_relay_inbox_duplicates_total").await == 1.0
    })
    .await;
    assert!(rx.try_recv().is_err(), "no notification for a duplicate");
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_init_creates_the_table_and_status_shows_the_backlog() {
    let f = InboxFixture::new("init").await;
    f.db.batch_execute(&format!("drop table {}", f.table))
        .await
        .unwrap();
    let config = f.config(&[]);
    // The receiver refuses a missing table with what to do.
    let mut r = f.spawn(&config);
    assert!(!r.wait_exit(T).await.success());
    assert!(
        r.log_text().contains("init --inbox-only"),
        "{}",
        r.log_text()
    );
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let c = config.to_str().unwrap();
    let out = run(&["init", "--inbox-only", "--config", c]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    let out = run(&["init", "--inbox-only", "--config", c]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("exists"),
        "{out:?}"
    );
    let mut r = f.start(&[]).await;
    f.publish(&[
        Msg::event_forge("inb-init-1"),
        Msg::event_forge("inb-init-2"),
    ])
    .await;
    f.wait_count(2, T).await;
    f.db.batch_execute(&format!(
        "update {} set status = 'processed' where message_id = 'inb-init-1'",
        f.table
    ))
    .await
    .unwrap();
    let out = run(&["status", "--json", "--config", c]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["inbox"]["by_status"],
        serde_json::json!({"processed": 1, "received": 1})
    );
    let out = run(&["status", "--config", c]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("processed 1, received 1"),
        "{out:?}"
    );
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.cleanup().await;
}

/// Interop: rows the receiver recorded are processed by Event-Forge's own Python
/// `InboxService` (SQLAlchemy repository) unchanged. Needs a Python with the
/// `event-forge`, `sqlalchemy` and `asyncpg` packages, named by
/// `OUTBOX_RELAY_EVENT_FORGE_PYTHON`; run with `--ignored`. Without the variable
/// it fails, so it never passes without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs OUTBOX_RELAY_EVENT_FORGE_PYTHON (a python with event-forge, sqlalchemy, asyncpg)"]
async fn inb_event_forge_inbox_service_processes_what_the_receiver_recorded() {
    let python = std::env::var("OUTBOX_RELAY_EVENT_FORGE_PYTHON").expect(
        "set OUTBOX_RELAY_EVENT_FORGE_PYTHON to a python with event-forge, sqlalchemy[asyncio] and asyncpg \
         (python3 -m venv v && v/bin/pip install event-forge 'sqlalchemy[asyncio]' asyncpg psycopg2-binary)",
    );
    let f = InboxFixture::new("interop").await;
    let schema = "inb_interop";
    event_forge_tables(&python, &f, schema).await;
    let table = outbox_relay::pg::TableName::parse(&format!("{schema}.inbox_messages")).unwrap();
    let mut r = f.start(&[&format!("table = \"{table}\"")]).await;
    let ids: Vec<String> = (0..5).map(|i| format!("inb-interop-{i}")).collect();
    f.publish(
        &ids.iter()
            .map(|id| Msg::event_forge(id))
            .collect::<Vec<_>>(),
    )
    .await;
    let count = || async {
        f.db.query_one(&format!("select count(*) from {}", table.quoted()), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for(T, "5 rows recorded", || async { count().await == 5 }).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/event_forge_inbox.py"
    );
    let out = std::process::Command::new(&python)
        .args([
            script,
            "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            schema,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut want = ids.clone();
    want.sort();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want.join(","));
    let processed: i64 =
        f.db.query_one(
            &format!(
                "select count(*) from {} where status = 'processed' and processed_at is not null",
                table.quoted()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 5, "InboxService marked every row processed");
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    f.db.batch_execute(&format!("drop schema {schema} cascade"))
        .await
        .unwrap();
    f.cleanup().await;
}

/// Makes `schema` afresh with Event-Forge's tables created by its own models
/// (`Base.metadata.create_all`: no server defaults), through `python`.
async fn event_forge_tables(python: &str, f: &InboxFixture, schema: &str) {
    f.db.batch_execute(&format!("drop schema if exists {schema} cascade"))
        .await
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/event_forge_tables.py"
    );
    let out = std::process::Command::new(python)
        .args([script, "create", crate::support::PG_URL, schema])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let defaults: i64 = f
        .db
        .query_one(
            "select count(*) from information_schema.columns where table_schema = $1 and column_default is not null",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(defaults, 0, "Event-Forge's models give no server defaults");
}

/// Interop, the other way: messages Event-Forge's own Python publisher
/// (`AioPikaPublisher`) sends are recorded by the receiver with Event-Forge's
/// mapping. Needs `OUTBOX_RELAY_EVENT_FORGE_PYTHON` to name a Python with the
/// `event-forge` and `aio-pika` packages; run with `--ignored`. Without the
/// variable it fails, so it never passes without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs OUTBOX_RELAY_EVENT_FORGE_PYTHON (a python with event-forge and aio-pika)"]
async fn inb_what_event_forge_publishes_is_recorded_once() {
    let python = std::env::var("OUTBOX_RELAY_EVENT_FORGE_PYTHON").expect(
        "set OUTBOX_RELAY_EVENT_FORGE_PYTHON to a python with event-forge and aio-pika \
         (python3 -m venv v && v/bin/pip install event-forge 'sqlalchemy[asyncio]' aio-pika psycopg2-binary)",
    );
    let mut f = InboxFixture::new("interop_pub").await;
    let schema = "inb_interop_pub";
    event_forge_tables(&python, &f, schema).await;
    f.db.batch_execute(&format!("drop table if exists {}", f.table))
        .await
        .unwrap();
    f.table = format!("{schema}.inbox_messages");
    f.schema = Some(schema.to_string());
    let exchange = "inb_ex_interop_pub";
    let conn = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    crate::support::declare_topic(&ch, exchange).await;
    let mut r = f
        .start(&[
            &format!("bind_exchange = \"{exchange}\""),
            "bind_keys = [\"Order.#\"]",
            "source = \"event-forge\"",
        ])
        .await;
    let ids: Vec<String> = (0..2000).map(|i| format!("inb-ef-pub-{i}")).collect();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/event_forge_publish.py"
    );
    // Published twice: the second copy of each is a duplicate.
    for _ in 0..2 {
        let out = std::process::Command::new(&python)
            .arg(script)
            .arg(AMQP_URL)
            .arg(exchange)
            .args(&ids)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    wait_for(T, "every message recorded", || async {
        f.db.query_one(
            &format!(
                "select count(*) from {} where source = 'event-forge'",
                f.table
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 2000
    })
    .await;
    let rows = f
        .db
        .query(
            &format!(
                "select message_id, event_type, payload::text, metadata->>'traceId', status from {} order by message_id",
                f.table
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000, "stored once each");
    for row in &rows {
        let id: String = row.get(0);
        let i: usize = id.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(row.get::<_, String>(1), "order.placed");
        let payload: serde_json::Value = serde_json::from_str(&row.get::<_, String>(2)).unwrap();
        assert_eq!(payload, serde_json::json!({"orderId": id, "n": i}));
        assert_eq!(
            row.get::<_, Option<String>>(3).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(row.get::<_, String>(4), "received");
    }
    wait_for(T, "the copies counted as duplicates and acked", || async {
        let q = ch
            .queue_declare(
                f.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        q.message_count() == 0
    })
    .await;
    assert!(r.terminate(T).await.success(), "{}", r.log_text());
    let _ = ch
        .exchange_delete(exchange.into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    f.cleanup().await;
}
