//! Time helpers shared across the crate (a leaf: it imports nothing of the crate):
//! Unix microseconds, the Postgres epoch, sleeping until an optional instant,
//! retry backoff, and Postgres timestamp text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Postgres epoch (2000-01-01) minus Unix epoch, in microseconds.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Local instant for a Unix-microseconds due time (now when it is in the past).
pub fn instant_of(due_micros: i64) -> Instant {
    let delta = due_micros - now_micros();
    if delta <= 0 {
        Instant::now()
    } else {
        Instant::now() + Duration::from_micros(delta as u64)
    }
}

/// Sleeps until `at`, or forever without one (a disabled `select!` timer).
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Backoff for the `attempt`-th failure: min(base · 2^(attempt-1), max) ± 10 %
/// jitter (the one formula, in the client crate's `backoff`).
pub use outbox_relay_client::backoff::jittered as backoff;
pub use outbox_relay_client::backoff::Backoff;

/// Postgres ISO text to Unix microseconds.
pub fn pg_timestamp_to_unix_micros(s: &str) -> Option<i64> {
    let (iso, secs) = pg_timestamp_to_iso(s)?;
    let micros = iso
        .get(19..)
        .and_then(|r| r.strip_prefix('.'))
        .map(|f| f[..6].parse::<i64>().unwrap_or(0))
        .unwrap_or(0);
    Some(secs * 1_000_000 + micros)
}

/// Postgres ISO text (`2026-11-27 06:00:00.5+00`) to Python-style ISO-8601
/// (`2026-11-27T06:00:00.500000+00:00`) and Unix seconds.
pub fn pg_timestamp_to_iso(s: &str) -> Option<(String, i64)> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b' ' && b[10] != b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 6 {
            return None;
        }
        micros = frac[..digits].parse::<i64>().ok()? * 10i64.pow(6 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_secs = if rest.is_empty() {
        None
    } else {
        let sign = match rest.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let parts: Vec<&str> = rest[1..].split(':').collect();
        if parts.is_empty()
            || parts.len() > 3
            || parts
                .iter()
                .any(|p| p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit()))
        {
            return None;
        }
        let v: Vec<i64> = parts.iter().map(|p| p.parse().unwrap_or(0)).collect();
        Some(sign * (v[0] * 3600 + v.get(1).unwrap_or(&0) * 60 + v.get(2).unwrap_or(&0)))
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let unix = days * 86400 + hour * 3600 + minute * 60 + second - offset_secs.unwrap_or(0);
    let mut iso = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if micros != 0 {
        iso.push_str(&format!(".{micros:06}"));
    }
    if let Some(off) = offset_secs {
        let sign = if off < 0 { '-' } else { '+' };
        let a = off.abs();
        iso.push_str(&format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60));
    }
    Some((iso, unix))
}

/// Unix microseconds to `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`.
pub fn unix_micros_to_iso(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    );
    if micros != 0 {
        s.push_str(&format!(".{micros:06}"));
    }
    s.push_str("+00:00");
    s
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let b1 = backoff(base, max, 1);
        assert!(
            b1 >= Duration::from_millis(90) && b1 <= Duration::from_millis(110),
            "{b1:?}"
        );
        let b3 = backoff(base, max, 3);
        assert!(
            b3 >= Duration::from_millis(360) && b3 <= Duration::from_millis(440),
            "{b3:?}"
        );
        let b10 = backoff(base, max, 10);
        assert!(b10 <= Duration::from_millis(1100), "{b10:?}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            pg_timestamp_to_iso("2026-11-27 06:00:00+00"),
            Some(("2026-11-27T06:00:00+00:00".into(), 1_795_759_200))
        );
        assert_eq!(
            pg_timestamp_to_iso("2026-11-27 08:30:00.000001+02:30").unwrap(),
            ("2026-11-27T08:30:00.000001+02:30".into(), 1_795_759_200)
        );
        assert_eq!(pg_timestamp_to_iso("1970-01-01 00:00:00").unwrap().1, 0);
        assert_eq!(pg_timestamp_to_iso("infinity"), None);
        assert_eq!(
            pg_timestamp_to_unix_micros("2026-11-27 06:00:00.25+00"),
            Some(1_795_759_200_250_000)
        );
        assert_eq!(
            unix_micros_to_iso(1_795_759_200_000_000),
            "2026-11-27T06:00:00+00:00"
        );
        assert_eq!(
            unix_micros_to_iso(1_500_000),
            "1970-01-01T00:00:01.500000+00:00"
        );
    }
}
