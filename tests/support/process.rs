//! The relay binary (and the examples) run as processes, their output in a log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A relay process spawned from the real binary; stderr goes to a log file.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub fn spawn(config: &std::path::Path, dir: &std::path::Path, env: &[(&str, &str)]) -> Relay {
        Self::command(&["run", "--config", config.to_str().unwrap()], dir, env)
    }

    /// Runs `outbox-relay <args>` in the background with stderr/stdout in a log file.
    pub fn command(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> Relay {
        Self::program(
            std::path::Path::new(env!("CARGO_BIN_EXE_outbox-relay")),
            args,
            dir,
            env,
        )
    }

    /// Runs one of the crate's examples (built by `cargo build --examples`, which
    /// `scripts/test.sh` does) like [`Relay::command`].
    pub fn example(name: &str, args: &[&str], dir: &std::path::Path) -> Relay {
        // target/<profile>/deps/<test binary> -> target/<profile>/examples/<name>
        let exe = std::env::current_exe().unwrap();
        let path = exe
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| profile.join("examples").join(name))
            .unwrap();
        assert!(
            path.exists(),
            "{} is missing: run `cargo build --examples` first (scripts/test.sh does)",
            path.display()
        );
        Self::program(&path, args, dir, &[])
    }

    fn program(
        program: &std::path::Path,
        args: &[&str],
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Relay {
        std::fs::create_dir_all(dir).unwrap();
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("relay-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOX_RELAY_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Relay { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "relay exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "relay did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of the relay's metrics endpoint (from its start-up log).
    pub async fn metrics_addr(&mut self) -> String {
        self.wait_log("metrics listening on ", Duration::from_secs(30))
            .await;
        let text = self.log_text();
        let at = text.find("metrics listening on ").unwrap() + "metrics listening on ".len();
        text[at..].split(':').take(2).collect::<Vec<_>>().join(":")
    }

    /// Waits until the relay streams (its start-up line).
    pub async fn wait_streaming(&mut self) {
        self.wait_log("streaming", Duration::from_secs(60)).await;
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit(timeout).await
    }

    /// Runs `outbox-relay <args> --config <config>` to its end (within 60 s):
    /// the exit code and everything it wrote.
    pub async fn run_to_end(
        args: &[&str],
        config: &std::path::Path,
        dir: &std::path::Path,
    ) -> (i32, String) {
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        let mut r = Relay::command(&all, dir, &[]);
        let status = r.wait_exit(Duration::from_secs(60)).await;
        (status.code().unwrap_or(-1), r.log_text())
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "relay did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
