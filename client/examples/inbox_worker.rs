//! A `Processor` in a process of its own, as a consuming service runs it: each
//! `order.placed` message's effect (one row in EFFECTS_TABLE) commits in the
//! transaction that marks its inbox row processed, messages of one aggregate
//! (the payload's `agg`) in arrival order.
//!
//! The chain test (`tests/inbox_faults.rs`) kills it with -9 in the middle of a
//! handler: while the file HOLD_FILE exists, a handler that has written its
//! effect waits (its transaction open) instead of returning.
//!
//! cargo run --example inbox_worker -- URL INBOX_TABLE EFFECTS_TABLE NOTIFY_CHANNEL HOLD_FILE
//! EFFECTS_TABLE needs the columns (order_id text, agg text, n int).

use outbox_relay_client::table::TableName;
use outbox_relay_client::{InboxMessage, Processor, ProcessorOptions};
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Transaction;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, inbox, effects, channel, hold] = args.as_slice() else {
        return Err(
            "usage: inbox_worker URL INBOX_TABLE EFFECTS_TABLE NOTIFY_CHANNEL HOLD_FILE".into(),
        );
    };
    let effects = TableName::parse(effects)?.quoted();
    let insert = format!("insert into {effects} (order_id, agg, n) values ($1, $2, $3)");
    let hold = PathBuf::from(hold);
    let processor = Processor::new(url, inbox)?
        .options(ProcessorOptions {
            notify_channel: Some(channel.clone()),
            ordering_field: Some("agg".into()),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            ..Default::default()
        })
        .handler(
            "order.placed",
            move |tx: &Transaction<'_>, m: &InboxMessage| {
                let p = m.payload.clone();
                let (insert, hold) = (insert.clone(), hold.clone());
                Box::pin(async move {
                    let order = p["orderId"].as_str().unwrap_or_default();
                    tx.execute(
                        &insert,
                        &[
                            &order,
                            &p["agg"].as_str().unwrap_or_default(),
                            &(p["n"].as_i64().unwrap_or(-1) as i32),
                        ],
                    )
                    .await?;
                    if hold.exists() {
                        println!("holding {order} mid-handler");
                        while hold.exists() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    Ok(())
                })
            },
        );
    println!("processing {inbox}");
    processor
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
