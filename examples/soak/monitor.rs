//! What the soak watches while it runs: the duplicates the receiver saw on the
//! wire (summed across its restarts) and the slot's lag.

use crate::procs::{http_get, metric};
use crate::setup::{self, SLOT};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples the receiver's `outbox_relay_inbox_duplicates_total` every 250 ms,
/// adding what each receiver process counted to one total (a restarted
/// receiver starts again at 0; what a killed one counted after its last
/// sample is not seen).
pub struct Duplicates {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    addr: String,
    last: f64,
    total: f64,
}

impl Duplicates {
    pub fn start(receiver_metrics: String) -> Duplicates {
        let state = Arc::new(Mutex::new(State {
            addr: receiver_metrics,
            ..Default::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let addr = shared.lock().unwrap().addr.clone();
                let Ok((200, body)) = http_get(&addr, "/metrics").await else {
                    continue;
                };
                let Some(now) = metric(&body, "outbox_relay_inbox_duplicates_total") else {
                    continue;
                };
                let mut s = shared.lock().unwrap();
                if s.addr == addr {
                    s.total += (now - s.last).max(0.0);
                    s.last = now;
                }
            }
        });
        Duplicates { state, task }
    }

    /// The receiver was replaced: its counter starts at 0 at `addr`.
    pub fn receiver_moved(&self, addr: String) {
        let mut s = self.state.lock().unwrap();
        if s.addr != addr {
            s.addr = addr;
            s.last = 0.0;
        }
    }

    pub fn total(&self) -> u64 {
        self.state.lock().unwrap().total as u64
    }
}

impl Drop for Duplicates {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The slot's lag (bytes of WAL written since its confirmed position) now.
pub async fn slot_lag(db: &tokio_postgres::Client) -> Option<f64> {
    db.query_opt(
        "select (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 from pg_replication_slots \
         where slot_name = $1",
        &[&SLOT],
    )
    .await
    .ok()
    .flatten()
    .and_then(|r| r.get(0))
}

/// How long from now until the slot's lag is under `limit` bytes (`None`:
/// not within `timeout`); sampled every 100 ms, reconnecting as needed.
pub async fn lag_under(limit: f64, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut db = None;
    while start.elapsed() < timeout {
        if db.is_none() {
            db = setup::pg(Duration::from_secs(5)).await.ok();
        }
        if let Some(client) = &db {
            match slot_lag(client).await {
                Some(lag) if lag < limit => return Some(start.elapsed()),
                Some(_) => {}
                None if client.is_closed() => db = None,
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
