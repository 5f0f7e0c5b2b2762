//! The soak's end: wait until everything written has taken effect, then count.

use crate::setup::{self, EFFECTS, INBOX, ORDERS, OUTBOX, RETRY};
use anyhow::Result;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// What the tables hold at the end.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub orders: i64,
    pub effects: i64,
    /// Orders without an effect.
    pub missing_effects: i64,
    /// Orders with more than one effect.
    pub doubled_effects: i64,
    /// Effects that came after a later order of their aggregate.
    pub out_of_order: i64,
    /// Rows in the relay's retry table (failed, delayed, parked behind another).
    pub parked: i64,
    /// Outbox rows not marked published.
    pub outbox_pending: i64,
    /// Inbox rows not processed.
    pub inbox_pending: i64,
    /// Inbox rows: every message recorded once.
    pub inbox_rows: i64,
    /// Seconds from the producer's stop until everything had taken effect.
    pub drain_seconds: f64,
}

impl Outcome {
    /// What does not hold, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.effects != self.orders || self.missing_effects != 0 || self.doubled_effects != 0 {
            out.push(format!(
                "effects: {} for {} orders ({} missing, {} doubled)",
                self.effects, self.orders, self.missing_effects, self.doubled_effects
            ));
        }
        if self.inbox_rows != self.orders {
            out.push(format!(
                "inbox: {} rows for {} orders",
                self.inbox_rows, self.orders
            ));
        }
        if self.out_of_order != 0 {
            out.push(format!(
                "{} effects out of their aggregate's order",
                self.out_of_order
            ));
        }
        for (what, n) in [
            ("parked in the retry table", self.parked),
            ("outbox rows not published", self.outbox_pending),
            ("inbox rows not processed", self.inbox_pending),
        ] {
            if n != 0 {
                out.push(format!("{n} {what}"));
            }
        }
        out
    }
}

/// Waits (up to `timeout`) until every order has its effect and nothing is
/// left parked or pending, then counts.
pub async fn settle(timeout: Duration) -> Result<Outcome> {
    let db = setup::pg(Duration::from_secs(60)).await?;
    let start = Instant::now();
    loop {
        let o = count(&db, start.elapsed()).await?;
        if o.failures().is_empty() || start.elapsed() > timeout {
            return Ok(o);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn count(db: &Client, waited: Duration) -> Result<Outcome> {
    let one = |sql: String| async move {
        Ok::<i64, anyhow::Error>(db.query_one(&sql, &[]).await?.get(0))
    };
    Ok(Outcome {
        orders: one(format!("select count(*) from {ORDERS}")).await?,
        effects: one(format!("select count(*) from {EFFECTS}")).await?,
        missing_effects: one(format!(
            "select count(*) from {ORDERS} o where not exists (select 1 from {EFFECTS} e where e.order_id = o.id)"
        ))
        .await?,
        doubled_effects: one(format!(
            "select count(*) from (select order_id from {EFFECTS} group by order_id having count(*) > 1) d"
        ))
        .await?,
        out_of_order: one(format!(
            "select count(*) from (select n, lag(n) over (partition by agg order by seq) as before from {EFFECTS}) e \
             where e.before >= e.n"
        ))
        .await?,
        parked: one(format!("select count(*) from {RETRY}")).await?,
        outbox_pending: one(format!("select count(*) from {OUTBOX} where status <> 'published'")).await?,
        inbox_pending: one(format!("select count(*) from {INBOX} where status <> 'processed'")).await?,
        inbox_rows: one(format!("select count(*) from {INBOX}")).await?,
        drain_seconds: waited.as_secs_f64(),
    })
}
