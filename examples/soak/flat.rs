//! Whether each process stayed flat: its memory, file descriptors and threads
//! at the end within 10 % of its first steady reading.
//!
//! Readings are per process and role: a relay killed and started again is a
//! new process with its own start, and a standby that takes over is measured
//! as the active relay from then on (a waiting standby holds half the memory).
//! A process' first steady reading in a role is its first one after it lived
//! through a reconnection to the broker (its first reading in that role when
//! it never did): the first time lapin connects again, async-compat starts its
//! global runtime lazily — a thread, an epoll and an eventfd — once per
//! process (seen in `/proc/<pid>/fd` and `/proc/<pid>/task/*/comm`: an
//! `async-compat/tokio-1` thread; flat over five more reconnections after it).
//! Only the processes running at the end are judged; the readings of the others
//! are in the report. Flat means no growth: the end more than 10 % above the
//! first steady reading fails; a drop is reported in the readings, not failed
//! (the 30-minute run of 2026-12-07 had two, neither a leak: a relay whose
//! first steady reading was taken while it caught up after a take-over, 34 →
//! 26 MB; a standby whose idle Postgres session a restart ended, 18 → 16
//! descriptors until it takes over).

use crate::procs::Resources;
use serde::Serialize;
use std::collections::HashSet;

/// The label of the last reading.
pub const END: &str = "end";

#[derive(Default)]
pub struct Readings {
    all: Vec<Reading>,
    reconnected: HashSet<u32>,
}

#[derive(Serialize)]
pub struct Reading {
    role: &'static str,
    /// When it was taken: "start", after a fault (its label), "end".
    at: &'static str,
    /// The process had lived through a reconnection to the broker.
    steady: bool,
    #[serde(flatten)]
    resources: Resources,
}

impl Readings {
    /// Each process' reading at `at`; `broker_reconnected`: each of them has
    /// just lived through a reconnection to the broker.
    pub fn record(
        &mut self,
        at: &'static str,
        readings: Vec<(&'static str, Resources)>,
        broker_reconnected: bool,
    ) {
        for (role, resources) in readings {
            if broker_reconnected {
                self.reconnected.insert(resources.pid);
            }
            self.all.push(Reading {
                role,
                at,
                steady: self.reconnected.contains(&resources.pid),
                resources,
            });
        }
    }

    pub fn into_all(self) -> Vec<Reading> {
        self.all
    }

    /// One line per process (and role) running at the end, and measure, that
    /// grew more than 10 % over its first steady reading (a count of a
    /// handful may grow by one).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for last in self.all.iter().filter(|r| r.at == END) {
            let same = |r: &&Reading| r.resources.pid == last.resources.pid && r.role == last.role;
            let first = self
                .all
                .iter()
                .filter(same)
                .find(|r| r.steady)
                .or_else(|| self.all.iter().find(same))
                .unwrap_or(last);
            let (a, b) = (first.resources, last.resources);
            for (what, x, y, slack) in [
                ("resident memory (KiB)", a.rss_kib, b.rss_kib, 0),
                ("open file descriptors", a.fds, b.fds, 1),
                ("threads", a.threads, b.threads, 1),
            ] {
                let allowed = (x as f64 * 0.1).max(slack as f64);
                if y as f64 - x as f64 > allowed {
                    out.push(format!(
                        "{} (pid {}): {what} {x} at its first steady reading ({}), {y} at the end: grew more than 10 %",
                        last.role, a.pid, first.at
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(pid: u32, rss_kib: u64, fds: u64, threads: u64) -> Resources {
        Resources {
            pid,
            rss_kib,
            fds,
            threads,
        }
    }

    #[test]
    fn the_one_time_step_of_the_first_reconnection_is_not_growth() {
        let mut m = Readings::default();
        m.record("start", vec![("relay", r(1, 20_000, 16, 2))], false);
        m.record("close", vec![("relay", r(1, 21_500, 20, 4))], true);
        m.record(END, vec![("relay", r(1, 22_000, 20, 4))], false);
        assert!(m.failures().is_empty(), "{:?}", m.failures());
    }

    #[test]
    fn growth_after_the_steady_reading_is_found() {
        let mut m = Readings::default();
        m.record("start", vec![("relay", r(1, 20_000, 16, 2))], false);
        m.record("close", vec![("relay", r(1, 20_000, 20, 4))], true);
        m.record(END, vec![("relay", r(1, 23_000, 24, 4))], false);
        assert_eq!(m.failures().len(), 2, "{:?}", m.failures());
    }

    #[test]
    fn a_drop_is_not_growth() {
        let mut m = Readings::default();
        m.record("close", vec![("relay", r(1, 34_000, 18, 4))], true);
        m.record(END, vec![("relay", r(1, 26_000, 16, 3))], false);
        assert!(m.failures().is_empty(), "{:?}", m.failures());
    }

    #[test]
    fn a_process_that_never_reconnected_is_measured_from_its_start() {
        let mut m = Readings::default();
        m.record("start", vec![("receiver", r(7, 10_000, 15, 2))], false);
        m.record(END, vec![("receiver", r(7, 10_000, 18, 2))], false);
        assert_eq!(m.failures().len(), 1, "{:?}", m.failures());
    }

    #[test]
    fn a_standby_that_took_over_is_measured_as_the_relay_it_became() {
        let mut m = Readings::default();
        m.record("start", vec![("standby", r(2, 12_000, 15, 2))], false);
        m.record("close", vec![("standby", r(2, 12_000, 18, 2))], true);
        m.record("take-over", vec![("relay", r(2, 24_000, 20, 3))], false);
        m.record(END, vec![("relay", r(2, 25_000, 20, 3))], false);
        assert!(m.failures().is_empty(), "{:?}", m.failures());
    }

    #[test]
    fn processes_gone_before_the_end_are_not_judged() {
        let mut m = Readings::default();
        m.record("start", vec![("relay", r(1, 20_000, 16, 2))], false);
        m.record("alarm", vec![("relay", r(1, 31_000, 16, 2))], false);
        m.record(END, vec![("relay", r(3, 20_000, 16, 2))], false);
        assert!(m.failures().is_empty(), "{:?}", m.failures());
    }
}
