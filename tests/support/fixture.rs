//! One test's private objects: table (our DDL or Event-Forge's own), retry
//! table, publication, slot, exchange, queue, consumer; dropped at the end, also
//! when the test panics.

use super::*;
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

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
        f.create_outbox_table().await;
        f.with_consumer(bind_queue).await
    }

    /// Like `new`, but on a cluster of several nodes (`urls`): the exchange and a
    /// quorum queue bound with `#` are declared there, and the consumer moves
    /// to the next node when it loses its connection.
    pub async fn quorum(name: &str, urls: Vec<String>) -> Fixture {
        let mut f = Self::bare(name).await;
        f.create_outbox_table().await;
        let conn = Connection::connect(&urls[0], ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        declare_topic(&ch, &f.exchange).await;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            f.queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
        ch.queue_bind(
            f.queue.as_str().into(),
            f.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
        f.consumer = Some(Consumer::start_on(urls, f.queue.clone()));
        f
    }

    async fn create_outbox_table(&self) {
        self.db
            .batch_execute(&outbox_relay::pg::catalog::outbox_ddl(
                &outbox_relay::pg::TableName::parse(&self.table).unwrap(),
            ))
            .await
            .unwrap();
        // Rows carry their own retry budget (Event-Forge default 3); tests that want a
        // message to die set max_retries on the row.
        self.db
            .batch_execute(&format!(
                "alter table {} alter column max_retries set default 100000",
                self.table
            ))
            .await
            .unwrap();
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
            ("mapping", vec![]),
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
            if (name == "inbox" || name == "mapping") && lines.is_empty() {
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

/// Drops a slot (terminating its walsender), its publication, its record and the table.
pub async fn drop_pg_objects(db: &Client, slot: &str, publication: &str, table: &str) {
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
