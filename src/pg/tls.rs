//! TLS to Postgres with rustls, the same rules for the SQL connections
//! (tokio-postgres) and the replication connection (pgwire-replication).
//!
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are read from `[postgres] url`
//! as libpq spells them and removed from the string handed to tokio-postgres
//! (which knows neither `verify-ca` nor `verify-full`). Files are read once, at
//! start-up, so a wrong path is an error naming its key. As in libpq, `require`
//! with an `sslrootcert` verifies the chain like `verify-ca`.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

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

/// The ssl keys taken out of a connection string.
#[derive(Default, Debug)]
struct SslParams {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl SslParams {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits the ssl keys off a `postgresql://` URL or a `key=value` string: the
/// string without them (for tokio-postgres) and the keys.
fn split(url: &str) -> Result<(String, SslParams), String> {
    let mut params = SslParams::default();
    if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .unwrap_or_default();
            if !params.take(&k, v) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, params));
    }
    // key = value pairs; values may be 'quoted' with \ escapes.
    let mut kept = Vec::new();
    let mut chars = url.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("cannot be parsed: expected = after {key}"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\\')) => {
                        if let Some((_, c)) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some((_, '\'')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("cannot be parsed: unterminated quote in {key}")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map(|(i, _)| *i).unwrap_or(url.len());
        if !params.take(&key, value) {
            kept.push(&url[start..end]);
        }
    }
    Ok((kept.join(" "), params))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{key}={path}: cannot be read ({e})"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}={path}: not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err(format!("{key}={path}: holds no PEM certificate"));
    }
    Ok(certs)
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
                let bytes = std::fs::read(key)
                    .map_err(|e| format!("sslkey={key}: cannot be read ({e})"))?;
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

    /// The name the server's certificate holds, read over a TLS handshake of
    /// our own that verifies the chain (`verify-ca`), or `None` when the server
    /// refuses TLS (the real connection then says so).
    ///
    /// pgwire-replication 0.5.0's verify-ca verifier only forgives rustls's old
    /// `NotValidForName` error, not the `NotValidForNameContext` that rustls
    /// 0.23 returns now, so it checks the name after all: the replication
    /// connection is given the certificate's own name to expect, which keeps
    /// verify-ca's meaning (a certificate the CA signed, whatever its name).
    pub async fn certificate_name(&self, host: &str, port: u16) -> Result<Option<String>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Unreachable, or no TLS: the real connection reports it.
        let Ok(mut tcp) = tokio::net::TcpStream::connect((host, port)).await else {
            return Ok(None);
        };
        if tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.is_err()
            || tcp.read_u8().await.ok() != Some(b'S')
        {
            return Ok(None);
        }
        let name = ServerName::try_from(host.to_string())
            .or_else(|_| ServerName::try_from("postgres".to_string()))
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("the server sent no certificate")?
            .to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the server's certificate cannot be read: {e}"))?;
        let names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        for n in &names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = n {
                // A wildcard stands for any one label.
                let dns = match dns.strip_prefix("*.") {
                    Some(rest) => format!("postgres.{rest}"),
                    None => dns.to_string(),
                };
                return Ok(Some(dns));
            }
        }
        for n in &names {
            if let x509_parser::extensions::GeneralName::IPAddress(ip) = n {
                let ip = match ip.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default()),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default()),
                    _ => continue,
                };
                return Ok(Some(ip.to_string()));
            }
        }
        Err("the server's certificate names no host (no subject alternative name): verify-ca cannot check it; reissue it with one".into())
    }

    /// A one-line account of a failed TLS negotiation, from the driver's error
    /// text: `(the key to look at, what went wrong and what to do)`.
    pub fn explain(&self, text: &str, host: &str) -> Option<(String, String)> {
        let lower = text.to_ascii_lowercase();
        let mode = format!("sslmode={}", self.mode.as_str());
        if lower.contains("does not support tls") || lower.contains("sslrequest rejected") {
            return Some((mode, "the server does not accept TLS: turn on ssl in postgresql.conf, or use sslmode=prefer or disable on a trusted network".into()));
        }
        let rootcert = format!(
            "sslrootcert={}",
            self.rootcert.as_deref().unwrap_or("system")
        );
        if lower.contains("unknownissuer")
            || lower.contains("unknown issuer")
            || lower.contains("badsignature")
        {
            return Some((rootcert, "the server's certificate is not signed by this CA: give the CA (PEM) that signed it".into()));
        }
        if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            return Some((mode, format!("the server's certificate is not valid for host {host}: connect by a name the certificate holds, or use sslmode=verify-ca")));
        }
        if lower.contains("expired") || lower.contains("notvalidyet") {
            return Some((
                rootcert,
                "the server's certificate is expired or not yet valid: renew it".into(),
            ));
        }
        if lower.contains("certificaterequired")
            || lower.contains("certificate required")
            || lower.contains("unknownca")
            || lower.contains("unknown ca")
        {
            return Some(("sslcert".into(), "the server refused the client certificate (or wants one): give sslcert and sslkey signed by a CA the server trusts".into()));
        }
        if lower.contains("tls") || lower.contains("certificate") || lower.contains("handshake") {
            return Some((
                mode,
                format!("TLS negotiation failed: {}", crate::redact::one_line(text)),
            ));
        }
        None
    }
}

/// Verifies the chain, not the name (`verify-ca`).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Encrypts without verifying the server (`prefer`, `require` without a root
/// certificate), as libpq does; the handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's TLS hook over tokio-rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // Below verify-full the name is not checked; an IP literal is still a
        // valid ServerName, and a name that is neither gets a stand-in.
        let name = ServerName::try_from(domain.to_string())
            .or_else(|_| ServerName::try_from("postgres".to_string()))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            name,
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
        })
    }
}

pub struct RustlsConnect {
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// An encrypted SQL connection.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
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
