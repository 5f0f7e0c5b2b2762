//! Any outbox table and any topology: a custom table mapped by `[mapping]`,
//! exchange, routing key, headers and properties from templates over the row,
//! the payload as the body; a preset with a column renamed and an exchange per
//! aggregate type declared on first use; a template naming a column the table
//! lacks refused at start-up.

use crate::support::amqp::{amqp_connect, declare_bound_queue, declare_topic, Consumer};
use crate::support::{wait_for, Fixture, Relay};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

async fn delete(exchanges: &[&str], queues: &[&str]) {
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete((*e).into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_table_routes_by_tenant_with_the_payload_as_the_body() {
    let f = Fixture::bare("map_tenant").await;
    let t = &f.table;
    f.db.batch_execute(&format!(
        "create table {t} (event_id uuid primary key, stream text not null, stream_id text not null, \
         kind text not null, data json not null, tenant text, meta jsonb, \
         created timestamptz not null default now())"
    ))
    .await
    .unwrap();
    // An exchange per tenant, each with a queue bound only to the key expected on it.
    let (acme, globex, nowhere) = (
        format!("{}-acme", f.exchange),
        format!("{}-globex", f.exchange),
        format!("{}-nowhere", f.exchange),
    );
    let (qa, qg, qn) = (
        format!("{}_a", f.queue),
        format!("{}_g", f.queue),
        format!("{}_n", f.queue),
    );
    delete(&[&acme, &globex, &nowhere], &[&qa, &qg, &qn]).await;
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    for (ex, q, key) in [
        (&acme, &qa, "acme.Order.placed"),
        (&globex, &qg, "globex.Order.placed"),
    ] {
        declare_topic(&ch, ex).await;
        crate::support::amqp::declare_queue(&ch, q, true).await;
        ch.queue_bind(
            q.as_str().into(),
            ex.as_str().into(),
            key.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let (on_acme, on_globex) = (Consumer::start(qa.clone()), Consumer::start(qg.clone()));

    let mut relay = f.spawn(&[
        ("postgres", "mapping = \"custom\""),
        ("mapping", "id = \"event_id\""),
        ("mapping", "aggregate_type = \"stream\""),
        ("mapping", "aggregate_id = \"stream_id\""),
        ("mapping", "event_type = \"kind\""),
        ("mapping", "payload = \"data\""),
        ("mapping", "metadata = \"meta\""),
        ("mapping", "created_at = \"created\""),
        ("amqp", &format!("exchange = \"{}-{{tenant}}\"", f.exchange)),
        ("amqp", "routing_key = \"{tenant}.{aggregate_type}.{event_type}\""),
        ("amqp", "declare_exchange = false"),
        ("retry", "max_retries = 100000"),
        ("amqp", "body = \"payload\""),
        (
            "amqp",
            "headers = { x-tenant = \"{tenant}\", x-stream = \"{aggregate_type}/{aggregate_id}\" }",
        ),
        (
            "amqp",
            "properties = { type = \"{event_type}\", correlation_id = \"{aggregate_id}\", app_id = \"billing-{tenant}\" }",
        ),
    ]);
    relay.wait_streaming().await;

    // The payload exactly as written (a json column keeps its text).
    let body = r#"{"total":  12.5 ,"items":[1, 2],"note":"ünïcode"}"#;
    // 242 bytes: the routing key ("{tenant}.Order.placed") is 255, AMQP's
    // limit, the exchange ("ex_map_tenant-{tenant}") 256, one over.
    let long_tenant = "x".repeat(242);
    let rows = [
        (uuid(1), "acme", "o-1", "placed", body),
        (uuid(2), "globex", "g-1", "placed", r#"{"n":2}"#),
        // No such exchange (declare_exchange = false): this message alone fails.
        (uuid(3), "nowhere", "n-1", "placed", r#"{"n":3}"#),
        // An exchange name over 255 bytes: this message alone fails.
        (uuid(4), long_tenant.as_str(), "l-1", "placed", r#"{"n":4}"#),
        // No tenant (NULL below): no exchange to name ("-events" is not this row's).
        (uuid(7), "", "z-1", "placed", r#"{"n":7}"#),
        // A key nothing is bound to: returned, parked.
        (uuid(5), "acme", "o-2", "shipped", r#"{"n":5}"#),
        (uuid(6), "acme", "o-1", "placed", r#"{"n":6}"#),
    ];
    for (id, tenant, agg, kind, data) in &rows {
        f.db.execute(
            &format!(
                "insert into {t} (event_id, stream, stream_id, kind, data, tenant, meta) \
                 values ($1::text::uuid, 'Order', $2, $3, $4::text::json, $5, '{{\"by\": \"test\"}}')"
            ),
            &[id, agg, kind, data, &(!tenant.is_empty()).then_some(*tenant)],
        )
        .await
        .unwrap();
    }
    on_acme.wait_ids(&[uuid(1), uuid(6)], T).await;
    on_globex.wait_ids(&[uuid(2)], T).await;
    wait_for(
        T,
        "the four undeliverable messages parked, each with its reason",
        || async {
            let p = f.parked().await;
            let reason = |id: &str| {
                p.iter()
                    .find(|r| r.0 == id)
                    .and_then(|r| r.3.clone())
                    .unwrap_or_default()
            };
            p.len() == 4
                && reason(&uuid(3)).contains("NOT_FOUND")
                && reason(&uuid(4)).contains("exchange")
                && reason(&uuid(4)).contains("255")
                && reason(&uuid(5)).contains("NO_ROUTE")
                && reason(&uuid(7)).contains("NULL")
        },
    )
    .await;

    let got = on_acme.all();
    let ids: Vec<String> = got.iter().map(|r| r.message_id()).collect();
    assert_eq!(ids, [uuid(1), uuid(6)], "acme's queue: its two, in order");
    let first = &got[0];
    assert_eq!(first.body, body.as_bytes(), "the payload, byte for byte");
    assert_eq!(first.routing_key, "acme.Order.placed");
    assert_eq!(first.header("x-tenant").as_deref(), Some("acme"));
    assert_eq!(first.header("x-stream").as_deref(), Some("Order/o-1"));
    assert_eq!(first.header("x-event-type").as_deref(), Some("placed"));
    assert_eq!(
        first.header("x-metadata").as_deref(),
        Some(r#"{"by": "test"}"#)
    );
    assert!(first
        .header("x-created-at")
        .is_some_and(|c| c.starts_with("20")));
    let p = &first.properties;
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("placed"));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("o-1"));
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("billing-acme")
    );
    let g = on_globex.all();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].routing_key, "globex.Order.placed");
    assert_eq!(g[0].body, br#"{"n":2}"#);

    // The operator makes the missing exchange: its message goes on the next retry.
    declare_bound_queue(&ch, &nowhere, &qn, true).await;
    let on_nowhere = Consumer::start(qn.clone());
    on_nowhere.wait_ids(&[uuid(3)], T).await;
    assert_eq!(on_nowhere.all()[0].routing_key, "nowhere.Order.placed");
    assert_eq!(on_acme.all().len(), 2, "nothing else reached acme's queue");

    assert!(relay.terminate(T).await.success());
    for c in [&on_acme, &on_globex, &on_nowhere] {
        c.stop();
    }
    let _ = conn.close(200, "bye".into()).await;
    delete(&[&acme, &globex, &nowhere], &[&qa, &qg, &qn]).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_with_a_renamed_column_declares_each_rendered_exchange_on_first_use() {
    let f = Fixture::bare("map_dbz").await;
    let t = &f.table;
    // Debezium's outbox router layout, the payload column called `body`.
    f.db.batch_execute(&format!(
        "create table {t} (id uuid primary key, aggregatetype text not null, \
         aggregateid text not null, type text not null, body jsonb not null)"
    ))
    .await
    .unwrap();
    let exchange = format!("{}-Invoice", f.exchange);
    let queue = format!("{}_i", f.queue);
    delete(&[&exchange], &[&queue]).await;
    let mut relay = f.spawn(&[
        ("postgres", "mapping = \"debezium\""),
        ("mapping", "payload = \"body\""),
        ("retry", "max_retries = 100000"),
        (
            "amqp",
            &format!("exchange = \"{}-{{aggregate_type}}\"", f.exchange),
        ),
        ("amqp", "body = \"payload\""),
    ]);
    relay.wait_streaming().await;
    f.db.batch_execute(&format!(
        "insert into {t} values ('{}', 'Invoice', 'i-1', 'invoice.created', '{{\"n\": 1}}')",
        uuid(11)
    ))
    .await
    .unwrap();
    // The relay declares the exchange the template names when it first publishes
    // there (nothing is bound yet: the message is returned and parked).
    let conn = amqp_connect().await;
    wait_for(T, "the rendered exchange declared by the relay", || async {
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
    })
    .await;
    let ch = conn.create_channel().await.unwrap();
    crate::support::amqp::declare_queue(&ch, &queue, true).await;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "Invoice.invoice.created".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let consumer = Consumer::start(queue.clone());
    consumer.wait_ids(&[uuid(11)], T).await;
    let m = &consumer.all()[0];
    assert_eq!(m.routing_key, "Invoice.invoice.created");
    assert_eq!(
        m.json(),
        serde_json::json!({"n": 1}),
        "the payload as the body"
    );
    assert_eq!(m.header("x-aggregate-id").as_deref(), Some("i-1"));
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    consumer.stop();
    let _ = conn.close(200, "bye".into()).await;
    delete(&[&exchange], &[&queue]).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_naming_a_column_the_table_lacks_is_refused_at_start() {
    let f = Fixture::new("map_unknown", false).await;
    let config = f.config(&[(
        "amqp",
        "routing_key = \"{region}.{aggregate_type}.{event_type}\"",
    )]);
    let (code, log) = Relay::run_to_end(&["run"], &config, &f.dir).await;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("region") && log.contains("template"),
        "the refusal names the column and says a template names it: {log}"
    );
    let (code, log) = Relay::run_to_end(&["check"], &config, &f.dir).await;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("region"), "{log}");
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_column_of_a_type_that_cannot_hold_its_field_is_refused_at_start() {
    let f = Fixture::bare("map_type").await;
    f.db.batch_execute(&format!(
        "create table {} (id text primary key, kind text not null, stream text not null, \
         stream_id text not null, data integer not null)",
        f.table
    ))
    .await
    .unwrap();
    let config = f.config(&[
        ("postgres", "mapping = \"custom\""),
        ("mapping", "aggregate_type = \"stream\""),
        ("mapping", "aggregate_id = \"stream_id\""),
        ("mapping", "event_type = \"kind\""),
        ("mapping", "payload = \"data\""),
        ("mapping", "id = \"id\""),
    ]);
    for command in ["run", "check"] {
        let (code, log) = Relay::run_to_end(&[command], &config, &f.dir).await;
        assert_ne!(code, 0, "{command}: {log}");
        assert!(
            log.contains("column data") && log.contains("integer") && log.contains("json"),
            "{command} names the column, its type and what it must be: {log}"
        );
    }
    f.cleanup().await;
}
