//! The set-up lock: relays (and `init`) that start at the same moment on a
//! fresh database would each find the publication, the slot or the slot record
//! table missing and each create it; all but one would then fail with
//! "already exists" (an active relay and its standby deployed together). Under
//! one advisory lock per database the second one waits for the first and finds
//! everything made.

use super::query_err;
use crate::error::Error;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::Client;

/// The advisory lock's key: the same for every relay in the database.
const KEY: &str = "hashtextextended('outbox-relay set-up', 0)";
/// How often a relay asks for the lock while another process holds it.
const ASK_EVERY: Duration = Duration::from_millis(100);
/// After this long waiting, the log says who holds the lock; then again
/// every [`SAY_AGAIN`] (creating a slot waits for every transaction running
/// when it started, so a long one holds every relay's start behind it: there
/// is no bound, the log keeps saying why).
const SAY_AFTER: Duration = Duration::from_secs(5);
const SAY_AGAIN: Duration = Duration::from_secs(60);

/// Runs `work` (which uses `client`) while holding the set-up lock on
/// `client`'s session; the lock is released afterwards, also when `work`
/// fails (and by Postgres when the session ends).
pub async fn locked<T>(
    client: &Client,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let started = Instant::now();
    let mut say_at = started + SAY_AFTER;
    loop {
        let row = client
            .query_one(&format!("select pg_try_advisory_lock({KEY})"), &[])
            .await
            .map_err(query_err("taking the set-up lock"))?;
        if row.try_get::<_, bool>(0).unwrap_or(false) {
            break;
        }
        if Instant::now() >= say_at {
            say_at = Instant::now() + SAY_AGAIN;
            let holder = holder(client).await;
            tracing::warn!(
                holder = ?holder,
                waited = ?started.elapsed(),
                "waiting for another process (pid {}) to finish creating the publication and slot (the set-up lock): if it is stuck, look at what it waits for in pg_stat_activity",
                holder.map_or_else(|| "unknown".to_string(), |p| p.to_string())
            );
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
    let result = work.await;
    if let Err(e) = client
        .batch_execute(&format!("select pg_advisory_unlock({KEY})"))
        .await
    {
        tracing::debug!(error = %e, "releasing the set-up lock (the session ends it anyway)");
    }
    result
}

/// The backend holding the set-up lock, when it can be seen.
async fn holder(client: &Client) -> Option<i32> {
    client
        .query_opt(
            &format!(
                "select pid from pg_locks where locktype = 'advisory' and granted \
                 and objsubid = 1 and (classid::bigint << 32 | objid::bigint) = {KEY} \
                 and database = (select oid from pg_database where datname = current_database()) limit 1"
            ),
            &[],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get(0).ok())
}
