//! Where and as whom to connect to Postgres, parsed once from `[postgres] url`
//! (a leaf module: connecting lives in `pg::connect`, TLS in `pg::tls`).

use super::tls::PgTls;
use std::fmt;
use tokio_postgres::config::Host;

/// A parsed `postgresql://` URL or `key=value` connection string: one host, or
/// several (`host=a,b` / `postgresql://a:5432,b:5432/db`, libpq's multi-host
/// form) of which the relay uses the one that takes writes.
#[derive(Clone)]
pub struct PgTarget {
    /// The host connected to: the URL's first, or the one [`PgTarget::primary`]
    /// found.
    pub host: String,
    pub port: u16,
    /// Every host of the URL with its port, in order.
    hosts: Vec<(String, u16)>,
    /// Connects to `host` only (a target [`PgTarget::primary`] returned).
    pinned: bool,
    pub user: String,
    password: String,
    pub dbname: String,
    /// The connection string without its ssl keys.
    url: String,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, read once.
    pub tls: PgTls,
    /// Send a password in clear text or MD5 over an unencrypted connection
    /// (`postgres.allow_insecure_password`).
    pub allow_insecure_password: bool,
}

fn first_host(cfg: &tokio_postgres::Config) -> String {
    match cfg.get_hosts().first() {
        Some(host) => host_name(host),
        None => "localhost".to_string(),
    }
}

fn host_name(host: &Host) -> String {
    match host {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    }
}

/// Every host with its port (a port per host, one port for all, or 5432).
fn hosts_of(cfg: &tokio_postgres::Config) -> Vec<(String, u16)> {
    let ports = cfg.get_ports();
    let hosts: Vec<String> = match cfg.get_hosts() {
        [] => vec!["localhost".to_string()],
        hosts => hosts.iter().map(host_name).collect(),
    };
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            (h, port)
        })
        .collect()
}

/// libpq's `target_session_attrs=primary` (PostgreSQL 14+) is `read-write` to
/// the driver: the relay needs a server that takes writes either way.
fn primary_as_read_write(url: &str) -> String {
    url.replace(
        "target_session_attrs=primary",
        "target_session_attrs=read-write",
    )
}

impl PgTarget {
    /// Parses a `postgresql://` URL or a `key=value` connection string. A
    /// refusal never shows a password the string holds.
    pub fn parse(url: &str) -> Result<Self, String> {
        Self::parse_unscrubbed(url).map_err(|e| crate::redact::scrub(&e, url))
    }

    fn parse_unscrubbed(url: &str) -> Result<Self, String> {
        let parse = |s: &str| -> Result<tokio_postgres::Config, String> {
            s.parse().map_err(|e| {
                format!("cannot be parsed ({e}); use postgresql://user:password@host:5432/dbname")
            })
        };
        let url = primary_as_read_write(url);
        let (rest, tls) = PgTls::from_url(&url, |rest| parse(rest).ok().map(|c| first_host(&c)))?;
        let cfg = parse(&rest)?;
        let hosts = hosts_of(&cfg);
        let (host, port) = hosts[0].clone();
        if !cfg.get_hostaddrs().is_empty() && hosts.len() > 1 {
            return Err(
                "hostaddr with several hosts is not supported: name each host in host=".into(),
            );
        }
        use tokio_postgres::config::TargetSessionAttrs;
        match cfg.get_target_session_attrs() {
            TargetSessionAttrs::ReadOnly => {
                return Err("target_session_attrs=read-only: the relay writes (its retry state, the rows' status); use read-write".into())
            }
            TargetSessionAttrs::Any if hosts.len() > 1 && rest.contains("target_session_attrs") => {
                return Err("target_session_attrs=any with several hosts would connect to a standby as readily as to the primary: use read-write (the default with several hosts)".into())
            }
            _ => {}
        }
        if tls.effective == super::tls::SslMode::VerifyFull {
            if let Some((ip, _)) = hosts
                .iter()
                .find(|(h, _)| h.parse::<std::net::IpAddr>().is_ok())
            {
                return Err(format!("sslmode=verify-full: host {ip} is an IP address; name the host by the DNS name its certificate holds, or use sslmode=verify-ca"));
            }
        }
        let user = cfg
            .get_user()
            .ok_or("names no user; use postgresql://user@host:5432/dbname")?
            .to_string();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = cfg.get_dbname().unwrap_or(&user).to_string();
        Ok(Self {
            host,
            port,
            hosts,
            pinned: false,
            user,
            password,
            dbname,
            url: rest,
            tls,
            allow_insecure_password: false,
        })
    }

    /// Uses `password` (read from `postgres.password_file`) instead of one in the URL.
    pub fn with_password(mut self, password: String) -> Self {
        self.password = password;
        self
    }

    /// Whether the URL itself carries a password.
    pub fn has_password(&self) -> bool {
        !self.password.is_empty()
    }

    /// The connection string with its password removed, for logs and errors
    /// (every host, or the one it is pinned to).
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = match self.pinned {
            true => vec![format!("{}:{}", self.host, self.port)],
            false => self.hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect(),
        };
        let shown = format!(
            "postgresql://{}@{}/{}",
            self.user,
            hosts.join(","),
            self.dbname
        );
        // A string read leniently can leave a password it did not take as the
        // password inside the user or database name: those are removed (the
        // one it took is never shown, so a short one does not garble the rest).
        let untaken = crate::redact::url_passwords(&self.url)
            .into_iter()
            .filter(|p| !self.password.contains(p))
            .collect();
        crate::redact::scrub_secrets(&shown, untaken)
    }

    /// Every host of the URL with its port.
    pub fn hosts(&self) -> &[(String, u16)] {
        &self.hosts
    }

    /// Whether connections must land on a server that takes writes: with
    /// several hosts (the relay's default there), or when pinned to one.
    pub(crate) fn wants_read_write(&self) -> bool {
        self.hosts.len() > 1 || self.pinned
    }

    /// Whether this target connects to one host only.
    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// This target, connecting to `host:port` (one of its hosts) only.
    pub(crate) fn pinned_to_host(&self, host: &str, port: u16) -> PgTarget {
        PgTarget {
            host: host.to_string(),
            port,
            pinned: true,
            ..self.clone()
        }
    }

    /// This target, connecting to its `i`-th host only.
    pub fn pinned_to(&self, i: usize) -> PgTarget {
        let (host, port) = &self.hosts[i];
        self.pinned_to_host(host, *port)
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// The connection string without ssl keys, password included: only for connecting.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether the host is a Unix socket directory (no network, no TLS).
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_redacts_password() {
        let t = PgTarget::parse("postgresql://relay:s3cret@db.example:6543/app").unwrap();
        assert_eq!(t.redacted(), "postgresql://relay@db.example:6543/app");
        assert_eq!(t.password(), "s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        let t = PgTarget::parse("host=h user=u password=p dbname=d").unwrap();
        assert_eq!(t.redacted(), "postgresql://u@h:5432/d");
    }

    #[test]
    fn several_hosts_are_tried_for_the_one_that_takes_writes() {
        let t = PgTarget::parse(
            "postgresql://relay:pw@db-a:5432,db-b:5433/app?target_session_attrs=primary",
        )
        .unwrap();
        assert_eq!(
            t.hosts(),
            [("db-a".to_string(), 5432), ("db-b".to_string(), 5433)]
        );
        assert_eq!(t.redacted(), "postgresql://relay@db-a:5432,db-b:5433/app");
        assert!(t.wants_read_write());
        assert!(t.url().contains("target_session_attrs=read-write"));
        let b = t.pinned_to(1);
        assert_eq!(b.redacted(), "postgresql://relay@db-b:5433/app");
        assert!(b.is_pinned() && b.wants_read_write());
        // key=value, one port for both; read-write is the default with several hosts.
        let t = PgTarget::parse("host=a,b port=6000 user=u dbname=d").unwrap();
        assert_eq!(
            t.hosts(),
            [("a".to_string(), 6000), ("b".to_string(), 6000)]
        );
        assert!(t.wants_read_write());
        assert!(!PgTarget::parse("host=a user=u").unwrap().wants_read_write());
        for (url, words) in [
            (
                "host=a,b user=u target_session_attrs=any",
                "target_session_attrs=any",
            ),
            ("host=a user=u target_session_attrs=read-only", "read-only"),
            (
                "host=db-a,10.0.0.2 user=u sslmode=verify-full sslrootcert=system",
                "10.0.0.2 is an IP address",
            ),
        ] {
            let e = PgTarget::parse(url).err().unwrap();
            assert!(e.contains(words), "{url}: {e}");
        }
    }

    #[test]
    fn sslmode_require_is_accepted() {
        let t = PgTarget::parse("postgresql://relay@db.example/app?sslmode=require").unwrap();
        assert!(t.tls.effective.requires_tls());
        assert!(!t.url().contains("sslmode"));
    }
}
