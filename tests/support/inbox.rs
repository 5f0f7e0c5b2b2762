//! Fixtures for the inbox tests: each test owns its inbox table, queue,
//! dead-letter exchange and queue, and NOTIFY channel (all prefixed `inb_`), and
//! runs `outbox-relay inbox` from the real binary.

use super::{amqp_connect, pg, wait_for, Relay, AMQP_URL, PG_URL};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Client;

pub struct InboxFixture {
    pub name: String,
    pub table: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    pub channel: String,
    pub dir: PathBuf,
    pub db: Client,
    /// A schema of the test's own (Event-Forge's tables), dropped at cleanup.
    pub schema: Option<String>,
}

/// A message as a test publishes it.
pub struct Msg {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Msg {
    /// An Event-Forge message: message_id property, x-event-type header, camelCase body.
    pub fn event_forge(id: &str) -> Msg {
        let body = serde_json::json!({
            "id": id, "aggregateType": "Order", "aggregateId": "a-1",
            "eventType": "order.placed", "payload": {"id": id}, "metadata": null,
            "createdAt": "2026-11-29T00:00:00Z"
        });
        Msg {
            properties: BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(headers(&[("x-event-type", "order.placed")])),
            body: body.to_string().into_bytes(),
        }
    }

    pub fn raw(body: &[u8]) -> Msg {
        Msg {
            properties: BasicProperties::default(),
            body: body.to_vec(),
        }
    }
}

pub fn headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
    }
    t
}

impl InboxFixture {
    /// Drops leftovers of an earlier run, creates the inbox table, the
    /// dead-letter exchange and a queue bound to it. The receiver declares the
    /// inbox queue itself.
    pub async fn new(name: &str) -> InboxFixture {
        let db = pg().await;
        let f = InboxFixture {
            name: name.to_string(),
            table: format!("public.inb_{name}"),
            queue: format!("inb_q_{name}"),
            dlx: format!("inb_dlx_{name}"),
            dlq: format!("inb_dlq_{name}"),
            channel: format!("inb_n_{name}"),
            dir: std::env::temp_dir()
                .join("outbox-relay-tests")
                .join(format!("inb_{name}")),
            db,
            schema: None,
        };
        f.db.batch_execute(&format!("drop table if exists {}", f.table))
            .await
            .unwrap();
        let table = outbox_relay::pg::TableName::parse(&f.table).unwrap();
        f.db.batch_execute(&outbox_relay::inbox::queries::inbox_ddl(&table))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&f.dir);
        std::fs::create_dir_all(&f.dir).unwrap();
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        for q in [&f.queue, &f.dlq] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(f.dlx.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        super::declare_bound_queue(&ch, &f.dlx, &f.dlq, true).await;
        let _ = conn.close(200, "bye".into()).await;
        f
    }

    /// Like `new`, but the inbox table is Event-Forge's own
    /// (`ef_inb_<name>.inbox_messages`, made by its models' DDL: no server defaults).
    pub async fn event_forge(name: &str) -> InboxFixture {
        let mut f = Self::new(name).await;
        f.db.batch_execute(&format!("drop table if exists {}", f.table))
            .await
            .unwrap();
        let schema = format!("ef_inb_{name}");
        super::event_forge_schema(&f.db, &schema).await;
        f.table = format!("{schema}.inbox_messages");
        f.schema = Some(schema);
        f
    }

    /// A config file; `inbox` lines replace the defaults with the same key, and
    /// `amqp_url` another broker address (a proxy).
    pub fn config_with(&self, inbox: &[&str], amqp_url: &str) -> PathBuf {
        self.config_on(inbox, &format!("url = \"{amqp_url}\""))
    }

    /// [`InboxFixture::config_with`], the `[amqp]` url line as given (a list of
    /// a cluster's nodes).
    pub fn config_on(&self, inbox: &[&str], amqp_url_line: &str) -> PathBuf {
        let mut lines = vec![
            format!("queue = \"{}\"", self.queue),
            format!("table = \"{}\"", self.table),
            format!("dead_letter_exchange = \"{}\"", self.dlx),
            format!("notify_channel = \"{}\"", self.channel),
        ];
        for l in inbox {
            let key = l.split('=').next().unwrap().trim();
            lines.retain(|x| x.split('=').next().unwrap().trim() != key);
            lines.push(l.to_string());
        }
        let text = format!(
            "[postgres]\nurl = \"{PG_URL}\"\nreconnect_backoff_max = \"2s\"\n\
             [amqp]\n{amqp_url_line}\nreconnect_backoff_max = \"2s\"\n\
             [inbox]\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info,outbox_relay=debug\"\n",
            lines.join("\n")
        );
        let path = self.dir.join("inbox.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn config(&self, inbox: &[&str]) -> PathBuf {
        self.config_with(inbox, AMQP_URL)
    }

    /// Starts `outbox-relay inbox` and waits until it consumes.
    pub async fn start(&self, inbox: &[&str]) -> Relay {
        let mut r = self.spawn(&self.config(inbox));
        r.wait_log("inbox consuming", Duration::from_secs(60)).await;
        r
    }

    pub fn spawn(&self, config: &std::path::Path) -> Relay {
        Relay::command(
            &["inbox", "--config", config.to_str().unwrap()],
            &self.dir,
            &[],
        )
    }

    /// Publishes `msgs` to the inbox queue (default exchange), with confirms.
    pub async fn publish(&self, msgs: &[Msg]) {
        self.publish_on(AMQP_URL, msgs).await
    }

    /// [`InboxFixture::publish`] through the broker node at `url`.
    pub async fn publish_on(&self, url: &str, msgs: &[Msg]) {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for chunk in msgs.chunks(1000) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for m in chunk {
                // Through the default exchange: the routing key is the queue's name.
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &m.body,
                        m.properties.clone(),
                    )
                    .await
                    .unwrap(),
                );
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack(), "broker acked the test publish");
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }

    pub async fn count(&self) -> i64 {
        self.db
            .query_one(&format!("select count(*) from {}", self.table), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Distinct message ids in the table.
    pub async fn distinct(&self) -> i64 {
        self.db
            .query_one(
                &format!("select count(distinct message_id) from {}", self.table),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn wait_count(&self, n: i64, timeout: Duration) {
        wait_for(timeout, &format!("{n} inbox rows"), || async {
            self.count().await == n
        })
        .await;
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn ready(&self, queue: &str) -> u32 {
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
        q.message_count()
    }

    /// Takes every message from the dead-letter queue: (header value of
    /// `x-inbox-invalid-reason`, body).
    pub async fn take_dead_letters(&self) -> Vec<(Option<String>, Vec<u8>)> {
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(self.dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let reason = m.delivery.properties.headers().as_ref().and_then(|h| {
                match h.inner().get("x-inbox-invalid-reason") {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                }
            });
            out.push((reason, m.delivery.data.clone()));
        }
        let _ = conn.close(200, "bye".into()).await;
        out
    }

    /// Waits until the dead-letter queue gave `n` messages; returns them in order.
    pub async fn wait_dead_letters(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<(Option<String>, Vec<u8>)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut all = Vec::new();
        while all.len() < n {
            all.extend(self.take_dead_letters().await);
            if std::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {n} dead letters, got {all:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        all
    }

    pub async fn cleanup(self) {
        let _ = self
            .db
            .batch_execute(&format!("drop table if exists {}", self.table))
            .await;
        if let Some(schema) = &self.schema {
            let _ = self
                .db
                .batch_execute(&format!("drop schema if exists {schema} cascade"))
                .await;
        }
        let conn = amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        for q in [&self.queue, &self.dlq] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(self.dlx.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = conn.close(200, "bye".into()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of the broker that can hold everything the client sends
/// (acks among it) while still passing what the broker sends (deliveries), and
/// then cut every connection without ever forwarding what it held.
pub struct HoldingProxy {
    pub port: u16,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingProxy {
    pub async fn start(upstream: &'static str) -> HoldingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let (h, c) = (hold.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (hold, cut) = (h.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut to: tokio::net::tcp::OwnedWriteHalf,
                                hold: Option<Arc<AtomicBool>>,
                                cut: Arc<AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let read = tokio::time::timeout(
                                Duration::from_millis(20),
                                from.read(&mut buf),
                            )
                            .await;
                            if cut.load(Ordering::SeqCst) {
                                return;
                            }
                            let n = match read {
                                Err(_) => continue,
                                Ok(Ok(0)) | Ok(Err(_)) => return,
                                Ok(Ok(n)) => n,
                            };
                            while hold.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
                                if cut.load(Ordering::SeqCst) {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Both sockets close when both pumps return (halves dropped).
                    tokio::join!(
                        pump(cr, sw, Some(hold), cut.clone()),
                        pump(sr, cw, None, cut)
                    );
                });
            }
        });
        HoldingProxy {
            port,
            hold,
            cut,
            task,
        }
    }

    /// Holds (true) or passes (false) what clients send to the broker.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every proxied connection, dropping what was held.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
