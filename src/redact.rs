//! Keeping secrets out of output (a leaf module): URLs without passwords.

/// An AMQP URL with its password removed, for logs and errors.
pub fn amqp_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => "<unparsable amqp url>".to_string(),
    }
}

/// A secret read from a file; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }

    /// The secret itself: only to use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// `host:port` of an AMQP URL (the scheme's default port when it names none).
pub fn amqp_node(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u
                .port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            format!("{}:{port}", u.host_str().unwrap_or_default())
        }
        Err(_) => "<unparsable amqp url>".to_string(),
    }
}

/// The host of an AMQP URL, for messages.
pub fn amqp_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// An error and every cause under it, `: `-joined (a TLS failure's reason is
/// often three sources down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Text on one line (error texts may carry newlines).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn amqp_password_is_removed() {
        let r = super::amqp_url("amqp://u:hunter2@h:5672/%2f");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("u@h:5672"), "{r}");
        assert_eq!(super::amqp_url("not a url"), "<unparsable amqp url>");
    }
}
