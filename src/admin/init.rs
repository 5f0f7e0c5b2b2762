//! `outbox-relay init`: creates what is missing — the outbox table (Event-Forge
//! layout only), the retry table, the publication and the slot; and the inbox
//! table when `[inbox]` is configured (`--inbox-only`: just that).

use super::retry_table;
use crate::config::{ColumnMapping, Config, Mapping};
use crate::error::Error;
use crate::pg::catalog;
use crate::pg::ddl::{self, Applied};
use crate::pg::shards;
use crate::pg::slots::{self, SlotRecords};
use crate::pg::TableName;

/// The same columns, whatever the templates add.
fn same_columns(a: &ColumnMapping, b: &ColumnMapping) -> bool {
    let bare = |m: &ColumnMapping| ColumnMapping {
        extra: Vec::new(),
        named_optional: Vec::new(),
        ..m.clone()
    };
    bare(a) == bare(b)
}

/// Creates what is missing; returns one line per object saying what was done.
/// Under the set-up lock, as a relay's start: `init` run while a relay starts
/// on the same fresh database does not race it.
pub async fn init(config: &Config) -> Result<Vec<String>, Error> {
    let sql = config.postgres.target.connect().await?;
    crate::pg::setup_lock::locked(&sql, create_missing(config, &sql)).await
}

async fn create_missing(
    config: &Config,
    sql: &tokio_postgres::Client,
) -> Result<Vec<String>, Error> {
    let pg = &config.postgres;
    let table = &pg.table;
    let mut lines = Vec::new();
    let messages = pg.source == crate::config::Source::Messages;
    match pg.mapping {
        // The messages source has no table.
        _ if messages => lines.push(format!(
            "table: none (postgres.source = \"messages\", prefix {:?})",
            pg.message_prefix
        )),
        // Created when missing; on an existing table (Event-Forge's models make it
        // under their own index names) only the indexes nothing covers yet.
        // Columns renamed in [mapping]: Event-Forge's DDL would make another table.
        Mapping::EventForge if !same_columns(&pg.columns, &ColumnMapping::event_forge()) => {
            if !catalog::table_exists(sql, table).await? {
                return Err(Error::TableRenamed {
                    table: table.to_string(),
                });
            }
            catalog::require_table(sql, table, &pg.columns).await?;
            lines.push(format!(
                "table {table}: exists (its columns as [mapping] names them)"
            ));
        }
        Mapping::EventForge => {
            let applied = ddl::apply(sql, &catalog::outbox_ddl(table), table).await?;
            catalog::require_table(sql, table, &pg.columns).await?;
            lines.push(applied_line("table", table, &applied));
        }
        // The relay has no DDL of its own for other layouts: the owner creates them.
        Mapping::Debezium | Mapping::Custom => {
            catalog::require_table(sql, table, &pg.columns).await?;
            lines.push(format!("table {table}: exists"));
        }
    }
    for shard in config.each_shard() {
        let index = shard.postgres.sharding.index.unwrap_or(0);
        let publication = &shard.postgres.publication;
        if messages {
            let created = catalog::ensure_message_publication(sql, publication, true).await?;
            lines.push(format!(
                "publication {publication}: {}",
                if created {
                    "created (no tables: messages only)"
                } else {
                    "exists"
                }
            ));
            continue;
        }
        let created = shards::ensure_publication(
            sql,
            &shard.postgres.sharding,
            index,
            table,
            &pg.columns.aggregate_id,
            true,
        )
        .await?;
        lines.push(format!(
            "publication {publication}{}: {}",
            shard_suffix(&shard),
            match (created, pg.sharding.is_sharded()) {
                (true, true) => format!(
                    "created (inserts only; the rows whose {} hashes to shard {index})",
                    pg.columns.aggregate_id
                ),
                (true, false) => "created (inserts only)".to_string(),
                (false, _) => "exists".to_string(),
            }
        ));
    }
    let retry = retry_table(config);
    let created = retry.create_if_missing(sql).await?;
    lines.push(format!(
        "retry table {}: {}",
        retry.name(),
        if created { "created" } else { "exists" }
    ));
    let records = SlotRecords::next_to(&pg.retry_table);
    let created = records.create_if_missing(sql).await?;
    lines.push(format!(
        "slot records {}: {}",
        records.name(),
        if created { "created" } else { "exists" }
    ));
    catalog::require_logical(sql).await?;
    if config.inbox.is_some() {
        lines.extend(init_inbox(config).await?);
    }
    for shard in config.each_shard() {
        let name = &shard.postgres.slot;
        let existed = catalog::slot_state(sql, name).await?.is_some();
        let filter = shards::filter(&shard.postgres, None);
        let slot = slots::ensure_slot(
            sql,
            &records,
            name,
            &pg.target.dbname,
            table,
            filter.as_deref(),
            true,
        )
        .await?;
        lines.push(format!(
            "slot {name}{}: {} at {}",
            shard_suffix(&shard),
            if existed { "exists" } else { "created" },
            slot.confirmed_flush
                .map(|l| l.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    }
    Ok(lines)
}

/// " (shard 1 of 3)" for a shard's configuration, else nothing.
fn shard_suffix(shard: &Config) -> String {
    match shard.postgres.sharding.label() {
        label if label.is_empty() => String::new(),
        label => format!(" ({label})"),
    }
}

/// Creates the inbox table of `[inbox]` when missing (sql/inbox_messages.sql),
/// and the indexes it lacks.
pub async fn init_inbox(config: &Config) -> Result<Vec<String>, Error> {
    let inbox = config.inbox.as_ref().ok_or(Error::InboxNotConfigured)?;
    let sql = config.postgres.target.connect().await?;
    let applied = crate::inbox::queries::create_if_missing(&sql, &inbox.table).await?;
    Ok(vec![applied_line("inbox table", &inbox.table, &applied)])
}

/// One line on a table and its indexes: created or there, and which of ours an
/// existing index covers.
fn applied_line(what: &str, table: &TableName, applied: &Applied) -> String {
    let mut line = format!(
        "{what} {table}: {}",
        if applied.table_created {
            "created"
        } else {
            "exists"
        }
    );
    if !applied.table_created && !applied.created.is_empty() {
        line.push_str(&format!("; added index(es) {}", applied.created.join(", ")));
    }
    if !applied.covered.is_empty() {
        let covered: Vec<String> = applied
            .covered
            .iter()
            .map(|(ours, theirs)| format!("{ours} (covered by {theirs})"))
            .collect();
        line.push_str(&format!("; not added: {}", covered.join(", ")));
    }
    line
}
