//! The AMQP side: one long-lived task owns the broker connection and a channel
//! in confirm mode. It takes publish commands from the relay over a bounded
//! channel, pipelines them (never one await per message) and reports each
//! broker answer back. When the connection goes away it says so, reconnects
//! with backoff and says when it is back; the relay then re-publishes what was
//! unresolved.

pub mod format;

pub use format::OutboundMessage;

use crate::config::AmqpUrl;
use crate::error::Error;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What the relay asks of the sink.
#[derive(Debug)]
pub enum SinkCommand {
    /// Publish under `generation`; commands of an older generation are dropped
    /// (their connection is gone and the relay re-sends them).
    Publish {
        seq: u64,
        generation: u64,
        message: Arc<OutboundMessage>,
    },
}

/// The broker's verdict on one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acked and not returned: the only success.
    Ack,
    /// Negatively acknowledged by the broker.
    Nack,
    /// Unroutable (`mandatory`): returned, even though an ack follows.
    Returned { reply_code: u16, reply_text: String },
    /// The channel was not in confirm mode: never a success.
    NotRequested,
}

/// What the sink tells the relay.
#[derive(Debug)]
pub enum SinkEvent {
    /// Connected, exchange declared, confirm mode on: publish with this generation.
    Up { generation: u64 },
    /// The connection of `generation` is gone; nothing published under it will be answered.
    Down { generation: u64, reason: String },
    /// The broker answered these publishes (seq, outcome) of `generation`.
    Confirmed {
        generation: u64,
        outcomes: Vec<(u64, Outcome)>,
    },
}

/// Connection settings of the sink.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub url: AmqpUrl,
    pub exchange: String,
    pub declare_exchange: bool,
    pub reconnect_backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl SinkSettings {
    /// The `[amqp]` section's connection settings.
    pub fn from_config(amqp: &crate::config::AmqpConfig) -> SinkSettings {
        SinkSettings {
            url: amqp.url.clone(),
            exchange: amqp.exchange.clone(),
            declare_exchange: amqp.declare_exchange,
            reconnect_backoff_max: amqp.reconnect_backoff_max,
            connect_timeout: amqp.connect_timeout,
        }
    }
}

/// An open connection with a confirm-mode channel.
pub struct Broker {
    pub connection: Connection,
    pub channel: lapin::Channel,
}

/// Connects, declares the exchange (topic, durable) when asked and enables confirms,
/// within `connect_timeout`: a broker that accepts the connection but never answers
/// (say, while it boots) must not hold the sink forever.
pub async fn connect(settings: &SinkSettings) -> Result<Broker, Error> {
    tokio::time::timeout(settings.connect_timeout, connect_now(settings))
        .await
        .unwrap_or_else(|_| {
            Err(Error::AmqpConnectTimeout {
                url: settings.url.redacted(),
                timeout: settings.connect_timeout,
            })
        })
}

async fn connect_now(settings: &SinkSettings) -> Result<Broker, Error> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("outbox-relay {}", env!("CARGO_PKG_VERSION")).into());
    let connection = Connection::connect(settings.url.expose(), props)
        .await
        .map_err(|source| Error::AmqpConnect {
            url: settings.url.redacted(),
            source,
        })?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| Error::Amqp {
            context: "opening a channel".into(),
            source,
        })?;
    if settings.declare_exchange {
        channel
            .exchange_declare(
                settings.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| Error::Amqp {
                context: format!(
                    "declaring exchange {} (topic, durable); if it exists with another type, pick another [amqp] exchange",
                    settings.exchange
                ),
                source,
            })?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|source| Error::Amqp {
            context: "enabling publisher confirms".into(),
            source,
        })?;
    Ok(Broker {
        connection,
        channel,
    })
}

/// One publish until its confirm: gives back its seq and message (for its id).
type ConfirmFuture<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// A broker answer to one publish.
type Answer = (
    u64,
    Arc<OutboundMessage>,
    Result<Confirmation, lapin::Error>,
);

/// Runs the sink until the command channel closes. `first` is the connection
/// made at start-up (so that start-up failures are reported, not retried).
pub async fn run(
    settings: SinkSettings,
    first: Broker,
    mut commands: mpsc::Receiver<SinkCommand>,
    events: mpsc::Sender<SinkEvent>,
) {
    let exchange: ShortString = settings.exchange.as_str().into();
    let mut broker = Some(first);
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let current = match broker.take() {
            Some(b) => b,
            None => match connect(&settings).await {
                Ok(b) => {
                    backoff = Duration::from_millis(100);
                    b
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "broker unavailable, retrying");
                    // Keep draining stale commands while waiting so the relay never blocks on us.
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            cmd = commands.recv() => if cmd.is_none() { return },
                        }
                    }
                    backoff = (backoff * 2).min(settings.reconnect_backoff_max);
                    continue;
                }
            },
        };
        generation += 1;
        if events.send(SinkEvent::Up { generation }).await.is_err() {
            return;
        }
        tracing::info!(generation, "broker connected, publishing with confirms");
        let reason = serve(&current, &exchange, generation, &mut commands, &events).await;
        let Some(reason) = reason else {
            close(&current.connection, 200, "outbox-relay shutting down").await;
            return;
        };
        tracing::warn!(generation, %reason, "broker connection lost; the relay re-publishes unconfirmed messages after reconnecting");
        if events
            .send(SinkEvent::Down { generation, reason })
            .await
            .is_err()
        {
            return;
        }
        close(&current.connection, 320, "outbox-relay reconnecting").await;
    }
}

/// Closes a connection without waiting long: on a connection that is already
/// gone, lapin's close can wait forever for an answer that never comes.
async fn close(connection: &Connection, code: u16, text: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(code, text.into())).await;
}

/// Publishes and collects confirms on one connection. Returns why it ended, or
/// `None` when the relay closed the command channel.
async fn serve(
    broker: &Broker,
    exchange: &ShortString,
    generation: u64,
    commands: &mut mpsc::Receiver<SinkCommand>,
    events: &mpsc::Sender<SinkEvent>,
) -> Option<String> {
    let mut confirms: FuturesUnordered<ConfirmFuture<'_>> = FuturesUnordered::new();
    let mut conn_events = Box::pin(broker.connection.events_listener());
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut returns = Returns::default();
    loop {
        tokio::select! {
            biased;
            Some(first) = confirms.next(), if !confirms.is_empty() => {
                // Every confirm that is ready now, as one batch: lapin hands a returned
                // message to whichever confirm it resolves next, not to the publish it
                // belongs to, so returns are matched to publishes by message id.
                let mut batch = vec![first];
                while let Some(Some(more)) = confirms.next().now_or_never() {
                    batch.push(more);
                }
                match returns.classify(batch) {
                    Ok(outcomes) => {
                        if events.send(SinkEvent::Confirmed { generation, outcomes }).await.is_err() {
                            return None;
                        }
                    }
                    Err(reason) => return Some(reason),
                }
            }
            ev = conn_events.next() => {
                match ev {
                    Some(lapin::Event::Error(e)) => return Some(format!("connection error: {e}")),
                    Some(lapin::Event::ConnectionBlocked(r)) => tracing::warn!(reason = %r, "broker blocked publishing (resource alarm); confirms wait until it unblocks"),
                    Some(lapin::Event::ConnectionUnblocked) => tracing::info!("broker unblocked publishing"),
                    Some(_) => {}
                    None => return Some("connection event stream ended".into()),
                }
            }
            cmd = commands.recv() => {
                // A closed command channel: the relay is shutting down.
                let first = cmd?;
                // Publish everything queued now in one go: the io loop then wakes once
                // for many frames instead of once per message.
                let mut next = Some(first);
                let mut done = Vec::new();
                let mut published = 0;
                while let Some(SinkCommand::Publish { seq, generation: g, message }) = next.take() {
                    if g == generation {
                        let channel = &broker.channel;
                        let exchange = message.exchange.clone().unwrap_or_else(|| exchange.clone());
                        let mut publish: ConfirmFuture<'_> = Box::pin(async move {
                            let sent = channel
                                .basic_publish(exchange, message.routing_key.clone(), options, &message.body, message.properties.clone())
                                .await;
                            match sent {
                                Ok(confirm) => (seq, message, confirm.await),
                                Err(e) => (seq, message, Err(e)),
                            }
                        });
                        // The first poll queues the frames and takes the delivery tag, so
                        // publishes leave in command order while their confirms are awaited together.
                        match futures_util::poll!(publish.as_mut()) {
                            std::task::Poll::Pending => confirms.push(publish),
                            std::task::Poll::Ready(result) => done.push(result),
                        }
                        published += 1;
                    }
                    if published < PUBLISH_BATCH {
                        next = commands.try_recv().ok();
                    }
                }
                if !done.is_empty() {
                    match returns.classify(done) {
                        Ok(outcomes) => {
                            if events.send(SinkEvent::Confirmed { generation, outcomes }).await.is_err() {
                                return None;
                            }
                        }
                        Err(reason) => return Some(reason),
                    }
                }
            }
        }
    }
}

/// Most publishes queued in one go before confirms are looked at again.
const PUBLISH_BATCH: usize = 256;

/// Matches returned (unroutable) messages to their publishes. RabbitMQ sends a
/// publish's `basic.return` before its `basic.ack`, but lapin attaches each return
/// to the next confirm it resolves — with `multiple` acks, any of several publishes.
/// So returns are counted by message id and consumed by that id's own confirm.
#[derive(Default)]
struct Returns {
    /// Returns not yet matched: message id -> (count, reply code, reply text).
    pending: HashMap<String, (u32, u16, String)>,
}

impl Returns {
    /// Turns a batch of ready confirms into outcomes; an error means the connection is gone.
    fn classify(&mut self, batch: Vec<Answer>) -> Result<Vec<(u64, Outcome)>, String> {
        let mut kinds = Vec::with_capacity(batch.len());
        for (seq, message, result) in batch {
            let confirmation = result.map_err(|e| format!("publishing: {e}"))?;
            let (kind, returned) = match confirmation {
                Confirmation::Ack(r) => (Outcome::Ack, r),
                Confirmation::Nack(r) => (Outcome::Nack, r),
                Confirmation::NotRequested => (Outcome::NotRequested, None),
            };
            if let Some(ret) = returned {
                let id = ret
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                let entry = self.pending.entry(id).or_insert((
                    0,
                    ret.reply_code,
                    ret.reply_text.to_string(),
                ));
                entry.0 += 1;
            }
            kinds.push((seq, message, kind));
        }
        Ok(kinds
            .into_iter()
            .map(|(seq, message, kind)| {
                let id = message.id.as_str();
                let outcome = match self.pending.get_mut(id) {
                    Some(entry) => {
                        entry.0 -= 1;
                        let outcome = Outcome::Returned {
                            reply_code: entry.1,
                            reply_text: entry.2.clone(),
                        };
                        if entry.0 == 0 {
                            self.pending.remove(id);
                        }
                        outcome
                    }
                    None => kind,
                };
                (seq, outcome)
            })
            .collect())
    }
}
