//! Per-aggregate order of what a consumer received, from ids `{agg}-{i}`.

use super::Received;
use std::collections::HashMap;

/// Position of each message in its aggregate, from ids `{agg}-{i}`.
fn seq_of(r: &Received) -> (String, usize) {
    let id = r.message_id();
    let (agg, i) = id.rsplit_once('-').unwrap();
    (agg.to_string(), i.parse().unwrap())
}

/// Asserts each aggregate's first deliveries arrived in increasing order.
pub fn assert_in_order(received: &[Received]) {
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in received {
        if !seen.insert(r.message_id()) {
            continue; // a redelivery of something already seen
        }
        let (agg, i) = seq_of(r);
        if let Some(prev) = last.get(&agg) {
            assert!(i > *prev, "aggregate {agg}: {i} arrived after {prev}");
        }
        last.insert(agg, i);
    }
}

/// Asserts, per aggregate, that every delivery (first or repeated) of message `i`
/// comes after the first delivery of every message before it.
pub fn assert_in_order_with_redeliveries(received: &[Received]) {
    assert_in_order_with_redeliveries_except(received, |_| false);
}

/// Like [`assert_in_order_with_redeliveries`], but a message for which
/// `unknown(id)` holds may be missing before later ones: the consumer never saw
/// where it stood (say, its only deliveries were the broker's redeliveries after
/// the node of the consumer that first got it died).
pub fn assert_in_order_with_redeliveries_except(
    received: &[Received],
    unknown: impl Fn(&str) -> bool,
) {
    let mut first_seen: HashMap<String, Vec<usize>> = HashMap::new();
    for r in received {
        let (agg, i) = seq_of(r);
        let seen = first_seen.entry(agg.clone()).or_default();
        if let Some(later) = seen.iter().find(|&&s| s > i) {
            panic!("aggregate {agg}: {i} delivered after {later} had been");
        }
        for earlier in 0..i {
            assert!(
                seen.contains(&earlier) || unknown(&format!("{agg}-{earlier}")),
                "aggregate {agg}: {i} delivered before {earlier}"
            );
        }
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
}
