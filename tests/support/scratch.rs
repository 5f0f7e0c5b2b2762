//! Throwaway Postgres clusters and RabbitMQ nodes on ports of their own, so a
//! test can break what it likes (TLS settings, a slot invalidated by
//! `max_slot_wal_keep_size`, a standby promoted, a node killed) without touching
//! the shared services. Each is stopped (immediately) and removed on drop, also
//! when a test panics.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Runs `cmd` in bash; panics with its stderr when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` as the postgres user.
pub fn sh_pg(cmd: &str) -> String {
    sh(&format!(
        "runuser -u postgres -- bash -c {}",
        shell_quote(cmd)
    ))
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The newest installed Postgres's bin directory.
fn pg_bin() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap()
        .join("bin")
        .display()
        .to_string()
}

/// A throwaway cluster.
pub struct ScratchPg {
    pub dir: PathBuf,
    pub bin: String,
    pub port: u16,
}

/// How to make one.
pub struct Setup<'a> {
    /// Part of the directory name (`outbox-relay-<name>-<port>`).
    pub name: &'a str,
    pub port: u16,
    /// Lines appended to postgresql.conf (port, socket directory and
    /// `wal_level = logical` are set already).
    pub conf: &'a str,
    /// The whole pg_hba.conf.
    pub hba: &'a str,
    /// `initdb --auth-host`.
    pub auth_host: &'a str,
    /// Files installed into the data directory (mode 600): (source path, name).
    pub files: &'a [(String, &'a str)],
}

/// pg_hba.conf that trusts everything local: plain scratch clusters.
pub const TRUST: &str = "local all all trust\nlocal replication all trust\n\
    host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

impl ScratchPg {
    /// A plain cluster (trust, no TLS) with `conf` added.
    pub fn plain(name: &str, port: u16, conf: &str) -> ScratchPg {
        Self::start(Setup {
            name,
            port,
            conf,
            hba: TRUST,
            auth_host: "trust",
            files: &[],
        })
    }

    /// initdb, configure, start.
    pub fn start(setup: Setup<'_>) -> ScratchPg {
        let port = setup.port;
        let pg = Self::empty(setup.name, port);
        let d = pg.dir.display().to_string();
        sh_pg(&format!(
            "{}/initdb -D {d}/data -U postgres --auth-local=trust --auth-host={} >/dev/null",
            pg.bin, setup.auth_host
        ));
        for (source, name) in setup.files {
            sh(&format!(
                "install -o postgres -m 600 {source} {d}/data/{name}"
            ));
        }
        std::fs::write(pg.dir.join("data/pg_hba.conf"), setup.hba).unwrap();
        let conf = format!(
            "port = {port}\nlisten_addresses = 'localhost'\nunix_socket_directories = '{d}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n{}\n",
            setup.conf
        );
        let mut text = std::fs::read_to_string(pg.dir.join("data/postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(pg.dir.join("data/postgresql.conf"), text).unwrap();
        sh(&format!("chown -R postgres {d}"));
        pg.start_server();
        pg
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started, on `port`.
    pub fn standby_of(primary: &ScratchPg, name: &str, port: u16) -> ScratchPg {
        let pg = Self::empty(name, port);
        let d = pg.dir.display().to_string();
        sh_pg(&format!(
            "{}/pg_basebackup -h {} -p {} -U postgres -D {d}/data -R -X stream >/dev/null",
            pg.bin,
            primary.dir.display(),
            primary.port
        ));
        let mut text = std::fs::read_to_string(pg.dir.join("data/postgresql.conf")).unwrap();
        text.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{d}'\nhot_standby = on\n"
        ));
        std::fs::write(pg.dir.join("data/postgresql.conf"), text).unwrap();
        sh(&format!("chown -R postgres {d}"));
        pg.start_server();
        pg
    }

    fn empty(name: &str, port: u16) -> ScratchPg {
        let dir = std::env::temp_dir().join(format!("outbox-relay-{name}-{port}"));
        let pg = ScratchPg {
            dir,
            bin: pg_bin(),
            port,
        };
        pg.stop();
        let _ = std::fs::remove_dir_all(&pg.dir);
        std::fs::create_dir_all(&pg.dir).unwrap();
        sh(&format!("chown postgres {}", pg.dir.display()));
        pg
    }

    fn start_server(&self) {
        let d = self.dir.display().to_string();
        sh_pg(&format!(
            "{}/pg_ctl -D {d}/data -l {d}/log -w start >/dev/null",
            self.bin
        ));
    }

    /// Runs SQL over the Unix socket (trust) in database `postgres`; its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        sh_pg(&format!(
            "{}/psql -h {} -p {} -U postgres -d postgres -v ON_ERROR_STOP=1 -Atc {}",
            self.bin,
            self.dir.display(),
            self.port,
            shell_quote(sql)
        ))
    }

    /// `postgresql://postgres@127.0.0.1:<port>/postgres` (needs a trusting pg_hba).
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Promotes a standby and waits until it takes writes.
    pub fn promote(&self) {
        sh_pg(&format!(
            "{}/pg_ctl -D {}/data -w promote >/dev/null",
            self.bin,
            self.dir.display()
        ));
        for _ in 0..200 {
            if self.psql("select pg_is_in_recovery()").trim() == "f" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the standby on port {} was not promoted", self.port);
    }

    /// Waits until this standby replayed everything `primary` wrote so far.
    pub fn caught_up_with(&self, primary: &ScratchPg) {
        let target = primary.psql("select pg_current_wal_lsn()");
        for _ in 0..400 {
            let behind = self.psql(&format!(
                "select pg_last_wal_replay_lsn() < '{}'::pg_lsn",
                target.trim()
            ));
            if behind.trim() == "f" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the standby did not catch up with {}", target.trim());
    }

    /// Stops it at once (like a crash).
    pub fn stop(&self) {
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "bash",
                "-c",
                &format!(
                    "{}/pg_ctl -D {}/data stop -m immediate",
                    self.bin,
                    self.dir.display()
                ),
            ])
            .output();
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway RabbitMQ node: its own node name, ports (`port` for AMQP as the
/// configuration says, `port + 1` the node port, `port + 2` distribution),
/// configuration file, plugins and directories; the Erlang cookie is the
/// machine's (`HOME=/var/lib/rabbitmq` shares `rabbitmqctl`'s). Killed (the
/// whole process group) on drop.
pub struct ScratchRabbit {
    pub dir: PathBuf,
    pub node: String,
    pub port: u16,
    child: std::process::Child,
    pgid: i32,
}

impl ScratchRabbit {
    /// Starts node `name@localhost` with `conf` as its rabbitmq.conf and
    /// `plugins` as its enabled_plugins file (`"[].\n"` for none).
    pub fn start(name: &str, port: u16, conf: &str, plugins: &str) -> ScratchRabbit {
        let dir = std::env::temp_dir().join(format!("outbox-relay-rabbit-{name}-{port}"));
        kill_group_in(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.join("enabled_plugins"), plugins).unwrap();
        let node = format!("{name}@localhost");
        let (child, pgid) = Self::spawn(&dir, &node, port);
        ScratchRabbit {
            dir,
            node,
            port,
            child,
            pgid,
        }
    }

    /// Starts the node again (after [`ScratchRabbit::kill9`]) on its own
    /// directories: its data, and its cluster membership, are kept.
    pub fn restart(&mut self) {
        self.kill9();
        let (child, pgid) = Self::spawn(&self.dir, &self.node, self.port);
        self.child = child;
        self.pgid = pgid;
    }

    fn spawn(dir: &std::path::Path, node: &str, port: u16) -> (std::process::Child, i32) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("out.log"))
            .unwrap();
        let d = dir.display().to_string();
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.env("RABBITMQ_NODENAME", node)
            .env("RABBITMQ_NODE_PORT", (port + 1).to_string())
            .env("RABBITMQ_DIST_PORT", (port + 2).to_string())
            .env("RABBITMQ_CONFIG_FILE", format!("{d}/rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", format!("{d}/mnesia"))
            .env("RABBITMQ_LOG_BASE", format!("{d}/log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{d}/enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", format!("{d}/rabbit.pid"))
            .env("RABBITMQ_LOGS", "-")
            .env("HOME", "/var/lib/rabbitmq")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start a scratch rabbitmq node");
        let pgid = child.id() as i32;
        std::fs::write(dir.join("launcher.pgid"), pgid.to_string()).unwrap();
        (child, pgid)
    }

    /// When the node has exited (it could not start: say, a port in use), the
    /// end of its log.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten()?;
        let log = std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        Some(tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    /// `rabbitmqctl -n <this node> <args>`: its output, or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .env("HOME", "/var/lib/rabbitmq")
            .output()
            .map_err(|e| format!("rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl -n {} {}: {}{}",
                self.node,
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// kill -9 of the whole node (the Erlang VM and its helpers); returns once
    /// every process of it is gone (its ports free for the next node).
    pub fn kill9(&mut self) {
        let group = format!("-{}", self.pgid);
        let _ = Command::new("kill").args(["-9", "--", &group]).output();
        let _ = self.child.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let alive = Command::new("kill")
                .args(["-0", "--", &group])
                .output()
                .is_ok_and(|o| o.status.success());
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Kills a node a crashed earlier run left behind.
fn kill_group_in(dir: &std::path::Path) {
    if let Ok(pgid) = std::fs::read_to_string(dir.join("launcher.pgid")) {
        if let Ok(pgid) = pgid.trim().parse::<i32>() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{pgid}")])
                .output();
        }
    }
}

impl Drop for ScratchRabbit {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
