//! Where and as whom to connect to Postgres, parsed once from `[postgres] url`
//! (a leaf module: connecting lives in `pg::connect`, TLS in `pg::tls`).

use super::tls::PgTls;
use std::fmt;
use tokio_postgres::config::Host;

/// A parsed `postgresql://` URL or `key=value` connection string.
#[derive(Clone)]
pub struct PgTarget {
    pub host: String,
    pub port: u16,
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
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    }
}

impl PgTarget {
    /// Parses a `postgresql://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<Self, String> {
        let parse = |s: &str| -> Result<tokio_postgres::Config, String> {
            s.parse().map_err(|e| {
                format!("cannot be parsed ({e}); use postgresql://user:password@host:5432/dbname")
            })
        };
        let (rest, tls) = PgTls::from_url(url, |rest| parse(rest).ok().map(|c| first_host(&c)))?;
        let cfg = parse(&rest)?;
        let host = first_host(&cfg);
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
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

    /// The connection string with its password removed, for logs and errors.
    pub fn redacted(&self) -> String {
        format!(
            "postgresql://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
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
    fn sslmode_require_is_accepted() {
        let t = PgTarget::parse("postgresql://relay@db.example/app?sslmode=require").unwrap();
        assert!(t.tls.effective.requires_tls());
        assert!(!t.url().contains("sslmode"));
    }
}
