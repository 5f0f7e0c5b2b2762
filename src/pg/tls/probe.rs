//! The verify-ca probe: the name the server's certificate holds, read over a
//! handshake of the relay's own, for the replication connection.

use super::PgTls;
use rustls::pki_types::ServerName;

impl PgTls {
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
}
