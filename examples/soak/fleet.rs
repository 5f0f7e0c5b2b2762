//! The processes under soak: two relays on one slot (one active, one hot
//! standby), the inbox receiver and a `Processor` (client/examples/inbox_worker.rs,
//! one effect row per order). Each can be killed and replaced.

use crate::procs::{http_get, Proc, Resources};
use crate::setup::{CHANNEL, EFFECTS, INBOX, PG_URL};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(60);

pub struct Fleet {
    relay_bin: PathBuf,
    worker_bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    /// While this file exists, the processor's next handler holds its
    /// transaction open after writing its effect.
    hold: PathBuf,
    relays: [Proc; 2],
    receiver: Proc,
    processor: Proc,
}

impl Fleet {
    /// `init`, then the active relay, its standby, the receiver and the
    /// processor, each up before the next starts.
    pub async fn start(
        relay_bin: &Path,
        worker_bin: &Path,
        config: &Path,
        dir: &Path,
    ) -> Result<Fleet> {
        let config_arg = config.to_str().context("config path is not UTF-8")?;
        let mut init = Proc::spawn("init", relay_bin, &["init", "--config", config_arg], dir)?;
        let status = init.wait_exit(START).await?;
        if !status.success() {
            bail!("outbox-relay init failed: {}", init.log_text());
        }
        let hold = dir.join("hold");
        let _ = std::fs::remove_file(&hold);
        let mut active = spawn_relay(relay_bin, config, dir)?;
        active.wait_log("streaming", START).await?;
        let mut standby = spawn_relay(relay_bin, config, dir)?;
        standby.wait_log("waiting as a hot standby", START).await?;
        let receiver = spawn_receiver(relay_bin, config, dir).await?;
        let processor = spawn_processor(worker_bin, &hold, dir).await?;
        Ok(Fleet {
            relay_bin: relay_bin.to_path_buf(),
            worker_bin: worker_bin.to_path_buf(),
            config: config.to_path_buf(),
            dir: dir.to_path_buf(),
            hold,
            relays: [active, standby],
            receiver,
            processor,
        })
    }

    /// Which relay holds the slot and streams: the one whose `/readyz` is 200
    /// (waits while neither is, as during a take-over). Not "the one that does
    /// not say standby": a relay that lost the slot to its standby while
    /// reconnecting waits for it without saying so.
    pub async fn active(&mut self) -> Result<usize> {
        let deadline = Instant::now() + START;
        loop {
            for i in 0..2 {
                if self.ready(i).await? {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!("neither relay holds the slot after {START:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn ready(&mut self, i: usize) -> Result<bool> {
        let addr = self.relays[i].metrics_addr().await?;
        Ok(matches!(http_get(&addr, "/readyz").await, Ok((200, _))))
    }

    pub async fn receiver_metrics(&mut self) -> Result<String> {
        self.receiver.metrics_addr().await
    }

    /// kill -9 of the active relay (`graceful`: SIGTERM); a new relay takes the
    /// killed one's place as the standby once the other has taken over.
    pub async fn stop_active_relay(&mut self, graceful: bool) -> Result<()> {
        let i = self.active().await?;
        if graceful {
            let status = self.relays[i].terminate(START).await?;
            if !status.success() {
                bail!(
                    "the active relay exited with {status} on SIGTERM: {}",
                    self.relays[i].log_path().display()
                );
            }
        } else {
            self.relays[i].kill9();
        }
        // Taken over: the other relay streams (not a log line, which an
        // earlier take-over of the same process would match).
        let deadline = Instant::now() + START;
        while !self.ready(1 - i).await? {
            if Instant::now() > deadline {
                bail!(
                    "the standby did not take over within {START:?}: {}",
                    self.relays[1 - i].log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut fresh = spawn_relay(&self.relay_bin, &self.config, &self.dir)?;
        fresh.wait_log("waiting as a hot standby", START).await?;
        self.relays[i] = fresh;
        Ok(())
    }

    pub async fn kill_receiver(&mut self) -> Result<()> {
        self.receiver.kill9();
        self.receiver = spawn_receiver(&self.relay_bin, &self.config, &self.dir).await?;
        Ok(())
    }

    /// kill -9 of the processor while a handler has written its effect and
    /// holds its transaction open.
    pub async fn kill_processor_mid_handler(&mut self) -> Result<()> {
        std::fs::write(&self.hold, b"")?;
        let held = self.processor.wait_log("mid-handler", START).await;
        self.processor.kill9();
        std::fs::remove_file(&self.hold)?;
        held.context("no handler reached the hold point")?;
        self.processor = spawn_processor(&self.worker_bin, &self.hold, &self.dir).await?;
        Ok(())
    }

    /// Every process still runs (none exited on its own).
    pub fn check_alive(&mut self) -> Result<()> {
        for p in self.all_mut() {
            if !p.alive() {
                bail!("{} exited on its own: {}", p.role, p.log_path().display());
            }
        }
        Ok(())
    }

    /// Each process' resources, by role (`relay` is the active one).
    pub async fn resources(&mut self) -> Result<Vec<(&'static str, Resources)>> {
        let active = self.active().await?;
        let mut out = Vec::new();
        for (role, p) in [
            ("relay", &self.relays[active]),
            ("standby", &self.relays[1 - active]),
            ("receiver", &self.receiver),
            ("processor", &self.processor),
        ] {
            let r = p
                .resources()
                .with_context(|| format!("reading /proc of the {role} (pid {})", p.pid()))?;
            out.push((role, r));
        }
        Ok(out)
    }

    /// SIGTERM to every process; each must exit cleanly.
    pub async fn stop(mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.hold);
        for p in self.all_mut() {
            let status = p.terminate(START).await?;
            // The worker example ends on SIGINT; SIGTERM ends it by signal.
            if !status.success() && p.role != "processor" {
                bail!(
                    "{} exited with {status} on SIGTERM: {}",
                    p.role,
                    p.log_path().display()
                );
            }
        }
        Ok(())
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        let [a, b] = &mut self.relays;
        [a, b, &mut self.receiver, &mut self.processor].into_iter()
    }
}

fn spawn_relay(bin: &Path, config: &Path, dir: &Path) -> Result<Proc> {
    Proc::spawn("relay", bin, &["run", "--config", path_str(config)?], dir)
}

async fn spawn_receiver(bin: &Path, config: &Path, dir: &Path) -> Result<Proc> {
    let mut p = Proc::spawn(
        "receiver",
        bin,
        &["inbox", "--config", path_str(config)?],
        dir,
    )?;
    p.wait_log("inbox consuming", START).await?;
    Ok(p)
}

async fn spawn_processor(bin: &Path, hold: &Path, dir: &Path) -> Result<Proc> {
    let args = [PG_URL, INBOX, EFFECTS, CHANNEL, path_str(hold)?];
    let mut p = Proc::spawn("processor", bin, &args, dir)?;
    p.wait_log("processing", START).await?;
    Ok(p)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
