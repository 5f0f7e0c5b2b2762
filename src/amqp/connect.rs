//! Connecting to the broker: the connection (URL, TLS, timeout, errors that
//! name the key to fix), a confirm-mode channel, and the exchanges the relay
//! publishes to (declared, or checked to exist).

use super::AmqpSettings;
use crate::config::AmqpUrl;
use crate::error::Error;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// An open connection with a confirm-mode channel.
pub struct Broker {
    pub connection: Connection,
    pub channel: lapin::Channel,
    /// Which of `AmqpSettings::nodes` it is connected to.
    pub node: usize,
}

impl Broker {
    /// The frame size negotiated with the broker: a content header frame larger
    /// than this makes the broker close the connection.
    pub fn frame_max(&self) -> usize {
        self.connection.configuration().frame_max() as usize
    }

    /// Opens another confirm-mode channel on the connection.
    pub async fn confirm_channel(&self, purpose: &str) -> Result<lapin::Channel, Error> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|source| Error::Amqp {
                context: format!("opening a channel for {purpose}"),
                source,
            })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| Error::Amqp {
                context: format!("enabling publisher confirms for {purpose}"),
                source,
            })?;
        Ok(channel)
    }
}

/// Connects (to the first node that answers), declares the exchanges (topic,
/// durable) when asked or checks that they exist, and enables confirms, within
/// `connect_timeout` per node: a broker that accepts the connection but never
/// answers (say, while it boots) must not hold the sink forever.
pub async fn connect(settings: &AmqpSettings) -> Result<Broker, Error> {
    connect_from(settings, 0).await
}

/// [`connect`], trying the nodes in order from `first` (wrapping around).
pub async fn connect_from(settings: &AmqpSettings, first: usize) -> Result<Broker, Error> {
    first_answering(settings, first, |node| connect_now(settings, node))
        .await
        .map(|(broker, _)| broker)
}

/// Opens a connection to the broker, nothing more, within `connect_timeout`.
pub async fn open(settings: &AmqpSettings) -> Result<Connection, Error> {
    open_as(settings, "outbox-relay", 0).await.map(|(c, _)| c)
}

/// A connection to the first node that answers, trying them in order from
/// `first`, with `name` (and the version) as the connection's name in the
/// broker's management UI: the same URLs, TLS settings, timeout and error
/// explanations for every connection the binary makes. Returns which node.
pub async fn open_as(
    settings: &AmqpSettings,
    name: &str,
    first: usize,
) -> Result<(Connection, usize), Error> {
    first_answering(settings, first, |node| open_now(settings, node, name)).await
}

/// Tries `attempt` on each node in turn from `first` (wrapping around), each
/// within `connect_timeout`; the first success and its node, or every node's
/// failure.
async fn first_answering<T, F, Fut>(
    settings: &AmqpSettings,
    first: usize,
    attempt: F,
) -> Result<(T, usize), Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut failures = Vec::new();
    let n = settings.nodes.len();
    for node in (0..n).map(|i| (first + i) % n) {
        let url = &settings.nodes[node];
        match tokio::time::timeout(settings.connect_timeout, attempt(node)).await {
            Ok(Ok(value)) => return Ok((value, node)),
            Ok(Err(e)) => failures.push((url, e)),
            Err(_) => failures.push((
                url,
                Error::AmqpConnectTimeout {
                    url: url.redacted(),
                    timeout: settings.connect_timeout,
                },
            )),
        }
    }
    Err(none_answered(failures))
}

/// No node answered: with one node its own error (naming the key to fix), with
/// several each node's — worth retrying when any of them is.
fn none_answered(mut failures: Vec<(&AmqpUrl, Error)>) -> Error {
    if failures.len() == 1 {
        return failures.pop().expect("one failure").1;
    }
    Error::AmqpNodes {
        transient: failures.iter().any(|(_, e)| e.is_transient()),
        failures: failures
            .iter()
            .map(|(url, e)| format!("{}: {e}", url.node()))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

async fn open_now(settings: &AmqpSettings, node: usize, name: &str) -> Result<Connection, Error> {
    let url = &settings.nodes[node];
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{name} {}", env!("CARGO_PKG_VERSION")).into());
    // rustls needs a process-wide crypto provider when more than one is built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = lapin::runtime::default_runtime().map_err(|source| Error::AmqpConnect {
        url: url.redacted(),
        source,
    })?;
    Connection::connect_with_config(url.expose(), props, settings.tls.0.clone(), runtime)
        .await
        .map_err(|source| connect_error(url, source))
}

/// A failed connection; one that failed in the TLS handshake names the key to
/// look at.
fn connect_error(node: &AmqpUrl, source: lapin::Error) -> Error {
    let text = crate::redact::error_chain(&source);
    let lower = text.to_ascii_lowercase();
    let url = node.redacted();
    let tls = |key: &str, message: String| Error::AmqpTls {
        url: url.clone(),
        key: key.to_string(),
        message,
    };
    if lower.contains("unknownissuer")
        || lower.contains("unknown issuer")
        || lower.contains("badsignature")
    {
        return tls("tls_ca_file", "the broker's certificate is not signed by a trusted CA: set amqp.tls_ca_file to the CA (PEM) that signed it".into());
    }
    if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        return tls("url", format!("the broker's certificate is not valid for host {}: connect by a name the certificate holds", crate::redact::amqp_host(node.expose())));
    }
    if lower.contains("certificaterequired")
        || lower.contains("certificate required")
        || lower.contains("unknownca")
        || lower.contains("unknown ca")
    {
        return tls("tls_cert_file", "the broker refused the client certificate (or wants one): set amqp.tls_cert_file and amqp.tls_key_file to a certificate its CA signed".into());
    }
    if (lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
        || lower.contains("invalid peer certificate")
        || lower.contains("handshake"))
        && node.expose().starts_with("amqps://")
    {
        return tls("url", format!("TLS negotiation failed ({}): check that the port speaks TLS (RabbitMQ's default is 5671) and the certificates", crate::redact::one_line(&text)));
    }
    Error::AmqpConnect { url, source }
}

/// The exchanges the relay publishes to, with the keys that name them.
pub fn exchanges(settings: &AmqpSettings) -> Vec<(&'static str, &str)> {
    let mut exchanges = Vec::new();
    if let Some(exchange) = &settings.exchange {
        exchanges.push(("amqp.exchange", exchange.as_str()));
    }
    if let Some(dlx) = &settings.dead_letter_exchange {
        exchanges.push(("amqp.dead_letter_exchange", dlx.as_str()));
    }
    exchanges
}

async fn connect_now(settings: &AmqpSettings, node: usize) -> Result<Broker, Error> {
    let connection = open_now(settings, node, "outbox-relay").await?;
    for (key, exchange) in exchanges(settings) {
        ensure_exchange(&connection, key, exchange, settings.declare_exchange).await?;
    }
    let broker = Broker {
        channel: connection
            .create_channel()
            .await
            .map_err(|source| Error::Amqp {
                context: "opening a channel".into(),
                source,
            })?,
        connection,
        node,
    };
    broker
        .channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|source| Error::Amqp {
            context: "enabling publisher confirms".into(),
            source,
        })?;
    Ok(broker)
}

/// Declares `exchange` (topic, durable), or with `declare = false` checks that it
/// exists, on a channel of its own: a failed passive declare closes its channel.
pub async fn ensure_exchange(
    connection: &Connection,
    key: &'static str,
    exchange: &str,
    declare: bool,
) -> Result<(), Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| Error::Amqp {
            context: "opening a channel".into(),
            source,
        })?;
    let result = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                passive: !declare,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(()) => {
            let _ = channel.close(200, "exchange checked".into()).await;
            Ok(())
        }
        Err(source) if declare => Err(Error::ExchangeUnusable {
            key,
            exchange: exchange.to_string(),
            hint: "it exists with another type or durability: pick another name, or delete it so it can be declared as a durable topic exchange",
            source: Box::new(source),
        }),
        Err(source) => Err(Error::ExchangeUnusable {
            key,
            exchange: exchange.to_string(),
            hint: "it does not exist and amqp.declare_exchange = false: declare it (topic, durable), or set declare_exchange = true",
            source: Box::new(source),
        }),
    }
}
