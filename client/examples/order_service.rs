//! A service that uses both halves of the library: it places orders (the order
//! row and its `order.placed` event commit together through `outbox::enqueue`)
//! and ships them (a `Processor` handler writes the shipment in the transaction
//! that marks the inbox row processed, so each order ships once).
//!
//! Run next to it: `outbox-relay run` (outbox -> broker) and `outbox-relay inbox`
//! (broker -> `public.inbox_messages`, `bind_keys = ["Order.#"]`), both from one
//! config file; `outbox-relay init` creates the outbox and inbox tables.
//!
//! cargo run --example order_service -- [POSTGRES_URL] [ORDERS_TO_PLACE]
//! defaults: postgresql://postgres@127.0.0.1:5432/test 10

use outbox_relay_client::outbox::{enqueue, NewEvent};
use outbox_relay_client::{InboxMessage, Processor};
use tokio_postgres::{NoTls, Transaction};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "postgresql://postgres@127.0.0.1:5432/test".into());
    let orders: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "create table if not exists example_orders (id text primary key, placed_at timestamptz not null default now());
             create table if not exists example_shipments (order_id text primary key, shipped_at timestamptz not null default now());",
        )
        .await?;

    // Producer side: the order and its event, in one transaction.
    for _ in 0..orders {
        let tx = client.transaction().await?;
        let order: String = tx
            .query_one(
                "insert into example_orders (id) values (gen_random_uuid()::text) returning id",
                &[],
            )
            .await?
            .get(0);
        enqueue(
            &tx,
            NewEvent::new(
                "Order",
                order.clone(),
                "order.placed",
                serde_json::json!({ "orderId": order }),
            ),
        )
        .await?;
        tx.commit().await?;
    }
    println!("placed {orders} order(s); shipping what arrives in the inbox (Ctrl-C stops)");

    // Consumer side: ship each order once.
    Processor::new(&url, "public.inbox_messages")?
        .handler("order.placed", |tx: &Transaction<'_>, m: &InboxMessage| {
            let order = m.payload["orderId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Box::pin(async move {
                tx.execute(
                    "insert into example_shipments (order_id) values ($1)",
                    &[&order],
                )
                .await?;
                println!("shipped {order}");
                Ok(())
            })
        })
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
