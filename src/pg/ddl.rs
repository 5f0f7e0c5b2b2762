//! Applying the DDL files of `sql/` to a table that may already exist, made by
//! another tool under other names: the table is created when missing, and each
//! index only when no index of the table already covers it (the same leading
//! columns, and for a partial index a predicate on the same values). So `init` on
//! a table Event-Forge's models created adds nothing that duplicates
//! Event-Forge's own indexes, and still adds what the relay needs and they lack.

use super::names::TableName;
use super::{get, query_err};
use crate::error::Error;
use tokio_postgres::GenericClient;

/// One `CREATE INDEX IF NOT EXISTS name ON table (columns) [WHERE predicate]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    pub name: String,
    pub columns: Vec<String>,
    pub predicate: Option<String>,
    /// The statement as written.
    pub sql: String,
}

/// An index the table has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingIndex {
    pub name: String,
    /// Key columns in order; `None` for an expression.
    pub columns: Vec<Option<String>>,
    pub predicate: Option<String>,
}

impl IndexSpec {
    /// Parses an index statement of our own DDL files; `None` for other statements.
    pub fn parse(statement: &str) -> Option<IndexSpec> {
        let s = statement.trim();
        let upper = s.to_ascii_uppercase();
        if !upper.starts_with("CREATE INDEX") {
            return None;
        }
        let name = s
            .split_whitespace()
            .skip_while(|w| !w.eq_ignore_ascii_case("EXISTS"))
            .nth(1)?
            .to_string();
        let open = s.find('(')?;
        let close = open + s[open..].find(')')?;
        let columns = s[open + 1..close]
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_string())
            .collect();
        let rest = s[close + 1..].trim();
        let predicate = rest
            .get(..5)
            .filter(|w| w.eq_ignore_ascii_case("WHERE"))
            .map(|_| rest[5..].trim().to_string());
        Some(IndexSpec {
            name,
            columns,
            predicate,
            sql: s.to_string(),
        })
    }

    /// The existing index that makes this one unnecessary, if any.
    pub fn covered_by<'a>(&self, existing: &'a [ExistingIndex]) -> Option<&'a ExistingIndex> {
        existing.iter().find(|e| {
            let leading = e.columns.len() >= self.columns.len()
                && self
                    .columns
                    .iter()
                    .zip(&e.columns)
                    .all(|(want, have)| have.as_deref() == Some(want.as_str()));
            leading
                && match (&self.predicate, &e.predicate) {
                    (None, None) => true,
                    (Some(want), Some(have)) => literals(want).iter().all(|l| have.contains(l)),
                    _ => false,
                }
        })
    }
}

/// The quoted literals of a predicate (`'received'`, ...): what a partial index
/// selects on, as Postgres keeps it in whatever normal form it prints.
fn literals(predicate: &str) -> Vec<String> {
    predicate
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(|l| format!("'{l}'"))
        .collect()
}

/// What applying a DDL file did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub table_created: bool,
    /// Indexes created.
    pub created: Vec<String>,
    /// (our index, the existing one that covers it).
    pub covered: Vec<(String, String)>,
}

/// The indexes of `table`.
pub async fn indexes<C: GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<Vec<ExistingIndex>, Error> {
    const CONTEXT: &str = "reading the table's indexes";
    let rows = client
        .query(
            "select ic.relname::text, \
             array(select a.attname::text from unnest(i.indkey::int2[]) with ordinality k(n, o) \
                   left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n \
                   where k.o <= i.indnkeyatts order by k.o), \
             pg_get_expr(i.indpred, i.indrelid) \
             from pg_index i join pg_class ic on ic.oid = i.indexrelid \
             where i.indrelid = $1::text::regclass order by ic.relname",
            &[&table.quoted()],
        )
        .await
        .map_err(query_err(CONTEXT))?;
    rows.iter()
        .map(|r| {
            Ok(ExistingIndex {
                name: get(r, 0, CONTEXT)?,
                columns: get(r, 1, CONTEXT)?,
                predicate: get(r, 2, CONTEXT)?,
            })
        })
        .collect()
}

/// Runs `ddl` (statements separated by `;` at line ends) for `table`: the table
/// statement as written (`IF NOT EXISTS`), each index only when none of the
/// table's indexes covers it.
pub async fn apply<C: GenericClient>(
    client: &C,
    ddl: &str,
    table: &TableName,
) -> Result<Applied, Error> {
    let existed = super::catalog::table_exists(client, table).await?;
    let mut applied = Applied {
        table_created: !existed,
        ..Applied::default()
    };
    for statement in statements(ddl) {
        match IndexSpec::parse(&statement) {
            // (The table statement only when the table is missing: no notice.)
            None if existed => {}
            None => client
                .batch_execute(&statement)
                .await
                .map_err(query_err("creating the table"))?,
            Some(spec) => {
                let existing = indexes(client, table).await?;
                match spec.covered_by(&existing) {
                    Some(e) => applied.covered.push((spec.name.clone(), e.name.clone())),
                    None => {
                        client
                            .batch_execute(&spec.sql)
                            .await
                            .map_err(query_err("creating an index of the table"))?;
                        applied.created.push(spec.name.clone());
                    }
                }
            }
        }
    }
    Ok(applied)
}

/// The statements of a DDL file, comments dropped.
fn statements(ddl: &str) -> Vec<String> {
    let text: String = ddl
        .lines()
        .map(|l| match l.find("--") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(name: &str, columns: &[&str], predicate: Option<&str>) -> ExistingIndex {
        ExistingIndex {
            name: name.into(),
            columns: columns.iter().map(|c| Some(c.to_string())).collect(),
            predicate: predicate.map(String::from),
        }
    }

    #[test]
    fn index_statements_parse() {
        let spec = IndexSpec::parse(
            "CREATE INDEX IF NOT EXISTS idx_inbox_unfinished ON public.inbox_messages (created_at, id)\n    WHERE status IN ('received', 'failed', 'processing')",
        )
        .unwrap();
        assert_eq!(spec.name, "idx_inbox_unfinished");
        assert_eq!(spec.columns, vec!["created_at", "id"]);
        assert_eq!(
            spec.predicate.as_deref(),
            Some("status IN ('received', 'failed', 'processing')")
        );
        assert!(IndexSpec::parse("CREATE TABLE IF NOT EXISTS t (a int)").is_none());
    }

    #[test]
    fn an_index_on_the_same_leading_columns_covers_ours_whatever_its_name() {
        // Event-Forge's own names for what our DDL calls idx_outbox_messages_*.
        let ef = vec![
            existing(
                "idx_outbox_status_scheduled",
                &["status", "scheduled_at"],
                None,
            ),
            existing("idx_outbox_created", &["created_at"], None),
            existing("outbox_messages_pkey", &["id"], None),
        ];
        let ours = IndexSpec::parse(
            "CREATE INDEX IF NOT EXISTS idx_outbox_messages_status_scheduled ON t (status, scheduled_at)",
        )
        .unwrap();
        assert_eq!(
            ours.covered_by(&ef).map(|e| e.name.as_str()),
            Some("idx_outbox_status_scheduled")
        );
        // A longer index covers a prefix of it; a different order does not.
        let status = IndexSpec::parse("CREATE INDEX IF NOT EXISTS s ON t (status)").unwrap();
        assert!(status.covered_by(&ef).is_some());
        let reversed =
            IndexSpec::parse("CREATE INDEX IF NOT EXISTS r ON t (scheduled_at, status)").unwrap();
        assert!(reversed.covered_by(&ef).is_none());
    }

    #[test]
    fn a_partial_index_is_covered_only_by_one_on_the_same_values() {
        let unfinished = IndexSpec::parse(
            "CREATE INDEX IF NOT EXISTS u ON t (created_at, id) WHERE status IN ('received', 'failed', 'processing')",
        )
        .unwrap();
        // Event-Forge's plain (created_at) index is no substitute: the claim would
        // walk every processed row.
        let plain = vec![existing("idx_inbox_created", &["created_at"], None)];
        assert!(unfinished.covered_by(&plain).is_none());
        let same = vec![existing(
            "mine",
            &["created_at", "id"],
            Some("((status)::text = ANY ((ARRAY['received'::character varying, 'failed'::character varying, 'processing'::character varying])::text[]))"),
        )];
        assert!(unfinished.covered_by(&same).is_some());
        let other = vec![existing(
            "sweep",
            &["created_at", "id"],
            Some("((status)::text = 'processing'::text)"),
        )];
        assert!(unfinished.covered_by(&other).is_none());
        // An expression column never matches a column name.
        let expr = vec![ExistingIndex {
            name: "e".into(),
            columns: vec![None, Some("id".into())],
            predicate: None,
        }];
        let plain_spec =
            IndexSpec::parse("CREATE INDEX IF NOT EXISTS p ON t (created_at)").unwrap();
        assert!(plain_spec.covered_by(&expr).is_none());
    }

    #[test]
    fn the_ddl_files_split_into_their_statements() {
        let s = statements(crate::inbox::queries::INBOX_DDL);
        assert!(s[0].starts_with("CREATE TABLE IF NOT EXISTS"));
        let indexes: Vec<IndexSpec> = s.iter().filter_map(|x| IndexSpec::parse(x)).collect();
        assert_eq!(indexes.len(), 6, "{s:#?}");
        assert!(indexes
            .iter()
            .any(|i| i.name == "idx_inbox_unfinished" && i.predicate.is_some()));
        let s = statements(super::super::catalog::OUTBOX_DDL);
        assert_eq!(s.iter().filter_map(|x| IndexSpec::parse(x)).count(), 3);
    }
}
