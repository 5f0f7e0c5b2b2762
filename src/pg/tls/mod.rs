//! TLS to Postgres with rustls, the same rules for the SQL connections
//! (tokio-postgres) and the replication connection (pgwire-replication).
//!
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are read from `[postgres] url`
//! as libpq spells them and removed from the string handed to tokio-postgres
//! (which knows neither `verify-ca` nor `verify-full`). Files are read once, at
//! start-up, so a wrong path is an error naming its key. As in libpq, `require`
//! with an `sslrootcert` verifies the chain like `verify-ca`.

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;
use std::sync::Arc;

mod adapter;
mod explain;
mod keys;
mod probe;
mod verify;

pub use adapter::{MakeRustls, RustlsConnect, RustlsStream};
use keys::{read_certs, split};
use verify::{ChainOnly, NoVerification};

/// libpq's `sslmode`, as the relay applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use prefer, require, verify-ca or verify-full"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                "sslmode={other} is unknown: use disable, prefer, require, verify-ca or verify-full"
            ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection in this mode is always encrypted.
    pub fn requires_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }
}

/// The TLS settings of one Postgres target, with the rustls configuration built
/// from them.
#[derive(Clone)]
pub struct PgTls {
    /// The mode as written (`prefer` when absent, as in libpq).
    pub mode: SslMode,
    /// The mode applied: `require` with a root certificate verifies like `verify-ca`.
    pub effective: SslMode,
    /// `sslrootcert` as written; `None` or `system` use the Mozilla roots.
    pub rootcert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("rootcert", &self.rootcert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PgTls {
    /// Parses the ssl keys of `url` and reads their files; returns the string
    /// without them. `host` is the first host of the URL.
    pub fn from_url(
        url: &str,
        host_of: impl Fn(&str) -> Option<String>,
    ) -> Result<(String, Self), String> {
        let (rest, p) = split(url)?;
        let mode = match &p.mode {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        let rootcert = p.rootcert.filter(|r| !r.is_empty());
        let effective = match (mode, &rootcert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        let verifies = matches!(effective, SslMode::VerifyCa | SslMode::VerifyFull);
        if verifies && rootcert.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert=FILE (the CA that signed the server's certificate, PEM) or sslrootcert=system (the Mozilla roots)",
                mode.as_str()
            ));
        }
        if effective == SslMode::VerifyFull {
            if let Some(host) = host_of(&rest) {
                if host.parse::<std::net::IpAddr>().is_ok() {
                    return Err(format!(
                        "sslmode=verify-full: host {host} is an IP address; name the host by the DNS name its certificate holds, or use sslmode=verify-ca"
                    ));
                }
            }
        }
        let roots = match rootcert.as_deref() {
            None | Some("system") => {
                let mut roots = RootCertStore::empty();
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                roots
            }
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(read_certs("sslrootcert", path)?);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert={path}: holds no usable CA certificate"
                    ));
                }
                roots
            }
        };
        let client_auth = match (&p.cert, &p.key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err("sslcert is set without sslkey: give both, or neither".into())
            }
            (None, Some(_)) => {
                return Err("sslkey is set without sslcert: give both, or neither".into())
            }
            (Some(cert), Some(key)) => {
                let certs = read_certs("sslcert", cert)?;
                let bytes =
                    crate::files::read_small(key).map_err(|e| format!("sslkey={key}: {e}"))?;
                let pk = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                    format!("sslkey={key}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")
                })?;
                Some((certs, pk))
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("sslmode={}: {e}", mode.as_str()))?;
        let roots = Arc::new(roots);
        let verifier: Arc<dyn ServerCertVerifier> = {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            match effective {
                SslMode::VerifyFull => webpki,
                SslMode::VerifyCa => Arc::new(ChainOnly(webpki)),
                _ => Arc::new(NoVerification(provider())),
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match client_auth {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("sslkey: does not match sslcert ({e})"))?,
            None => builder.with_no_client_auth(),
        };
        Ok((
            rest,
            Self {
                mode,
                effective,
                rootcert,
                cert: p.cert.map(PathBuf::from),
                key: p.key.map(PathBuf::from),
                config: Arc::new(config),
            },
        ))
    }

    /// The sslmode tokio-postgres negotiates with (it verifies nothing itself:
    /// the rustls configuration does).
    pub fn tokio_postgres_mode(&self) -> tokio_postgres::config::SslMode {
        match self.effective {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The connector for tokio-postgres.
    pub fn connector(&self) -> MakeRustls {
        MakeRustls {
            config: self.config.clone(),
        }
    }

    /// The same rules for pgwire-replication.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as M;
        let ca = match self.rootcert.as_deref() {
            None | Some("system") => None,
            Some(path) => Some(PathBuf::from(path)),
        };
        let mut tls = pgwire_replication::TlsConfig {
            mode: match self.effective {
                SslMode::Disable => M::Disable,
                SslMode::Prefer => M::Prefer,
                SslMode::Require => M::Require,
                SslMode::VerifyCa => M::VerifyCa,
                SslMode::VerifyFull => M::VerifyFull,
            },
            ca_pem_path: ca,
            sni_hostname: None,
            client_cert_pem_path: self.cert.clone(),
            client_key_pem_path: self.key.clone(),
        };
        if self.effective != SslMode::VerifyFull && host.parse::<std::net::IpAddr>().is_ok() {
            // An IP literal is no valid SNI name; nothing checks the name below
            // verify-full, so any name does.
            tls.sni_hostname = Some("postgres".into());
        }
        tls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_keys_are_split_off_both_forms() {
        let (rest, p) = split(
            "postgresql://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://u:p@h:5432/db?application_name=x");
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.rootcert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, p) =
            split("host=h user=u password='a b\\'c' sslmode = require sslcert='/x y' dbname=d")
                .unwrap();
        assert_eq!(rest, "host=h user=u password='a b\\'c' dbname=d");
        assert_eq!(p.mode.as_deref(), Some("require"));
        assert_eq!(p.cert.as_deref(), Some("/x y"));
    }

    #[test]
    fn modes_and_files_are_checked_naming_the_key() {
        let none = |_: &str| Some("db.example".to_string());
        let e = PgTls::from_url("postgresql://u@h/db?sslmode=verify-full", none).unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = PgTls::from_url("postgresql://u@h/db?sslmode=bogus", none).unwrap_err();
        assert!(e.starts_with("sslmode=bogus"), "{e}");
        let e = PgTls::from_url(
            "postgresql://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            none,
        )
        .unwrap_err();
        assert!(
            e.starts_with("sslrootcert=/nonexistent/ca.pem: cannot be read"),
            "{e}"
        );
        let e = PgTls::from_url("postgresql://u@h/db?sslcert=/x", none).unwrap_err();
        assert!(e.contains("sslkey"), "{e}");
        let ip = |_: &str| Some("10.0.0.1".to_string());
        let e = PgTls::from_url(
            "postgresql://u@10.0.0.1/db?sslmode=verify-full&sslrootcert=system",
            ip,
        )
        .unwrap_err();
        assert!(e.contains("IP address"), "{e}");
        let (_, t) = PgTls::from_url("postgresql://u@h/db", none).unwrap();
        assert_eq!(t.effective, SslMode::Prefer);
        let (_, t) = PgTls::from_url(
            "postgresql://u@h/db?sslmode=verify-full&sslrootcert=system",
            none,
        )
        .unwrap();
        assert_eq!(t.effective, SslMode::VerifyFull);
    }
}
