//! `outbox-relay dead list` and `dead requeue`.

use super::retry_table;
use crate::config::Config;
use crate::error::Error;
use crate::pg::query_err;
use crate::pg::quote_ident;
use crate::retry::housekeeping::Housekeeping;
use crate::retry::queries::DeadMessage;

/// Dead messages of one slot, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct DeadList {
    #[serde(skip)]
    slot: String,
    pub messages: Vec<DeadMessage>,
}

impl std::fmt::Display for DeadList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.messages.is_empty() {
            return writeln!(f, "no dead messages for slot {}", self.slot);
        }
        writeln!(
            f,
            "{:<38} {:<40} {:<24} {:>8}  last error",
            "id", "aggregate", "event type", "attempts"
        )?;
        for d in &self.messages {
            writeln!(
                f,
                "{:<38} {:<40} {:<24} {:>8}  {}",
                d.id,
                format!("{}/{}", d.aggregate_type, d.aggregate_id),
                d.event_type.as_deref().unwrap_or_default(),
                d.attempts,
                d.last_error.as_deref().unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// Dead messages of this relay's slot, oldest first.
pub async fn dead_list(config: &Config) -> Result<DeadList, Error> {
    let retry = retry_table(config);
    let sql = config.postgres.target.connect().await?;
    let messages = if retry.exists(&sql).await? {
        retry.dead(&sql).await?
    } else {
        Vec::new()
    };
    Ok(DeadList {
        slot: config.postgres.slot.clone(),
        messages,
    })
}

/// Gives dead messages (`ids`, or all with `None`) a fresh retry budget and wakes the
/// running relay. Returns the ids requeued; unknown ids are an error naming them.
pub async fn dead_requeue(config: &Config, ids: Option<&[String]>) -> Result<Vec<String>, Error> {
    let pg = &config.postgres;
    let retry = retry_table(config);
    let mut sql = pg.target.connect().await?;
    if !retry.exists(&sql).await? {
        return Err(Error::Requeue(format!(
            "retry table {} does not exist: nothing is dead",
            retry.name()
        )));
    }
    let outbox = Housekeeping::learn(
        &sql,
        pg.table.clone(),
        &pg.columns,
        pg.on_success,
        pg.retention,
    )
    .await?;
    let tx = sql
        .transaction()
        .await
        .map_err(query_err("starting the requeue"))?;
    let requeued = retry.requeue(&tx, ids).await?;
    let wanted = ids.unwrap_or_default();
    let unknown: Vec<&str> = wanted
        .iter()
        .filter(|id| !requeued.contains(id))
        .map(|s| s.as_str())
        .collect();
    if !unknown.is_empty() {
        tx.rollback().await.ok();
        return Err(Error::Requeue(format!(
            "not dead in slot {}: {} (see `outbox-relay dead list`)",
            pg.slot,
            unknown.join(", ")
        )));
    }
    outbox.mirror_requeued(&tx, &requeued).await?;
    tx.batch_execute(&format!(
        "notify {}",
        quote_ident(&crate::retry::requeue_channel(&pg.slot))
    ))
    .await
    .map_err(query_err("notifying the relay"))?;
    tx.commit()
        .await
        .map_err(query_err("committing the requeue"))?;
    Ok(requeued)
}
