use super::*;
use crate::event::OutboxEvent;
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

fn head(key: u64, due: i64, blocked: bool) -> Head {
    Head {
        key: AggregateKey(key),
        aggregate_type: "A".into(),
        aggregate_id: key.to_string(),
        due,
        blocked,
    }
}

fn row(seq: i64) -> Loaded {
    Loaded {
        parked_seq: seq,
        event: Ok(OutboxEvent {
            id: format!("m-{seq}"),
            aggregate_type: "A".into(),
            aggregate_id: "1".into(),
            event_type: "e".into(),
            payload: Bytes::from_static(b"{}"),
            metadata: None,
            created_at: None,
            scheduled_at: None,
            max_retries: None,
            extra: Vec::new(),
        }),
        commit_time: 0,
        attempts: 1,
        max_retries: 3,
        last_error: None,
    }
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

#[test]
fn a_parked_aggregate_stays_parked_until_its_parks_commit_and_its_queue_is_empty() {
    let mut p = Parked::new(1 << 20);
    let k = AggregateKey(1);
    assert!(!p.is_parked(k));
    p.park_sent(k, "A", "1");
    assert!(p.is_parked(k), "a park on its way parks the aggregate");
    p.adopt(head(1, 0, false));
    p.park_done(k, Instant::now());
    let loads = p.due(later());
    assert_eq!(loads.len(), 1, "the head is loaded once due");
    assert!(p.due(later()).is_empty(), "and only once");
    assert_eq!(p.loaded(k, vec![row(1), row(2)], PageEnd::Empty), None);
    assert_eq!(p.take_ready(), Some(k));
    assert_eq!(p.next(k).unwrap().parked_seq, 1);
    assert!(p.next(k).is_none(), "one in flight per aggregate");
    assert_eq!(p.delivered(k), None);
    assert_eq!(p.take_ready(), Some(k));
    assert_eq!(p.next(k).unwrap().parked_seq, 2);
    // Another park is on its way while the page runs out.
    p.park_sent(k, "A", "1");
    let check = p.delivered(k).expect("an empty page is checked once more");
    assert_eq!(check.after_seq, Some(2));
    assert_eq!(p.loaded(k, vec![], PageEnd::Empty), None);
    assert!(p.is_parked(k), "the park still on its way keeps it parked");
    p.park_done(k, Instant::now());
    assert!(p.is_parked(k), "a park without a head is loaded to check");
    let check = p.due(later());
    assert_eq!(check.len(), 1);
    p.loaded(k, vec![], PageEnd::Empty);
    assert!(!p.is_parked(k));
    assert_eq!(p.buffered(), 0);
}

#[test]
fn a_blocked_head_is_not_scheduled_until_requeued() {
    let mut p = Parked::new(1 << 20);
    p.adopt(head(2, 0, true));
    assert!(p.is_parked(AggregateKey(2)));
    assert!(p.next_due().is_none());
    p.adopt(head(2, 0, false));
    assert!(p.next_due().is_some());
}

#[test]
fn a_failure_drops_the_rest_of_the_page_until_the_head_is_due_again() {
    let mut p = Parked::new(1 << 20);
    let k = AggregateKey(3);
    p.adopt(head(3, 0, false));
    p.due(later());
    p.loaded(k, vec![row(1), row(2), row(3)], PageEnd::More);
    p.take_ready();
    p.next(k);
    let due = later();
    p.failed(k, due);
    assert_eq!(p.buffered(), 0, "the rest of the page is let go");
    assert_eq!(p.next_due(), Some(due));
    assert!(p.next(k).is_none());
    let again = p.due(due);
    assert_eq!(again[0].after_seq, None, "loaded again from its head");
}

#[test]
fn loads_stop_at_the_byte_budget() {
    let one = row(1).weight();
    let mut p = Parked::new(one * 4);
    for k in 1..=4 {
        p.adopt(head(k, 0, false));
    }
    let loads = p.due(later());
    assert_eq!(loads.len(), 4);
    assert!(
        loads.iter().all(|l| l.max_bytes < one),
        "each asks for a share"
    );
    for k in 1..=4 {
        p.loaded(AggregateKey(k), vec![row(k as i64)], PageEnd::More);
    }
    assert_eq!(p.buffered(), one * 4);
    assert!(!p.can_load(), "the budget is used up: no load starts");
    let k = p.take_ready().unwrap();
    p.next(k);
    assert!(p.can_load(), "a published row frees its share");
}

#[test]
fn parking_counts_every_park_on_its_way() {
    // The shutdown drain waits for this to reach zero.
    let mut p = Parked::new(1 << 20);
    p.park_sent(AggregateKey(1), "A", "1");
    p.park_sent(AggregateKey(1), "A", "1");
    p.park_sent(AggregateKey(2), "A", "2");
    assert_eq!(p.parking(), 3);
    p.park_done(AggregateKey(1), Instant::now());
    p.park_done(AggregateKey(2), Instant::now());
    assert_eq!(p.parking(), 1);
    p.park_done(AggregateKey(1), Instant::now());
    assert_eq!(p.parking(), 0);
}

#[test]
fn each_load_asks_for_its_share_of_the_budget() {
    let budget = MAX_LOADING * 1000;
    let mut p = Parked::new(budget);
    p.adopt(head(1, 0, false));
    let loads = p.due(later());
    assert_eq!(loads.len(), 1);
    assert_eq!(loads[0].max_bytes, 1000);
    assert_eq!(loads[0].max_rows, PAGE_ROWS);
}

#[test]
fn at_most_max_loading_loads_are_on_their_way() {
    // One byte a load: the byte budget would let 2 * MAX_LOADING - 1 start.
    let mut p = Parked::new(2 * MAX_LOADING - 1);
    let n = MAX_LOADING as u64 + 10;
    for k in 1..=n {
        p.adopt(head(k, 0, false));
    }
    let loads = p.due(later());
    assert_eq!(loads.len(), MAX_LOADING);
    assert!(!p.can_load());
    assert!(p.due(later()).is_empty(), "no more until one is answered");
    assert_eq!(p.loaded(loads[0].key, vec![], PageEnd::Empty), None);
    assert!(p.can_load());
    assert_eq!(p.due(later()).len(), 1);
}

#[test]
fn loads_on_their_way_count_against_the_budget() {
    let one = row(1).weight();
    let budget = MAX_LOADING * one * 2;
    let mut p = Parked::new(budget);
    p.adopt(head(1, 0, false));
    assert_eq!(p.due(later()).len(), 1);
    let rows: Vec<Loaded> = (1..=64).map(row).collect();
    let held: usize = rows.iter().map(Loaded::weight).sum();
    p.loaded(AggregateKey(1), rows, PageEnd::More);
    assert_eq!(p.buffered(), held);
    for k in 2..=101 {
        p.adopt(head(k, 0, false));
    }
    let loads = p.due(later());
    let share = budget / MAX_LOADING;
    assert_eq!(
        loads.len(),
        (budget - held) / share,
        "each may bring its share"
    );
    assert!(loads.len() < MAX_LOADING);
}

#[test]
fn a_head_due_now_is_loaded_now() {
    let mut p = Parked::new(1 << 20);
    let k = AggregateKey(4);
    p.park_sent(k, "A", "4");
    let now = Instant::now();
    p.park_done(k, now);
    assert_eq!(p.next_due(), Some(now));
    assert_eq!(p.due(now).len(), 1);
}

#[test]
fn a_blocked_aggregate_lets_its_page_go_and_a_requeue_loads_it_again() {
    let mut p = Parked::new(1 << 20);
    let k = AggregateKey(5);
    p.adopt(head(5, 0, false));
    p.due(later());
    p.loaded(k, vec![row(1), row(2), row(3)], PageEnd::More);
    p.take_ready();
    p.next(k);
    p.blocked(k);
    assert_eq!(p.buffered(), 0, "the rest of the page is let go");
    assert!(p.is_parked(k));
    assert!(p.next(k).is_none());
    assert!(p.delivered(k).is_none(), "nothing follows a blocked head");
    assert!(p.next_due().is_none());
    // A requeue reports the head again, not blocked: it is loaded from its head.
    p.adopt(head(5, 0, false));
    let again = p.due(later());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].after_seq, None);
}

/// Model of the store: each aggregate's rows (seq → delivered?), in order.
#[derive(Debug, Clone)]
enum Op {
    /// A stream message of aggregate `agg` is parked (with or without a head report).
    Park { agg: u8 },
    /// The oldest pending park commits.
    ParkCommitted,
    /// The oldest pending load is answered from the model.
    LoadAnswered { page: usize },
    /// The message in flight of aggregate `agg` is acked, or fails.
    Outcome { agg: u8, ack: bool },
    /// Time passes: due loads start.
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(|agg| Op::Park { agg }),
        3 => Just(Op::ParkCommitted),
        3 => (1usize..4).prop_map(|page| Op::LoadAnswered { page }),
        4 => (0u8..4, proptest::bool::weighted(0.8)).prop_map(|(agg, ack)| Op::Outcome { agg, ack }),
        2 => Just(Op::Tick),
    ]
}

struct Model {
    p: Parked,
    next_seq: i64,
    /// Committed rows per aggregate, in seq order (not yet delivered).
    rows: BTreeMap<u8, Vec<i64>>,
    /// Parks on their way: (agg, seq it will get).
    parking: VecDeque<(u8, i64)>,
    loads: VecDeque<Load>,
    in_flight: HashMap<u8, i64>,
    delivered: BTreeMap<u8, Vec<i64>>,
    now: Instant,
}

fn agg_of(key: AggregateKey) -> u8 {
    key.0 as u8
}

impl Model {
    fn new() -> Self {
        Model {
            p: Parked::new(row(1).weight() * MAX_LOADING * 3),
            next_seq: 1,
            rows: BTreeMap::new(),
            parking: VecDeque::new(),
            loads: VecDeque::new(),
            in_flight: HashMap::new(),
            delivered: BTreeMap::new(),
            now: Instant::now(),
        }
    }

    fn pump(&mut self) {
        while let Some(key) = self.p.take_ready() {
            if let Some(r) = self.p.next(key) {
                let agg = agg_of(key);
                assert!(
                    self.in_flight.insert(agg, r.parked_seq).is_none(),
                    "two messages of one aggregate in flight"
                );
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Park { agg } => {
                self.p
                    .park_sent(AggregateKey(agg as u64), "A", &agg.to_string());
                self.parking.push_back((agg, self.next_seq));
                self.next_seq += 1;
            }
            Op::ParkCommitted => {
                if let Some((agg, seq)) = self.parking.pop_front() {
                    let q = self.rows.entry(agg).or_default();
                    let head = q.is_empty();
                    q.push(seq);
                    let key = AggregateKey(agg as u64);
                    if head {
                        self.p.adopt(head_of(agg));
                    }
                    self.p.park_done(key, self.now);
                }
            }
            Op::LoadAnswered { page } => {
                if let Some(l) = self.loads.pop_front() {
                    let agg = agg_of(l.key);
                    let q = self.rows.get(&agg).cloned().unwrap_or_default();
                    let after: Vec<i64> = q
                        .into_iter()
                        .filter(|s| l.after_seq.is_none_or(|a| *s > a))
                        .collect();
                    let take = page.min(l.max_rows);
                    let rows: Vec<Loaded> = after.iter().take(take).map(|s| row(*s)).collect();
                    let end = if after.len() > take {
                        PageEnd::More
                    } else {
                        PageEnd::Empty
                    };
                    self.loads.extend(self.p.loaded(l.key, rows, end));
                }
            }
            Op::Outcome { agg, ack } => {
                if let Some(seq) = self.in_flight.remove(&agg) {
                    let key = AggregateKey(agg as u64);
                    if ack {
                        let q = self.rows.get_mut(&agg).unwrap();
                        assert_eq!(q.first(), Some(&seq), "a message overtook its predecessor");
                        q.remove(0);
                        self.delivered.entry(agg).or_default().push(seq);
                        self.loads.extend(self.p.delivered(key));
                    } else {
                        self.p.failed(key, self.now);
                    }
                }
            }
            Op::Tick => {
                self.now += Duration::from_secs(1);
                let due = self.p.due(self.now);
                self.loads.extend(due);
            }
        }
        self.pump();
    }

    /// Everything parked is delivered, and every aggregate is let go.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            if self.parking.is_empty()
                && self.loads.is_empty()
                && self.in_flight.is_empty()
                && self.p.len() == 0
            {
                return;
            }
            if !self.parking.is_empty() {
                self.apply(Op::ParkCommitted);
            } else if !self.loads.is_empty() {
                self.apply(Op::LoadAnswered { page: 3 });
            } else if let Some((&agg, _)) = self.in_flight.iter().next() {
                self.apply(Op::Outcome { agg, ack: true });
            } else {
                self.apply(Op::Tick);
            }
        }
        panic!(
            "never settled: {} aggregates left, rows {:?}",
            self.p.len(),
            self.rows
        );
    }
}

fn head_of(agg: u8) -> Head {
    Head {
        key: AggregateKey(agg as u64),
        aggregate_type: "A".into(),
        aggregate_id: agg.to_string(),
        due: 0,
        blocked: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every parked message is delivered exactly once, per aggregate in park
    /// order, one in flight at a time; no aggregate is let go while it has rows;
    /// the byte budget is never exceeded and returns to zero.
    #[test]
    fn recovery_delivers_everything_in_order(ops in proptest::collection::vec(op(), 1..150)) {
        let mut m = Model::new();
        for op in ops {
            m.apply(op);
            prop_assert!(m.p.buffered() <= m.p.budget + row(1).weight() * MAX_LOADING);
            for (agg, q) in &m.rows {
                if !q.is_empty() {
                    prop_assert!(m.p.is_parked(AggregateKey(*agg as u64)), "aggregate {} let go with rows", agg);
                }
            }
        }
        m.settle();
        prop_assert_eq!(m.p.buffered(), 0);
        for (agg, q) in &m.rows {
            prop_assert!(q.is_empty(), "aggregate {} kept {:?}", agg, q);
        }
        for (agg, d) in &m.delivered {
            prop_assert!(d.windows(2).all(|w| w[0] < w[1]), "aggregate {} delivered out of order: {:?}", agg, d);
        }
    }
}
