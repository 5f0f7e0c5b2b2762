//! Prometheus metrics (registered once, names `outbox_relay_*`), readiness
//! (`health`) and the endpoint that serves both (`server`).

pub mod health;
pub mod server;

pub use health::{Health, Problem};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;

/// The `reason` labels of `outbox_relay_publish_failures_total`: one per
/// `failure::Failure` kind (its test checks they match).
pub const PUBLISH_FAILURE_REASONS: [&str; 6] = [
    "nack",
    "returned",
    "timeout",
    "too_large",
    "refused",
    "malformed",
];

/// The `reason` labels of `outbox_relay_inbox_invalid_total`: one per
/// `inbox::Invalid` kind (its test checks they match).
pub const INBOX_INVALID_REASONS: [&str; 5] = [
    "too_large",
    "not_json",
    "missing_id",
    "bad_field",
    "refused_by_table",
];

/// Every metric the relay exports.
pub struct Metrics {
    pub registry: Registry,
    /// Messages acked by the broker (stream and retried).
    pub published: IntCounter,
    /// Publish failures by reason: nack, returned, timeout, too_large, malformed.
    pub failures: IntCounterVec,
    /// Messages in retry state (parked, not dead).
    pub retries_pending: IntGauge,
    /// Messages declared dead.
    pub dead_letters: IntCounter,
    /// Messages in the in-flight window.
    pub inflight: IntGauge,
    /// Bytes the in-flight window holds.
    pub inflight_bytes: IntGauge,
    /// The LSN the relay last marked applied (reported to the server).
    pub confirmed_lsn: Gauge,
    /// WAL bytes between the server's current position and the slot's confirmed one.
    pub slot_lag_bytes: IntGauge,
    /// Commit time to broker ack.
    pub delivery_latency: Histogram,
    /// Reconnections by peer: postgres, amqp.
    pub reconnects: IntCounterVec,
    /// Messages with the outbox prefix emitted non-transactionally: not published.
    pub messages_ignored: IntCounter,
    /// Housekeeping statements given up for one row, by job.
    pub housekeeping_failures: IntCounterVec,
    /// Inbox deliveries recorded as new rows.
    pub inbox_received: IntCounter,
    /// Inbox deliveries whose (message_id, source) was already recorded (acked, not stored).
    pub inbox_duplicates: IntCounter,
    /// Inbox deliveries refused, by reason (see `inbox::Invalid`).
    pub inbox_invalid: IntCounterVec,
    /// From a delivery's arrival to the commit that recorded it.
    pub inbox_receive_latency: Histogram,
    /// Inbox rows a Processor handler processed (committed with the row's status).
    pub inbox_processed: IntCounter,
    /// Inbox handler attempts that failed (retried later or permanently failed).
    pub inbox_failed: IntCounter,
    /// 1 while the relay or the receiver is paused for a fault that is not a
    /// message's, by cause (see [`Pause`]).
    pub paused: IntGaugeVec,
    /// 1 while the slot is lost, by how (see [`SlotLoss`]).
    pub slot_lost: IntGaugeVec,
    /// 1 on the broker node (`host:port`) this process is connected to, 0 on
    /// the others of `amqp.url`.
    pub broker_node: IntGaugeVec,
}

/// Why the relay or the receiver pauses without charging any message: the label
/// of `outbox_relay_paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The inbox table refuses rows and has accepted none since.
    InboxTable,
    /// Every publish across several routing keys is returned or nacked, none acked.
    Routing,
}

impl Pause {
    pub const ALL: [Pause; 2] = [Pause::InboxTable, Pause::Routing];

    pub fn label(self) -> &'static str {
        match self {
            Pause::InboxTable => "inbox_table",
            Pause::Routing => "routing",
        }
    }
}

/// How a replication slot was lost: the label of `outbox_relay_slot_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotLoss {
    /// The slot no longer exists on the server that had it.
    Dropped,
    /// The slot exists but can no longer be read (`wal_status = 'lost'`: it fell
    /// behind `max_slot_wal_keep_size`, or a conflict on a standby).
    Invalidated,
    /// Postgres failed over (a new timeline or another server) to one without the slot.
    Failover,
}

impl SlotLoss {
    pub const ALL: [SlotLoss; 3] = [SlotLoss::Dropped, SlotLoss::Invalidated, SlotLoss::Failover];

    pub fn label(self) -> &'static str {
        match self {
            SlotLoss::Dropped => "dropped",
            SlotLoss::Invalidated => "invalidated",
            SlotLoss::Failover => "failover",
        }
    }
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registrar(Registry::new());
        let latency = |max: Option<f64>| LATENCY_BUCKETS.iter().copied().chain(max).collect();
        Metrics {
            published: r.counter(
                "outbox_relay_messages_published_total",
                "Messages acknowledged by the broker (first attempts and retries)",
            ),
            failures: r.counters(
                "outbox_relay_publish_failures_total",
                "Failed publishes, by reason",
                "reason",
                &PUBLISH_FAILURE_REASONS,
            ),
            retries_pending: r.gauge(
                "outbox_relay_retries_pending",
                "Messages in retry state (parked, not dead)",
            ),
            dead_letters: r.counter(
                "outbox_relay_dead_letters_total",
                "Messages that ran out of retries (dead-lettered when configured)",
            ),
            inflight: r.gauge(
                "outbox_relay_inflight_messages",
                "Messages in the in-flight window (unconfirmed, queued behind their aggregate, or being parked)",
            ),
            inflight_bytes: r.gauge(
                "outbox_relay_inflight_bytes",
                "Bytes the in-flight window holds (message bodies plus a fixed overhead each), bounded by amqp.max_in_flight_bytes",
            ),
            confirmed_lsn: r.register(Gauge::new(
                "outbox_relay_confirmed_lsn",
                "LSN the relay marked applied and reports to the server (as a number)",
            )),
            slot_lag_bytes: r.gauge(
                "outbox_relay_slot_lag_bytes",
                "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) of the slot, read at scrape time",
            ),
            delivery_latency: r.histogram(
                "outbox_relay_delivery_latency_seconds",
                "Time from the transaction's commit to the broker's ack",
                latency(Some(60.0)),
            ),
            reconnects: r.counters(
                "outbox_relay_reconnects_total",
                "Reconnections after a lost connection, by peer",
                "peer",
                &["postgres", "amqp"],
            ),
            messages_ignored: r.counter(
                "outbox_relay_messages_ignored_total",
                "Logical decoding messages with the outbox prefix emitted non-transactionally (pg_logical_emit_message(false, ...)): not published",
            ),
            housekeeping_failures: r.counters(
                "outbox_relay_housekeeping_failures_total",
                "Outbox rows whose on_success or status update was given up (the row refused it), and failed retention or dead-row purge sweeps, by job",
                "job",
                &["on_success", "mirror", "retention", "dead_purge"],
            ),
            inbox_received: r.counter(
                "outbox_relay_inbox_received_total",
                "Inbox deliveries recorded as new rows of the inbox table",
            ),
            inbox_duplicates: r.counter(
                "outbox_relay_inbox_duplicates_total",
                "Inbox deliveries whose (message_id, source) was already recorded: acked, not stored again",
            ),
            inbox_invalid: r.counters(
                "outbox_relay_inbox_invalid_total",
                "Inbox deliveries that cannot be recorded, dead-lettered or rejected, by reason",
                "reason",
                &INBOX_INVALID_REASONS,
            ),
            inbox_receive_latency: r.histogram(
                "outbox_relay_inbox_receive_latency_seconds",
                "Time from a delivery's arrival at the inbox receiver to the commit that recorded it",
                latency(None),
            ),
            inbox_processed: r.counter(
                "outbox_relay_inbox_processed_total",
                "Inbox rows processed by a Processor handler (its writes committed with the status)",
            ),
            inbox_failed: r.counter(
                "outbox_relay_inbox_failed_total",
                "Inbox handler attempts that failed (scheduled again, or permanently failed)",
            ),
            paused: r.gauges(
                "outbox_relay_paused",
                "1 while publishing (routing) or receiving (inbox_table) is paused for a fault that is not a message's: nothing is counted against the messages",
                "cause",
                &Pause::ALL.map(Pause::label),
            ),
            slot_lost: r.gauges(
                "outbox_relay_slot_lost",
                "1 while the replication slot is lost (dropped, invalidated, failover): recover with outbox-relay replay --pending",
                "how",
                &SlotLoss::ALL.map(SlotLoss::label),
            ),
            broker_node: r.register(IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_broker_node",
                    "1 on the RabbitMQ node (host:port) this process is connected to, 0 on the other nodes of amqp.url",
                ),
                &["node"],
            )),
            registry: r.0,
        }
    }

    /// Shows each node of `amqp.url` (`host:port`) in `outbox_relay_broker_node`,
    /// at 0 until connected to.
    pub fn broker_nodes(&self, nodes: &[String]) {
        for node in nodes {
            self.broker_node.with_label_values(&[node]);
        }
    }

    /// Moves `outbox_relay_broker_node` from the `old` node to the `new` one.
    pub fn set_broker_node(&self, old: Option<&str>, new: Option<&str>) {
        if let Some(old) = old {
            self.broker_node.with_label_values(&[old]).set(0);
        }
        if let Some(new) = new {
            self.broker_node.with_label_values(&[new]).set(1);
        }
    }

    /// Sets `outbox_relay_paused{cause}`.
    pub fn set_paused(&self, cause: Pause, on: bool) {
        self.paused
            .with_label_values(&[cause.label()])
            .set(i64::from(on));
    }

    /// Counts one failed publish under its `reason` label.
    pub fn failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub fn housekeeping_failure(&self, job: &str) {
        self.housekeeping_failures.with_label_values(&[job]).inc();
    }

    pub fn reconnect(&self, peer: &str) {
        self.reconnects.with_label_values(&[peer]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }
}

/// Counts what a client-crate `Processor` does into
/// `outbox_relay_inbox_processed_total` and `outbox_relay_inbox_failed_total`:
/// `processor.observer(Arc::new(ProcessorMetrics))`.
pub struct ProcessorMetrics;

impl outbox_relay_client::ProcessorObserver for ProcessorMetrics {
    fn processed(&self, n: u64) {
        metrics().inbox_processed.inc_by(n);
    }

    fn failed(&self, n: u64) {
        metrics().inbox_failed.inc_by(n);
    }
}

/// Histogram buckets of the latencies, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Makes each metric and registers it once; a label's values are created up
/// front, so every series exists (at 0) from the start.
struct Registrar(Registry);

impl Registrar {
    fn register<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: prometheus::Result<M>,
    ) -> M {
        let metric = metric.expect("valid metric");
        self.0
            .register(Box::new(metric.clone()))
            .expect("each metric registered once");
        metric
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help))
    }

    fn counters(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
        let vec = self.register(IntCounterVec::new(Opts::new(name, help), &[label]));
        for v in values {
            vec.with_label_values(&[v]);
        }
        vec
    }

    fn gauges(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
        let vec = self.register(IntGaugeVec::new(Opts::new(name, help), &[label]));
        for v in values {
            vec.with_label_values(&[v]);
        }
        vec
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.register(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets),
        ))
    }
}

/// The process-wide metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_exported() {
        let m = metrics();
        m.published.inc();
        m.broker_nodes(&["test-node:5672".to_string()]);
        let text = m.render();
        for name in [
            "outbox_relay_messages_published_total",
            "outbox_relay_publish_failures_total",
            "outbox_relay_retries_pending",
            "outbox_relay_dead_letters_total",
            "outbox_relay_inflight_messages",
            "outbox_relay_inflight_bytes",
            "outbox_relay_confirmed_lsn",
            "outbox_relay_slot_lag_bytes",
            "outbox_relay_delivery_latency_seconds",
            "outbox_relay_reconnects_total",
            "outbox_relay_messages_ignored_total",
            "outbox_relay_housekeeping_failures_total",
            "outbox_relay_inbox_received_total",
            "outbox_relay_inbox_duplicates_total",
            "outbox_relay_inbox_invalid_total",
            "outbox_relay_inbox_receive_latency_seconds",
            "outbox_relay_inbox_processed_total",
            "outbox_relay_inbox_failed_total",
            "outbox_relay_paused",
            "outbox_relay_slot_lost",
            "outbox_relay_broker_node",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }

    #[test]
    fn the_broker_node_gauge_follows_the_connection() {
        let m = metrics();
        m.broker_nodes(&["gauge-a:5672".to_string(), "gauge-b:5672".to_string()]);
        let at = |node: &str| m.broker_node.with_label_values(&[node]).get();
        m.set_broker_node(None, Some("gauge-a:5672"));
        assert_eq!((at("gauge-a:5672"), at("gauge-b:5672")), (1, 0));
        m.set_broker_node(Some("gauge-a:5672"), Some("gauge-b:5672"));
        assert_eq!((at("gauge-a:5672"), at("gauge-b:5672")), (0, 1));
        m.set_broker_node(Some("gauge-b:5672"), None);
        assert_eq!((at("gauge-a:5672"), at("gauge-b:5672")), (0, 0));
    }
}
