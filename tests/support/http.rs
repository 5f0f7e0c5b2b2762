//! The metrics endpoint: GET, and one metric's value.

use super::*;
use std::time::Duration;

/// GET `path` from `addr`: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint reachable");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Waits until the relay at `addr` reports an empty in-flight window (messages
/// and bytes): nothing it published is left unresolved.
pub async fn wait_window_empty(addr: &str) {
    wait_for(
        Duration::from_secs(60),
        "in-flight window empty",
        || async {
            let m = http_get(addr, "/metrics").await.1;
            metric_value(&m, "outbox_relay_inflight_messages") == Some(0.0)
                && metric_value(&m, "outbox_relay_inflight_bytes") == Some(0.0)
        },
    )
    .await;
}

/// The value of a metric line `name{labels} value` (labels as written, "" for none).
/// The value of one metric scraped from the endpoint at `addr` (-1 when absent).
pub async fn scrape_metric(addr: &str, name_and_labels: &str) -> f64 {
    metric_value(&http_get(addr, "/metrics").await.1, name_and_labels).unwrap_or(-1.0)
}

pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name_and_labels))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
