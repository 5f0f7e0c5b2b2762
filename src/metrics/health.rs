//! What `/readyz` reports: whether the relay can make progress, and if not, why.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    streaming: AtomicBool,
    broker: AtomicBool,
    /// Pid of the process holding the slot while this relay waits as a standby; 0 otherwise.
    standby_for: AtomicI32,
}

impl Health {
    pub fn set_streaming(&self, v: bool) {
        self.streaming.store(v, Ordering::Relaxed);
    }

    pub fn set_broker(&self, v: bool) {
        self.broker.store(v, Ordering::Relaxed);
    }

    pub fn set_standby(&self, holder_pid: Option<i32>) {
        self.standby_for
            .store(holder_pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// `Ok` when replication streams and the broker is connected; else why not.
    pub fn ready(&self) -> Result<(), String> {
        let standby = self.standby_for.load(Ordering::Relaxed);
        if standby != 0 {
            return Err(format!("standby: the slot is held by pid {standby}"));
        }
        match (
            self.streaming.load(Ordering::Relaxed),
            self.broker.load(Ordering::Relaxed),
        ) {
            (true, true) => Ok(()),
            (false, true) => Err("replication is not streaming (connecting to Postgres)".into()),
            (true, false) => Err("broker is not connected".into()),
            (false, false) => {
                Err("replication is not streaming and the broker is not connected".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_why() {
        let h = Health::default();
        assert!(h.ready().unwrap_err().contains("not streaming"));
        h.set_streaming(true);
        assert!(h.ready().unwrap_err().contains("broker"));
        h.set_broker(true);
        assert!(h.ready().is_ok());
        h.set_standby(Some(42));
        assert!(h.ready().unwrap_err().contains("pid 42"));
    }
}
