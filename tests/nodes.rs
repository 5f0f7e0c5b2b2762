//! A broker of several nodes (`amqp.url` a list) on the shared RabbitMQ: the
//! first "node" is a proxy that can stop answering. The three-node cluster, with
//! nodes killed, is tests/cluster.rs.

use crate::support::inbox::{InboxFixture, Msg};
use crate::support::{http_get, wait_for, Fixture, StallingProxy, AMQP_URL};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Waits until `/readyz` says the relay is connected to `node`.
async fn wait_ready_on(addr: &str, node: &str) {
    wait_ready_within(addr, node, T).await
}

async fn wait_ready_within(addr: &str, node: &str, within: Duration) {
    wait_for(within, &format!("ready on {node}"), || async {
        let (code, body) = http_get(addr, "/readyz").await;
        code == 200 && body.trim() == format!("ready: broker node {node}")
    })
    .await;
}

/// The node the relay publishes through stops answering (accepts bytes, sends
/// none): the publishes time out, the relay sees that every one does, renews
/// the connection and goes on from the *next* node — not the stalled one again,
/// which would hold it for `connect_timeout` (60 s here) before moving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_answering_is_left_for_the_next_one() {
    let f = Fixture::new("nodes_stall", true).await;
    let proxy = StallingProxy::start("127.0.0.1:5672").await;
    let urls = format!("url = [\"{}\", \"{AMQP_URL}\"]", proxy.amqp_url());
    let mut relay = f.spawn(&[
        ("amqp", &urls),
        ("amqp", "connect_timeout = \"60s\""),
        ("retry", "publish_timeout = \"2s\""),
    ]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    wait_ready_on(&addr, &format!("127.0.0.1:{}", proxy.port)).await;
    let first = f.insert_each("ns-before", 5).await;
    f.consumer().wait_ids(&first, T).await;

    proxy.stall(true);
    let ids = f.insert_each("ns", 50).await;
    // Well within the 60 s a connection attempt to the stalled node would take.
    f.consumer().wait_ids(&ids, Duration::from_secs(30)).await;
    wait_ready_on(&addr, "127.0.0.1:5672").await;
    let log = relay.log_text();
    assert!(
        log.contains("replacing the broker connection (from the next node)"),
        "{log}"
    );
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// The same for the inbox receiver: its node stops answering, its liveness
/// probe gets no answer, and it consumes again from the next node — not the
/// stalled one first, which would hold it for `connect_timeout` (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_node_stops_answering_goes_on_from_the_next_one() {
    let f = InboxFixture::new("nodes_stall").await;
    let proxy = StallingProxy::start("127.0.0.1:5672").await;
    let amqp = format!(
        "url = [\"{}\", \"{AMQP_URL}\"]\nconnect_timeout = \"60s\"",
        proxy.amqp_url()
    );
    let mut receiver = f.spawn(&f.config_on(&[], &amqp));
    receiver.wait_log("inbox consuming", T).await;
    let addr = receiver.metrics_addr().await;
    wait_ready_on(&addr, &format!("127.0.0.1:{}", proxy.port)).await;
    let msgs: Vec<Msg> = (0..20)
        .map(|i| Msg::event_forge(&format!("nsi-{i}")))
        .collect();
    f.publish(&msgs[..10]).await;
    f.wait_count(10, T).await;

    proxy.stall(true);
    f.publish(&msgs[10..]).await;
    // The probe gives up after 30 s; then well within the 60 s a connection
    // attempt to the stalled node would take.
    wait_ready_within(&addr, "127.0.0.1:5672", Duration::from_secs(55)).await;
    // What the broker had handed to the old consumer stays with it until the
    // broker learns that connection is gone (its heartbeat, or the close frame
    // once the node answers again): then every message is recorded, once.
    proxy.stall(false);
    f.wait_count(20, T).await;
    assert_eq!(f.distinct().await, 20);
    assert!(receiver.terminate(T).await.success());
    f.cleanup().await;
}
