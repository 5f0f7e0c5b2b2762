//! The window's unit tests: admission, turns, accounting, refusals and
//! suspects (routing pauses in `routing_tests.rs`, random interleavings in
//! `proptests.rs`); the helpers here serve all three.

use super::*;
use crate::event::OutboxEvent;
use bytes::Bytes;

/// Aggregate `agg`'s `n`-th event; its routing key is `A.e{agg % 4}` (four keys).
pub(super) fn event(agg: u8, n: u32) -> Row {
    Row::Event(Arc::new(OutboxEvent {
        id: format!("{agg}-{n}"),
        aggregate_type: "A".into(),
        aggregate_id: agg.to_string(),
        event_type: format!("e{}", agg % 4),
        payload: Bytes::from_static(b"{}"),
        metadata: None,
        created_at: None,
        scheduled_at: None,
        max_retries: None,
        extra: Vec::new(),
    }))
}

pub(super) fn message(row: &Row, size: usize) -> Arc<OutboundMessage> {
    let Row::Event(e) = row else { unreachable!() };
    let mut m = crate::sink::format::encode(e, 0).unwrap();
    m.body.resize(size, b' ');
    Arc::new(m)
}

pub(super) fn stream(txn: u64) -> Origin {
    Origin::Stream {
        txn,
        commit_time: 0,
    }
}

pub(super) fn window(ordering: Ordering, max: usize) -> Window {
    let mut w = Window::new(ordering, max, 1 << 30, Duration::from_secs(30));
    w.on_up(1);
    w
}

#[test]
fn strict_order_queues_behind_the_unconfirmed_message() {
    let mut w = window(Ordering::Strict, 10);
    let a0 = event(1, 0);
    let a1 = event(1, 1);
    let b0 = event(2, 0);
    assert_eq!(
        w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None),
        Admitted::Sent
    );
    assert_eq!(
        w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None),
        Admitted::Queued
    );
    assert_eq!(
        w.admit(b0.clone(), Some(message(&b0, 10)), stream(0), None),
        Admitted::Sent
    );
    let sent: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(sent, vec![0, 2]);
    let r = w.resolve(0).unwrap();
    assert!(r.park.is_empty());
    let sent: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(sent, vec![1], "the ack hands the turn to the next message");
    w.check_invariants();
}

#[test]
fn a_full_window_refuses_and_a_confirm_frees_room() {
    let mut w = window(Ordering::Relaxed, 2);
    for n in 0..2 {
        let r = event(1, n);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    assert!(!w.has_room());
    assert_eq!(w.room(), 0);
    w.resolve(0);
    assert!(w.has_room());
    w.resolve(1);
    assert_eq!((w.len(), w.bytes()), (0, 0));
}

#[test]
fn bytes_limit_lets_one_big_message_into_an_empty_window() {
    let mut w = Window::new(Ordering::Strict, 100, 1024, Duration::from_secs(30));
    w.on_up(1);
    let r = event(1, 0);
    assert!(w.has_room());
    w.admit(r.clone(), Some(message(&r, 5000)), stream(0), None);
    assert!(!w.has_room(), "over the byte limit");
    w.resolve(0);
    assert!(w.has_room());
}

#[test]
fn only_published_or_parking_messages_await_an_answer() {
    // The shutdown drain waits for exactly these.
    let mut w = window(Ordering::Strict, 10);
    assert!(!w.has_unanswered());
    let a0 = event(1, 0);
    let a1 = event(1, 1);
    w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
    w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None);
    assert!(w.has_unanswered(), "a0 is on the wire");
    w.on_down(1, false);
    assert!(
        !w.has_unanswered(),
        "unsent and queued messages are replayed, not awaited"
    );
    let b0 = event(2, 0);
    let parking = w.admit_parking(b0, None, stream(0), None);
    assert!(w.has_unanswered(), "a park in progress is awaited");
    w.resolve(parking);
    assert!(!w.has_unanswered());
}

#[test]
fn no_broker_no_room_and_unsent_messages_go_out_on_reconnect_in_order() {
    let mut w = window(Ordering::Relaxed, 10);
    for n in 0..3 {
        let r = event(1, n);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    assert_eq!(w.take_publishes().count(), 3);
    assert_eq!(w.on_down(1, false), None);
    assert!(!w.has_room());
    assert!(!w.is_published(0, 1));
    assert!(
        w.expired(Instant::now() + Duration::from_secs(3600))
            .is_empty(),
        "no deadlines run while the broker is down"
    );
    assert_eq!(w.on_up(2), 3);
    let sent: Vec<(Seq, u64)> = w.take_publishes().map(|p| (p.seq, p.generation)).collect();
    assert_eq!(sent, vec![(0, 2), (1, 2), (2, 2)]);
    assert!(w.is_published(1, 2) && !w.is_published(1, 1));
}

#[test]
fn a_failure_parks_the_message_and_its_queue() {
    let mut w = window(Ordering::Strict, 10);
    for n in 0..3 {
        let r = event(1, n);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    let park = w.fail_stream(0, Failure::Nack);
    assert_eq!(park, vec![0, 1, 2]);
    assert_eq!(
        w.take_publishes().count(),
        1,
        "only the first was published"
    );
    for s in park {
        assert!(w.resolve(s).unwrap().park.is_empty());
    }
    assert!(w.is_empty());
    w.check_invariants();
}

#[test]
fn a_queued_message_with_its_own_cause_is_parked_when_its_turn_comes() {
    let mut w = window(Ordering::Strict, 10);
    let a0 = event(1, 0);
    let a1 = event(1, 1);
    let a2 = event(1, 2);
    w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
    let cause = ParkCause {
        failure: Some(Failure::TooLarge { bytes: 2, limit: 1 }),
        not_before: None,
    };
    assert_eq!(
        w.admit(a1.clone(), None, stream(0), Some(cause)),
        Admitted::Queued
    );
    w.admit(a2.clone(), Some(message(&a2, 10)), stream(0), None);
    w.take_publishes().count();
    let r = w.resolve(0).unwrap();
    assert_eq!(r.park, vec![1, 2]);
    assert_eq!(w.take_publishes().count(), 0);
    w.check_invariants();
}

#[test]
fn timeouts_expire_only_what_is_still_published() {
    let mut w = window(Ordering::Relaxed, 10);
    for n in 0..3 {
        let r = event(n as u8, n);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.resolve(1);
    let late = Instant::now() + Duration::from_secs(31);
    assert_eq!(w.expired(late), vec![0, 2]);
    assert!(w.expired(late).is_empty(), "each deadline fires once");
}

#[test]
fn dropping_stream_messages_keeps_parks_and_retries() {
    let mut w = window(Ordering::Strict, 10);
    let a0 = event(1, 0);
    let a1 = event(1, 1);
    let b0 = event(2, 0);
    w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
    w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None);
    let parking = w.admit_parking(b0.clone(), None, stream(0), None);
    let retry = event(3, 0);
    w.admit_retry(
        retry.clone(),
        message(&retry, 10),
        Origin::Retry {
            key: retry.key(),
            parked_seq: 1,
            attempts: 1,
            max_retries: 3,
        },
        false,
    );
    assert_eq!(w.drop_stream_messages(), 2);
    assert_eq!(w.len(), 2);
    assert!(w.entry(parking).is_some());
    w.check_invariants();
}

#[test]
fn a_window_at_its_byte_limit_has_no_room() {
    let r0 = event(1, 0);
    let m0 = message(&r0, 100);
    let r1 = event(2, 0);
    let m1 = message(&r1, 100);
    let limit = m0.weight() + m1.weight();
    let mut w = Window::new(Ordering::Relaxed, 100, limit, Duration::from_secs(30));
    w.on_up(1);
    w.admit(r0, Some(m0), stream(0), None);
    assert!(w.has_room(), "under the byte limit");
    w.admit(r1, Some(m1), stream(0), None);
    assert_eq!(w.bytes(), limit);
    assert!(!w.has_room(), "at the byte limit");
}

#[test]
fn only_the_current_connection_is_the_current_generation() {
    let mut w = window(Ordering::Relaxed, 10);
    assert!(w.generation_is(1) && !w.generation_is(2));
    w.on_down(1, false);
    assert!(!w.generation_is(1));
    w.on_up(2);
    assert!(w.generation_is(2) && !w.generation_is(1));
}

#[test]
fn a_blocked_broker_suspends_deadlines_and_unblocking_restarts_them_in_full() {
    let mut w = window(Ordering::Relaxed, 10);
    let r = event(1, 0);
    w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    w.take_publishes().count();
    assert!(
        w.expired(Instant::now()).is_empty(),
        "a deadline lies ahead of its publish"
    );
    w.suspend();
    assert!(!w.has_room());
    let late = Instant::now() + Duration::from_secs(3600);
    assert!(w.expired(late).is_empty(), "no deadline runs while blocked");
    w.resume();
    assert!(w.has_room());
    assert!(
        w.expired(Instant::now()).is_empty(),
        "a full deadline, not an overdue one"
    );
    assert_eq!(w.expired(late), vec![0]);
}

#[test]
fn a_refusal_makes_every_message_on_the_wire_a_suspect_probed_alone() {
    let mut w = window(Ordering::Relaxed, 10);
    for agg in 0..3u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    assert_eq!(w.take_publishes().count(), 3);
    assert_eq!(w.on_down(1, true), None, "no probe was alone on the wire");
    assert_eq!(w.suspects(), 3);
    assert!(!w.has_room());
    assert_eq!(w.on_up(2), 1, "one probe goes out");
    assert_eq!(w.probing(), Some(0));
    let probe: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(probe.len(), 1);
    assert!(probe[0].isolated && probe[0].generation == 2);
    // A plain drop of the connection says nothing about the probe.
    assert_eq!(w.on_down(2, false), None);
    assert_eq!(w.suspects(), 3);
    assert_eq!(w.on_up(3), 1);
    let again: Vec<(Seq, u64)> = w.take_publishes().map(|p| (p.seq, p.generation)).collect();
    assert_eq!(again, vec![(0, 3)], "the same probe, alone");
    // Acked: the next suspect goes out alone.
    w.resolve(0);
    assert_eq!((w.suspects(), w.probing()), (2, Some(1)));
    let next: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(next, vec![1]);
    // The broker closes the connection again: the probe alone on the wire is the culprit.
    assert_eq!(w.on_down(3, true), Some(1));
    let refused = Failure::Refused {
        reply_code: 406,
        reply_text: "PRECONDITION_FAILED".into(),
    };
    assert_eq!(w.fail_stream(1, refused), vec![1]);
    assert_eq!(w.on_up(4), 1);
    assert_eq!(w.probing(), Some(2));
    let last: Vec<(Seq, u64)> = w.take_publishes().map(|p| (p.seq, p.generation)).collect();
    assert_eq!(
        last,
        vec![(2, 4)],
        "the last suspect, on the new connection"
    );
    w.resolve(1);
    w.resolve(2);
    assert_eq!((w.suspects(), w.probing()), (0, None));
    assert!(w.has_room());
    w.check_invariants();
}

#[test]
fn a_turn_handed_on_while_suspects_are_probed_waits_for_the_probing_to_end() {
    let mut w = window(Ordering::Strict, 10);
    let a0 = event(1, 0);
    let a1 = event(1, 1);
    let b0 = event(2, 0);
    w.admit(a0.clone(), Some(message(&a0, 10)), stream(0), None);
    w.admit(a1.clone(), Some(message(&a1, 10)), stream(0), None);
    w.admit(b0.clone(), Some(message(&b0, 10)), stream(0), None);
    assert_eq!(w.take_publishes().count(), 2);
    w.on_down(1, true);
    w.on_up(2);
    let probe: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(probe, vec![0]);
    // a0 is acked: a1 gets the turn, but only the next suspect goes out.
    w.resolve(0);
    let next: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(next, vec![2], "the next probe alone, not a1");
    assert!(!w.is_published(1, 2));
    // The last suspect is acked: a1 goes out.
    w.resolve(2);
    let rest: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(rest, vec![1]);
    w.check_invariants();
}

#[test]
fn dropping_stream_messages_drops_their_suspects_and_probes_what_is_left() {
    let mut w = window(Ordering::Relaxed, 10);
    for agg in 0..3u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    let retry = event(3, 0);
    let retry_seq = w.admit_retry(
        retry.clone(),
        message(&retry, 10),
        Origin::Retry {
            key: retry.key(),
            parked_seq: 1,
            attempts: 1,
            max_retries: 3,
        },
        false,
    );
    assert_eq!(w.take_publishes().count(), 4);
    w.on_down(1, true);
    w.on_up(2);
    assert_eq!((w.suspects(), w.probing()), (4, Some(0)));
    w.take_publishes().count();
    // The replication stream reconnects: its messages (the probe among them) go.
    assert_eq!(w.drop_stream_messages(), 3);
    assert_eq!(w.suspects(), 1);
    assert_eq!(w.probing(), Some(retry_seq), "the suspect left is probed");
    let probe: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(probe, vec![retry_seq]);
    w.check_invariants();
    w.resolve(retry_seq);
    assert!(w.has_room() && w.is_empty());
    w.check_invariants();
}

#[test]
fn a_probe_that_is_not_a_stream_message_stays_the_probe_when_the_stream_is_dropped() {
    let mut w = window(Ordering::Relaxed, 10);
    let retry = event(3, 0);
    let retry_seq = w.admit_retry(
        retry.clone(),
        message(&retry, 10),
        Origin::Retry {
            key: retry.key(),
            parked_seq: 1,
            attempts: 1,
            max_retries: 3,
        },
        false,
    );
    for agg in 0..2u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.take_publishes().count();
    w.on_down(1, true);
    w.on_up(2);
    assert_eq!(w.probing(), Some(retry_seq));
    assert_eq!(w.drop_stream_messages(), 2);
    assert_eq!(w.probing(), Some(retry_seq), "still the probe");
    assert_eq!(
        w.on_down(2, true),
        Some(retry_seq),
        "the probe alone on the wire is the culprit"
    );
    w.check_invariants();
}

#[test]
fn a_failed_dead_letter_publish_waits_for_its_backoff_and_goes_out_once() {
    let mut w = window(Ordering::Strict, 10);
    let r = event(3, 0);
    let seq = w.admit_retry(
        r.clone(),
        message(&r, 10),
        Origin::DeadLetter {
            key: r.key(),
            parked_seq: 1,
            attempts: 4,
            reason: "out of retries".into(),
        },
        true,
    );
    let first: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(first.len(), 1);
    assert!(first[0].isolated, "a message refused before goes alone");
    w.backoff(seq, Duration::from_secs(10));
    assert!(!w.is_published(seq, 1));
    w.fire_backoffs(Instant::now());
    assert_eq!(w.take_publishes().count(), 0, "not before its backoff");
    assert!(w.next_timer().is_some());
    w.fire_backoffs(Instant::now() + Duration::from_secs(60));
    let again: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(again.len(), 1, "once its backoff is over");
    assert!(again[0].isolated);
    assert!(w.is_published(seq, 1));
    w.fire_backoffs(Instant::now() + Duration::from_secs(120));
    assert_eq!(w.take_publishes().count(), 0, "once");
    w.check_invariants();
}

#[test]
fn timers_fire_at_the_instant_next_timer_names() {
    // The loop sleeps until `next_timer` and then fires what is due at that instant.
    let mut w = window(Ordering::Relaxed, 10);
    let r = event(1, 0);
    w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    w.take_publishes().count();
    let deadline = w.next_timer().unwrap();
    assert_eq!(
        w.expired(deadline),
        vec![0],
        "a deadline expires at its instant"
    );
    let d = event(3, 0);
    let seq = w.admit_retry(
        d.clone(),
        message(&d, 10),
        Origin::DeadLetter {
            key: d.key(),
            parked_seq: 1,
            attempts: 4,
            reason: "out of retries".into(),
        },
        false,
    );
    w.take_publishes().count();
    w.backoff(seq, Duration::from_secs(1));
    let at = w.next_timer().unwrap();
    w.fire_backoffs(at);
    assert_eq!(
        w.take_publishes().count(),
        1,
        "a backoff ends at its instant"
    );
}

#[test]
fn an_ordinary_publish_is_not_isolated() {
    let mut w = window(Ordering::Strict, 10);
    let r = event(1, 0);
    w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    let p: Vec<Publish> = w.take_publishes().collect();
    assert!(!p[0].isolated);
}
