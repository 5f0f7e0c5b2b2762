//! What each fuzz target checks, shared by `fuzz/fuzz_targets/*.rs` (libFuzzer,
//! nightly) and `tests/fuzz_corpus.rs` (every corpus file and every finding
//! replayed on stable, in CI).
//!
//! Each target feeds bytes from outside the relay to the code that reads them —
//! pgoutput from the walsender, a row's values, a logical decoding message, a
//! delivery from any publisher, a configuration file, a connection URL — and the
//! code must end in a value or a typed error. A panic (an `unwrap`, an index, an
//! overflow: the fuzz build keeps overflow checks on) is a finding, and so is a
//! broken invariant asserted here: a message the broker could not read back, an
//! envelope that is not the JSON its row says, a password in any output.

#![allow(dead_code)]

use bytes::Bytes;
use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;
use outbox_relay::config::wire::{BodyShape, WireShape};
use outbox_relay::config::{ColumnMapping, Config};
use outbox_relay::event::OutboxEvent;
use outbox_relay::pg::{PgTarget, TableName};
use outbox_relay::sink::format::{encode_with, OutboundMessage};
use outbox_relay::source::{Decoded, Decoder};
use std::sync::LazyLock;

/// A password no input is expected to hold: `urls` and `config` put it in a URL
/// and check that no output shows it.
pub const SECRET: &str = "Zq9vSecretPw7x";

/// Length-prefixed pieces of an input: a first byte of 0xFF is a NULL; below
/// 0x80 it is the piece's length; otherwise, with the next byte, a 15-bit
/// length. A length past the end takes the rest.
pub struct Pieces<'a> {
    rest: &'a [u8],
}

impl<'a> Pieces<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next piece (`Some(None)` for a NULL), or `None` at the end.
    pub fn next_piece(&mut self) -> Option<Option<&'a [u8]>> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        if first == 0xFF {
            return Some(None);
        }
        let len = if first < 0x80 {
            first as usize
        } else {
            let (&second, rest) = self.rest.split_first().unwrap_or((&0, &[]));
            self.rest = rest;
            ((first as usize & 0x7F) << 8) | second as usize
        };
        let len = len.min(self.rest.len());
        let (piece, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(Some(piece))
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Encodes `pieces` in this format (for seeds and regression tests).
    pub fn encode(pieces: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                None => out.push(0xFF),
                Some(p) => {
                    let len = p.len().min(0x7FFF);
                    if len < 0x80 {
                        out.push(len as u8);
                    } else {
                        out.push(0x80 | (len >> 8) as u8);
                        out.push(len as u8);
                    }
                    out.extend_from_slice(&p[..len]);
                }
            }
        }
        out
    }
}

/// A table the relay reads: its name, column mapping, wire shape and the
/// columns of its Relation message (name, type oid).
pub struct Table {
    pub name: TableName,
    pub columns: ColumnMapping,
    pub wire: WireShape,
    pub relation: Vec<(&'static str, u32)>,
}

const TEXT: u32 = 25;
const INT4: u32 = 23;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const TIMESTAMPTZ: u32 = 1184;
const VARCHAR: u32 = 1043;

fn load(toml: &str) -> Config {
    Config::from_toml_with_env(toml, "fuzz", Vec::new()).expect("the fuzz tables' configuration")
}

/// Event-Forge's table (`reference/event-forge.md`) with the default wire
/// shape, and a tenant table with templates and the payload as the body
/// (`docs/mapping.md`).
pub static TABLES: LazyLock<Vec<Table>> = LazyLock::new(|| {
    let forge = load(
        r#"
[postgres]
url = "postgresql://postgres@127.0.0.1:5432/test"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
"#,
    );
    let tenant = load(
        r#"
[postgres]
url = "postgresql://postgres@127.0.0.1:5432/test"
table = "public.app_events"
mapping = "custom"
[mapping]
id = "event_id"
aggregate_type = "stream"
aggregate_id = "stream_id"
event_type = "kind"
payload = "data"
metadata = "meta"
created_at = "created"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
exchange = "{tenant}-events"
routing_key = "{tenant}.{aggregate_type}.{event_type}"
declare_exchange = false
body = "payload"
[amqp.headers]
x-tenant = "{tenant}"
[amqp.properties]
type = "{event_type}"
correlation_id = "{aggregate_id}"
app_id = "billing-{tenant}"
"#,
    );
    vec![
        Table {
            name: forge.postgres.table.clone(),
            columns: forge.postgres.columns.clone(),
            wire: forge.amqp.wire.clone(),
            relation: vec![
                ("id", VARCHAR),
                ("aggregate_type", VARCHAR),
                ("aggregate_id", VARCHAR),
                ("event_type", VARCHAR),
                ("payload", JSON),
                ("metadata", JSON),
                ("status", VARCHAR),
                ("retry_count", INT4),
                ("max_retries", INT4),
                ("error_message", TEXT),
                ("scheduled_at", TIMESTAMPTZ),
                ("locked_by", VARCHAR),
                ("locked_at", TIMESTAMPTZ),
                ("created_at", TIMESTAMPTZ),
                ("updated_at", TIMESTAMPTZ),
            ],
        },
        Table {
            name: tenant.postgres.table.clone(),
            columns: tenant.postgres.columns.clone(),
            wire: tenant.amqp.wire.clone(),
            relation: vec![
                ("event_id", TEXT),
                ("tenant", TEXT),
                ("stream", TEXT),
                ("stream_id", TEXT),
                ("kind", TEXT),
                ("data", JSON),
                ("meta", JSONB),
                ("created", TIMESTAMPTZ),
            ],
        },
    ]
});

/// pgoutput's Relation message for `table`, with `id`.
pub fn relation_message(id: u32, table: &Table, relation: &[(&str, u32)]) -> Vec<u8> {
    let mut b = vec![b'R'];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(table.name.schema.as_bytes());
    b.push(0);
    b.extend_from_slice(table.name.name.as_bytes());
    b.push(0);
    b.push(b'd');
    b.extend_from_slice(&(relation.len() as u16).to_be_bytes());
    for (name, oid) in relation {
        b.push(0);
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    b
}

/// pgoutput's Insert message of relation `id` with text `values`.
pub fn insert_message(id: u32, values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = vec![b'I'];
    b.extend_from_slice(&id.to_be_bytes());
    b.push(b'N');
    b.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            None => b.push(b'n'),
            Some(s) => {
                b.push(b't');
                b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                b.extend_from_slice(s);
            }
        }
    }
    b
}

/// pgoutput as the walsender sends it: each piece one XLogData payload, into
/// one decoder of Event-Forge's table. Every event it yields must encode.
pub fn pgoutput(data: &[u8]) {
    let table = &TABLES[0];
    let mut decoder = Decoder::new(table.name.clone(), table.columns.clone());
    let mut pieces = Pieces::new(data);
    while let Some(piece) = pieces.next_piece() {
        let Some(payload) = piece else { continue };
        match decoder.decode(Bytes::copy_from_slice(payload)) {
            Ok(Decoded::Event(event)) => check_encoding(&event, 0, &table.wire),
            Ok(Decoded::Malformed(row)) => assert!(!row.reason.is_empty()),
            Ok(Decoded::Ignored) => {}
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

/// A row's values, through the real decoder and the encoder: byte 0 picks the
/// table (bit 0) and declares its payload and metadata columns `text` instead
/// of JSON (bits 1 and 2); bytes 1..9 are the commit time (Postgres epoch
/// microseconds); then one piece per column, in the Relation's order.
pub fn row_values(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let table = &TABLES[(flags & 1) as usize];
    let mut commit = [0u8; 8];
    let n = rest.len().min(8);
    commit[..n].copy_from_slice(&rest[..n]);
    let commit_time = i64::from_be_bytes(commit);
    let mut pieces = Pieces::new(&rest[n..]);
    let relation: Vec<(&str, u32)> = table
        .relation
        .iter()
        .map(|&(name, oid)| {
            let as_text = (name == table.columns.payload && flags & 2 != 0)
                || (Some(name) == table.columns.metadata.as_deref() && flags & 4 != 0);
            (name, if as_text { TEXT } else { oid })
        })
        .collect();
    let values: Vec<Option<&[u8]>> = relation
        .iter()
        .map(|_| pieces.next_piece().unwrap_or(None))
        .collect();
    let mut decoder = Decoder::new(table.name.clone(), table.columns.clone());
    match decoder.decode(Bytes::from(relation_message(7, table, &relation))) {
        Ok(Decoded::Ignored) => {}
        other => panic!("the table's Relation message: {other:?}"),
    }
    match decoder.decode(Bytes::from(insert_message(7, &values))) {
        Ok(Decoded::Event(event)) => check_encoding(&event, commit_time, &table.wire),
        Ok(Decoded::Malformed(row)) => assert!(!row.reason.is_empty()),
        other => panic!("an insert of the table's columns: {other:?}"),
    }
}

/// The content of a logical decoding message (`postgres.source = "messages"`).
pub fn message_content(data: &[u8]) {
    match outbox_relay::source::message::decode(data, "0/16B3748") {
        Ok(event) => check_encoding(&event, 0, &TABLES[0].wire),
        Err(row) => {
            assert!(!row.reason.is_empty());
            assert!(!row.id.is_empty());
        }
    }
}

/// What the broker reads back of a message: properties and headers through
/// the AMQP codec, and the body.
fn check_encoding(event: &OutboxEvent, commit_time: i64, wire: &WireShape) {
    let message: OutboundMessage = match encode_with(event, commit_time, wire) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.0.is_empty());
            return;
        }
    };
    assert_eq!(message.id, event.id);
    let frame = cookie_factory_gen(&message.properties);
    assert_eq!(
        message.header_len,
        frame.len() + 20,
        "header_len must be the content header frame's size"
    );
    let (left, read) = lapin::protocol::basic::parse_properties(frame.as_slice())
        .expect("the broker must read the properties back");
    assert!(left.is_empty());
    assert_eq!(read, message.properties, "properties survive the wire");
    assert_eq!(
        read.message_id().as_ref().map(ShortString::as_str),
        Some(event.id.as_str())
    );
    let header = |name: &str| match read.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    assert_eq!(
        header("x-aggregate-id").as_deref(),
        Some(event.aggregate_id.as_bytes())
    );
    match wire.body {
        BodyShape::Payload => assert_eq!(message.body, event.payload.as_ref()),
        BodyShape::Envelope => {
            let json_ok = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).is_ok();
            if !json_ok(&event.payload) || !event.metadata.as_deref().is_none_or(json_ok) {
                // A json/jsonb column's text is Postgres' own, trusted as JSON.
                return;
            }
            let body: serde_json::Value =
                serde_json::from_slice(&message.body).expect("the envelope is JSON");
            assert_eq!(body["id"].as_str(), Some(event.id.as_str()));
            assert_eq!(
                body["aggregateType"].as_str(),
                Some(event.aggregate_type.as_str())
            );
            assert_eq!(
                body["aggregateId"].as_str(),
                Some(event.aggregate_id.as_str())
            );
            assert_eq!(body["eventType"].as_str(), Some(event.event_type.as_str()));
            let payload: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
            assert_eq!(body["payload"], payload);
        }
    }
}

fn cookie_factory_gen(properties: &BasicProperties) -> Vec<u8> {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .expect("properties serialize")
}

/// A delivery from any publisher: piece 1 is the properties as they travel
/// in the content header frame (unparsable ones stand for none), piece 2 the
/// routing key, the rest the body.
pub fn delivery(data: &[u8]) {
    let mut pieces = Pieces::new(data);
    let properties = pieces
        .next_piece()
        .flatten()
        .and_then(|p| lapin::protocol::basic::parse_properties(p).ok())
        .map(|(_, p)| p)
        .unwrap_or_default();
    let routing_key = String::from_utf8_lossy(pieces.next_piece().flatten().unwrap_or_default());
    let body = pieces.rest();
    match outbox_relay::inbox::mapping::map(body, &properties, &routing_key, 64 * 1024) {
        Ok(record) => {
            assert!(!record.message_id.is_empty());
            assert!(record.message_id.chars().count() <= 255);
            assert!(!record.message_id.contains('\0'));
            assert!(!record.event_type.contains('\0'));
            // JSON as Postgres' `json` takes it: any number, kept as written
            // (a `serde_json::Value` would refuse 1e400).
            let json =
                |text: &str| serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok();
            assert!(json(&record.payload), "the recorded payload is JSON");
            if let Some(m) = &record.metadata {
                assert!(json(m), "the recorded metadata is JSON");
            }
        }
        Err(invalid) => {
            assert!(!invalid.reason().is_empty());
            assert!(!invalid.detail().is_empty());
        }
    }
}

/// A configuration file as typed by hand; after a line `#ENV`, `KEY=value`
/// lines are `OUTBOX_RELAY_*` overrides. A URL with [`SECRET`] as its password
/// must never show it, valid or not.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A URL parser drops tabs and line breaks: an input whose pieces join into
    // the secret that way holds it itself (it is not a password of ours).
    if assembled(text) {
        return;
    }
    let (toml, env) = text.split_once("\n#ENV\n").unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The secret is a password when every time it appears, it is in a URL's
    // user part (`://user:SECRET@`); elsewhere (a table name, say) it may show.
    let only_in_urls = text.match_indices(SECRET).all(|(i, _)| {
        let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
        let before = &text[line_start..i];
        before.rfind("://").is_some_and(|s| {
            let user = &before[s + 3..];
            user.ends_with(':') && !user[..user.len() - 1].contains([':', '@', '/', '"', ' '])
        }) && text[i + SECRET.len()..].starts_with('@')
    });
    match Config::from_toml_with_env(toml, "fuzz.toml", env) {
        Ok(config) => {
            let shown = format!("{config:?}");
            if only_in_urls {
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.is_empty());
            if only_in_urls {
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
    }
}

/// A Postgres connection URL or `key=value` string, and an AMQP URL, each with
/// [`SECRET`] as its password: parsed, or refused, the password never shows
/// (in the refusal, the redacted form, or `Debug`).
pub fn urls(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains(SECRET) || text.contains("Zq9v") || assembled(text) {
        return;
    }
    let candidates = [
        format!("postgresql://user:{SECRET}@{text}"),
        format!("{text} password={SECRET}"),
        format!("password={SECRET} {text}"),
        format!("postgresql://{text}?password={SECRET}"),
    ];
    for url in &candidates {
        match PgTarget::parse(url) {
            Ok(target) => {
                assert!(!target.redacted().contains(SECRET), "{url}");
                assert!(!format!("{target:?}").contains(SECRET), "{url}");
            }
            Err(e) => assert!(!e.contains(SECRET), "{url}: {e}"),
        }
    }
    for url in [
        format!("amqp://guest:{SECRET}@{text}"),
        format!("amqps://guest:{SECRET}@{text}"),
    ] {
        let toml = format!(
            "[postgres]\nurl = \"postgresql://postgres@127.0.0.1:5432/test\"\n[amqp]\nurl = {}\n",
            toml_string(&url)
        );
        match Config::from_toml_with_env(&toml, "fuzz.toml", Vec::new()) {
            Ok(config) => assert!(!format!("{config:?}").contains(SECRET), "{url}"),
            Err(e) => assert!(!e.to_string().contains(SECRET), "{url}: {e}"),
        }
        for shown in [
            outbox_relay::redact::amqp_url(&url),
            outbox_relay::redact::amqp_node(&url),
            outbox_relay::redact::amqp_host(&url),
        ] {
            assert!(!shown.contains(SECRET), "{url}: {shown}");
        }
    }
}

/// Whether `text` holds [`SECRET`] more often once tabs and line breaks are
/// removed, as a URL parser removes them.
fn assembled(text: &str) -> bool {
    let stripped: String = text
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    stripped.matches(SECRET).count() != text.matches(SECRET).count()
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
