//! The faults the soak injects, one at a time, in turn.

use crate::fleet::Fleet;
use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillRelay,
    KillReceiver,
    KillProcessorMidHandler,
    CloseBrokerConnections,
    RestartPostgres,
    RestartBroker,
    MemoryAlarm,
    StandbyTakeOver,
}

/// How long the broker's memory alarm lasts.
const ALARM: Duration = Duration::from_secs(20);

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::KillRelay,
        Fault::KillReceiver,
        Fault::KillProcessorMidHandler,
        Fault::CloseBrokerConnections,
        Fault::RestartPostgres,
        Fault::RestartBroker,
        Fault::MemoryAlarm,
        Fault::StandbyTakeOver,
    ];

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Fault::KillRelay => "kill -9 the active relay",
            Fault::KillReceiver => "kill -9 the receiver",
            Fault::KillProcessorMidHandler => "kill -9 the processor mid-handler",
            Fault::CloseBrokerConnections => "close every broker connection",
            Fault::RestartPostgres => "restart Postgres",
            Fault::RestartBroker => "restart the broker",
            Fault::MemoryAlarm => "broker memory alarm for 20 s",
            Fault::StandbyTakeOver => "stop the active relay: its standby takes over",
        }
    }

    /// Every process connects to the broker again after it.
    pub fn reconnects_to_the_broker(self) -> bool {
        matches!(self, Fault::CloseBrokerConnections | Fault::RestartBroker)
    }

    /// Injects the fault and returns when it is over (the service is back, the
    /// alarm cleared, the killed process replaced).
    pub async fn inject(self, fleet: &mut Fleet) -> Result<()> {
        match self {
            Fault::KillRelay => fleet.stop_active_relay(false).await,
            Fault::StandbyTakeOver => fleet.stop_active_relay(true).await,
            Fault::KillReceiver => fleet.kill_receiver().await,
            Fault::KillProcessorMidHandler => fleet.kill_processor_mid_handler().await,
            Fault::CloseBrokerConnections => {
                sh(&["rabbitmqctl", "-q", "close_all_connections", "soak fault"])
            }
            Fault::RestartPostgres => {
                let version = std::fs::read_dir("/etc/postgresql")
                    .context("finding the local Postgres cluster")?
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
                    .context("no cluster in /etc/postgresql")?;
                sh(&[
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    &version,
                    "main",
                    "restart",
                ])
            }
            Fault::RestartBroker => {
                sh(&["rabbitmqctl", "-q", "stop_app"])?;
                sh(&["rabbitmqctl", "-q", "start_app"])
            }
            Fault::MemoryAlarm => {
                let _restore = Restore;
                sh(&["rabbitmqctl", "-q", "set_vm_memory_high_watermark", "0"])?;
                tokio::time::sleep(ALARM).await;
                Ok(())
            }
        }
    }
}

/// Lifts the memory alarm again, also when the soak is interrupted.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = sh(&["rabbitmqctl", "-q", "set_vm_memory_high_watermark", "0.4"]);
    }
}

fn sh(argv: &[&str]) -> Result<()> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Lifts a memory alarm a crashed earlier soak may have left behind.
pub fn clear_alarm() {
    drop(Restore);
}
