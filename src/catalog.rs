//! Everything the relay asks Postgres over plain SQL: connection targets,
//! server settings, the outbox table's shape, the publication and the slot.

use crate::error::Error;
use crate::event::ColumnMapping;
use pgwire_replication::Lsn;
use std::fmt;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

/// DDL of the Event-Forge outbox table, shared by `init`, the README and the tests.
pub const OUTBOX_DDL: &str = include_str!("../sql/outbox_messages.sql");

/// Where and as whom to connect, parsed from `[postgres] url`.
#[derive(Clone)]
pub struct PgTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: String,
    pub dbname: String,
    url: String,
}

impl PgTarget {
    /// Parses a `postgresql://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<Self, String> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            format!("cannot be parsed ({e}); use postgresql://user:password@host:5432/dbname")
        })?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .ok_or("names no user; use postgresql://user@host:5432/dbname")?
            .to_string();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = cfg.get_dbname().unwrap_or(&user).to_string();
        if matches!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
            return Err("sslmode=require is not supported yet: connect over a trusted network or a local socket".into());
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            dbname,
            url: url.to_string(),
        })
    }

    /// The connection string with its password removed, for logs and errors.
    pub fn redacted(&self) -> String {
        format!(
            "postgresql://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// The full connection string, password included: only for connecting.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Opens an SQL session; its connection runs on a task of its own.
    pub async fn connect(&self) -> Result<Client, Error> {
        self.connect_as("outbox-relay").await
    }

    /// Like `connect`, with this `application_name` (shown in pg_stat_activity).
    pub async fn connect_as(&self, application_name: &str) -> Result<Client, Error> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|source| Error::PostgresConnect {
                url: self.redacted(),
                source,
            })?;
        config.application_name(application_name);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::PostgresConnect {
                    url: self.redacted(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres sql connection ended");
            }
        });
        Ok(client)
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A URL or connection string for logs: the password is never shown.
pub fn redact_pg_url(url: &str) -> String {
    match PgTarget::parse(url) {
        Ok(t) => t.redacted(),
        Err(_) => "<unparsable postgres url>".to_string(),
    }
}

/// `schema.table`, each part as Postgres stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (schema, name) = match s.split_once('.') {
            Some((a, b)) => (a, b),
            None => ("public", s),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        };
        if !ok(schema) || !ok(name) {
            return Err(format!(
                "{s:?} is not a table name; use schema.table with letters, digits and underscores"
            ));
        }
        Ok(Self {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// Quoted for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn query_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |source| Error::Postgres {
        context: context.to_string(),
        source,
    }
}

pub async fn wal_level(client: &Client) -> Result<String, Error> {
    let row = client
        .query_one("show wal_level", &[])
        .await
        .map_err(query_err("reading wal_level"))?;
    Ok(row.get(0))
}

pub async fn require_logical(client: &Client) -> Result<(), Error> {
    let level = wal_level(client).await?;
    if level != "logical" {
        return Err(Error::WalLevel { actual: level });
    }
    Ok(())
}

/// Column names of the table, or `None` when it does not exist.
pub async fn table_columns(
    client: &Client,
    table: &TableName,
) -> Result<Option<Vec<String>>, Error> {
    let exists = client
        .query_opt(
            "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("looking up the outbox table"))?;
    if exists.is_none() {
        return Ok(None);
    }
    let columns = table_column_types(client, table).await?;
    Ok(Some(columns.into_iter().map(|(name, _, _)| name).collect()))
}

/// The table exists and has every column the mapping requires.
pub async fn require_table(
    client: &Client,
    table: &TableName,
    mapping: &ColumnMapping,
) -> Result<(), Error> {
    let Some(columns) = table_columns(client, table).await? else {
        return Err(Error::TableMissing {
            table: table.to_string(),
        });
    };
    let missing = mapping.missing_required(&columns);
    if !missing.is_empty() {
        return Err(Error::ColumnsMissing {
            table: table.to_string(),
            missing,
        });
    }
    Ok(())
}

pub async fn can_replicate(client: &Client) -> Result<bool, Error> {
    let row = client
        .query_one(
            "select rolreplication or rolsuper from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map_err(query_err("reading the role's attributes"))?;
    Ok(row.get(0))
}

/// What Postgres says about the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationState {
    Missing,
    /// Exists; whether it covers the table and publishes inserts.
    Present {
        covers_table: bool,
        publishes_insert: bool,
    },
}

pub async fn publication_state(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<PublicationState, Error> {
    let row = client
        .query_opt(
            "select pubinsert, puballtables from pg_publication where pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err("looking up the publication"))?;
    let Some(row) = row else {
        return Ok(PublicationState::Missing);
    };
    let publishes_insert: bool = row.get(0);
    let covers = client
        .query_opt(
            "select 1 from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .map_err(query_err("reading the publication's tables"))?
        .is_some();
    Ok(PublicationState::Present {
        covers_table: covers,
        publishes_insert,
    })
}

pub async fn create_publication(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<(), Error> {
    let sql = format!(
        "create publication {} for table {} with (publish = 'insert')",
        quote_ident(publication),
        table.quoted()
    );
    client.batch_execute(&sql).await.map_err(query_err(
        "creating the publication (needs ownership of the table)",
    ))
}

/// The publication exists (created when `create` is set), covers the table and publishes inserts.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    table: &TableName,
    create: bool,
) -> Result<bool, Error> {
    match publication_state(client, publication, table).await? {
        PublicationState::Missing if create => {
            create_publication(client, publication, table).await?;
            Ok(true)
        }
        PublicationState::Missing => Err(Error::PublicationMissing {
            publication: publication.to_string(),
            table: table.to_string(),
        }),
        PublicationState::Present {
            covers_table: false,
            ..
        } => Err(Error::PublicationMismatch {
            publication: publication.to_string(),
            table: table.to_string(),
        }),
        PublicationState::Present {
            publishes_insert: false,
            ..
        } => Err(Error::PublicationNoInsert {
            publication: publication.to_string(),
        }),
        PublicationState::Present { .. } => Ok(false),
    }
}

/// What Postgres says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    /// Bytes of WAL between the slot's confirmed position and the server's current position.
    pub lag_bytes: Option<i64>,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, Error> {
    let row = client
        .query_opt(
            "select plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("looking up the replication slot"))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r
            .get::<_, Option<String>>(3)
            .and_then(|s| Lsn::parse(&s).ok()),
        lag_bytes: r.get(4),
    }))
}

/// Checks the slot fits this relay; creates it when missing and `create` is set.
/// Returns the slot's state after that.
pub async fn ensure_slot(
    client: &Client,
    slot: &str,
    dbname: &str,
    create: bool,
) -> Result<SlotState, Error> {
    let state = match slot_state(client, slot).await? {
        Some(s) => s,
        None if create => {
            client
                .query_one(
                    "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .map_err(query_err("creating the replication slot (needs REPLICATION and a free slot: raise max_replication_slots)"))?;
            slot_state(client, slot)
                .await?
                .ok_or_else(|| Error::SlotMissing {
                    slot: slot.to_string(),
                })?
        }
        None => {
            return Err(Error::SlotMissing {
                slot: slot.to_string(),
            })
        }
    };
    match (&state.plugin, &state.database) {
        (Some(p), Some(d)) if p == "pgoutput" && d == dbname => Ok(state),
        (plugin, database) => Err(Error::SlotMismatch {
            slot: slot.to_string(),
            plugin: plugin.clone().unwrap_or_else(|| "physical".into()),
            database: database.clone().unwrap_or_default(),
            expected_database: dbname.to_string(),
        }),
    }
}

/// Creates the Event-Forge outbox table (and its indexes) when missing.
pub async fn create_outbox_table(client: &Client, table: &TableName) -> Result<(), Error> {
    client
        .batch_execute(&outbox_ddl(table))
        .await
        .map_err(query_err("creating the outbox table"))
}

/// The DDL of `sql/outbox_messages.sql` for another table name.
pub fn outbox_ddl(table: &TableName) -> String {
    OUTBOX_DDL
        .replace("public.outbox_messages", &table.quoted())
        .replace("idx_outbox_messages_", &format!("idx_{}_", table.name))
}

/// DDL of the relay-owned retry table.
pub const PARKED_DDL: &str = include_str!("../sql/outbox_relay_parked.sql");

/// The DDL of `sql/outbox_relay_parked.sql` for another table name.
pub fn parked_ddl(table: &TableName) -> String {
    PARKED_DDL
        .replace("public.outbox_relay_parked", &table.quoted())
        .replace(
            "outbox_relay_parked_aggregate",
            &format!("{}_aggregate", table.name),
        )
}

/// Creates the relay-owned retry table when missing (a role without CREATE on the
/// schema can use one an owner created: nothing is created when it exists).
pub async fn create_parked_table(client: &Client, table: &TableName) -> Result<(), Error> {
    if table_columns(client, table).await?.is_some() {
        return Ok(());
    }
    client
        .batch_execute(&parked_ddl(table))
        .await
        .map_err(query_err(
            "creating the retry table (needs CREATE on its schema)",
        ))
}

/// Columns of the table with their type oids and SQL type names, in attnum order.
pub async fn table_column_types<C: tokio_postgres::GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<Vec<(String, u32, String)>, Error> {
    let rows = client
        .query(
            "select a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod) from pg_attribute a \
             join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped \
             order by a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("reading the outbox table's column types"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Event-Forge retry columns: when the table has them all, the relay shows retry
/// state in the row's own columns too.
pub const RETRY_COLUMNS: [&str; 5] = [
    "status",
    "retry_count",
    "error_message",
    "scheduled_at",
    "updated_at",
];

/// Parses Postgres's "replication slot \"x\" is active for PID 123".
pub fn pid_from_slot_error(message: &str) -> Option<i32> {
    let idx = message.find("active for PID ")?;
    message[idx + "active for PID ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_redacts_password() {
        let t = PgTarget::parse("postgresql://relay:s3cret@db.example:6543/app").unwrap();
        assert_eq!(t.redacted(), "postgresql://relay@db.example:6543/app");
        assert_eq!(t.password(), "s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        let t = PgTarget::parse("host=h user=u password=p dbname=d").unwrap();
        assert_eq!(t.redacted(), "postgresql://u@h:5432/d");
    }

    #[test]
    fn table_names() {
        let t = TableName::parse("outbox").unwrap();
        assert_eq!(t.to_string(), "public.outbox");
        assert_eq!(
            TableName::parse("app.outbox").unwrap().quoted(),
            "\"app\".\"outbox\""
        );
        assert!(TableName::parse("a;drop").is_err());
        assert!(TableName::parse("").is_err());
    }

    #[test]
    fn ddl_is_renamed() {
        let ddl = outbox_ddl(&TableName::parse("app.events_out").unwrap());
        assert!(ddl.contains("\"app\".\"events_out\""));
        assert!(!ddl.contains("outbox_messages"));
    }

    #[test]
    fn slot_pid() {
        assert_eq!(
            pid_from_slot_error("replication slot \"s\" is active for PID 4242"),
            Some(4242)
        );
        assert_eq!(pid_from_slot_error("other"), None);
    }
}
