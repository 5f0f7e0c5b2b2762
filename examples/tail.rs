//! Prints every message published to an exchange: declares a temporary queue,
//! binds it with a routing-key pattern, and prints routing key, message_id,
//! headers and body of each delivery.
//!
//! cargo run --example tail -- [AMQP_URL] [EXCHANGE] [BINDING]
//! defaults: amqp://guest:guest@127.0.0.1:5672/%2f events #

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

#[tokio::main]
async fn main() -> Result<(), lapin::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let exchange = args.next().unwrap_or_else(|| "events".into());
    let binding = args.next().unwrap_or_else(|| "#".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        exchange.as_str().into(),
        binding.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    eprintln!("listening on exchange {exchange} with binding {binding} (Ctrl-C to stop)");
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "tail".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let d = delivery?;
        println!(
            "{} message_id={} headers={:?}\n  {}",
            d.routing_key,
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or("-"),
            d.properties.headers().as_ref().map(|h| h
                .inner()
                .keys()
                .map(|k| k.as_str().to_string())
                .collect::<Vec<_>>()),
            String::from_utf8_lossy(&d.data)
        );
    }
    Ok(())
}
