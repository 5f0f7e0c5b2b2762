//! Random interleavings of every window operation, checked against the
//! invariants and a model of per-aggregate order.

use super::routing_tests::returned;
use super::tests::{event, message, stream};
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// One step of a random interleaving.
#[derive(Debug, Clone)]
enum Op {
    /// A stream message of aggregate `agg` (of 4), `size` bytes, maybe with its own cause.
    Admit {
        agg: u8,
        size: usize,
        cause: bool,
    },
    /// The broker answers the `i`-th oldest outstanding publish: ack or refusal.
    Answer {
        i: usize,
        ack: bool,
    },
    /// Every outstanding publish times out.
    Timeout,
    /// The connection drops and comes back.
    Reconnect,
    /// The broker closes the connection in answer to a publish, and is back.
    Refuse,
    /// The broker blocks publishing, or unblocks.
    Block,
    Unblock,
    /// The oldest pending park commits.
    ParkCommitted,
    /// Every outstanding publish is returned as unroutable (a topology fault).
    ReturnAll,
    /// A routing probe is due.
    Probe,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 1usize..600, proptest::bool::weighted(0.1))
            .prop_map(|(agg, size, cause)| Op::Admit { agg, size, cause }),
        4 => (0usize..8, proptest::bool::weighted(0.85)).prop_map(|(i, ack)| Op::Answer { i, ack }),
        1 => Just(Op::Timeout),
        1 => Just(Op::Reconnect),
        1 => Just(Op::Refuse),
        1 => Just(Op::Block),
        1 => Just(Op::Unblock),
        2 => Just(Op::ParkCommitted),
        1 => Just(Op::ReturnAll),
        1 => Just(Op::Probe),
    ]
}

/// Drives a window the way the relay does: parks go to a model retry table,
/// an aggregate with parked messages parks its later messages behind them.
struct Harness {
    w: Window,
    generation: u64,
    /// Outstanding publishes in publish order: (seq, generation).
    wire: Vec<(Seq, u64)>,
    parking: VecDeque<Seq>,
    parked_aggs: HashMap<AggregateKey, usize>,
    /// Per aggregate: admission numbers in the order first published.
    published: HashMap<u8, Vec<u32>>,
    /// Per aggregate: admission numbers in the order parked.
    parked: HashMap<u8, Vec<u32>>,
    counters: HashMap<u8, u32>,
    admitted: usize,
    resolved: usize,
    /// The time probes are fired at.
    clock: Instant,
}

fn agg_and_n(row: &Row) -> (u8, u32) {
    let (a, n) = row.id().split_once('-').unwrap();
    (a.parse().unwrap(), n.parse().unwrap())
}

impl Harness {
    fn new(ordering: Ordering) -> Self {
        let mut w = Window::new(ordering, 16, 4096, Duration::from_secs(30));
        w.on_up(1);
        Harness {
            w,
            generation: 1,
            wire: Vec::new(),
            parking: VecDeque::new(),
            parked_aggs: HashMap::new(),
            published: HashMap::new(),
            parked: HashMap::new(),
            counters: HashMap::new(),
            admitted: 0,
            resolved: 0,
            clock: Instant::now(),
        }
    }

    fn collect(&mut self) {
        let sent: Vec<(Seq, u64)> = self
            .w
            .take_publishes()
            .map(|p| (p.seq, p.generation))
            .collect();
        for (seq, g) in sent {
            let (agg, n) = agg_and_n(self.w.entry(seq).unwrap().row());
            let list = self.published.entry(agg).or_default();
            if !list.contains(&n) {
                list.push(n);
            }
            self.wire.push((seq, g));
        }
    }

    /// A publish failed: held when the fault is systemic, else parked.
    fn fail(&mut self, seq: Seq, failure: Failure) {
        if self.w.unrouted(seq, &failure) {
            return; // held: the wire gives it back when it is published again
        }
        let seqs = self.w.fail_stream(seq, failure);
        self.park(seqs);
    }

    fn park(&mut self, seqs: Vec<Seq>) {
        for s in seqs {
            let row = self.w.entry(s).unwrap().row().clone();
            *self.parked_aggs.entry(row.key()).or_default() += 1;
            let (agg, n) = agg_and_n(&row);
            self.parked.entry(agg).or_default().push(n);
            self.parking.push_back(s);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Admit { agg, size, cause } => {
                if !self.w.has_room() {
                    return;
                }
                let n = self.counters.entry(agg).or_default();
                let row = event(agg, *n);
                *n += 1;
                self.admitted += 1;
                let m = Some(message(&row, size));
                let cause = cause.then_some(ParkCause {
                    failure: Some(Failure::TooLarge {
                        bytes: size,
                        limit: 0,
                    }),
                    not_before: None,
                });
                if self.parked_aggs.contains_key(&row.key()) {
                    let s = self.w.admit_parking(row, m, stream(0), cause);
                    self.park(vec![s]);
                } else if let Admitted::Park(seqs) = self.w.admit(row, m, stream(0), cause) {
                    self.park(seqs);
                }
            }
            Op::Answer { i, ack } => {
                if self.wire.is_empty() {
                    return;
                }
                let (seq, g) = self.wire.remove(i % self.wire.len());
                if !self.w.is_published(seq, g) {
                    return; // stale
                }
                if ack {
                    self.w.routed(seq);
                    let r = self.w.resolve(seq).unwrap();
                    self.resolved += 1;
                    self.park(r.park);
                } else {
                    self.fail(seq, Failure::Nack);
                }
            }
            Op::ReturnAll => {
                for (seq, g) in std::mem::take(&mut self.wire) {
                    if self.w.is_published(seq, g) {
                        self.fail(seq, returned());
                    }
                }
            }
            Op::Probe => {
                // A clock of its own that only moves forward, an hour a probe.
                self.clock += Duration::from_secs(3600);
                self.w.fire_routing_probe(self.clock);
            }
            Op::Timeout => {
                let late = Instant::now() + Duration::from_secs(3600);
                for seq in self.w.expired(late) {
                    self.fail(
                        seq,
                        Failure::Timeout {
                            after: Duration::from_secs(30),
                        },
                    );
                }
            }
            Op::Reconnect => {
                assert_eq!(self.w.on_down(self.generation, false), None);
                self.wire.clear();
                self.generation += 1;
                self.w.on_up(self.generation);
            }
            Op::Refuse => {
                let probe = self.w.probing();
                let culprit = self.w.on_down(self.generation, true);
                if let Some(p) = probe {
                    if self
                        .wire
                        .iter()
                        .any(|(s, g)| *s == p && *g == self.generation)
                    {
                        assert_eq!(
                            culprit,
                            Some(p),
                            "the probe alone on the wire is the culprit"
                        );
                    }
                }
                self.wire.clear();
                if let Some(seq) = culprit {
                    let seqs = self.w.fail_stream(
                        seq,
                        Failure::Refused {
                            reply_code: 406,
                            reply_text: "PRECONDITION_FAILED".into(),
                        },
                    );
                    self.park(seqs);
                }
                self.generation += 1;
                self.w.on_up(self.generation);
            }
            Op::Block => {
                self.w.suspend();
                assert!(!self.w.has_room());
                assert!(
                    self.w
                        .expired(Instant::now() + Duration::from_secs(3600))
                        .is_empty(),
                    "no deadline runs while the broker blocks"
                );
            }
            Op::Unblock => self.w.resume(),
            Op::ParkCommitted => {
                if let Some(s) = self.parking.pop_front() {
                    let r = self.w.resolve(s).unwrap();
                    assert!(r.park.is_empty(), "a parked message holds no turn");
                    self.resolved += 1;
                }
            }
        }
        self.collect();
        self.w.check_invariants();
    }

    /// Acks and commits everything outstanding.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.w.is_empty() {
                return;
            }
            if self.w.blocked {
                self.apply(Op::Unblock);
            } else if self.w.routing_paused() && self.wire.is_empty() {
                self.apply(Op::Probe);
            } else if !self.wire.is_empty() {
                self.apply(Op::Answer { i: 0, ack: true });
            } else if !self.parking.is_empty() {
                self.apply(Op::ParkCommitted);
            } else {
                self.apply(Op::Reconnect);
            }
        }
        panic!("window never drained: {} left", self.w.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Strict ordering: per aggregate, first publishes follow admission order and
    /// never overtake a parked message; every message is resolved exactly once;
    /// the window's accounting returns to zero.
    #[test]
    fn strict_window_keeps_order_and_accounting(ops in proptest::collection::vec(op(), 1..120)) {
        let mut h = Harness::new(Ordering::Strict);
        for op in ops {
            h.apply(op);
        }
        h.settle();
        prop_assert_eq!(h.w.len(), 0);
        prop_assert_eq!(h.w.bytes(), 0);
        prop_assert_eq!(h.resolved, h.admitted);
        for (agg, order) in &h.published {
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "aggregate {} published out of order: {:?}", agg, order);
            if let Some(first_parked) = h.parked.get(agg).and_then(|p| p.iter().min()) {
                prop_assert!(order.iter().all(|n| n < first_parked || h.parked[agg].contains(n)),
                    "aggregate {}: a message after parked {} was published: {:?}", agg, first_parked, order);
            }
            let parked = h.parked.get(agg).cloned().unwrap_or_default();
            prop_assert!(parked.windows(2).all(|w| w[0] < w[1]), "aggregate {} parked out of order: {:?}", agg, parked);
        }
    }

    /// Relaxed ordering pipelines an aggregate but keeps the same accounting.
    #[test]
    fn relaxed_window_accounting_returns_to_zero(ops in proptest::collection::vec(op(), 1..120)) {
        let mut h = Harness::new(Ordering::Relaxed);
        for op in ops {
            h.apply(op);
        }
        h.settle();
        prop_assert_eq!(h.w.len(), 0);
        prop_assert_eq!(h.w.bytes(), 0);
        prop_assert_eq!(h.resolved, h.admitted);
    }
}
