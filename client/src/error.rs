//! The client's errors, and what a failed statement means (shared with the
//! relay, whose SQL sessions decide the same way).

/// What went wrong; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Postgres error while {context}: {}", server_message(.source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to Postgres: {0} (check the URL and that the server is running)")]
    Connect(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// How the statement's failure should be handled (`None`: not a statement's).
    pub fn sql_trouble(&self) -> Option<SqlTrouble> {
        match self {
            Error::Postgres { source, .. } => Some(SqlTrouble::of(source)),
            _ => None,
        }
    }
}

/// Maps a statement's error to `Error::Postgres` with what was being done.
pub(crate) fn query_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { context, source }
}

/// The server's message (with its SQLSTATE and hint) rather than the driver's
/// generic text.
pub fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(h);
            }
            s
        }
        None => e.to_string(),
    }
}

/// What kind of trouble an SQL statement ran into, which decides what to do
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlTrouble {
    /// The connection is gone, or the server is shutting down or overloaded:
    /// retry the same statement after a backoff (on a new connection).
    Connection,
    /// `lock_timeout`, `statement_timeout`, a serialization failure or a
    /// deadlock: retry after a backoff (another session holds a lock).
    Timeout,
    /// A column, table or type the statement names is gone or changed (someone
    /// altered the table): learn the table's shape again, then retry.
    SchemaDrift,
    /// This row's values are refused (a constraint, a trigger, a conversion):
    /// retrying the same row fails the same way.
    Row,
    /// Anything else the server refused.
    Other,
}

impl SqlTrouble {
    /// The trouble in a statement's error.
    pub fn of(e: &tokio_postgres::Error) -> SqlTrouble {
        match e.as_db_error() {
            None => SqlTrouble::Connection,
            Some(db) => SqlTrouble::of_code(db.code().code()),
        }
    }

    /// The trouble a SQLSTATE means.
    pub fn of_code(code: &str) -> SqlTrouble {
        match code {
            "55P03" | "57014" | "40001" | "40P01" => SqlTrouble::Timeout,
            c if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                SqlTrouble::Connection
            }
            c if c.starts_with("42") => SqlTrouble::SchemaDrift,
            c if c.starts_with("22") || c.starts_with("23") || c.starts_with("P0") => {
                SqlTrouble::Row
            }
            _ => SqlTrouble::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_mean_what_they_say() {
        for (code, want) in [
            ("55P03", SqlTrouble::Timeout),
            ("57014", SqlTrouble::Timeout),
            ("40P01", SqlTrouble::Timeout),
            ("08006", SqlTrouble::Connection),
            ("57P01", SqlTrouble::Connection),
            ("53300", SqlTrouble::Connection),
            ("42703", SqlTrouble::SchemaDrift),
            ("42P01", SqlTrouble::SchemaDrift),
            ("23502", SqlTrouble::Row),
            ("23514", SqlTrouble::Row),
            ("22P02", SqlTrouble::Row),
            ("P0001", SqlTrouble::Row),
            ("XX000", SqlTrouble::Other),
        ] {
            assert_eq!(SqlTrouble::of_code(code), want, "{code}");
        }
    }
}
