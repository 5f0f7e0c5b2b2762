//! What a failed TLS negotiation means, in one line naming the key to fix.

use super::PgTls;

impl PgTls {
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
