//! Postgres names as the relay accepts them (a leaf module): `schema.table`
//! names, slot and publication identifiers, and identifier quoting.

use std::fmt;

/// `schema.table`, each part as Postgres stores it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`); letters, digits, `_` and `$`.
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

    /// Another table in the same schema.
    pub fn sibling(&self, name: &str) -> TableName {
        TableName {
            schema: self.schema.clone(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A slot or publication name: what Postgres accepts unquoted for slots.
pub fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "{name:?} may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(TableName::parse("a.").is_err());
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("outbox_relay_1").is_ok());
        assert!(check_identifier("Bad-Name").is_err());
        assert!(check_identifier("").is_err());
        assert!(check_identifier(&"a".repeat(64)).is_err());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
