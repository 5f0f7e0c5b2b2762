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
