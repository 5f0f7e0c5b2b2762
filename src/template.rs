//! Templates over an outbox row: `"{aggregate_type}.{event_type}"`,
//! `"{tenant}-events"`. A leaf: parsed once at start-up (an unknown name is a
//! refusal there), rendered per message without a lookup by name — each field is
//! resolved to the row's own field or to the position of an extra column the
//! decoder reads for it.
//!
//! `{{` and `}}` stand for literal braces. A name is letters, digits and `_`,
//! not starting with a digit: a column name as SQL spells it unquoted.

/// The row fields every outbox has, whatever its columns are called.
pub const FIELDS: [&str; 4] = ["id", "aggregate_type", "aggregate_id", "event_type"];

/// Where a rendered field's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Id,
    AggregateType,
    AggregateId,
    EventType,
    /// The `i`-th extra column (see [`Columns`]).
    Extra(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Slot),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// As written, for messages.
    source: String,
}

/// The extra columns the templates name, in the order their values are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns(Vec<String>);

impl Columns {
    pub fn names(&self) -> &[String] {
        &self.0
    }

    fn slot(&mut self, name: &str) -> Slot {
        match name {
            "id" => Slot::Id,
            "aggregate_type" => Slot::AggregateType,
            "aggregate_id" => Slot::AggregateId,
            "event_type" => Slot::EventType,
            other => match self.0.iter().position(|c| c == other) {
                Some(i) => Slot::Extra(i),
                None => {
                    self.0.push(other.to_string());
                    Slot::Extra(self.0.len() - 1)
                }
            },
        }
    }
}

/// A row's values as a template reads them.
pub trait Values {
    /// The value of `slot`: `Some("")` for a NULL column, `None` when the row
    /// at hand does not carry that column (a copy made without it).
    fn field(&self, slot: Slot) -> Option<&str>;
}

impl Template {
    /// Parses `text`, registering the extra columns it names in `columns`.
    pub fn parse(text: &str, columns: &mut Columns) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!(
                                    "{{{name} is not closed: write {{name}}, or {{{{ for a brace"
                                ))
                            }
                        }
                    }
                    check_name(&name)?;
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(columns.slot(&name)));
                }
                '}' => return Err("a } without its {: write }} for a brace".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template {
            parts,
            source: text.to_string(),
        })
    }

    /// The text, when the template names no field.
    pub fn literal(&self) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(_) => return None,
            }
        }
        Some(out)
    }

    /// As written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with `values` (a NULL column renders as nothing). Err: the
    /// row does not carry a value the template names (`columns` gives its name).
    pub fn render(&self, values: &impl Values, columns: &Columns) -> Result<String, String> {
        self.render_with(values, columns, false)
    }

    /// Like [`Template::render`], but a NULL or empty value is an error too
    /// (an exchange name must not change shape with a missing value:
    /// `"{tenant}-events"` must not become `"-events"`).
    pub fn render_all(&self, values: &impl Values, columns: &Columns) -> Result<String, String> {
        self.render_with(values, columns, true)
    }

    fn render_with(
        &self,
        values: &impl Values,
        columns: &Columns,
        every_value: bool,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(slot) => match values.field(*slot) {
                    Some("") if every_value => {
                        return Err(format!(
                            "template {:?} names {}, which is NULL or empty in this row",
                            self.source,
                            name_of(*slot, columns)
                        ));
                    }
                    Some(v) => out.push_str(v),
                    None => {
                        let name = name_of(*slot, columns);
                        return Err(format!(
                            "template {:?} names column {name}, which this copy of the row does not carry (the outbox row is gone)",
                            self.source
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// The name a template gave `slot`.
fn name_of(slot: Slot, columns: &Columns) -> &str {
    match slot {
        Slot::Id => "id",
        Slot::AggregateType => "aggregate_type",
        Slot::AggregateId => "aggregate_id",
        Slot::EventType => "event_type",
        Slot::Extra(i) => columns.0.get(i).map_or("?", String::as_str),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Ok(());
    }
    Err(format!(
        "{{{name}}} is not a field or column name (letters, digits and _; one of {} or a column of the table)",
        FIELDS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Row(Vec<String>);

    impl Values for Row {
        fn field(&self, slot: Slot) -> Option<&str> {
            Some(match slot {
                Slot::Id => "i-1",
                Slot::AggregateType => "Order",
                Slot::AggregateId => "o-7",
                Slot::EventType => "placed",
                Slot::Extra(i) => return self.0.get(i).map(String::as_str),
            })
        }
    }

    #[test]
    fn fields_and_columns_render_in_place() {
        let mut cols = Columns::default();
        let rk = Template::parse("{tenant}.{aggregate_type}.{event_type}", &mut cols).unwrap();
        let ex = Template::parse("{{literal}}-{region}-{tenant}", &mut cols).unwrap();
        assert_eq!(cols.names(), ["tenant", "region"]);
        let row = Row(vec!["acme".into(), "eu".into()]);
        assert_eq!(rk.render(&row, &cols).unwrap(), "acme.Order.placed");
        assert_eq!(ex.render(&row, &cols).unwrap(), "{literal}-eu-acme");
        let short = Row(vec!["acme".into()]);
        let e = ex.render(&short, &cols).unwrap_err();
        assert!(e.contains("column region"), "{e}");
        let empty = Row(vec!["acme".into(), String::new()]);
        assert_eq!(ex.render(&empty, &cols).unwrap(), "{literal}--acme");
        let e = ex.render_all(&empty, &cols).unwrap_err();
        assert!(e.contains("region") && e.contains("NULL or empty"), "{e}");
        assert_eq!(rk.literal(), None);
        let plain = Template::parse("events", &mut cols).unwrap();
        assert_eq!(plain.literal().as_deref(), Some("events"));
        assert_eq!(cols.names().len(), 2, "a literal names no column");
    }

    #[test]
    fn malformed_templates_say_what_is_wrong() {
        let mut cols = Columns::default();
        for (text, words) in [
            ("{tenant", "not closed"),
            ("tenant}", "without its {"),
            ("{}", "not a field or column name"),
            ("{1st}", "not a field or column name"),
            ("{a-b}", "not a field or column name"),
        ] {
            let e = Template::parse(text, &mut cols).unwrap_err();
            assert!(e.contains(words), "{text}: {e}");
        }
    }

    proptest! {
        /// Any text without braces is its own literal; doubling braces escapes them.
        #[test]
        fn text_round_trips(s in "[^{}]{0,40}", t in "[^{}]{0,10}") {
            let mut cols = Columns::default();
            let plain = Template::parse(&s, &mut cols).unwrap();
            prop_assert_eq!(plain.literal(), Some(s.clone()));
            let escaped = Template::parse(&format!("{{{{{t}}}}}"), &mut cols).unwrap();
            prop_assert_eq!(escaped.literal(), Some(format!("{{{t}}}")));
            prop_assert!(cols.names().is_empty());
        }
    }
}
