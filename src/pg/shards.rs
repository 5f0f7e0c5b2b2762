//! The outbox split into shards inside Postgres: shard `i` of `n` is a
//! publication whose row filter keeps the rows whose aggregate id hashes to `i`
//! (`hashtextextended`, the hash Postgres' own hash partitioning uses), read by a
//! slot of its own. Every row is in exactly one shard — a NULL aggregate id
//! hashes as the empty string — and an aggregate always in the same one, so its
//! order holds. Each shard publication carries a comment, `outbox-relay shard i
//! of n`: the record of how the outbox is split, so that a change of `n` (which
//! would move aggregates between shards mid-stream) is refused.

use super::catalog::{self, PublicationState};
use super::{get, query_err, quote_ident, TableName};
use crate::config::{PostgresConfig, Sharding};
use crate::error::Error;
use tokio_postgres::Client;

/// The shard a command on one slot works on: the one named, or 0 when not
/// sharded; a sharded configuration that names none is refused (`what`:
/// "relay", "replay", ...).
pub fn chosen(sharding: &Sharding, what: &'static str) -> Result<u32, Error> {
    match (sharding.is_sharded(), sharding.index) {
        (false, _) => Ok(0),
        (true, Some(i)) => Ok(i),
        (true, None) => Err(Error::ShardNotChosen {
            count: sharding.count,
            last: sharding.count - 1,
            what,
        }),
    }
}

/// The rows `pg`'s slot carries, as an SQL condition on the outbox table: its
/// shard's row filter (with `qualifier`, e.g. `o`, before the column), or `None`
/// for the whole table (not sharded, or no shard named).
pub fn filter(pg: &PostgresConfig, qualifier: Option<&str>) -> Option<String> {
    let s = &pg.sharding;
    let index = s.index.filter(|_| s.is_sharded())?;
    let column = match qualifier {
        Some(q) => format!("{q}.{}", quote_ident(&pg.columns.aggregate_id)),
        None => quote_ident(&pg.columns.aggregate_id),
    };
    Some(filter_on(&column, s.count, index))
}

/// Shard `index` of `count`'s condition on `column`, an SQL expression.
fn filter_on(column: &str, count: u32, index: u32) -> String {
    format!(
        "((hashtextextended(coalesce(({column})::text, ''), 0) & 9223372036854775807) % {count}) = {index}"
    )
}

/// Shard `index` of `count`'s row filter on `column` (the aggregate id).
pub fn row_filter(column: &str, count: u32, index: u32) -> String {
    filter_on(&quote_ident(column), count, index)
}

/// The comment that records a shard publication.
pub fn comment(count: u32, index: u32) -> String {
    format!("outbox-relay shard {index} of {count}")
}

/// `(index, count)` from a shard publication's comment.
fn parse_comment(comment: &str) -> Option<(u32, u32)> {
    let rest = comment.strip_prefix("outbox-relay shard ")?;
    let (index, count) = rest.split_once(" of ")?;
    Some((index.parse().ok()?, count.parse().ok()?))
}

/// The publications of this outbox as Postgres has them: the base name
/// (unsharded) and `{base}_{i}`, each with its shard record, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub publications: Vec<(String, Option<(u32, u32)>)>,
}

impl Layout {
    /// What the relay finds in Postgres, for messages: "not sharded (publication
    /// p)", "3 shards (p_0, p_1, p_2)".
    fn describe(&self) -> String {
        let mut counts: Vec<u32> = self
            .publications
            .iter()
            .filter_map(|(_, s)| s.map(|(_, n)| n))
            .collect();
        counts.sort_unstable();
        counts.dedup();
        let names: Vec<&str> = self.publications.iter().map(|(p, _)| p.as_str()).collect();
        match counts.as_slice() {
            [] => format!("not sharded (publication {})", names.join(", ")),
            [n] => format!("{n} shard(s) ({})", names.join(", ")),
            _ => format!("a mix of shard counts {counts:?} ({})", names.join(", ")),
        }
    }

    /// Whether it agrees with `sharding` (nothing yet agrees with anything).
    fn agrees(&self, sharding: &Sharding) -> bool {
        self.publications.iter().all(|(name, record)| match record {
            Some((i, n)) => {
                sharding.is_sharded() && *n == sharding.count && *name == sharding.publication(*i)
            }
            None => !sharding.is_sharded() && *name == sharding.base_publication,
        })
    }
}

/// Reads the layout of the publications named after `sharding`'s base.
pub async fn layout(client: &Client, sharding: &Sharding) -> Result<Layout, Error> {
    const CONTEXT: &str = "reading the outbox's publications";
    let base = &sharding.base_publication;
    let rows = client
        .query(
            "select p.pubname::text, obj_description(p.oid, 'pg_publication') from pg_publication p \
             where p.pubname = $1 or (left(p.pubname, length($1) + 1) = $1 || '_' \
             and substr(p.pubname, length($1) + 2) ~ '^[0-9]+$') order by 1",
            &[base],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    let mut publications = Vec::new();
    for row in rows {
        let name: String = get(&row, 0, CONTEXT)?;
        let comment: Option<String> = get(&row, 1, CONTEXT)?;
        let record = comment.as_deref().and_then(parse_comment);
        // `{base}_{i}` without a record is someone else's: only the base name
        // may be an unsharded outbox's.
        if record.is_some() || name == *base {
            publications.push((name, record));
        }
    }
    Ok(Layout { publications })
}

/// Refuses a layout that does not agree with the configuration, saying how to
/// re-shard without losing or reordering anything.
pub fn check_layout(
    layout: &Layout,
    sharding: &Sharding,
    table: &TableName,
    slot_base: &str,
) -> Result<(), Error> {
    if layout.agrees(sharding) {
        return Ok(());
    }
    let wanted = match sharding.is_sharded() {
        true => format!("postgres.shards = {}", sharding.count),
        false => "postgres.shards = 1 (not sharded)".to_string(),
    };
    let drops: Vec<String> = layout
        .publications
        .iter()
        .map(|(name, record)| {
            let slot = match record {
                Some((i, _)) => format!("{slot_base}_{i}"),
                None => slot_base.to_string(),
            };
            format!(
                "DROP PUBLICATION {}; SELECT pg_drop_replication_slot('{slot}');",
                quote_ident(name)
            )
        })
        .collect();
    Err(Error::ShardLayout {
        detail: format!(
            "{wanted}, but the outbox {table} is {}: changing how it is split would move aggregates between shards mid-stream, so it is refused. To re-shard: (1) stop the writers of {table}; (2) wait until `outbox-relay status` shows every shard with no lag and nothing in retry state; (3) stop the relays; (4) drop the old publications and slots: {}; (5) `outbox-relay init --shards N`; (6) start one relay per shard (`run --shard I`) and the writers again",
            layout.describe(),
            drops.join(" ")
        ),
    })
}

/// Creates shard `index`'s publication: inserts only, via a partitioned
/// table's root, with its row filter and its record, in one transaction.
async fn create(
    client: &Client,
    sharding: &Sharding,
    index: u32,
    table: &TableName,
    column: &str,
) -> Result<(), Error> {
    let publication = sharding.publication(index);
    let sql = format!(
        "begin; create publication {p} for table {t} where ({f}) with (publish = 'insert', publish_via_partition_root = true); \
         comment on publication {p} is '{c}'; commit",
        p = quote_ident(&publication),
        t = table.quoted(),
        f = row_filter(column, sharding.count, index),
        c = comment(sharding.count, index),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("rollback").await;
        return Err(query_err(
            "creating the shard's publication (needs ownership of the table)",
        )(e));
    }
    Ok(())
}

/// The publication of shard `index` exists (created when `create` is set),
/// agrees with the configuration's split, and covers the table as any
/// publication must. True: it was created.
pub async fn ensure_publication(
    client: &Client,
    sharding: &Sharding,
    index: u32,
    table: &TableName,
    column: &str,
    create_missing: bool,
) -> Result<bool, Error> {
    if !sharding.is_sharded() {
        let found = layout(client, sharding).await?;
        check_layout(&found, sharding, table, &sharding.base_slot)?;
        return catalog::ensure_publication(
            client,
            &sharding.base_publication,
            table,
            create_missing,
        )
        .await;
    }
    let found = layout(client, sharding).await?;
    check_layout(&found, sharding, table, &sharding.base_slot)?;
    let publication = sharding.publication(index);
    let state = catalog::publication_state(client, &publication, table).await?;
    if state == PublicationState::Missing && create_missing {
        create(client, sharding, index, table, column).await?;
        return Ok(true);
    }
    let partitioned = catalog::is_partitioned(client, table).await?;
    match catalog::publication_problem(&state, &publication, table, partitioned) {
        Some(e) => Err(e),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharding(count: u32) -> Sharding {
        let mut s = Sharding::single("s", "p");
        s.count = count;
        s
    }

    #[test]
    fn the_record_reads_back() {
        assert_eq!(parse_comment(&comment(3, 1)), Some((1, 3)));
        assert_eq!(parse_comment("made by hand"), None);
        assert_eq!(parse_comment("outbox-relay shard x of 3"), None);
    }

    #[test]
    fn a_layout_agrees_only_with_its_own_split() {
        let three = Layout {
            publications: (0..3).map(|i| (format!("p_{i}"), Some((i, 3)))).collect(),
        };
        assert!(three.agrees(&sharding(3)));
        assert!(!three.agrees(&sharding(4)));
        assert!(!three.agrees(&sharding(1)));
        // Fewer publications than shards is fine (the missing ones are created).
        let some = Layout {
            publications: vec![("p_0".into(), Some((0, 3)))],
        };
        assert!(some.agrees(&sharding(3)));
        let plain = Layout {
            publications: vec![("p".into(), None)],
        };
        assert!(plain.agrees(&sharding(1)));
        assert!(!plain.agrees(&sharding(2)));
        let empty = Layout {
            publications: vec![],
        };
        assert!(empty.agrees(&sharding(5)) && empty.agrees(&sharding(1)));
    }

    #[test]
    fn a_changed_split_is_refused_with_the_way_to_reshard() {
        let three = Layout {
            publications: (0..3).map(|i| (format!("p_{i}"), Some((i, 3)))).collect(),
        };
        let table = TableName::parse("public.outbox_messages").unwrap();
        let e = check_layout(&three, &sharding(4), &table, "s")
            .unwrap_err()
            .to_string();
        for words in [
            "postgres.shards = 4",
            "3 shard(s) (p_0, p_1, p_2)",
            "stop the writers",
            "DROP PUBLICATION \"p_2\"; SELECT pg_drop_replication_slot('s_2');",
            "init --shards N",
        ] {
            assert!(e.contains(words), "{words}: {e}");
        }
    }

    #[test]
    fn the_filter_names_the_column_and_the_shard() {
        assert_eq!(
            row_filter("aggregate_id", 3, 2),
            "((hashtextextended(coalesce((\"aggregate_id\")::text, ''), 0) & 9223372036854775807) % 3) = 2"
        );
    }
}
