//! Helpers shared by the end-to-end benchmarks (`drain`, `inbox`, `scale`): CPU
//! seconds and peak RSS from /proc, the broker's pid and settling, medians, LSNs,
//! the payload of a typical event.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on most systems).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/<pid>/stat after the command name (field 3 is index 0).
pub fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after_comm.split_whitespace().map(str::to_string).collect()
}

pub fn ticks_at(fields: &[String], index: usize) -> f64 {
    fields
        .get(index)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The machine's CPU time so far, in clock ticks over all cores: (busy, all),
/// from /proc/stat's first line (busy: everything but idle and iowait).
pub fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let all: f64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (all - idle, all)
}

/// How busy the machine's cores were since `before` ([`machine_ticks`]), 0-1.
pub fn busy_since(before: (f64, f64)) -> f64 {
    let now = machine_ticks();
    (now.0 - before.0) / (now.1 - before.1).max(1.0)
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let f = stat_fields(pid);
    (ticks_at(&f, 11) + ticks_at(&f, 12)) / clock_ticks()
}

/// CPU seconds used so far by Postgres: every running Postgres process (walsender,
/// backends, background writers), plus what its exited children used (the
/// postmaster's cutime and cstime), so backends that ended between two samples count.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .collect();
    let mut total = 0.0;
    for &pid in &pids {
        let f = stat_fields(pid);
        total += ticks_at(&f, 11) + ticks_at(&f, 12);
        // The postmaster: its parent is not a Postgres process.
        let parent: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if !pids.contains(&parent) {
            total += ticks_at(&f, 13) + ticks_at(&f, 14);
        }
    }
    total / clock_ticks()
}

/// CPU seconds used so far by one process (the relay or the plain publisher), the
/// broker and Postgres; the difference of two is what a run cost each of them.
#[derive(Clone, Copy, Default)]
pub struct CpuUse {
    pub process: f64,
    pub broker: f64,
    pub postgres: f64,
}

impl CpuUse {
    /// `process: None` counts the process as zero (it has not started yet).
    pub fn now(process: Option<u32>, broker: Option<u32>) -> CpuUse {
        CpuUse {
            process: process.map(cpu_seconds).unwrap_or(0.0),
            broker: broker.map(cpu_seconds).unwrap_or(0.0),
            postgres: postgres_cpu_seconds(),
        }
    }

    /// What was used since `before`, per 100 000 of `messages`.
    pub fn per_100k_since(self, before: CpuUse, messages: usize) -> CpuUse {
        let per = |now: f64, then: f64| (now - then) * 100_000.0 / messages as f64;
        CpuUse {
            process: per(self.process, before.process),
            broker: per(self.broker, before.broker),
            postgres: per(self.postgres, before.postgres),
        }
    }
}

/// Peak resident set size in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Waits until the broker is quiet (under 5 % of a core over 250 ms, at most 60 s):
/// the purge of the previous run's messages must not be billed to the next one.
pub async fn settle_broker() {
    let Some(pid) = broker_pid() else { return };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let before = cpu_seconds(pid);
        tokio::time::sleep(Duration::from_millis(250)).await;
        if cpu_seconds(pid) - before < 0.0125 {
            return;
        }
    }
}

pub fn broker_pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "beam.smp"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The median of some figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Messages ready in `queue` (a passive declare).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// The relay binary to run: this build's, or `BENCH_RELAY=PATH` (another build, for
/// an A/B of two commits).
pub fn relay_binary() -> String {
    std::env::var("BENCH_RELAY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outbox-relay").to_string())
}

/// An LSN (`16/B374D848`) as a number.
pub fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// A ~400-byte JSON payload, like a typical domain event.
pub fn payload(i: usize) -> String {
    format!(
        "{{\"orderId\":\"order-{i:08}\",\"customer\":{{\"id\":\"cust-{c:06}\",\"email\":\"customer{c}@example.com\",\"tier\":\"gold\"}},\"lines\":[{{\"sku\":\"SKU-{a:05}\",\"qty\":2,\"price\":19.99}},{{\"sku\":\"SKU-{b:05}\",\"qty\":1,\"price\":5.25}}],\"total\":45.23,\"currency\":\"EUR\",\"shipping\":{{\"method\":\"standard\",\"address\":\"Example Street 12, 10115 Berlin\"}},\"note\":\"benchmark row\"}}",
        c = i % 100_000,
        a = i % 50_000,
        b = (i * 7) % 50_000
    )
}

/// `2026-11-27T06:00:00.123456+00:00` to Unix microseconds (UTC offsets only).
pub fn parse_iso_micros(s: &str) -> i64 {
    let date = &s[..10];
    let (y, m, d): (i64, i64, i64) = (
        date[..4].parse().unwrap(),
        date[5..7].parse().unwrap(),
        date[8..10].parse().unwrap(),
    );
    let (h, mi, se): (i64, i64, i64) = (
        s[11..13].parse().unwrap(),
        s[14..16].parse().unwrap(),
        s[17..19].parse().unwrap(),
    );
    let micros = if s.as_bytes().get(19) == Some(&b'.') {
        s[20..26].parse::<i64>().unwrap()
    } else {
        0
    };
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (days * 86400 + h * 3600 + mi * 60 + se) * 1_000_000 + micros
}
