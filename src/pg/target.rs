//! Where and as whom to connect to Postgres, parsed once from `[postgres] url`
//! (a leaf module: connecting lives in `pg::connect`).

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
    url: String,
}

impl PgTarget {
    /// Parses a `postgresql://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<Self, String> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            format!("cannot be parsed ({e}); use postgresql://user:password@host:5432/dbname")
        })?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
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
        if matches!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
            return Err("sslmode=require is not supported yet: connect over a trusted network or a local socket".into());
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            dbname,
            url: url.to_string(),
        })
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

    /// The full connection string, password included: only for connecting.
    pub(crate) fn url(&self) -> &str {
        &self.url
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
}
