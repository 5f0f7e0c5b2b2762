//! Signs of life: a silent replication connection is probed and then replaced,
//! a stall (work pending, the LSN not moving) is reported, and a lost stream is
//! reconnected (the retry state read again before any WAL is published).

use super::main_loop::Relay;
use super::startup;
use crate::error::Error;
use crate::metrics::{self, Problem};
use crate::retry::StoreCommand;
use crate::source::Decoder;
use crate::time::Backoff;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;

impl Relay {
    /// The next liveness deadline: the probe, the reconnect, the stall report.
    pub(super) fn liveness_timer(&self) -> Option<Instant> {
        let timeout = self.config.postgres.replication_timeout;
        let l = &self.liveness;
        let stream = l.reading.then(|| {
            if l.probed {
                l.last_wal + timeout
            } else {
                l.last_wal + timeout / 2
            }
        });
        let stall = (!self.tracker.is_idle() && !l.stalled)
            .then(|| l.last_progress + self.config.relay.stall_timeout);
        [stream, stall].into_iter().flatten().min()
    }

    /// Half the replication timeout silent: ask the server for a sign of life; all
    /// of it: the connection is dead (a partition TCP has not noticed).
    pub(super) fn check_stream(&mut self, now: Instant) -> Option<String> {
        let timeout = self.config.postgres.replication_timeout;
        let l = &mut self.liveness;
        if !l.reading {
            return None;
        }
        let silent = now.saturating_duration_since(l.last_wal);
        if silent >= timeout {
            l.wal_event();
            return Some(format!(
                "the replication connection was silent for {silent:?} (postgres.replication_timeout), even after a probe"
            ));
        }
        if silent >= timeout / 2 && !l.probed {
            l.probed = true;
            tracing::debug!(?silent, "replication connection silent: probing");
            self.heartbeat.probe();
        }
        None
    }

    /// Reports (and clears) a stall: work pending while the applied LSN stands still.
    pub(super) fn check_progress(&mut self) {
        let now = Instant::now();
        if self.tracker.is_idle() {
            self.liveness.last_progress = now;
        }
        let waited = now.saturating_duration_since(self.liveness.last_progress);
        let stalled = waited >= self.config.relay.stall_timeout;
        if stalled && !self.liveness.stalled {
            let why = format!(
                "no progress for {waited:?}: {} transaction(s) wait, {} message(s) in the window, {} park(s) unanswered (relay.stall_timeout)",
                self.tracker.len(),
                self.window.len(),
                self.parked.parking()
            );
            tracing::warn!("{why}");
            self.health.set_problem(Problem::Stalled, Some(why));
        } else if !stalled && self.liveness.stalled {
            self.health.set_problem(Problem::Stalled, None);
        }
        self.liveness.stalled = stalled;
    }

    /// Replaces a lost replication connection. Stream messages not yet applied are
    /// dropped from memory: the server sends them again from the slot's position.
    /// Returns false when shutdown was requested while reconnecting.
    pub(super) async fn reconnect_source(
        &mut self,
        reason: String,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        tracing::warn!(%reason, dropped = self.window.len(), "replication stream lost; reconnecting, unapplied transactions will be replayed");
        self.health.set_streaming(false);
        self.client.abort();
        self.window.drop_stream_messages();
        self.tracker.reset();
        let mut backoff = Backoff::new(
            Duration::from_millis(200),
            self.config.postgres.reconnect_backoff_max,
        );
        loop {
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(false),
                res = startup::open_stream(&self.source_settings, &self.config, self.applied, Some(self.reported)) => match res {
                    Ok((client, start)) => {
                        tracing::info!(start_lsn = %start, "replication stream resumed");
                        metrics::metrics().reconnect("postgres");
                        self.health.set_streaming(true);
                        self.client = client;
                        self.decoder = Decoder::new(
                            self.config.postgres.table.clone(),
                            self.config.postgres.columns.clone(),
                        );
                        // Another relay may have held the slot meanwhile: read the
                        // retry state again before the first WAL message is published.
                        self.heads_pending = true;
                        let _ = self.store.send(StoreCommand::Reload).await;
                        return Ok(true);
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, "cannot resume replication yet");
                    }
                    Err(e) => return Err(e),
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(false),
                _ = tokio::time::sleep(backoff.fail()) => {}
            }
        }
    }
}
