//! Throwaway Postgres clusters on ports of their own, so a test can break what it
//! likes (TLS settings, a slot invalidated by `max_slot_wal_keep_size`, a standby
//! promoted) without touching the shared server. Each runs as the `postgres`
//! user from the newest installed version and is stopped (immediately) and
//! removed on drop, also when a test panics.

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
