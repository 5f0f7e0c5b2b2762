//! Shared fixtures for the integration tests, one module a job: every test gets
//! its own table, publication, slot, exchange and queue ([`fixture`]), a relay
//! process spawned from the real binary ([`process`]), a consumer that survives
//! broker connection loss ([`amqp`]), the metrics endpoint ([`http`]), proxies
//! that stall or hold a peer ([`proxy`]), WAL positions ([`wal`]), scratch
//! clusters and nodes of its own ([`scratch`], [`cluster`]), per-aggregate order
//! ([`order`]), writing through outages and counting every id after one
//! ([`outage`]), and condition waits with timeouts (here).
// Each test binary uses a part of these helpers: what one does not use is not dead.
#![allow(dead_code)]

pub mod amqp;
pub mod cluster;
pub mod fixture;
pub mod http;
pub mod inbox;
pub mod order;
pub mod outage;
pub mod process;
pub mod proxy;
pub mod scratch;
pub mod tls;
pub mod wal;

// Re-exported for the tests; each binary uses some of them.
#[allow(unused_imports)]
pub use amqp::{
    amqp_connect, declare_bound_queue, declare_queue, declare_topic, Consumer, Received,
};
#[allow(unused_imports)]
pub use fixture::{event_forge_schema, index_names, Fixture, EVENT_FORGE_DDL};
#[allow(unused_imports)]
pub use http::{http_get, metric_value, scrape_metric, wait_window_empty};
#[allow(unused_imports)]
pub use order::{assert_in_order, assert_in_order_with_redeliveries};
#[allow(unused_imports)]
pub use outage::{
    assert_recovered, assert_recovered_or, write_in_background, write_rows_in_background,
};
pub use process::Relay;
#[allow(unused_imports)]
pub use proxy::StallingProxy;
#[allow(unused_imports)]
pub use wal::{commit_record_lsn, lsn_to_u64};

use std::future::Future;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Waits until `cond` returns true, polling every 50 ms; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn pg() -> Client {
    let (client, conn) = tokio_postgres::connect(PG_URL, NoTls)
        .await
        .expect("test postgres reachable (run scripts/setup-services.sh)");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Connects, retrying while Postgres restarts.
pub async fn pg_retry(timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio_postgres::connect(PG_URL, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                if client.simple_query("select 1").await.is_ok() {
                    return client;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("postgres did not come back: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts `cond` holds at every check during `window` (a negative assertion:
/// something must not happen for a while).
pub async fn holds_for<F, Fut>(window: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(cond().await, "no longer true: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cond().await, "no longer true: {what}");
}

/// Ids of a test run, unique per call.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}
