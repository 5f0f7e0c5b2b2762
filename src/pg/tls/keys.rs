//! The libpq keys of `[postgres] url`: `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` taken out of a URL or a `key=value` string, and the PEM files they
//! name read once.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The ssl keys taken out of a connection string.
#[derive(Default, Debug)]
pub(super) struct SslParams {
    pub(super) mode: Option<String>,
    pub(super) rootcert: Option<String>,
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
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
pub(super) fn split(url: &str) -> Result<(String, SslParams), String> {
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

pub(super) fn read_certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = crate::files::read_small(path).map_err(|e| format!("{key}={path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}={path}: not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err(format!("{key}={path}: holds no PEM certificate"));
    }
    Ok(certs)
}
