//! The soak's processes (relays, receiver, processor): spawned with their output
//! in a log file each, killed, stopped, and measured from `/proc`.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One process of the soak and where its output goes.
pub struct Proc {
    pub role: &'static str,
    child: Child,
    log: PathBuf,
    metrics: Option<String>,
}

/// What a process holds, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Resources {
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in `dir/<role>-<n>.log`.
    pub fn spawn(role: &'static str, program: &Path, args: &[&str], dir: &Path) -> Result<Proc> {
        let n = std::fs::read_dir(dir)?.count();
        let log = dir.join(format!("{role}-{n}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOX_RELAY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Proc {
            role,
            child,
            log,
            metrics: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the log holds `needle`; an error when the process exits or
    /// the time runs out.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; its log: {}",
                    self.role,
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; its log: {}",
                    self.role,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of its metrics endpoint (from its start-up log).
    pub async fn metrics_addr(&mut self) -> Result<String> {
        if let Some(addr) = &self.metrics {
            return Ok(addr.clone());
        }
        const AT: &str = "metrics listening on ";
        self.wait_log(AT, Duration::from_secs(30)).await?;
        let text = self.log_text();
        let at = text.find(AT).expect("just seen") + AT.len();
        let addr = text[at..].split(':').take(2).collect::<Vec<_>>().join(":");
        self.metrics = Some(addr.clone());
        Ok(addr)
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// kill -9, and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for its exit (kill -9 after `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        self.wait_exit(timeout).await
    }

    /// Waits for it to exit on its own (kill -9 after `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!(
                    "{} did not finish within {timeout:?}; its log: {}",
                    self.role,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its resident memory, open file descriptors and threads now.
    pub fn resources(&self) -> Option<Resources> {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(Resources {
            pid,
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.kill9();
        }
    }
}

/// GET `path` from `addr` within 5 s: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of the metric line `name` (no labels) in a scrape.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
