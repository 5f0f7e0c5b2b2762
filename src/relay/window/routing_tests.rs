//! The window under a systemic routing fault: held messages, probes, resumes.

use super::tests::{event, message, stream, window};
use super::*;

pub(super) fn returned() -> Failure {
    Failure::Returned {
        reply_code: 312,
        reply_text: "NO_ROUTE".into(),
    }
}

#[test]
fn a_systemic_routing_fault_holds_messages_uncharged_until_a_probe_is_acked() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Strict, 64);
    for agg in 0..12u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    let a = event(0, 1);
    assert_eq!(
        w.admit(a.clone(), Some(message(&a, 10)), stream(0), None),
        Admitted::Queued
    );
    assert_eq!(w.take_publishes().count(), 12);
    // The first failures are the messages' own: parked as usual.
    for seq in 1..MIN_FAILURES as Seq {
        assert!(!w.unrouted(seq, &returned()));
        w.fail_stream(seq, returned());
    }
    // The next one makes it systemic: held, not charged.
    let decisive = MIN_FAILURES as Seq;
    assert!(w.unrouted(decisive, &returned()));
    assert!(w.routing_paused() && !w.has_room());
    assert!(!w.is_published(decisive, 1));
    assert!(w.routing_fault().unwrap().keys.len() >= 3);
    for seq in decisive + 1..12 {
        assert!(w.unrouted(seq, &returned()), "held while it lasts");
    }
    assert_eq!(w.take_publishes().count(), 0, "nothing goes out but probes");
    w.check_invariants();
    // Seq 0 is still on the wire: no probe before it is answered.
    let later = Instant::now() + Duration::from_secs(3600);
    w.fire_routing_probe(later);
    assert_eq!(w.take_publishes().count(), 0);
    assert!(w.unrouted(0, &returned()));
    assert!(w.next_timer().is_some(), "a probe is scheduled");
    w.fire_routing_probe(later);
    let probes: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(probes.len(), 1, "one probe at a time");
    let first_key = probes[0].message.routing_key.clone();
    w.fire_routing_probe(later);
    assert_eq!(w.take_publishes().count(), 0, "the probe is on the wire");
    // It fails again: the next probe tries another routing key.
    assert!(w.unrouted(probes[0].seq, &returned()));
    w.fire_routing_probe(later + Duration::from_secs(3600));
    let second: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].message.routing_key, first_key);
    // Acked: the broker routes again, everything held goes out in order.
    assert!(w.routed(second[0].seq));
    w.resolve(second[0].seq);
    assert!(!w.routing_paused() && w.has_room());
    let resumed: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    let mut expected: Vec<Seq> = (0..12)
        .filter(|s| *s == 0 || *s >= decisive)
        .filter(|s| *s != second[0].seq)
        .collect();
    expected.sort_unstable();
    assert_eq!(resumed, expected);
    w.check_invariants();
}

#[test]
fn a_routing_pause_ending_while_suspects_remain_keeps_probing_them_alone() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Strict, 64);
    for agg in 0..12u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    assert_eq!(w.take_publishes().count(), 12);
    for seq in 1..MIN_FAILURES as Seq {
        assert!(!w.unrouted(seq, &returned()));
        w.fail_stream(seq, returned());
    }
    for seq in MIN_FAILURES as Seq..11 {
        assert!(w.unrouted(seq, &returned()));
    }
    // Seqs 0 and 11 are still on the wire when the broker refuses: both suspects.
    assert_eq!(w.on_down(1, true), None);
    assert_eq!(w.suspects(), 2);
    assert_eq!(w.on_up(2), 1);
    let probe: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(probe, vec![0]);
    // The probe is acked: the routing pause ends, but the other suspect still goes alone.
    assert!(w.routed(0));
    assert!(!w.routing_paused());
    assert_eq!(
        w.take_publishes().count(),
        0,
        "the probe is still unanswered"
    );
    w.resolve(0);
    let next: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(next, vec![11], "the last suspect alone");
    w.resolve(11);
    let held: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(held, (MIN_FAILURES as Seq..11).collect::<Vec<_>>());
    w.check_invariants();
}

#[test]
fn nacks_on_one_key_pause_and_renew_the_connection_once_then_probe_on_the_new_one() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Strict, 64);
    // One routing key for everything (aggregates 0, 4, 8, ... share `A.e0`).
    for i in 0..12u8 {
        let r = event(i * 4, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    assert_eq!(w.take_publishes().count(), 12);
    for seq in 0..MIN_FAILURES as Seq - 1 {
        assert!(!w.unrouted(seq, &Failure::Nack));
        w.fail_stream(seq, Failure::Nack);
    }
    assert_eq!(w.take_renewal(), None, "not systemic yet");
    assert!(w.unrouted(MIN_FAILURES as Seq - 1, &Failure::Nack));
    assert!(w.routing_paused());
    assert_eq!(w.take_renewal(), Some(1), "the connection is renewed");
    for seq in MIN_FAILURES as Seq..12 {
        assert!(w.unrouted(seq, &Failure::Nack));
    }
    assert_eq!(w.take_renewal(), None, "once per connection");
    // The new connection: nothing but one probe, at once.
    w.on_down(1, false);
    assert_eq!(w.on_up(2), 0);
    w.fire_routing_probe(Instant::now());
    let probes: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(probes.len(), 1, "one probe on the new connection");
    assert_eq!(probes[0].generation, 2);
    // Nacked there too: that connection is renewed in turn.
    assert!(w.unrouted(probes[0].seq, &Failure::Nack));
    assert_eq!(w.take_renewal(), Some(2));
    w.on_down(2, false);
    w.on_up(3);
    w.fire_routing_probe(Instant::now());
    let probe: Vec<Publish> = w.take_publishes().collect();
    assert_eq!(probe.len(), 1);
    assert!(w.routed(probe[0].seq), "acked: the pause ends");
    w.resolve(probe[0].seq);
    assert_eq!(w.take_publishes().count(), 12 - MIN_FAILURES);
    assert_eq!(w.take_renewal(), None);
    w.check_invariants();
}

#[test]
fn returns_pause_without_renewing_the_connection() {
    let mut w = window(Ordering::Relaxed, 64);
    for agg in 0..12u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.take_publishes().count();
    for seq in 0..12 {
        if !w.unrouted(seq, &returned()) {
            w.fail_stream(seq, returned());
        }
    }
    assert!(w.routing_paused());
    assert_eq!(w.take_renewal(), None, "the topology's fault: no renewal");
}

#[test]
fn with_nothing_held_a_routing_pause_ends_by_itself() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Relaxed, 64);
    for agg in 0..MIN_FAILURES as u8 {
        let r = event(agg, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.take_publishes().count();
    for seq in 0..MIN_FAILURES as Seq - 1 {
        assert!(!w.unrouted(seq, &returned()));
        w.fail_stream(seq, returned());
    }
    assert!(w.unrouted(MIN_FAILURES as Seq - 1, &returned()));
    // The replication stream reconnects: the held stream message is dropped (the
    // server sends it again).
    w.drop_stream_messages();
    w.fire_routing_probe(Instant::now() + Duration::from_secs(3600));
    assert!(!w.routing_paused() && w.has_room());
}

#[test]
fn dead_letter_copies_say_nothing_about_routing() {
    let mut w = window(Ordering::Relaxed, 64);
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
        false,
    );
    for _ in 0..2 * crate::relay::routing::MIN_FAILURES {
        assert!(!w.unrouted(seq, &Failure::Nack));
    }
    assert!(!w.routing_paused());
    assert!(!w.routed(seq));
}

#[test]
fn routing_probes_wait_for_their_backoff() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Relaxed, 64);
    // One routing key for everything: nacks on it are systemic.
    for i in 0..MIN_FAILURES as u8 + 2 {
        let r = event(i * 4, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.take_publishes().count();
    for seq in 0..MIN_FAILURES as Seq - 1 {
        assert!(!w.unrouted(seq, &Failure::Nack));
        w.fail_stream(seq, Failure::Nack);
    }
    assert_eq!(w.routing_timer(), None, "not paused");
    for seq in MIN_FAILURES as Seq - 1..MIN_FAILURES as Seq + 2 {
        assert!(w.unrouted(seq, &Failure::Nack));
    }
    let due = w
        .routing_timer()
        .expect("nothing on the wire: a probe is scheduled");
    assert!(due > Instant::now(), "after a wait");
    w.fire_routing_probe(Instant::now());
    assert_eq!(w.take_publishes().count(), 0, "not before the first wait");
    w.fire_routing_probe(due);
    let t1 = due;
    let probe: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(probe.len(), 1);
    assert_eq!(w.routing_timer(), None, "the probe is on the wire");
    // The probe is refused for its own sake: parked, and the next probe still waits.
    let refused = Failure::Refused {
        reply_code: 406,
        reply_text: "PRECONDITION_FAILED".into(),
    };
    assert!(!w.unrouted(probe[0], &refused));
    w.fail_stream(probe[0], refused);
    w.fire_routing_probe(t1 + Duration::from_millis(1));
    assert_eq!(w.take_publishes().count(), 0, "the wait after a probe");
    w.fire_routing_probe(t1 + Duration::from_secs(60));
    assert_eq!(w.take_publishes().count(), 1);
    w.check_invariants();
}

#[test]
fn a_dead_letter_copy_waiting_for_its_backoff_is_never_a_routing_probe() {
    use crate::relay::routing::MIN_FAILURES;
    let mut w = window(Ordering::Relaxed, 64);
    let d = event(3, 0);
    let dead = w.admit_retry(
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
    w.backoff(dead, Duration::from_secs(3600));
    // One routing key for the stream messages: nacks on it are systemic.
    for i in 0..MIN_FAILURES as u8 + 1 {
        let r = event(i * 4, 0);
        w.admit(r.clone(), Some(message(&r, 10)), stream(0), None);
    }
    w.take_publishes().count();
    for seq in 1..MIN_FAILURES as Seq {
        assert!(!w.unrouted(seq, &Failure::Nack));
        w.fail_stream(seq, Failure::Nack);
    }
    for seq in MIN_FAILURES as Seq..MIN_FAILURES as Seq + 2 {
        assert!(w.unrouted(seq, &Failure::Nack));
    }
    let due = w.routing_timer().unwrap();
    w.fire_routing_probe(due);
    let probe: Vec<Seq> = w.take_publishes().map(|p| p.seq).collect();
    assert_eq!(probe, vec![MIN_FAILURES as Seq], "a held stream message");
    assert!(
        !w.is_published(dead, 1),
        "the dead letter keeps its backoff"
    );
    w.check_invariants();
}
