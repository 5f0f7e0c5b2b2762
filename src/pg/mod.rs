//! Postgres, everything but the replication stream: names and targets (leaves
//! that `config` builds on), SQL connections, and the catalog queries the relay
//! and the operator commands ask.

pub mod catalog;
pub mod connect;
pub mod ddl;
pub mod setup_lock;
pub mod shards;
pub mod slots;
pub mod target;
pub mod tls;
pub mod trouble;

pub use names::{quote_ident, TableName};
/// Table names and identifier quoting, shared with the client crate.
pub use outbox_relay_client::table as names;
pub use target::PgTarget;

use crate::error::Error;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

/// Column `idx` of `row`, read while `context`: a value of an unexpected type or a
/// NULL where none is allowed is an error naming the column, never a panic (a
/// hand-made or altered table must not crash the relay).
pub fn get<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    context: &'static str,
) -> Result<T, Error> {
    row.try_get(idx).map_err(|source| Error::Column {
        context,
        column: row
            .columns()
            .get(idx)
            .map(|c| c.name().to_string())
            .unwrap_or_else(|| format!("#{idx}")),
        source,
    })
}

/// Maps a query error to `Error::Postgres` with what the relay was doing.
pub fn query_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres {
        context: context.to_string(),
        source,
    }
}
