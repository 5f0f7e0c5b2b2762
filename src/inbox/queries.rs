//! Every statement the receiver runs on the inbox table, and its DDL.

use super::mapping::Record;
use crate::error::Error;
use crate::pg::names::TableName;
use crate::pg::query_err;
use tokio_postgres::GenericClient;

/// `sql/inbox_messages.sql`: the Event-Forge inbox table.
pub const INBOX_DDL: &str = include_str!("../../sql/inbox_messages.sql");

/// The DDL for `table`. The default table keeps Event-Forge's index and
/// constraint names; another table gets names of its own (index names are
/// per schema).
pub fn inbox_ddl(table: &TableName) -> String {
    let ddl = INBOX_DDL.replace("public.inbox_messages", &table.quoted());
    if table.name == "inbox_messages" {
        return ddl;
    }
    ddl.replace("idx_inbox_", &format!("idx_{}_", table.name))
        .replace(
            "uq_inbox_message_source",
            &format!("uq_{}_message_source", table.name),
        )
}

/// Creates the table when missing, and each index no index of the table covers
/// yet (a table Event-Forge's models made has its own under other names).
pub async fn create_if_missing<C: GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<crate::pg::ddl::Applied, Error> {
    crate::pg::ddl::apply(client, &inbox_ddl(table), table).await
}

pub async fn exists<C: GenericClient>(client: &C, table: &TableName) -> Result<bool, Error> {
    let row = client
        .query_one("select to_regclass($1) is not null", &[&table.quoted()])
        .await
        .map_err(query_err("looking up the inbox table"))?;
    Ok(row.get(0))
}

/// Rows by status, for `status`.
pub async fn backlog<C: GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<Vec<(String, i64)>, Error> {
    let rows = client
        .query(
            &format!(
                "select status::text, count(*) from {} group by status order by status",
                table.quoted()
            ),
            &[],
        )
        .await
        .map_err(query_err("counting the inbox rows by status"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The columns the receiver's insert writes (every other column needs a default
/// or must take NULL).
pub const WRITTEN: [&str; 12] = [
    "id",
    "message_id",
    "source",
    "event_type",
    "payload",
    "metadata",
    "status",
    "retry_count",
    "max_retries",
    "created_at",
    "updated_at",
    "recovery_attempts",
];

/// The insert of one batch: new rows come back with their ids; a delivery whose
/// (message_id, source) is already there is skipped (a duplicate). Every NOT NULL
/// column of Event-Forge's table is written with Event-Forge's own value (its
/// models keep the defaults in Python: a table they created has no server
/// defaults), so the insert works on such a table as on one from `init`. Row ids
/// are UUIDv7 made here (milliseconds first): each insert into the primary key
/// lands at its right-hand edge instead of a random page, which costs Postgres
/// 22-31 % less than `gen_random_uuid()` (`benches/sql/inbox_id_order.sql`).
pub fn insert_sql(table: &TableName) -> String {
    format!(
        "insert into {} (id, message_id, source, event_type, payload, metadata, status, \
         retry_count, max_retries, created_at, updated_at, recovery_attempts) \
         select u.i, u.m, $1, u.e, u.p::json, u.md::json, 'received', 0, $2, \
         clock_timestamp(), clock_timestamp(), 0 \
         from unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) with ordinality as u(m, e, p, md, i, n) \
         order by u.n \
         on conflict (message_id, source) do nothing \
         returning id, message_id",
        table.quoted()
    )
}

/// Inserts `records` (one statement); returns (row id, message_id) of the new rows.
pub async fn insert<C: GenericClient>(
    client: &C,
    statement: &tokio_postgres::Statement,
    source: &str,
    max_retries: i32,
    records: &[&Record],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let ids: Vec<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    let types: Vec<&str> = records.iter().map(|r| r.event_type.as_str()).collect();
    let payloads: Vec<&str> = records.iter().map(|r| r.payload.as_str()).collect();
    let metadata: Vec<Option<&str>> = records.iter().map(|r| r.metadata.as_deref()).collect();
    let row_ids: Vec<String> = records
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let rows = client
        .query(
            statement,
            &[
                &source,
                &max_retries,
                &ids,
                &types,
                &payloads,
                &metadata,
                &row_ids,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `pg_notify` payloads (at most 8000 bytes each) carrying `ids`, comma-separated.
pub fn notify_payloads(ids: &[String]) -> Vec<String> {
    const MAX: usize = 7900;
    let mut out = Vec::new();
    let mut cur = String::new();
    for id in ids {
        if !cur.is_empty() && cur.len() + 1 + id.len() > MAX {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(id);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_for_another_table_renames_its_indexes() {
        let ddl = inbox_ddl(&TableName::parse("app.inb_x").unwrap());
        assert!(ddl.contains("\"app\".\"inb_x\""));
        assert!(!ddl.contains("inbox_messages"));
        assert!(ddl.contains("uq_inb_x_message_source"));
        let ddl = inbox_ddl(&TableName::parse("public.inbox_messages").unwrap());
        assert!(ddl.contains("uq_inbox_message_source"));
        assert!(ddl.contains("idx_inbox_recovery_sweep"));
    }

    #[test]
    fn notify_payloads_stay_under_the_limit() {
        let ids: Vec<String> = (0..1000).map(|i| format!("{i:036}")).collect();
        let p = notify_payloads(&ids);
        assert!(p.len() > 1);
        assert!(p.iter().all(|s| s.len() <= 7900));
        let back: Vec<String> = p
            .iter()
            .flat_map(|s| s.split(','))
            .map(String::from)
            .collect();
        assert_eq!(back, ids);
        assert!(notify_payloads(&[]).is_empty());
    }
}
