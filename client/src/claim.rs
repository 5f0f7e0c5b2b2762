//! The Processor's state logic, without I/O: what a failed attempt turns a row
//! into (Event-Forge's backoff and retry budget), and what the recovery sweep
//! does with a row left in `processing`. The statements that apply it live in
//! `processor.rs`.

use std::time::Duration;

/// A row's status after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// `failed`, due again after this delay; `retry_count` becomes `retries`.
    Retry { retries: i32, delay: Duration },
    /// `permanently_failed`: the retry budget is spent.
    Dead { retries: i32 },
}

/// Event-Forge's backoff: min(base · 2^retry_count, max), scaled by `jitter`
/// (0.9 to 1.1 in use: ± 10 %).
pub fn backoff(base: Duration, max: Duration, retry_count: i32, jitter: f64) -> Duration {
    let attempt = u32::try_from(retry_count).unwrap_or(0).saturating_add(1);
    crate::backoff::delay(base, max, attempt, jitter.clamp(0.9, 1.1))
}

/// What a failed attempt does to a row that had `retry_count` retries of its
/// `max_retries`: the first attempt plus `max_retries` retries, then dead.
pub fn after_failure(
    retry_count: i32,
    max_retries: i32,
    base: Duration,
    max: Duration,
    jitter: f64,
) -> AfterFailure {
    let retries = retry_count.saturating_add(1);
    if retries > max_retries {
        AfterFailure::Dead { retries }
    } else {
        AfterFailure::Retry {
            retries,
            delay: backoff(base, max, retry_count, jitter),
        }
    }
}

/// What the recovery sweep does with a row stuck in `processing` (its worker
/// crashed between marking it and finishing it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Back to `failed`, due now: processed again.
    Retry,
    /// Recovered too often: `permanently_failed`.
    GiveUp,
}

/// Recovery for a row already recovered `recovery_attempts` times.
pub fn recover(recovery_attempts: i32, max_recoveries: i32) -> Recovery {
    if recovery_attempts >= max_recoveries {
        Recovery::GiveUp
    } else {
        Recovery::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(5);
    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn event_forge_backoff() {
        assert_eq!(backoff(S, H, 0, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(S, H, 1, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(S, H, 3, 1.0), Duration::from_secs(40));
        assert_eq!(backoff(S, H, 30, 1.0), H);
        assert_eq!(backoff(S, H, 0, 1.1), Duration::from_millis(5500));
    }

    #[test]
    fn the_budget_is_the_first_attempt_plus_max_retries() {
        assert_eq!(
            after_failure(0, 0, S, H, 1.0),
            AfterFailure::Dead { retries: 1 }
        );
        assert_eq!(
            after_failure(0, 3, S, H, 1.0),
            AfterFailure::Retry {
                retries: 1,
                delay: S
            }
        );
        assert_eq!(
            after_failure(3, 3, S, H, 1.0),
            AfterFailure::Dead { retries: 4 }
        );
        assert_eq!(recover(0, 3), Recovery::Retry);
        assert_eq!(recover(3, 3), Recovery::GiveUp);
    }

    proptest! {
        /// Delays stay within ± 10 % of min(base · 2^n, max) and never shrink as
        /// retries grow (for the same jitter).
        #[test]
        fn backoff_is_bounded_and_monotonic(n in 0i32..40, jitter in 0.9f64..=1.1) {
            let d = backoff(S, H, n, jitter);
            prop_assert!(d <= H.mul_f64(1.1));
            prop_assert!(d >= S.mul_f64(0.9));
            prop_assert!(backoff(S, H, n + 1, jitter) >= d);
        }

        /// A row fails at most max_retries + 1 times before it is dead, and every
        /// failure before that schedules a retry.
        #[test]
        fn a_row_dies_after_exactly_its_budget(max in 0i32..20) {
            let mut count = 0;
            let mut attempts = 0;
            loop {
                attempts += 1;
                match after_failure(count, max, S, H, 1.0) {
                    AfterFailure::Retry { retries, .. } => count = retries,
                    AfterFailure::Dead { retries } => {
                        prop_assert_eq!(retries, max + 1);
                        break;
                    }
                }
            }
            prop_assert_eq!(attempts, max + 1);
        }
    }
}
