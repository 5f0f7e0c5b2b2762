//! A RabbitMQ cluster: three scratch nodes (ports 56810, 56820, 56830 and the
//! two above each), quorum queues, `amqp.url` listing every node. The node the
//! relay or the receiver is connected to is killed (-9), then the whole cluster;
//! every id is counted after each. One cluster for the binary (it takes ~25 s
//! to form): one test runs the scenarios in turn, each with its own names,
//! restarting what the one before killed.

mod support;

use std::time::Duration;
use support::cluster::ScratchCluster;
use support::inbox::{InboxFixture, Msg};
use support::{
    assert_recovered_or, holds_for, http_get, scrape_metric, wait_for, write_rows_in_background,
    Fixture, Relay,
};

const T: Duration = Duration::from_secs(90);
const PORT: u16 = 56810;

/// `(id, aggregate)` rows: `per` events of each of `aggs` aggregates, interleaved
/// (ids `{prefix}{a}-{i}`, as the order check reads them).
fn aggregate_rows(prefix: &str, aggs: usize, per: usize) -> Vec<(String, String)> {
    (0..per)
        .flat_map(|i| (0..aggs).map(move |a| (format!("{prefix}{a}-{i}"), format!("{prefix}{a}"))))
        .collect()
}

/// Waits for `/readyz` to answer 200 on a node other than `not`; that node.
async fn ready_node(addr: &str, not: Option<&str>) -> String {
    let node = std::sync::Mutex::new(String::new());
    wait_for(T, "ready on a live broker node", || async {
        let (code, body) = http_get(addr, "/readyz").await;
        match body.trim().strip_prefix("ready: broker node ") {
            Some(n) if code == 200 && Some(n) != not => {
                *node.lock().unwrap() = n.to_string();
                true
            }
            _ => false,
        }
    })
    .await;
    node.into_inner().unwrap()
}

/// What the relay published, in the order it reached the consumer: the
/// broker's own redeliveries (to the test consumer, after its node died with
/// deliveries unacked) are left out — RabbitMQ requeues those behind newer
/// messages, which says nothing about the order the relay published in.
fn published(f: &Fixture) -> Vec<support::Received> {
    f.consumer()
        .all()
        .into_iter()
        .filter(|r| !r.redelivered)
        .collect()
}

/// Asserts the relay's publish order per aggregate, as the consumer can tell
/// it: a message whose every delivery was such a redelivery (its first went to
/// the consumer on the dead node and was never read) has no place in
/// `published`, so it may be missing before later ones; every other message,
/// and every re-publish of the relay, is checked.
fn assert_published_in_order(f: &Fixture) {
    let all = f.consumer().all();
    let fresh: std::collections::HashSet<String> = all
        .iter()
        .filter(|r| !r.redelivered)
        .map(|r| r.message_id())
        .collect();
    let only_redelivered: std::collections::HashSet<String> = all
        .iter()
        .map(|r| r.message_id())
        .filter(|id| !fresh.contains(id))
        .collect();
    assert!(
        only_redelivered.len() <= 500,
        "{} messages reached the consumer only as redeliveries: more than the test consumer's prefetch (500)",
        only_redelivered.len()
    );
    support::order::assert_in_order_with_redeliveries_except(&published(f), |id| {
        only_redelivered.contains(id)
    });
}

fn broker_node_metric(node: &str) -> String {
    format!("outbox_relay_broker_node{{node=\"{node}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_nothing_when_nodes_die() {
    let mut cluster = ScratchCluster::start("cl", PORT).await;
    the_relay_moves_to_a_live_node_when_its_node_is_killed(&mut cluster).await;
    the_receiver_moves_to_a_live_node_and_records_each_message_once(&mut cluster).await;
    the_whole_cluster_down_for_twenty_seconds_loses_nothing(&mut cluster).await;
}

async fn the_relay_moves_to_a_live_node_when_its_node_is_killed(cluster: &mut ScratchCluster) {
    let f = Fixture::quorum("cl_relay", cluster.urls()).await;
    let urls = cluster.toml_urls();
    let mut relay = f.spawn(&[("amqp", &urls)]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    let first = ready_node(&addr, None).await;
    assert_eq!(scrape_metric(&addr, &broker_node_metric(&first)).await, 1.0);
    let rows = aggregate_rows("clr", 20, 300);
    let all: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    let writer = write_rows_in_background(f.table.clone(), rows);
    wait_for(T, "some delivered", || async {
        f.consumer().ids().len() >= 1000
    })
    .await;
    let killed = cluster.index_of(&first);
    let at = std::time::Instant::now();
    cluster.kill9(killed);
    let second = ready_node(&addr, Some(&first)).await;
    eprintln!(
        "relay: {first} killed, ready on {second} after {:?}",
        at.elapsed()
    );
    writer.await.unwrap();
    assert_recovered_or(&f, &mut relay, &all, || cluster.describe()).await;
    assert_published_in_order(&f);
    // Nothing is left parked; at most the first nacks of a channel opened while
    // the quorum queue had no leader were charged an attempt each, before the
    // relay saw that every publish was nacked and renewed the connection (8 in
    // a row: relay::routing::MIN_FAILURES).
    f.wait_retry_drained().await;
    let now = ready_node(&addr, Some(&first)).await;
    assert_eq!(scrape_metric(&addr, &broker_node_metric(&first)).await, 0.0);
    assert_eq!(scrape_metric(&addr, &broker_node_metric(&now)).await, 1.0);
    let log = relay.log_text();
    assert!(log.contains("broker connection lost"), "{log}");
    let charged = log.matches("publish failed").count();
    assert!(charged < 8, "{charged} publishes charged: {log}");
    assert!(relay.terminate(T).await.success());
    let cfg = f.config(&[("amqp", &urls)]);
    let (code, out) = Relay::run_to_end(&["status"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("broker node     {now}")), "{out}");

    // A relay started while that node is still down goes to another; `check`
    // names the node that is down and passes (the broker is reachable).
    let (code, out) = Relay::run_to_end(&["check"], &cfg, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{first} NOT reachable")), "{out}");
    let mut again = f.spawn(&[("amqp", &urls)]);
    again.wait_streaming().await;
    let addr = again.metrics_addr().await;
    let node = ready_node(&addr, Some(&first)).await;
    assert_ne!(node, first);
    let late = aggregate_rows("clr_late", 3, 10);
    let late_ids: Vec<String> = late.iter().map(|(id, _)| id.clone()).collect();
    write_rows_in_background(f.table.clone(), late)
        .await
        .unwrap();
    f.consumer().wait_ids(&late_ids, T).await;
    assert!(again.terminate(T).await.success());
    f.cleanup().await;
    cluster.restart(&[killed]).await;
}

async fn the_receiver_moves_to_a_live_node_and_records_each_message_once(
    cluster: &mut ScratchCluster,
) {
    let f = InboxFixture::new("cl_inbox").await;
    let inbox = ["queue_type = \"quorum\"", "prefetch = 200"];
    let cfg = f.config_on(&inbox, &cluster.toml_urls());
    let mut receiver = f.spawn(&cfg);
    receiver.wait_log("inbox consuming", T).await;
    let addr = receiver.metrics_addr().await;
    let first = ready_node(&addr, None).await;
    let killed = cluster.index_of(&first);
    let survivor = cluster.url((killed + 1) % 3);
    let msgs: Vec<Msg> = (0..4000)
        .map(|i| Msg::event_forge(&format!("cli-{i}")))
        .collect();
    f.publish_on(&survivor, &msgs).await;
    wait_for(T, "some recorded", || async { f.count().await >= 500 }).await;
    let at = std::time::Instant::now();
    cluster.kill9(killed);
    let second = ready_node(&addr, Some(&first)).await;
    eprintln!(
        "receiver: {first} killed, ready on {second} after {:?}",
        at.elapsed()
    );
    // Every message once: the deliveries the lost node had not seen acked come
    // again (from the quorum queue's new leader) and are counted as duplicates.
    f.wait_count(4000, Duration::from_secs(180)).await;
    assert_eq!(f.distinct().await, 4000);
    let more: Vec<Msg> = (4000..4100)
        .map(|i| Msg::event_forge(&format!("cli-{i}")))
        .collect();
    f.publish_on(&survivor, &more).await;
    f.wait_count(4100, T).await;
    assert!(receiver.terminate(T).await.success());
    f.cleanup().await;
    cluster.restart(&[killed]).await;
}

async fn the_whole_cluster_down_for_twenty_seconds_loses_nothing(cluster: &mut ScratchCluster) {
    let f = Fixture::quorum("cl_whole", cluster.urls()).await;
    let mut relay = f.spawn(&[("amqp", &cluster.toml_urls())]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    let first = ready_node(&addr, None).await;
    let before = aggregate_rows("clw", 10, 100);
    let mut all: Vec<String> = before.iter().map(|(id, _)| id.clone()).collect();
    write_rows_in_background(f.table.clone(), before)
        .await
        .unwrap();
    f.consumer().wait_ids(&all, T).await;

    for i in 0..3 {
        cluster.kill9(i);
    }
    wait_for(T, "readyz: the broker is not connected", || async {
        let (code, body) = http_get(&addr, "/readyz").await;
        code == 503 && body.contains("broker is not connected")
    })
    .await;
    assert_eq!(scrape_metric(&addr, &broker_node_metric(&first)).await, 0.0);
    // Rows committed while no node is up wait in the WAL: nothing is parked.
    let during = aggregate_rows("clw_down", 10, 100);
    all.extend(during.iter().map(|(id, _)| id.clone()));
    write_rows_in_background(f.table.clone(), during)
        .await
        .unwrap();
    holds_for(
        Duration::from_secs(20),
        "not ready, nothing parked, while every node is down",
        || async {
            let (code, _) = http_get(&addr, "/readyz").await;
            code == 503 && f.parked().await.is_empty()
        },
    )
    .await;

    let at = std::time::Instant::now();
    cluster.restart(&[0, 1, 2]).await;
    let node = ready_node(&addr, None).await;
    eprintln!(
        "whole cluster: restarted, ready on {node} after {:?}",
        at.elapsed()
    );
    assert_recovered_or(&f, &mut relay, &all, || cluster.describe()).await;
    assert_published_in_order(&f);
    assert!(f.parked().await.is_empty(), "an outage parks nothing");
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}
