//! Shared fixtures for the integration tests: every test gets its own table,
//! publication, slot, exchange and queue (named after the test), a relay
//! process spawned from the real binary, a consumer that survives broker
//! connection loss, and condition waits with timeouts.
#![allow(dead_code)]

pub mod inbox;
pub mod scratch;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Waits until `cond` returns true, polling every 50 ms; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn pg() -> Client {
    let (client, conn) = tokio_postgres::connect(PG_URL, NoTls)
        .await
        .expect("test postgres reachable (run scripts/setup-services.sh)");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Connects, retrying while Postgres restarts.
pub async fn pg_retry(timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio_postgres::connect(PG_URL, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                if client.simple_query("select 1").await.is_ok() {
                    return client;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("postgres did not come back: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn lsn_to_u64(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn text");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Start LSN of transaction `xid`'s commit record, searched from `from` on (read
/// from the WAL with `pg_walinspect`, which Postgres ships since 15).
pub async fn commit_record_lsn(db: &tokio_postgres::Client, from: &str, xid: &str) -> u64 {
    // Several tests may create the extension at once: a lost race is fine.
    let _ = db
        .batch_execute("create extension if not exists pg_walinspect")
        .await;
    let row = db
        .query_one(
            "select start_lsn::text from pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) \
             where resource_manager = 'Transaction' and xid::text = $2 and record_type like 'COMMIT%'",
            &[&from, &xid],
        )
        .await
        .expect("the commit record of the transaction");
    lsn_to_u64(&row.get::<_, String>(0))
}

/// Event-Forge 1.5.0's own DDL, verbatim (tests/fixtures): both tables without
/// server defaults, with Event-Forge's index names.
pub const EVENT_FORGE_DDL: &str = include_str!("../fixtures/event_forge_1_5_0.sql");

/// Makes `schema` afresh holding `outbox_messages` and `inbox_messages` exactly
/// as Event-Forge's models create them (in a schema of their own, as an
/// Event-Forge service's search path would put them).
pub async fn event_forge_schema(db: &Client, schema: &str) {
    db.batch_execute(&format!(
        "drop schema if exists {schema} cascade; create schema {schema}; \
         set search_path = {schema}; {EVENT_FORGE_DDL}; reset search_path"
    ))
    .await
    .unwrap_or_else(|e| panic!("creating Event-Forge's tables in {schema}: {e}"));
}

/// The index names of `table` (`schema.name`), sorted.
pub async fn index_names(db: &Client, table: &str) -> Vec<String> {
    let (schema, name) = table.split_once('.').unwrap();
    db.query(
        "select indexname::text from pg_indexes where schemaname = $1 and tablename = $2 order by 1",
        &[&schema, &name],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// One test's private objects.
pub struct Fixture {
    pub name: String,
    pub table: String,
    /// The relay-owned retry table, one per test.
    pub retry_table: String,
    pub slot: String,
    pub publication: String,
    pub exchange: String,
    pub queue: String,
    pub dir: PathBuf,
    pub db: Client,
    pub consumer: Option<Consumer>,
    /// A schema of the test's own (Event-Forge's tables), dropped at cleanup.
    pub schema: Option<String>,
}

impl Fixture {
    /// Drops leftovers of a crashed earlier run, creates the Event-Forge table,
    /// declares the exchange and (when `bind_queue`) a durable queue bound with `#`.
    pub async fn new(name: &str, bind_queue: bool) -> Fixture {
        let f = Self::bare(name).await;
        f.db.batch_execute(&outbox_relay::pg::catalog::outbox_ddl(
            &outbox_relay::pg::TableName::parse(&f.table).unwrap(),
        ))
        .await
        .unwrap();
        // Rows carry their own retry budget (Event-Forge default 3); tests that want a
        // message to die set max_retries on the row.
        f.db.batch_execute(&format!(
            "alter table {} alter column max_retries set default 100000",
            f.table
        ))
        .await
        .unwrap();
        f.with_consumer(bind_queue).await
    }

    /// Like `new` but creates no table (the test makes its own).
    pub async fn bare(name: &str) -> Fixture {
        let db = pg().await;
        let f = Fixture {
            name: name.to_string(),
            table: format!("public.t_{name}"),
            retry_table: format!("public.r_{name}"),
            slot: format!("s_{name}"),
            publication: format!("p_{name}"),
            exchange: format!("ex_{name}"),
            queue: format!("q_{name}"),
            dir: std::env::temp_dir().join("outbox-relay-tests").join(name),
            db,
            consumer: None,
            schema: None,
        };
        drop_pg_objects(&f.db, &f.slot, &f.publication, &f.table).await;
        let _ =
            f.db.batch_execute(&format!("drop table if exists {}", f.retry_table))
                .await;
        let _ = std::fs::remove_dir_all(&f.dir);
        std::fs::create_dir_all(&f.dir).unwrap();
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(f.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(f.exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = conn.close(200, "bye".into()).await;
        f
    }

    /// Like `new`, but the outbox table is Event-Forge's own (`ef_<name>.outbox_messages`,
    /// made by its models' DDL: no server defaults), next to its `inbox_messages`.
    pub async fn event_forge(name: &str, bind_queue: bool) -> Fixture {
        let mut f = Self::bare(name).await;
        let schema = format!("ef_{name}");
        event_forge_schema(&f.db, &schema).await;
        f.table = format!("{schema}.outbox_messages");
        f.schema = Some(schema);
        f.with_consumer(bind_queue).await
    }

    pub async fn with_consumer(mut self, bind_queue: bool) -> Fixture {
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        declare_topic(&ch, &self.exchange).await;
        declare_queue(&ch, &self.queue, true).await;
        if bind_queue {
            self.bind("#").await;
        }
        let _ = conn.close(200, "bye".into()).await;
        self.consumer = Some(Consumer::start(self.queue.clone()));
        self
    }

    /// Binds the test queue to the exchange with `pattern`.
    pub async fn bind(&self, pattern: &str) {
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_bind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    pub fn consumer(&self) -> &Consumer {
        self.consumer.as_ref().expect("fixture has a consumer")
    }

    /// A config file for this fixture; `extra` is appended per section as TOML lines
    /// (e.g. `[("amqp", "max_in_flight = 64")]`).
    pub fn config(&self, extra: &[(&str, &str)]) -> PathBuf {
        let mut sections: Vec<(&str, Vec<String>)> = vec![
            (
                "postgres",
                vec![
                    format!("url = \"{PG_URL}\""),
                    format!("table = \"{}\"", self.table),
                    format!("slot = \"{}\"", self.slot),
                    format!("publication = \"{}\"", self.publication),
                    format!("retry_table = \"{}\"", self.retry_table),
                    "slot_wait = \"20s\"".into(),
                    "reconnect_backoff_max = \"2s\"".into(),
                ],
            ),
            (
                "amqp",
                vec![
                    format!("url = \"{AMQP_URL}\""),
                    format!("exchange = \"{}\"", self.exchange),
                    "reconnect_backoff_max = \"2s\"".into(),
                ],
            ),
            (
                "retry",
                vec![
                    "backoff_base = \"100ms\"".into(),
                    "backoff_max = \"500ms\"".into(),
                ],
            ),
            ("relay", vec![]),
            // Written only when a test adds lines (`outbox-relay inbox` needs a queue).
            ("inbox", vec![]),
            ("metrics", vec!["listen = \"127.0.0.1:0\"".into()]),
            ("log", vec!["level = \"info,outbox_relay=debug\"".into()]),
        ];
        for (section, line) in extra {
            let s = sections
                .iter_mut()
                .find(|(n, _)| n == section)
                .expect("known section");
            let key = line.split('=').next().unwrap().trim();
            s.1.retain(|l| l.split('=').next().unwrap().trim() != key);
            s.1.push(line.to_string());
        }
        let mut text = String::new();
        for (name, lines) in sections {
            if name == "inbox" && lines.is_empty() {
                continue;
            }
            text.push_str(&format!("[{name}]\n"));
            for l in lines {
                text.push_str(&l);
                text.push('\n');
            }
        }
        let path = self.dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the relay binary with this fixture's config.
    pub fn spawn(&self, extra: &[(&str, &str)]) -> Relay {
        Relay::spawn(&self.config(extra), &self.dir, &[])
    }

    /// Inserts one Event-Forge row per (id, aggregate_id, event_type), all in one transaction.
    pub async fn insert_batch(&self, rows: &[(String, String, String)]) {
        let mut sql = format!(
            "insert into {} (id, aggregate_type, aggregate_id, event_type, payload) values ",
            self.table
        );
        for (i, (id, agg, ev)) in rows.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "('{id}', 'Order', '{agg}', '{ev}', '{{\"n\": {i}}}')"
            ));
        }
        self.db.batch_execute(&sql).await.unwrap();
    }

    /// Inserts `n` rows, one transaction each, ids `{prefix}-{i}`; returns the ids.
    pub async fn insert_each(&self, prefix: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            self.insert_batch(&[(id.clone(), format!("agg-{}", i % 97), "created".into())])
                .await;
            ids.push(id);
        }
        ids
    }

    pub async fn current_lsn(&self) -> u64 {
        let s: String = self
            .db
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        lsn_to_u64(&s)
    }

    /// The slot's confirmed_flush_lsn (0 when the slot does not exist yet).
    pub async fn confirmed_lsn(&self) -> u64 {
        let row = self
            .db
            .query_opt(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .map(|s| lsn_to_u64(&s))
            .unwrap_or(0)
    }

    /// Rows of the retry table: (id, status, attempts, error_message). A missing or
    /// misnamed retry table is an error, never "nothing parked".
    pub async fn parked(&self) -> Vec<(String, String, i32, Option<String>)> {
        let rows = self
            .db
            .query(
                &format!(
                    "select id, status, attempts, error_message from {} order by seq",
                    self.retry_table
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("reading retry table {}: {e}", self.retry_table));
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    /// Waits until the retry table is empty (every parked message delivered).
    pub async fn wait_retry_drained(&self) {
        wait_for(Duration::from_secs(60), "retry table drained", || async {
            self.parked().await.is_empty()
        })
        .await;
    }

    /// Waits until the slot's confirmed LSN reaches `lsn`.
    pub async fn wait_slot_past(&self, lsn: u64, what: &str) {
        wait_for(Duration::from_secs(60), what, || async {
            self.confirmed_lsn().await >= lsn
        })
        .await;
    }

    /// Waits until the head of the retry table failed with a reason containing `reason`.
    pub async fn wait_head_failed_with(&self, reason: &str) {
        wait_for(
            Duration::from_secs(60),
            &format!("head of the retry table failed with {reason:?}"),
            || async {
                self.parked()
                    .await
                    .first()
                    .is_some_and(|p| p.3.as_deref().unwrap_or("").contains(reason))
            },
        )
        .await;
    }

    /// (status, retry_count, error_message) of an Event-Forge outbox row.
    pub async fn row_state(&self, id: &str) -> (String, i32, Option<String>) {
        let r = self
            .db
            .query_one(
                &format!(
                    "select status, retry_count, error_message from {} where id = $1",
                    self.table
                ),
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    }

    pub async fn slot_active_pid(&self) -> Option<i32> {
        self.db
            .query_opt(
                "select active_pid from pg_replication_slots where slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0))
    }

    /// Drops slot, publication, table, queue and exchange.
    pub async fn cleanup(mut self) {
        if let Some(c) = self.consumer.take() {
            c.stop();
        }
        let db = pg_retry(Duration::from_secs(30)).await;
        drop_pg_objects(&db, &self.slot, &self.publication, &self.table).await;
        let _ = db
            .batch_execute(&format!("drop table if exists {}", self.retry_table))
            .await;
        if let Some(schema) = self.schema.take() {
            let _ = db
                .batch_execute(&format!("drop schema if exists {schema} cascade"))
                .await;
        }
        if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = ch
                    .exchange_delete(
                        self.exchange.as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        self.slot.clear();
    }
}

impl Drop for Fixture {
    /// A test that panicked still drops its slot (an inactive slot holds WAL forever).
    fn drop(&mut self) {
        if self.slot.is_empty() {
            return;
        }
        let (slot, publication, table) = (
            self.slot.clone(),
            self.publication.clone(),
            self.table.clone(),
        );
        let retry_table = self.retry_table.clone();
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((db, conn)) = tokio_postgres::connect(PG_URL, NoTls).await {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    drop_pg_objects(&db, &slot, &publication, &table).await;
                    let _ = db
                        .batch_execute(&format!("drop table if exists {retry_table}"))
                        .await;
                    if let Some(schema) = schema {
                        let _ = db
                            .batch_execute(&format!("drop schema if exists {schema} cascade"))
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

async fn drop_pg_objects(db: &Client, slot: &str, publication: &str, table: &str) {
    // A walsender may still hold the slot for a moment after its relay died.
    for _ in 0..100 {
        let _ = db
            .execute(
                "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = $1 and active_pid is not null",
                &[&slot],
            )
            .await;
        match db
            .execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => break,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = db
        .batch_execute(&format!("drop publication if exists \"{publication}\""))
        .await;
    // The relay's record of the slot: without it a re-run would be refused as a lost slot.
    let _ = db
        .execute(
            "delete from public.outbox_relay_slots where slot = $1",
            &[&slot],
        )
        .await;
    let _ = db
        .batch_execute(&format!("drop table if exists {table}"))
        .await;
}

/// Declares the durable topic exchange `exchange`.
pub async fn declare_topic(ch: &lapin::Channel, exchange: &str) {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Declares the queue `queue` (durable when `durable`).
pub async fn declare_queue(ch: &lapin::Channel, queue: &str, durable: bool) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Declares the durable topic exchange `exchange` and the queue `queue` (durable
/// when `durable`), bound to it with `#`.
pub async fn declare_bound_queue(ch: &lapin::Channel, exchange: &str, queue: &str, durable: bool) {
    declare_topic(ch, exchange).await;
    declare_queue(ch, queue, durable).await;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

pub async fn amqp_connect() -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("rabbitmq not reachable: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One delivered message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the consumer got it.
    pub at: std::time::SystemTime,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Received {
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default()
    }

    pub fn header(&self, key: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

/// Consumes the test queue in the background, reconnecting when the broker
/// closes the connection; messages are acked after they are recorded.
pub struct Consumer {
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    pub fn start(queue: String) -> Consumer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            loop {
                // Every step is bounded: a broker that is restarting may accept a
                // connection and never answer it.
                let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
                        .await
                        .ok()?;
                    let ch = conn.create_channel().await.ok()?;
                    let probe = conn.create_channel().await.ok()?;
                    ch.basic_qos(500, lapin::options::BasicQosOptions::default())
                        .await
                        .ok()?;
                    let consumer = ch
                        .basic_consume(
                            queue.as_str().into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .ok()?;
                    Some((conn, probe, consumer))
                })
                .await;
                let Ok(Some((conn, probe, mut consumer))) = attempt else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                // Whether this consumer still exists as far as the broker is concerned:
                // after a broker restart the delivery stream does not always end.
                let mut check = tokio::time::interval(Duration::from_secs(1));
                check.tick().await;
                loop {
                    tokio::select! {
                        d = consumer.next() => {
                            let Some(Ok(d)) = d else { break };
                            sink.lock().unwrap().push(Received {
                                at: std::time::SystemTime::now(),
                                routing_key: d.routing_key.to_string(),
                                body: d.data.clone(),
                                properties: d.properties.clone(),
                            });
                            let acked = tokio::time::timeout(
                                Duration::from_secs(5),
                                d.ack(BasicAckOptions::default()),
                            )
                            .await;
                            if !matches!(acked, Ok(Ok(_))) {
                                break;
                            }
                        }
                        _ = check.tick() => {
                            let passive = QueueDeclareOptions {
                                passive: true,
                                durable: true,
                                ..Default::default()
                            };
                            let alive = tokio::time::timeout(
                                Duration::from_secs(5),
                                probe.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
                            )
                            .await;
                            if !matches!(alive, Ok(Ok(q)) if q.consumer_count() > 0) {
                                break;
                            }
                        }
                    }
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "test consumer reconnecting".into()),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Consumer { received, task }
    }

    pub fn stop(&self) {
        self.task.abort();
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn ids(&self) -> HashSet<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.message_id())
            .collect()
    }

    /// Waits until every id in `expected` was received.
    pub async fn wait_ids(&self, expected: &[String], timeout: Duration) {
        let want: HashSet<&String> = expected.iter().collect();
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.ids();
            let missing = want.iter().filter(|id| !have.contains(**id)).count();
            if missing == 0 {
                return;
            }
            if Instant::now() > deadline {
                let sample: Vec<_> = want
                    .iter()
                    .filter(|id| !have.contains(**id))
                    .take(5)
                    .collect();
                panic!(
                    "{missing} of {} ids not received within {timeout:?} (e.g. {sample:?})",
                    want.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Received messages grouped by aggregate id, in arrival order.
    pub fn by_aggregate(&self) -> HashMap<String, Vec<Received>> {
        let mut out: HashMap<String, Vec<Received>> = HashMap::new();
        for r in self.all() {
            out.entry(r.header("x-aggregate-id").unwrap_or_default())
                .or_default()
                .push(r);
        }
        out
    }
}

/// A relay process spawned from the real binary; stderr goes to a log file.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub fn spawn(config: &std::path::Path, dir: &std::path::Path, env: &[(&str, &str)]) -> Relay {
        Self::command(&["run", "--config", config.to_str().unwrap()], dir, env)
    }

    /// Runs `outbox-relay <args>` in the background with stderr/stdout in a log file.
    pub fn command(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> Relay {
        Self::program(
            std::path::Path::new(env!("CARGO_BIN_EXE_outbox-relay")),
            args,
            dir,
            env,
        )
    }

    /// Runs one of the crate's examples (built by `cargo build --examples`, which
    /// `scripts/test.sh` does) like [`Relay::command`].
    pub fn example(name: &str, args: &[&str], dir: &std::path::Path) -> Relay {
        // target/<profile>/deps/<test binary> -> target/<profile>/examples/<name>
        let exe = std::env::current_exe().unwrap();
        let path = exe
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| profile.join("examples").join(name))
            .unwrap();
        assert!(
            path.exists(),
            "{} is missing: run `cargo build --examples` first (scripts/test.sh does)",
            path.display()
        );
        Self::program(&path, args, dir, &[])
    }

    fn program(
        program: &std::path::Path,
        args: &[&str],
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Relay {
        std::fs::create_dir_all(dir).unwrap();
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("relay-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOX_RELAY_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Relay { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "relay exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "relay did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of the relay's metrics endpoint (from its start-up log).
    pub async fn metrics_addr(&mut self) -> String {
        self.wait_log("metrics listening on ", Duration::from_secs(30))
            .await;
        let text = self.log_text();
        let at = text.find("metrics listening on ").unwrap() + "metrics listening on ".len();
        text[at..].split(':').take(2).collect::<Vec<_>>().join(":")
    }

    /// Waits until the relay streams (its start-up line).
    pub async fn wait_streaming(&mut self) {
        self.wait_log("streaming", Duration::from_secs(60)).await;
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit(timeout).await
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "relay did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts `cond` holds at every check during `window` (a negative assertion:
/// something must not happen for a while).
pub async fn holds_for<F, Fut>(window: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(cond().await, "no longer true: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cond().await, "no longer true: {what}");
}

/// GET `path` from `addr`: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint reachable");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Waits until the relay at `addr` reports an empty in-flight window (messages
/// and bytes): nothing it published is left unresolved.
pub async fn wait_window_empty(addr: &str) {
    wait_for(
        Duration::from_secs(60),
        "in-flight window empty",
        || async {
            let m = http_get(addr, "/metrics").await.1;
            metric_value(&m, "outbox_relay_inflight_messages") == Some(0.0)
                && metric_value(&m, "outbox_relay_inflight_bytes") == Some(0.0)
        },
    )
    .await;
}

/// The value of a metric line `name{labels} value` (labels as written, "" for none).
/// The value of one metric scraped from the endpoint at `addr` (-1 when absent).
pub async fn scrape_metric(addr: &str, name_and_labels: &str) -> f64 {
    metric_value(&http_get(addr, "/metrics").await.1, name_and_labels).unwrap_or(-1.0)
}

pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name_and_labels))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Ids of a test run, unique per call.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// A TCP proxy in front of a service that can stall: while stalled it forwards
/// nothing in either direction (a peer that accepts bytes and never answers),
/// without disturbing the shared service itself.
pub struct StallingProxy {
    pub port: u16,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(upstream: &'static str) -> StallingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut to: tokio::net::tcp::OwnedWriteHalf,
                                flag: Arc<AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::join!(pump(cr, sw, flag.clone()), pump(sr, cw, flag));
                });
            }
        });
        StallingProxy {
            port,
            stalled,
            task,
        }
    }

    pub fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The broker URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
