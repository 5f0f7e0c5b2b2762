//! The state behind the relay's signs of life (`liveness.rs` acts on it): when
//! the replication connection last spoke, whether it was probed, when the
//! applied LSN last moved.

use tokio::time::Instant;

/// Signs of life: of the replication connection (while the relay reads it) and
/// of progress (the applied LSN moving while work is pending).
pub(super) struct Liveness {
    /// The last replication event, or when the relay started reading again.
    pub(super) last_wal: Instant,
    pub(super) reading: bool,
    pub(super) probed: bool,
    /// The applied LSN last moved, or nothing was pending.
    pub(super) last_progress: Instant,
    pub(super) stalled: bool,
}

impl Liveness {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Liveness {
            last_wal: now,
            reading: false,
            probed: false,
            last_progress: now,
            stalled: false,
        }
    }

    pub(super) fn wal_event(&mut self) {
        self.last_wal = Instant::now();
        self.probed = false;
    }

    /// Silence only counts while the relay reads the stream.
    pub(super) fn reading(&mut self, reading: bool) {
        if reading && !self.reading {
            self.wal_event();
        }
        self.reading = reading;
    }
}
