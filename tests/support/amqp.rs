//! The broker side of a test: declarations, and a consumer that reconnects.

use super::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The broker delivered it before, to a consumer that did not ack it (the
    /// broker's redelivery, not a publish of the relay's).
    pub redelivered: bool,
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
        Self::start_on(vec![AMQP_URL.to_string()], queue)
    }

    /// [`Consumer::start`] on a broker of several nodes: each reconnect goes to
    /// the next URL.
    pub fn start_on(urls: Vec<String>, queue: String) -> Consumer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            for attempt in 0.. {
                let url = &urls[attempt % urls.len()];
                // Every step is bounded: a broker that is restarting may accept a
                // connection and never answer it.
                let connect = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(url, ConnectionProperties::default()),
                )
                .await;
                let Ok(Ok(conn)) = connect else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let setup = tokio::time::timeout(Duration::from_secs(5), async {
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
                    Some((probe, consumer))
                })
                .await;
                let Ok(Some((probe, mut consumer))) = setup else {
                    // Closed, not just dropped: a consume the broker registered
                    // but did not confirm in time would otherwise keep up to a
                    // prefetch of messages unacked on a channel nobody reads.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        conn.close(200, "test consumer setup timed out".into()),
                    )
                    .await;
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
                                redelivered: d.redelivered,
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
                    Duration::from_secs(5),
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
        if let Err(e) = self.try_wait_ids(expected, timeout).await {
            panic!("{e}");
        }
    }

    /// [`Consumer::wait_ids`], saying what is missing instead of panicking (for
    /// callers that add what they know to the failure).
    pub async fn try_wait_ids(&self, expected: &[String], timeout: Duration) -> Result<(), String> {
        let want: HashSet<&String> = expected.iter().collect();
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.ids();
            let missing = want.iter().filter(|id| !have.contains(**id)).count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut sample: Vec<_> = want
                    .iter()
                    .filter(|id| !have.contains(**id))
                    .take(10)
                    .collect();
                sample.sort();
                return Err(format!(
                    "{missing} of {} ids not received within {timeout:?} (e.g. {sample:?}); {} deliveries seen",
                    want.len(),
                    self.received.lock().unwrap().len()
                ));
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
