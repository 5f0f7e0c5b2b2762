//! The AMQP side: one long-lived task owns the broker connection, a channel in
//! confirm mode for the stream, and a second one for dead-letter copies. It takes
//! publish commands from the relay over a bounded channel, pipelines them (never
//! one await per message) and reports each broker answer back. When the
//! connection goes away it says so — and whether the broker closed it in answer to
//! a publish, so the relay can find that message — reconnects with backoff and
//! says when it is back; the relay then re-publishes what was unresolved.
//!
//! Some publishes go out on an isolated channel, one at a time: dead-letter copies
//! (an exchange that vanished closes only that channel) and messages the relay
//! suspects of making the broker close channels. A channel-level refusal there
//! closes only that channel and is that one message's alone.

pub mod format;
mod returns;

pub use format::OutboundMessage;

use crate::amqp::{connect_from, ensure_exchange, AmqpSettings, Broker};
use crate::time::Backoff;
use format::Destination;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::protocol::AMQPErrorKind;
use lapin::types::ShortString;
use lapin::{Confirmation, Connection, ErrorKind};
use returns::Returns;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the relay asks of the sink.
#[derive(Debug)]
pub enum SinkCommand {
    /// Publish under `generation`; commands of an older generation are dropped
    /// (their connection is gone and the relay re-sends them).
    Publish {
        seq: u64,
        generation: u64,
        message: Arc<OutboundMessage>,
        /// Publish on the isolated channel, alone.
        isolated: bool,
    },
    /// Close the connection of `generation` and connect again (from the next
    /// node): every publish on it is nacked or unanswered, which can be the
    /// channel's state rather than the broker's (a channel opened while a quorum
    /// queue's leader was down can nack forever).
    Renew { generation: u64 },
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
    /// The broker closed the isolated channel in answer to this publish.
    Refused(Refusal),
    /// Not published: its content header frame is larger than the broker's `frame_max`.
    HeadersTooLarge { bytes: usize, frame_max: usize },
}

/// The broker's reply when it closed a channel or the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply_code: u16,
    pub reply_text: String,
}

/// What the sink tells the relay.
#[derive(Debug)]
pub enum SinkEvent {
    /// Connected, exchanges ready, confirm mode on: publish with this generation.
    Up {
        generation: u64,
        frame_max: usize,
        /// The broker node (`host:port`) connected to.
        node: String,
    },
    /// The connection of `generation` is gone; nothing published under it will be
    /// answered. `refusal`: the broker closed it with an error a publish can cause
    /// (a malformed or oversized message), so one of the unanswered publishes did.
    Down {
        generation: u64,
        reason: String,
        refusal: Option<Refusal>,
    },
    /// The broker stopped reading publishes (a resource alarm): nothing is answered
    /// until it unblocks, and that is not the messages' fault.
    Blocked {
        generation: u64,
        reason: String,
    },
    Unblocked {
        generation: u64,
    },
    /// The broker answered these publishes (seq, outcome) of `generation`.
    Confirmed {
        generation: u64,
        outcomes: Vec<(u64, Outcome)>,
    },
}

/// The first wait before reconnecting.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// A connection that lasted this long was healthy: the backoff starts over. One
/// that the broker closed sooner — say, in answer to a publish — is not evidence
/// of health, so the reconnect waits keep growing.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Codes a broker closes a channel or connection with in answer to one publish:
/// precondition failed (message over `max_message_size`), frame, syntax and
/// command errors, unexpected frame, not implemented. Connection forced (an
/// operator or a shutdown), access refused and not found (settings) are not a
/// message's fault.
const REFUSAL_CODES: [u16; 6] = [406, 501, 502, 503, 505, 540];

/// The broker's reply, when `error` is a close it sent with one of `REFUSAL_CODES`.
fn refusal(error: &lapin::Error) -> Option<Refusal> {
    match error.kind() {
        ErrorKind::ProtocolError(e) if REFUSAL_CODES.contains(&e.get_id()) => Some(Refusal {
            reply_code: e.get_id(),
            reply_text: e.get_message().to_string(),
        }),
        _ => None,
    }
}

/// A channel-level close the broker sent (a soft error: the channel is gone, the
/// connection is not).
fn channel_close(error: &lapin::Error) -> Option<Refusal> {
    match error.kind() {
        ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(_)) => {
            Some(Refusal {
                reply_code: e.get_id(),
                reply_text: e.get_message().to_string(),
            })
        }
        _ => None,
    }
}

/// One publish until its confirm: gives back its seq and message (for its id).
type ConfirmFuture<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// A broker answer to one publish.
type Answer = (
    u64,
    Arc<OutboundMessage>,
    Result<Confirmation, lapin::Error>,
);

/// Why `serve` stopped.
struct Ended {
    reason: String,
    refusal: Option<Refusal>,
}

impl Ended {
    fn from_error(context: &str, error: &lapin::Error) -> Ended {
        Ended {
            reason: format!("{context}: {error}"),
            refusal: refusal(error),
        }
    }
}

/// Runs the sink until the command channel closes. `first` is the connection
/// made at start-up (so that start-up failures are reported, not retried). A
/// lost connection is made again starting from the next node of `amqp.url`, so
/// that with a cluster the relay moves to a node that is up.
pub async fn run(
    settings: AmqpSettings,
    first: Broker,
    mut commands: mpsc::Receiver<SinkCommand>,
    events: mpsc::Sender<SinkEvent>,
) {
    // With a templated exchange every message names its own (`Destination::Rendered`).
    let exchange: ShortString = settings.exchange.clone().unwrap_or_default().into();
    let mut broker = Some(first);
    let mut generation = 0u64;
    let mut next_node = 0;
    let mut backoff = Backoff::new(BACKOFF_BASE, settings.reconnect_backoff_max);
    loop {
        let current = match broker.take() {
            Some(b) => b,
            None => match connect_from(&settings, next_node).await {
                Ok(b) => b,
                Err(e) => {
                    let wait_for = backoff.fail();
                    tracing::warn!(error = %e, retry_in = ?wait_for, "broker unavailable, retrying");
                    if !wait(wait_for, &mut commands).await {
                        return;
                    }
                    continue;
                }
            },
        };
        generation += 1;
        let frame_max = current.frame_max();
        let node = settings.nodes[current.node].node();
        next_node = current.node + 1;
        if events
            .send(SinkEvent::Up {
                generation,
                frame_max,
                node: node.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(
            generation,
            frame_max,
            %node,
            "broker connected, publishing with confirms"
        );
        let up_since = Instant::now();
        let Some(ended) = serve(
            &current,
            &exchange,
            RenderedExchanges {
                declare: settings.declare_exchange,
                timeout: settings.connect_timeout,
                ensured: HashSet::new(),
                proven: HashSet::new(),
            },
            generation,
            &mut commands,
            &events,
        )
        .await
        else {
            close(&current.connection, 200, "outbox-relay shutting down").await;
            return;
        };
        tracing::warn!(generation, %node, reason = %ended.reason, "broker connection lost; the relay re-publishes unconfirmed messages after reconnecting");
        if events
            .send(SinkEvent::Down {
                generation,
                reason: ended.reason,
                refusal: ended.refusal,
            })
            .await
            .is_err()
        {
            return;
        }
        close(&current.connection, 320, "outbox-relay reconnecting").await;
        if up_since.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        if !wait(backoff.fail(), &mut commands).await {
            return;
        }
    }
}

/// Waits `delay`, draining stale commands meanwhile so the relay never blocks on
/// this task. False: the relay closed the command channel.
async fn wait(delay: Duration, commands: &mut mpsc::Receiver<SinkCommand>) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            cmd = commands.recv() => if cmd.is_none() { return false },
        }
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
    mut rendered: RenderedExchanges,
    generation: u64,
    commands: &mut mpsc::Receiver<SinkCommand>,
    events: &mpsc::Sender<SinkEvent>,
) -> Option<Ended> {
    let mut confirms: FuturesUnordered<ConfirmFuture<'_>> = FuturesUnordered::new();
    let mut isolated = IsolatedLane::default();
    let mut conn_events = Box::pin(broker.connection.events_listener());
    let mut returns = Returns::default();
    let answer = |outcomes: Vec<(u64, Outcome)>| async move {
        events
            .send(SinkEvent::Confirmed {
                generation,
                outcomes,
            })
            .await
            .is_ok()
    };
    loop {
        // Priority: confirms (they free the relay's window), isolated confirms,
        // connection events, then new publishes.
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
                        if !answer(outcomes).await {
                            return None;
                        }
                    }
                    Err(e) => return Some(Ended::from_error("publishing", &e)),
                }
            }
            Some(answered) = isolated.in_flight.next(), if !isolated.in_flight.is_empty() => {
                match isolated.answered(answered) {
                    Ok((seq, outcome, message)) => {
                        if let Destination::Rendered(name) = &message.destination {
                            if !matches!(outcome, Outcome::Refused(_)) {
                                rendered.proven.insert(name.clone());
                            }
                        }
                        if !answer(vec![(seq, outcome)]).await {
                            return None;
                        }
                    }
                    Err(ended) => return Some(ended),
                }
            }
            ev = conn_events.next() => {
                match ev {
                    // A channel the broker closed (a soft error) is the business of the
                    // publishes on it: their confirms fail, and they are handled there.
                    Some(lapin::Event::Error(e)) if channel_close(&e).is_some() => {
                        tracing::debug!(error = %e, "a channel was closed by the broker");
                    }
                    Some(lapin::Event::Error(e)) => return Some(Ended::from_error("connection error", &e)),
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "broker blocked publishing (resource alarm); publish deadlines are suspended until it unblocks");
                        if events.send(SinkEvent::Blocked { generation, reason }).await.is_err() {
                            return None;
                        }
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("broker unblocked publishing");
                        if events.send(SinkEvent::Unblocked { generation }).await.is_err() {
                            return None;
                        }
                    }
                    Some(_) => {}
                    None => return Some(Ended { reason: "connection event stream ended".into(), refusal: None }),
                }
            }
            cmd = commands.recv() => {
                // A closed command channel: the relay is shutting down.
                let first = cmd?;
                let (done, mut refused, then) = publish_queued(
                    first, commands, broker, exchange, generation, &mut confirms, &mut isolated,
                    &mut rendered,
                )
                .await;
                if !done.is_empty() {
                    match returns.classify(done) {
                        Ok(outcomes) => refused.extend(outcomes),
                        Err(e) => return Some(Ended::from_error("publishing", &e)),
                    }
                }
                if !refused.is_empty() && !answer(refused).await {
                    return None;
                }
                match then {
                    Then::Go => {}
                    Then::Renew => {
                        return Some(Ended {
                            reason: "every publish on this connection is nacked or unanswered: replacing it (from the next node)".into(),
                            refusal: None,
                        });
                    }
                    Then::End(ended) => return Some(ended),
                }
            }
        }
        if let Err(ended) = isolated.start_next(broker, exchange).await {
            return Some(ended);
        }
    }
}

/// What the connection does after a round of publishes.
enum Then {
    Go,
    /// The relay asked for this connection to be renewed.
    Renew,
    /// The connection failed while an exchange was being ensured.
    End(Ended),
}

/// The exchanges templates rendered that this connection has declared (or
/// checked): each is ensured once per connection, on a channel of its own (a
/// failed declare closes its channel, and must not close the publishing one).
/// Until an exchange has taken a publish on this connection its messages go out
/// on the isolated channel: an exchange that passes the check but refuses the
/// publish (403: the user may not write there, or it is internal) then closes
/// that channel only, and the refusal is that one message's.
struct RenderedExchanges {
    declare: bool,
    /// Longest wait for a declare (`amqp.connect_timeout`): a broker that stopped
    /// reading must not hold the sink's loop.
    timeout: Duration,
    ensured: HashSet<ShortString>,
    proven: HashSet<ShortString>,
}

impl RenderedExchanges {
    /// Ok(None): `name` can be published to. Ok(Some(outcome)): it cannot —
    /// that one message's outcome (returned with the broker's reason, as a
    /// publish to a missing exchange is). Err: the connection failed.
    async fn ensure(
        &mut self,
        broker: &Broker,
        name: &ShortString,
    ) -> Result<Option<Outcome>, Ended> {
        if self.ensured.contains(name) {
            return Ok(None);
        }
        let ensured = tokio::time::timeout(
            self.timeout,
            ensure_exchange(&broker.connection, "amqp.exchange", name.as_str(), self.declare),
        )
        .await
        .map_err(|_| Ended {
            reason: format!(
                "declaring exchange {:?} took longer than amqp.connect_timeout ({:?}): replacing the connection",
                name.as_str(),
                self.timeout
            ),
            refusal: None,
        })?;
        match ensured {
            Ok(()) => {
                self.ensured.insert(name.clone());
                Ok(None)
            }
            Err(crate::Error::ExchangeUnusable { hint, source, .. }) => {
                match channel_close(&source) {
                    Some(r) => Ok(Some(Outcome::Returned {
                        reply_code: r.reply_code,
                        reply_text: format!(
                            "exchange {:?} cannot be used: {} ({hint})",
                            name.as_str(),
                            r.reply_text
                        ),
                    })),
                    None => Err(Ended::from_error("ensuring a rendered exchange", &source)),
                }
            }
            Err(e) => Err(Ended {
                reason: format!("ensuring exchange {:?}: {e}", name.as_str()),
                refusal: None,
            }),
        }
    }
}

/// Publishes `first` and everything else queued now (up to `PUBLISH_BATCH`) in
/// one go: the io loop then wakes once for many frames instead of once per
/// message. Commands of an older connection are dropped. Returns the answers
/// that came at once, the refusals made before publishing (headers larger
/// than `frame_max`, an exchange a template rendered that cannot be used), and
/// what the connection does next: go on, be renewed at the relay's request
/// (what was queued after that request stays queued), or end.
#[allow(clippy::too_many_arguments)]
async fn publish_queued<'a>(
    first: SinkCommand,
    commands: &mut mpsc::Receiver<SinkCommand>,
    broker: &'a Broker,
    exchange: &ShortString,
    generation: u64,
    confirms: &mut FuturesUnordered<ConfirmFuture<'a>>,
    isolated: &mut IsolatedLane,
    rendered: &mut RenderedExchanges,
) -> (Vec<Answer>, Vec<(u64, Outcome)>, Then) {
    let frame_max = broker.frame_max();
    let mut next = Some(first);
    let mut done = Vec::new();
    let mut refused = Vec::new();
    let mut published = 0;
    while let Some(command) = next.take() {
        let (seq, g, message, alone) = match command {
            SinkCommand::Publish {
                seq,
                generation,
                message,
                isolated,
            } => (seq, generation, message, isolated),
            SinkCommand::Renew { generation: g } if g == generation => {
                return (done, refused, Then::Renew);
            }
            SinkCommand::Renew { .. } => {
                next = commands.try_recv().ok();
                continue;
            }
        };
        if g == generation {
            if message.header_len > frame_max {
                refused.push((
                    seq,
                    Outcome::HeadersTooLarge {
                        bytes: message.header_len,
                        frame_max,
                    },
                ));
            } else {
                let mut alone = alone || matches!(message.destination, Destination::DeadLetter(_));
                let mut unusable = None;
                if let Destination::Rendered(name) = &message.destination {
                    match rendered.ensure(broker, name).await {
                        Ok(None) => alone |= !rendered.proven.contains(name),
                        Ok(Some(outcome)) => unusable = Some(outcome),
                        Err(ended) => return (done, refused, Then::End(ended)),
                    }
                }
                if let Some(outcome) = unusable {
                    refused.push((seq, outcome));
                } else if alone {
                    isolated.queue.push_back((seq, message));
                } else {
                    let mut publish = publish(&broker.channel, exchange.clone(), seq, message);
                    // The first poll queues the frames and takes the delivery tag, so
                    // publishes leave in command order while their confirms are awaited together.
                    match futures_util::poll!(publish.as_mut()) {
                        std::task::Poll::Pending => confirms.push(publish),
                        std::task::Poll::Ready(result) => done.push(result),
                    }
                }
            }
            published += 1;
        }
        if published < PUBLISH_BATCH {
            next = commands.try_recv().ok();
        }
    }
    (done, refused, Then::Go)
}

/// Publishes `message` on `channel` and waits for its confirm.
fn publish<'a>(
    channel: &'a lapin::Channel,
    exchange: ShortString,
    seq: u64,
    message: Arc<OutboundMessage>,
) -> ConfirmFuture<'a> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    Box::pin(async move {
        let exchange = message.exchange(&exchange).clone();
        let sent = channel
            .basic_publish(
                exchange,
                message.routing_key.clone(),
                options,
                &message.body,
                message.properties.clone(),
            )
            .await;
        match sent {
            Ok(confirm) => (seq, message, confirm.await),
            Err(e) => (seq, message, Err(e)),
        }
    })
}

/// Most publishes queued in one go before confirms are looked at again.
const PUBLISH_BATCH: usize = 256;

/// Publishes that must not take others down with them: their own channel, one
/// at a time, so a channel-level refusal (an exchange deleted under the relay, a
/// message over the broker's `max_message_size`) closes only that channel and is
/// attributed to the one message that caused it.
#[derive(Default)]
struct IsolatedLane {
    channel: Option<lapin::Channel>,
    queue: std::collections::VecDeque<(u64, Arc<OutboundMessage>)>,
    in_flight: FuturesUnordered<ConfirmFuture<'static>>,
    returns: Returns,
}

impl IsolatedLane {
    /// Publishes the next queued message when none is in flight.
    async fn start_next(&mut self, broker: &Broker, exchange: &ShortString) -> Result<(), Ended> {
        if !self.in_flight.is_empty() {
            return Ok(());
        }
        let Some((seq, message)) = self.queue.pop_front() else {
            return Ok(());
        };
        let channel = match &self.channel {
            Some(c) => c.clone(),
            None => {
                let c = broker
                    .confirm_channel("isolated publishes")
                    .await
                    .map_err(|e| Ended {
                        reason: e.to_string(),
                        refusal: None,
                    })?;
                self.channel = Some(c.clone());
                c
            }
        };
        let exchange = exchange.clone();
        self.in_flight.push(Box::pin(async move {
            let answer = publish(&channel, exchange, seq, message).await;
            drop(channel);
            answer
        }));
        Ok(())
    }

    /// The broker's answer to the message in flight; a closed channel is that
    /// message's refusal unless the connection itself is gone.
    fn answered(&mut self, answer: Answer) -> Result<(u64, Outcome, Arc<OutboundMessage>), Ended> {
        let (seq, message, result) = answer;
        match result {
            Err(e) => match channel_close(&e) {
                Some(refusal) => {
                    // The channel is gone; the next message opens a new one.
                    self.channel = None;
                    Ok((seq, Outcome::Refused(refusal), message))
                }
                None => Err(Ended::from_error("publishing on the isolated channel", &e)),
            },
            Ok(confirmation) => {
                let mut outcomes = self
                    .returns
                    .classify(vec![(seq, message.clone(), Ok(confirmation))])
                    .map_err(|e| Ended::from_error("publishing on the isolated channel", &e))?;
                let (seq, outcome) = outcomes.remove(0);
                Ok((seq, outcome, message))
            }
        }
    }
}
