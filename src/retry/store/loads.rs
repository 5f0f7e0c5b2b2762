//! The store's reads for the relay: every aggregate's head (a reload, page by
//! page), and pages of an aggregate's queue with their outbox rows read again.

use super::{Next, Store, GIVE_UP_AFTER, HEADS_PAGE};
use crate::event::{MalformedRow, OutboxEvent, RowRead};
use crate::metrics::metrics;
use crate::retry::queries::ParkedRow;
use crate::retry::{Load, Loaded, PageEnd, StoreEvent};
use crate::time::now_micros;
use bytes::Bytes;
use tokio::sync::mpsc;

impl Store {
    /// Reads every aggregate's head, page by page, and hands them to the relay.
    pub(super) async fn reload(&mut self, events: &mpsc::Sender<StoreEvent>) -> bool {
        let mut after: Option<(String, String)> = None;
        let mut attempt = 0;
        loop {
            match self
                .retry
                .heads_page(&mut self.client, after.as_ref(), HEADS_PAGE)
                .await
            {
                Ok(page) => {
                    attempt = 0;
                    let last = page
                        .last()
                        .map(|h| (h.aggregate_type.clone(), h.aggregate_id.clone()));
                    let full = page.len() as i64 == HEADS_PAGE;
                    if !page.is_empty() && events.send(StoreEvent::Heads(page)).await.is_err() {
                        return false;
                    }
                    match (full, last) {
                        (true, Some(last)) => after = Some(last),
                        _ => break,
                    }
                }
                Err(e) => {
                    attempt += 1;
                    // The relay does not read WAL until it has the heads: never give up.
                    self.trouble(
                        "reading the retry queue",
                        &e,
                        attempt.min(GIVE_UP_AFTER - 1),
                    )
                    .await;
                }
            }
        }
        if let Ok(n) = self.retry.count_parked(&self.client).await {
            metrics().retries_pending.set(n);
        }
        self.healthy();
        events.send(StoreEvent::HeadsDone).await.is_ok()
    }

    /// The next due rows of each of these aggregates, with their outbox rows read
    /// again (so a row fixed by an operator goes out fixed; a row that is gone goes
    /// out as parked): two statements for all of them. One answer per load.
    pub(super) async fn load(&mut self, loads: &[Load]) -> Vec<(Vec<Loaded>, PageEnd)> {
        let limit = loads.iter().map(|l| l.max_rows).max().unwrap_or(1).max(1) as i64;
        let requests: Vec<(&str, &str, i64)> = loads
            .iter()
            .map(|l| {
                (
                    l.aggregate_type.as_str(),
                    l.aggregate_id.as_str(),
                    l.after_seq.unwrap_or(0),
                )
            })
            .collect();
        let mut attempt = 0;
        let found = loop {
            match self.retry.pages(&self.client, &requests, limit).await {
                Ok(found) => break found,
                Err(e) => {
                    attempt += 1;
                    if let Next::GiveUp = self.trouble("loading retries", &e, attempt).await {
                        // Not this time: the relay asks again later.
                        let later = PageEnd::Due(now_micros() + 30_000_000);
                        return loads.iter().map(|_| (Vec::new(), later)).collect();
                    }
                }
            }
        };
        let mut pages: Vec<Vec<ParkedRow>> = loads.iter().map(|_| Vec::new()).collect();
        for (i, row) in found {
            if let Some(page) = pages.get_mut(i) {
                page.push(row);
            }
        }
        let now = now_micros();
        let ends: Vec<PageEnd> = loads
            .iter()
            .zip(pages.iter_mut())
            .map(|(load, page)| due_part(page, load.max_rows.max(1), now))
            .collect();
        let ids: Vec<&str> = pages.iter().flatten().map(|r| r.id.as_str()).collect();
        let mut current = if ids.is_empty() {
            Default::default()
        } else {
            let mut attempt = 0;
            loop {
                match self.outbox.reread_many(&self.client, &ids).await {
                    Ok(rows) => break rows,
                    Err(e) => {
                        attempt += 1;
                        if let Next::GiveUp = self
                            .trouble("re-reading outbox rows for retries", &e, attempt)
                            .await
                        {
                            tracing::warn!(error = %e, "cannot re-read the outbox rows; retrying them as they were parked");
                            break Default::default();
                        }
                    }
                }
            }
        };
        let mut out = Vec::with_capacity(loads.len());
        for ((load, page), mut end) in loads.iter().zip(pages).zip(ends) {
            let mut rows = Vec::with_capacity(page.len());
            let mut bytes = 0usize;
            let count = page.len();
            for (i, row) in page.into_iter().enumerate() {
                let event = current
                    .remove(&row.id)
                    .unwrap_or_else(|| parked_copy(&row, &load.aggregate_type, &load.aggregate_id));
                let max_retries = match &event {
                    Ok(e) if self.outbox.has_max_retries() => {
                        e.max_retries.unwrap_or(row.max_retries)
                    }
                    _ => row.max_retries,
                };
                let loaded = Loaded {
                    parked_seq: row.seq,
                    event,
                    commit_time: row.commit_time,
                    attempts: row.attempts,
                    max_retries,
                    last_error: row.error_message,
                };
                bytes += loaded.weight();
                rows.push(loaded);
                if bytes >= load.max_bytes && i + 1 < count {
                    end = PageEnd::More;
                    break;
                }
            }
            out.push((rows, end));
        }
        self.healthy();
        out
    }
}

/// Cuts `page` to what it may give now — due rows, up to its dead or
/// not-yet-due row, at most `max_rows` — and says where it ended.
fn due_part(page: &mut Vec<ParkedRow>, max_rows: usize, now: i64) -> PageEnd {
    let full = page.len() >= max_rows;
    page.truncate(max_rows);
    let Some(stop) = page.iter().position(|r| r.status == "dead" || r.due > now) else {
        return if full { PageEnd::More } else { PageEnd::Empty };
    };
    let end = if page[stop].status == "dead" {
        PageEnd::Blocked
    } else {
        PageEnd::Due(page[stop].due)
    };
    page.truncate(stop);
    end
}

/// The event as it was parked, for a retry whose outbox row is gone.
fn parked_copy(row: &ParkedRow, aggregate_type: &str, aggregate_id: &str) -> RowRead {
    let event_type = row.event_type.clone().unwrap_or_default();
    match &row.payload {
        Some(p)
            if !event_type.is_empty()
                && serde_json::from_str::<serde::de::IgnoredAny>(p).is_ok() =>
        {
            Ok(OutboxEvent {
                id: row.id.clone(),
                aggregate_type: aggregate_type.to_string(),
                aggregate_id: aggregate_id.to_string(),
                event_type,
                payload: Bytes::from(p.clone()),
                metadata: row.metadata.clone().map(Bytes::from),
                created_at: row.created_at.clone(),
                scheduled_at: None,
                max_retries: None,
                extra: Vec::new(),
            })
        }
        _ => Err(Box::new(MalformedRow {
            id: row.id.clone(),
            reason: "the outbox row is gone and the parked copy is not a valid message".into(),
            aggregate_type: Some(aggregate_type.to_string()),
            aggregate_id: Some(aggregate_id.to_string()),
            event_type: row.event_type.clone(),
            payload: row.payload.clone().map(Bytes::from),
        })),
    }
}
