//! Keeping secrets out of output (a leaf module): URLs without passwords.

/// An AMQP URL with its password removed, for logs and errors.
pub fn amqp_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let taken = u.password().map(str::to_string);
            if taken.is_some() {
                let _ = u.set_password(None);
            }
            // A URL typed wrong (`amqps://amqp://user:password@host`) keeps its
            // password where the parser did not look for one: in the path.
            let untaken = url_passwords(url)
                .into_iter()
                .filter(|p| !taken.as_deref().is_some_and(|t| t.contains(p)))
                .collect();
            scrub_secrets(u.as_ref(), untaken)
        }
        Err(_) => "<unparsable amqp url>".to_string(),
    }
}

/// `message` with every password `url` may hold replaced by `<password>`: the
/// part after `user:` in `scheme://user:password@`, and the value of every
/// `password=` (up to `&`, a space or the end, quoted or not). For a refusal of
/// a URL that cannot be parsed, whose text may echo any part of it.
pub fn scrub(message: &str, url: &str) -> String {
    scrub_secrets(message, url_passwords(url))
}

/// The passwords `url` may hold (see [`scrub`]).
pub fn url_passwords(url: &str) -> Vec<&str> {
    let mut secrets: Vec<&str> = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        if let Some(at) = rest.rfind('@') {
            // `user:pass:word@` is `pass:word` to a parser; `x://user:password@`
            // after a doubled scheme is `//user:password` to one and `password`
            // to the other: both go.
            let userinfo = &rest[..at];
            if let Some((_, pw)) = userinfo.split_once(':') {
                secrets.push(pw);
            }
            if let Some((_, pw)) = userinfo.rsplit_once(':') {
                secrets.push(pw);
            }
        }
    }
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        let after = rest[i + "password".len()..].trim_start();
        rest = &rest[i + "password".len()..];
        let Some(value) = after.strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let value = match value.strip_prefix('\'') {
            Some(quoted) => quoted.split('\'').next().unwrap_or(quoted),
            None => value
                .split(|c: char| c == '&' || c.is_whitespace())
                .next()
                .unwrap_or(value),
        };
        secrets.push(value);
    }
    secrets
}

/// `message` with each of `secrets` replaced by `<password>`.
pub fn scrub_secrets(message: &str, mut secrets: Vec<&str>) -> String {
    let mut out = message.to_string();
    // Longest first: a password that holds another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, "<password>");
    }
    out
}

/// `text` with the password of every URL in it (`scheme://user:password@`)
/// replaced by `<password>`.
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, a double quote or a space (a user
        // name may hold single quotes); its user part at the last `@` in it.
        let end = tail
            .find(|c: char| c == '/' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@').and_then(|at| {
            let user = &authority[..at];
            user.find(':').map(|colon| (colon, at))
        }) {
            Some((colon, at)) => {
                out.push_str(&authority[..=colon]);
                out.push_str("<password>");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
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
        // The user's name is not garbled when it equals the password.
        assert_eq!(
            super::amqp_url("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest@h:5672/%2f"
        );
        let doubled = super::amqp_url("amqps://amqp://guest:hunter2@10.0.0.2:5672/%2f");
        assert!(!doubled.contains("hunter2"), "{doubled}");
    }

    #[test]
    fn scrub_removes_every_password_a_url_may_hold() {
        let url = "postgresql://u:pw1@h/db?sslmode=bogus?password=pw2&x=1 password = 'pw 3'";
        let message = format!("sslmode=bogus?password=pw2&x is unknown; u:pw1@h; pw 3 {url}");
        let shown = super::scrub(&message, url);
        for pw in ["pw1", "pw2", "pw 3"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert!(
            shown.contains("sslmode=bogus?password=<password>&x is unknown"),
            "{shown}"
        );
        assert_eq!(super::scrub("no secret here", "host=a"), "no secret here");
    }

    #[test]
    fn scrub_urls_removes_the_password_of_every_url() {
        let text =
            "slot \"amqp://g:pw1@h/%2f\" and postgresql://u:p:w2@a,b:5/db, amqp://g@h, x://:pw3@h";
        let shown = super::scrub_urls(text);
        for pw in ["pw1", "p:w2", "pw3"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert!(shown.contains("amqp://g:<password>@h/%2f"), "{shown}");
        assert!(shown.contains("amqp://g@h,"), "{shown}");
        assert_eq!(super::scrub_urls("no url: a://b"), "no url: a://b");
    }
}
