//! Several `outbox-relay inbox` processes on one queue: competing receivers
//! record each message once; with a quorum queue and single active consumer one
//! receives at a time, in queue order, and another takes over when it dies.

use crate::support::inbox::{InboxFixture, Msg};
use crate::support::{scrape_metric, wait_for, Relay};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Starts `n` receivers on `config`, each consuming before the next starts.
async fn receivers(f: &InboxFixture, config: &std::path::Path, n: usize) -> Vec<Relay> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut r = f.spawn(config);
        r.wait_log("inbox consuming", T).await;
        all.push(r);
    }
    all
}

fn messages(prefix: &str, n: usize) -> Vec<Msg> {
    (0..n)
        .map(|i| Msg::event_forge(&format!("{prefix}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_competing_receivers_record_each_message_once_through_a_kill_9() {
    let f = InboxFixture::new("compete").await;
    let config = f.config(&["prefetch = 100", "batch_size = 50"]);
    let mut rs = receivers(&f, &config, 3).await;
    f.publish(&messages("cmp", 6000)).await;
    wait_for(T, "some recorded", || async { f.count().await >= 1500 }).await;
    rs[0].kill9();
    f.wait_count(6000, Duration::from_secs(120)).await;
    assert_eq!(f.distinct().await, 6000);
    // The survivors each took a share (the broker round-robins between them).
    for r in &mut rs[1..] {
        let addr = r.metrics_addr().await;
        assert!(scrape_metric(&addr, "outbox_relay_inbox_received_total").await > 0.0);
        assert!(r.terminate(T).await.success(), "{}", r.log_text());
    }
    f.cleanup().await;
}

/// The recipe for a queue whose order matters: `queue_type = "quorum"` and
/// `single_active_consumer = true`. The second receiver idles until the first
/// dies, then goes on where it stopped; the table holds the messages in queue
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inb_single_active_consumer_keeps_queue_order_across_a_take_over() {
    let f = InboxFixture::new("sac").await;
    let config = f.config(&[
        "queue_type = \"quorum\"",
        "single_active_consumer = true",
        "prefetch = 50",
        "batch_size = 20",
    ]);
    let mut rs = receivers(&f, &config, 2).await;
    let idle = rs[1].metrics_addr().await;
    f.publish(&messages("sac", 3000)).await;
    wait_for(T, "some recorded", || async { f.count().await >= 800 }).await;
    assert_eq!(
        scrape_metric(&idle, "outbox_relay_inbox_received_total").await,
        0.0,
        "the second receiver waits while the first is active"
    );
    rs[0].kill9();
    f.wait_count(3000, Duration::from_secs(120)).await;
    assert_eq!(f.distinct().await, 3000);
    assert!(scrape_metric(&idle, "outbox_relay_inbox_received_total").await > 0.0);
    let order: Vec<usize> =
        f.db.query(
            &format!("select message_id from {} order by created_at, id", f.table),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            id.trim_start_matches("sac-").parse().unwrap()
        })
        .collect();
    let out_of_order = order.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(out_of_order, 0, "recorded in queue order: {order:?}");
    assert!(rs[1].terminate(T).await.success(), "{}", rs[1].log_text());
    f.cleanup().await;
}
