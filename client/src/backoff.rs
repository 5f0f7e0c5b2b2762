//! Waits between attempts: one formula for every retry, reconnect and probe of
//! both halves of outbox-relay (the relay uses it too).

use std::time::Duration;

/// The wait after the `attempt`-th failure (1 for the first):
/// min(base · 2^(attempt-1), max), scaled by `jitter` (clamped to 0.5–1.5).
pub fn delay(base: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    exp.min(max).mul_f64(jitter.clamp(0.5, 1.5))
}

/// A jitter factor of ± 10 % for one wait.
pub fn jitter() -> f64 {
    use rand::Rng;
    rand::rng().random_range(0.9..=1.1)
}

/// [`delay`] with ± 10 % jitter.
pub fn jittered(base: Duration, max: Duration, attempt: u32) -> Duration {
    delay(base, max, attempt, jitter())
}

/// A wait that doubles with each failure of a loop of attempts (reconnects,
/// probes), up to a cap, and starts over once an attempt succeeds.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    jitter: bool,
}

impl Backoff {
    /// ± 10 % jitter on each wait (several processes do not retry in step).
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
            jitter: true,
        }
    }

    /// The same without jitter (waits a state machine's tests can predict).
    pub fn exact(base: Duration, max: Duration) -> Backoff {
        Backoff {
            jitter: false,
            ..Backoff::new(base, max)
        }
    }

    /// Counts a failure; the wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.current()
    }

    /// The wait after the failures counted so far (`base` before any).
    pub fn current(&self) -> Duration {
        let j = if self.jitter { jitter() } else { 1.0 };
        delay(self.base, self.max, self.failures.max(1), j)
    }

    /// An attempt succeeded: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_over() {
        let ms = Duration::from_millis;
        assert_eq!(delay(ms(100), ms(1000), 1, 1.0), ms(100));
        assert_eq!(delay(ms(100), ms(1000), 3, 1.0), ms(400));
        assert_eq!(delay(ms(100), ms(1000), 30, 1.0), ms(1000));
        assert_eq!(delay(ms(100), ms(1000), 0, 1.0), ms(100));
        let mut b = Backoff::exact(ms(100), ms(250));
        assert_eq!(b.current(), ms(100));
        assert_eq!([b.fail(), b.fail(), b.fail()], [ms(100), ms(200), ms(250)]);
        assert_eq!(b.failures(), 3);
        b.reset();
        assert_eq!(b.fail(), ms(100));
        for _ in 0..100 {
            let d = jittered(ms(1000), ms(1000), 1);
            assert!(d >= ms(900) && d <= ms(1100), "{d:?}");
        }
    }
}
