//! `outbox-relay replay --pending [--since TIME]`: the recovery after a lost slot.
//! Creates a new slot (so nothing committed from now on is missed), then
//! re-publishes the outbox rows still `pending` that were created before that,
//! oldest first, in the Event-Forge wire format with confirms, and marks them as
//! `on_success` says. Rows of an aggregate with retry state are parked behind it
//! (the relay delivers them in order); a row the broker refuses is parked with its
//! reason. Consumers deduplicate by `message_id`: a row that was delivered but not
//! yet marked when the slot was lost goes out twice.

use super::retry_table;
use crate::amqp::{self, AmqpSettings};
use crate::config::{Config, OnSuccess};
use crate::error::Error;
use crate::event::{AggregateKey, OutboxEvent, Row};
use crate::failure::Failure;
use crate::outbox_table::{MirrorUpdate, OutboxTable};
use crate::pg::slots::SlotRecords;
use crate::pg::{catalog, get, query_err};
use crate::retry::queries::RetryTable;
use crate::retry::ParkItem;
use crate::sink;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::Confirmation;
use std::collections::HashSet;
use std::sync::Arc;

/// Rows read and published per round.
const PAGE: i64 = 500;

/// What `replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// The invalidated slot dropped first, if there was one.
    pub dropped_invalidated_slot: bool,
    /// The LSN of the slot created for the recovery, when there was none.
    pub slot_created_at: Option<String>,
    /// Rows the broker acked.
    pub published: u64,
    /// Rows parked in the retry table (behind their aggregate's retry state, refused, or malformed).
    pub parked: u64,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dropped_invalidated_slot {
            writeln!(f, "dropped the invalidated slot")?;
        }
        if let Some(lsn) = &self.slot_created_at {
            writeln!(f, "created a new slot at {lsn}")?;
        }
        writeln!(
            f,
            "re-published {} pending row(s); parked {} for the relay to retry in order",
            self.published, self.parked
        )
    }
}

/// Re-publishes the rows still pending (created at or after `since`, a timestamp
/// Postgres understands, when given). From its start until it ends, the slot
/// record says a replay is running: a relay waits for it, so nothing newer of an
/// aggregate overtakes its replayed rows.
pub async fn replay_pending(config: &Config, since: Option<&str>) -> Result<ReplayReport, Error> {
    crate::pg::shards::chosen(&config.postgres.sharding, "replay")?;
    let pg = &config.postgres;
    if pg.source == crate::config::Source::Messages {
        return Err(Error::Replay(format!(
            "replay --pending re-publishes outbox rows, and with postgres.source = \"messages\" nothing is stored: messages emitted while the slot was lost cannot be re-published. To stream again from now, accepting that loss: select pg_drop_replication_slot('{slot}') (if it still exists), delete from {records} where slot = '{slot}', then `outbox-relay init` (see docs/mapping.md#outbox-without-a-table)",
            slot = pg.slot,
            records = SlotRecords::next_to(&pg.retry_table).name(),
        )));
    }
    if pg.on_success == OnSuccess::Keep {
        return Err(Error::Replay(format!(
            "postgres.on_success = \"keep\" leaves delivered rows 'pending', so replay cannot tell them from lost ones: set on_success to \"mark_published\" or \"delete\" (for {})",
            pg.table
        )));
    }
    let sql = pg.target.connect().await?;
    let event_forge_columns =
        pg.columns.status.is_some() && pg.columns.created_at.as_deref() == Some("created_at");
    if !event_forge_columns
        || catalog::pending_rows(&sql, &pg.table, None)
            .await?
            .is_none()
    {
        return Err(Error::Replay(format!(
            "{} has no status or created_at column: the relay cannot tell which rows were not delivered (replay needs the Event-Forge layout)",
            pg.table
        )));
    }
    if let Some(since) = since {
        sql.query_one("select $1::text::timestamptz", &[&since])
            .await
            .map_err(|e| Error::Replay(format!("--since {since:?} is not a timestamp Postgres understands ({e}); use e.g. \"2026-11-28 10:00:00+00\"")))?;
    }
    let retry = retry_table(config);
    retry.create_if_missing(&sql).await?;
    let records = SlotRecords::next_to(&pg.retry_table);
    records.create_if_missing(&sql).await?;
    let mut report = prepare_slot(&sql, config, &records).await?;
    // Everything created from now on reaches the slot; replay what came before.
    const CONTEXT: &str = "reading the server's time";
    let until: String = get(
        &sql.query_one("select now()::text", &[])
            .await
            .map_err(query_err(CONTEXT))?,
        0,
        CONTEXT,
    )?;
    let outbox = OutboxTable::learn(&sql, pg.table.clone(), &pg.columns).await?;
    // A shard's slot carries its shard's rows only: replay those, no other's.
    let shard = crate::pg::shards::filter(pg, Some("o"));
    let range = crate::outbox_table::PendingRange {
        until: &until,
        since,
        shard: shard.as_deref(),
    };
    let broker = amqp::connect(&AmqpSettings::from_config(&config.amqp)).await?;
    let mut ensured = HashSet::new();
    loop {
        let Some(page) = outbox
            .pending_page(&sql, (retry.name(), retry.slot()), &range, PAGE)
            .await?
        else {
            break;
        };
        if page.is_empty() {
            break;
        }
        let (published, parked) =
            replay_page(config, &sql, &broker, &mut ensured, &retry, &outbox, page).await?;
        report.published += published;
        report.parked += parked;
    }
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        broker.connection.close(200, "outbox-relay replay".into()),
    )
    .await;
    records.finish_replay(&sql, &pg.slot).await?;
    Ok(report)
}

/// Makes the slot usable again and marks the replay as started: refuses while a
/// process holds the slot; drops an invalidated slot; creates a missing one.
async fn prepare_slot(
    sql: &tokio_postgres::Client,
    config: &Config,
    records: &SlotRecords,
) -> Result<ReplayReport, Error> {
    let pg = &config.postgres;
    let state = catalog::slot_state(sql, &pg.slot).await?;
    if let Some(pid) = state.as_ref().and_then(|s| s.active_pid) {
        return Err(Error::Replay(format!(
            "slot {} is held by pid {pid}: stop the relay (and any standby) first, then replay",
            pg.slot
        )));
    }
    records.start_replay(sql, &pg.slot, &pg.table).await?;
    let mut report = ReplayReport::default();
    match state {
        Some(s) if s.is_invalidated() => {
            catalog::drop_slot(sql, &pg.slot).await?;
            tracing::info!(slot = %pg.slot, "replay: dropped the invalidated slot");
            report.dropped_invalidated_slot = true;
        }
        Some(s) => {
            catalog::check_slot(&s, &pg.slot, &pg.target.dbname)?;
            return Ok(report);
        }
        None => {}
    }
    catalog::require_logical(sql).await?;
    let lsn = catalog::create_slot(sql, &pg.slot).await?;
    let server = catalog::server_identity(sql).await.ok();
    records
        .replace(sql, &pg.slot, &pg.table, lsn, server.as_ref())
        .await?;
    tracing::info!(slot = %pg.slot, %lsn, "replay: created a new slot");
    report.slot_created_at = Some(lsn.to_string());
    Ok(report)
}

/// Re-publishes one page of pending rows: one row per aggregate (a refused row
/// cannot be overtaken by its successor; they come in the next round), with
/// confirms; parks what cannot go and marks what went. Returns (published, parked).
async fn replay_page(
    config: &Config,
    sql: &tokio_postgres::Client,
    broker: &amqp::Broker,
    ensured: &mut HashSet<ShortString>,
    retry: &RetryTable,
    outbox: &OutboxTable,
    page: Vec<crate::event::RowRead>,
) -> Result<(u64, u64), Error> {
    // The configured exchange's name (a literal, validated to fit); a template
    // names one per message instead.
    let configured = ShortString::try_new(config.amqp.wire.fixed_exchange().unwrap_or_default())
        .unwrap_or_default();
    let aggregates: Vec<(String, String)> = page
        .iter()
        .map(|r| match r {
            Ok(e) => (e.aggregate_type.clone(), e.aggregate_id.clone()),
            Err(m) => (
                m.aggregate_type.clone().unwrap_or_default(),
                m.aggregate_id.clone().unwrap_or_default(),
            ),
        })
        .collect();
    let held: HashSet<AggregateKey> = retry
        .held_among(sql, &aggregates)
        .await?
        .iter()
        .map(|(t, i)| AggregateKey::of(t, i))
        .collect();
    let mut taken: HashSet<AggregateKey> = HashSet::new();
    let mut to_park: Vec<ParkItem> = Vec::new();
    let mut confirms = Vec::new();
    let max_retries = config.retry.max_retries;
    for row in page {
        let row = match row {
            Ok(e) => Row::Event(Arc::new(e)),
            Err(m) => Row::Malformed(*m),
        };
        let key = row.key();
        if held.contains(&key) || matches!(row, Row::Malformed(_)) {
            to_park.push(ParkItem::from_row(0, &row, 0, max_retries));
            continue;
        }
        if !taken.insert(key) {
            continue;
        }
        let Row::Event(event) = row else { continue };
        let message = match publishable(config, broker, &event) {
            Ok(message) => usable_exchange(config, broker, ensured, message).await?,
            Err(failure) => Err(failure),
        };
        match message {
            Ok(message) => {
                let confirm = broker
                    .channel
                    .basic_publish(
                        message.exchange(&configured).clone(),
                        message.routing_key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &message.body,
                        message.properties.clone(),
                    )
                    .await
                    .map_err(|source| Error::Amqp {
                        context: "publishing a replayed row".into(),
                        source,
                    })?;
                confirms.push((event, confirm));
            }
            Err(failure) => to_park.push(failed_item(&event, failure, max_retries)),
        }
    }
    let (acked, refused) = answers(confirms).await?;
    to_park.extend(
        refused
            .into_iter()
            .map(|(event, failure)| failed_item(&event, failure, max_retries)),
    );
    outbox
        .on_success(sql, config.postgres.on_success, &acked)
        .await?;
    if !to_park.is_empty() {
        retry.insert_many(sql, &to_park).await?;
        let mirrors: Vec<MirrorUpdate> = to_park
            .iter()
            .filter_map(|item| {
                item.failure.as_ref().map(|reason| MirrorUpdate {
                    id: item.id.clone(),
                    status: "failed",
                    reason: reason.clone(),
                    delay: None,
                })
            })
            .collect();
        outbox.mirror(sql, &mirrors).await?;
    }
    Ok((acked.len() as u64, to_park.len() as u64))
}

/// The broker's answers to the page's publishes: the ids it acked, and the
/// events it refused (returned, nacked) with why.
async fn answers(
    confirms: Vec<(Arc<OutboxEvent>, lapin::PublisherConfirm)>,
) -> Result<(Vec<String>, Vec<(Arc<OutboxEvent>, Failure)>), Error> {
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for (event, confirm) in confirms {
        let confirmation = confirm.await.map_err(|source| Error::Amqp {
            context: "waiting for the broker to confirm a replayed row".into(),
            source,
        })?;
        let failure = match confirmation {
            Confirmation::Ack(None) => None,
            Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => Some(Failure::Returned {
                reply_code: r.reply_code,
                reply_text: r.reply_text.to_string(),
            }),
            Confirmation::Nack(None) => Some(Failure::Nack),
            Confirmation::NotRequested => Some(Failure::NotConfirmed),
        };
        match failure {
            None => acked.push(event.id.clone()),
            Some(failure) => refused.push((event, failure)),
        }
    }
    Ok((acked, refused))
}

/// A row the broker refused (or that cannot be sent), to park with its reason.
fn failed_item(event: &Arc<OutboxEvent>, failure: Failure, max_retries: i32) -> ParkItem {
    let mut item = ParkItem::from_row(0, &Row::Event(event.clone()), 0, max_retries);
    item.failure = Some(failure.to_string());
    item
}

/// The message of a replayed row, or why it cannot be published.
fn publishable(
    config: &Config,
    broker: &amqp::Broker,
    event: &OutboxEvent,
) -> Result<sink::OutboundMessage, Failure> {
    let message = sink::format::encode_with(event, 0, &config.amqp.wire)
        .map_err(|e| Failure::Unsendable(e.0))?;
    let limit = config.amqp.max_message_bytes;
    if message.body.len() > limit {
        return Err(Failure::TooLarge {
            bytes: message.body.len(),
            limit,
        });
    }
    if message.header_len > broker.frame_max() {
        return Err(Failure::HeadersTooLarge {
            bytes: message.header_len,
            frame_max: broker.frame_max(),
        });
    }
    Ok(message)
}

/// `message` when its exchange can be published to: an exchange a template
/// rendered is declared (or checked) the first time; one that cannot be used is
/// that row's failure, as the relay makes it.
async fn usable_exchange(
    config: &Config,
    broker: &amqp::Broker,
    ensured: &mut HashSet<ShortString>,
    message: sink::OutboundMessage,
) -> Result<Result<sink::OutboundMessage, Failure>, Error> {
    let sink::format::Destination::Rendered(name) = &message.destination else {
        return Ok(Ok(message));
    };
    if ensured.contains(name) {
        return Ok(Ok(message));
    }
    match amqp::ensure_exchange(
        &broker.connection,
        "amqp.exchange",
        name.as_str(),
        config.amqp.declare_exchange,
    )
    .await
    {
        Ok(()) => {
            ensured.insert(name.clone());
            Ok(Ok(message))
        }
        Err(Error::ExchangeUnusable { hint, source, .. }) => match source.kind() {
            // The broker closed the declare's channel: that exchange's fault, this row's failure.
            lapin::ErrorKind::ProtocolError(e) => Ok(Err(Failure::Returned {
                reply_code: e.get_id(),
                reply_text: format!(
                    "exchange {:?} cannot be used: {} ({hint})",
                    name.as_str(),
                    e.get_message()
                ),
            })),
            _ => Err(Error::Amqp {
                context: format!("declaring exchange {:?}", name.as_str()),
                source: *source,
            }),
        },
        Err(e) => Err(e),
    }
}
