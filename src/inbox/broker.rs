//! The broker task: owns the receiver's RabbitMQ connection. It declares the
//! queue and its bindings (or checks them), consumes with manual acks and a
//! prefetch window, maps each delivery (`mapping`), hands valid ones to the store
//! task and dead-letters invalid ones, and acks (multiple) what the store reports
//! committed. A lost connection reconnects with backoff on a new *epoch*: the
//! store's answers for deliveries of an older connection are dropped (the broker
//! redelivers those, and they come back as counted duplicates).

use super::acks::AckTracker;
use super::mapping::{self, Invalid};
use super::{Committed, Pending, Raw};
use crate::config::{AmqpConfig, InboxConfig, OnInvalid};
use crate::error::Error;
use crate::metrics::{metrics, Health, Problem};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Confirmation;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How often the receiver checks that its consumer still exists on the broker
/// (after a broker restart the delivery stream does not always end).
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for one broker operation (a declare, an ack, a confirm).
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The header that carries why a delivery was dead-lettered.
pub const REASON_HEADER: &str = "x-inbox-invalid-reason";
/// The header with the one-line detail.
pub const DETAIL_HEADER: &str = "x-inbox-invalid-detail";

/// Settings of the broker task.
pub struct BrokerSettings {
    pub amqp: AmqpConfig,
    pub inbox: InboxConfig,
    pub shutdown_timeout: Duration,
}

/// Why a consuming session ended.
enum Ended {
    Shutdown,
}

/// One connection with its channels and consumer.
struct Session {
    connection: Connection,
    /// Which node of `amqp.url` it is connected to.
    node: usize,
    consume: Channel,
    publish: Channel,
    probe: Channel,
    consumer: lapin::Consumer,
}

fn amqp_err(context: &str) -> impl Fn(lapin::Error) -> Error + '_ {
    move |source| Error::Amqp {
        context: context.to_string(),
        source,
    }
}

async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r.map_err(amqp_err(what)),
        Err(_) => Err(Error::InboxBroker(format!(
            "{what} got no answer within {OP_TIMEOUT:?}: the broker is overloaded or the connection is dead; reconnecting"
        ))),
    }
}

impl Session {
    /// A session on the first node that answers, trying from `first`.
    async fn open(s: &BrokerSettings, first: usize) -> Result<Session, Error> {
        // The relay's own connect: the [amqp] TLS settings (CA, client
        // certificate) and the errors that name the key to fix.
        let (connection, node) = crate::amqp::open_as(
            &crate::amqp::AmqpSettings::from_config(&s.amqp),
            "outbox-relay inbox",
            first,
        )
        .await?;
        topology(&connection, &s.inbox).await?;
        let consume = timed("opening the consume channel", connection.create_channel()).await?;
        timed(
            "setting the prefetch (inbox.prefetch)",
            consume.basic_qos(s.inbox.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let publish = timed(
            "opening the dead-letter channel",
            connection.create_channel(),
        )
        .await?;
        timed(
            "enabling publisher confirms on the dead-letter channel",
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let probe = timed("opening the probe channel", connection.create_channel()).await?;
        let consumer = timed(
            "starting the consumer",
            consume.basic_consume(
                s.inbox.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Session {
            connection,
            node,
            consume,
            publish,
            probe,
            consumer,
        })
    }
}

/// Declares the queue, its dead-letter exchange and bindings (`declare = true`),
/// or checks that the queue and the dead-letter exchange exist. Each step on a
/// channel of its own: a refused declare closes its channel.
async fn topology(connection: &Connection, inbox: &InboxConfig) -> Result<(), Error> {
    if let Some(dlx) = &inbox.dead_letter_exchange {
        crate::amqp::ensure_exchange(connection, "inbox.dead_letter_exchange", dlx, inbox.declare)
            .await?;
    }
    if let Some(exchange) = &inbox.bind_exchange {
        crate::amqp::ensure_exchange(connection, "inbox.bind_exchange", exchange, true).await?;
    }
    let channel = timed("opening a channel", connection.create_channel()).await?;
    let mut args = FieldTable::default();
    if inbox.declare {
        if let Some(dlx) = &inbox.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx.as_str())),
            );
        }
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(inbox.queue_type.as_str())),
        );
        if inbox.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
    }
    let declared = tokio::time::timeout(
        OP_TIMEOUT,
        channel.queue_declare(
            inbox.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                passive: !inbox.declare,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    .map_err(|_| Error::InboxBroker("declaring the inbox queue got no answer".into()))?;
    if let Err(source) = declared {
        return Err(Error::InboxQueue {
            queue: inbox.queue.clone(),
            hint: if inbox.declare {
                "it exists with other arguments (durability, x-queue-type, x-dead-letter-exchange, x-single-active-consumer): make inbox.queue_type, inbox.dead_letter_exchange and inbox.single_active_consumer match it, or delete the queue so it can be declared"
            } else {
                "it does not exist and inbox.declare = false: create it, or set declare = true"
            },
            source: Box::new(source),
        });
    }
    if let Some(exchange) = &inbox.bind_exchange {
        for key in &inbox.bind_keys {
            timed(
                "binding the inbox queue (inbox.bind_exchange, inbox.bind_keys)",
                channel.queue_bind(
                    inbox.queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
    }
    let _ = channel.close(200, "inbox topology ready".into()).await;
    Ok(())
}

/// Runs until `shutdown` turns true (after the deliveries handed to the store
/// are acked, or `shutdown_timeout`). The first connection's failure is returned
/// (a start-up refusal); later ones reconnect with backoff.
pub async fn run(
    settings: BrokerSettings,
    store: mpsc::Sender<Pending>,
    mut committed: mpsc::Receiver<Committed>,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<(), Error> {
    let mut epoch = 0u64;
    let mut failures = 0u32;
    // After a lost session, start from the next node: with a cluster, one that is up.
    let mut next_node = 0;
    loop {
        let session = match Session::open(&settings, next_node).await {
            Ok(s) => s,
            Err(e) if epoch == 0 => return Err(e),
            Err(e) => {
                failures += 1;
                health.set_problem(Problem::BrokerUnavailable, Some(e.to_string()));
                let wait = crate::time::backoff(
                    Duration::from_millis(200),
                    settings.amqp.reconnect_backoff_max,
                    failures,
                );
                tracing::warn!(error = %e, retry_in = ?wait, "inbox: cannot reach the broker");
                // Priority: shutdown, then the store's answers (stale now, dropped,
                // so the store is never blocked), then the end of the backoff.
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|s| *s) => return Ok(()),
                        c = committed.recv() => if c.is_none() { return Err(store_gone()) },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                continue;
            }
        };
        if epoch > 0 {
            metrics().reconnect("amqp");
        }
        epoch += 1;
        failures = 0;
        let node = settings.amqp.nodes[session.node].node();
        next_node = session.node + 1;
        health.set_broker(Some(node.clone()));
        health.set_problem(Problem::BrokerUnavailable, None);
        tracing::info!(queue = %settings.inbox.queue, epoch, %node, "inbox consuming");
        match consume(
            &settings,
            session,
            epoch,
            &store,
            &mut committed,
            &mut shutdown,
        )
        .await
        {
            Ok(Ended::Shutdown) => return Ok(()),
            Err(e) => {
                health.set_broker(None);
                if matches!(e, Error::InboxStoreGone) {
                    return Err(e);
                }
                tracing::warn!(error = %e, %node, "inbox: broker session ended; reconnecting from the next node");
            }
        }
    }
}

fn store_gone() -> Error {
    Error::InboxStoreGone
}

/// One session: deliveries in, acks out.
async fn consume(
    s: &BrokerSettings,
    mut session: Session,
    epoch: u64,
    store: &mpsc::Sender<Pending>,
    committed: &mut mpsc::Receiver<Committed>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Ended, Error> {
    let mut tracker = AckTracker::new();
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.tick().await;
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        // Priority: 1. the store's committed batches (acks free the prefetch
        // window); 2. shutdown (stop taking deliveries, wait for those handed to
        // the store); 3. the end of that wait; 4. new deliveries, only while the
        // store's channel has room; 5. the liveness probe.
        tokio::select! {
            biased;
            c = committed.recv() => {
                let c = c.ok_or_else(store_gone)?;
                for (e, tag) in c.settled {
                    if e == epoch {
                        tracker.settle(tag);
                    }
                }
                for (e, tag, invalid, raw) in c.refused {
                    if e == epoch {
                        dead_letter(s, &session, &mut tracker, tag, invalid, raw).await?;
                    }
                }
                ack(&session, &mut tracker).await?;
            }
            _ = shutdown.wait_for(|s| *s), if draining.is_none() => {
                let tag = session.consumer.tag();
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    session.consume.basic_cancel(tag, BasicCancelOptions::default()),
                ).await;
                draining = Some(tokio::time::Instant::now() + s.shutdown_timeout);
            }
            _ = crate::time::sleep_until_opt(draining), if draining.is_some() => {
                tracing::warn!(outstanding = tracker.outstanding(), "inbox: shutdown timeout with deliveries not yet recorded; the broker redelivers them");
                break;
            }
            d = session.consumer.next(), if draining.is_none() && store.capacity() > 0 => {
                let d = match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(amqp_err("receiving a delivery")(e)),
                    None => return Err(Error::InboxBroker("the broker ended the consumer (queue deleted, or the connection closed)".into())),
                };
                let tag = d.delivery_tag;
                tracker.received(tag);
                let raw = Raw {
                    body: d.data,
                    properties: d.properties,
                    routing_key: d.routing_key.to_string(),
                };
                match mapping::map(&raw.body, &raw.properties, &raw.routing_key, s.inbox.max_message_bytes) {
                    Ok(record) => {
                        let pending = Pending { epoch, tag, record, arrived: Instant::now(), delivery: raw };
                        store.try_send(pending).map_err(|_| store_gone())?;
                    }
                    Err(invalid) => {
                        dead_letter(s, &session, &mut tracker, tag, invalid, raw).await?;
                        ack(&session, &mut tracker).await?;
                    }
                }
            }
            _ = probe.tick() => {
                let q = timed(
                    "checking the inbox queue",
                    session.probe.queue_declare(
                        s.inbox.queue.as_str().into(),
                        QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
                        FieldTable::default(),
                    ),
                ).await?;
                if q.consumer_count() == 0 && draining.is_none() {
                    return Err(Error::InboxBroker("the broker no longer lists the inbox consumer".into()));
                }
            }
        }
        if draining.is_some() && tracker.outstanding() == 0 {
            break;
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        session
            .connection
            .close(200, "outbox-relay inbox shutting down".into()),
    )
    .await;
    Ok(Ended::Shutdown)
}

/// Acks (multiple) up to the highest tag whose predecessors are all settled.
async fn ack(session: &Session, tracker: &mut AckTracker) -> Result<(), Error> {
    if let Some(tag) = tracker.ackable() {
        timed(
            "acking recorded deliveries",
            session
                .consume
                .basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await?;
    }
    Ok(())
}

/// Counts an invalid delivery and sends it away: to the dead-letter exchange
/// with the reason in a header (then it is acked like the rest), or rejected
/// without requeue.
async fn dead_letter(
    s: &BrokerSettings,
    session: &Session,
    tracker: &mut AckTracker,
    tag: u64,
    invalid: Invalid,
    raw: Raw,
) -> Result<(), Error> {
    let reason = invalid.reason();
    metrics().inbox_invalid.with_label_values(&[reason]).inc();
    tracing::warn!(tag, reason, detail = %invalid.detail(), routing_key = %raw.routing_key, "inbox: invalid delivery");
    if let (OnInvalid::DeadLetter, Some(dlx)) = (s.inbox.on_invalid, &s.inbox.dead_letter_exchange)
    {
        let mut headers = raw.properties.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            DETAIL_HEADER.into(),
            AMQPValue::LongString(LongString::from(invalid.detail())),
        );
        headers.insert(
            "x-inbox-queue".into(),
            AMQPValue::LongString(LongString::from(s.inbox.queue.as_str())),
        );
        let properties = raw.properties.clone().with_headers(headers);
        let confirm = timed(
            "publishing an invalid delivery to inbox.dead_letter_exchange",
            session.publish.basic_publish(
                dlx.as_str().into(),
                raw.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &raw.body,
                properties,
            ),
        )
        .await?;
        let confirmation = timed("waiting for the dead-letter confirm", confirm).await?;
        if matches!(confirmation, Confirmation::Ack(_)) {
            tracker.settle(tag);
            return Ok(());
        }
        tracing::warn!(tag, "inbox: the broker refused the dead-letter publish; rejecting the delivery instead (the queue's own dead-letter exchange gets it)");
    }
    timed(
        "rejecting an invalid delivery",
        session
            .consume
            .basic_reject(tag, BasicRejectOptions { requeue: false }),
    )
    .await?;
    tracker.settle_individually(tag);
    Ok(())
}
