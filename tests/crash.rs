//! kill -9 of the relay: nothing lost, and the replay stays small.

use crate::support::{ids, wait_for, Fixture};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let f = Fixture::new("kill9", true).await;
    let cfg = f.config(&[]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let all = ids("k9", 12_000);
    let writer = {
        let rows: Vec<(String, String, String)> = all
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id.clone(),
                    format!("agg-{}", i % 300),
                    "streamed".to_string(),
                )
            })
            .collect();
        let table = f.table.clone();
        tokio::spawn(async move {
            let db = crate::support::pg().await;
            for chunk in rows.chunks(10) {
                let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
                for (i, (id, agg, ev)) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("('{id}', 'Order', '{agg}', '{ev}', '{{}}')"));
                }
                db.batch_execute(&sql).await.unwrap();
            }
        })
    };
    wait_for(T, "a few thousand delivered", || async {
        f.consumer().ids().len() >= 3000
    })
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    writer.await.unwrap();
    f.consumer().wait_ids(&all, Duration::from_secs(180)).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_lsn_is_reported_within_about_a_second() {
    let f = Fixture::new("replay_small", true).await;
    // The default status interval (100 ms).
    let cfg = f.config(&[]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let first = f.insert_each("first", 200).await;
    let end = f.current_lsn().await;
    f.consumer().wait_ids(&first, T).await;
    // The worker's default status interval is 10 s; the relay reports well within a second.
    wait_for(
        Duration::from_secs(2),
        "applied LSN reported to the server",
        || async { f.confirmed_lsn().await >= end },
    )
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let second = f.insert_each("second", 10).await;
    f.consumer().wait_ids(&second, T).await;
    let total = f.consumer().all().len();
    assert_eq!(
        total, 210,
        "kill -9 after the report: nothing replayed twice"
    );
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_parking_and_during_recovery_loses_nothing() {
    let f = Fixture::new("k9_recovery", false).await;
    f.bind("Order.ok").await;
    let cfg = f.config(&[
        ("retry", "backoff_base = \"100ms\""),
        ("retry", "backoff_max = \"500ms\""),
    ]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    // 6 000 rows over 60 aggregates in 10-row transactions; every message of the
    // first 30 aggregates is unroutable (Order.late has no binding yet), so they are
    // all parked, in commit order, behind their first one.
    let rows: Vec<(String, String, String)> = (0..6000)
        .map(|i| {
            let agg = i % 60;
            let ev = if agg < 30 { "late" } else { "ok" };
            (format!("a{agg}-{i}"), format!("a{agg}"), ev.to_string())
        })
        .collect();
    let late = rows.iter().filter(|r| r.2 == "late").count();
    let writer = {
        let table = f.table.clone();
        let rows = rows.clone();
        tokio::spawn(async move {
            let db = crate::support::pg().await;
            for chunk in rows.chunks(10) {
                let mut sql = format!("insert into {table} (id, aggregate_type, aggregate_id, event_type, payload) values ");
                for (i, (id, agg, ev)) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("('{id}', 'Order', '{agg}', '{ev}', '{{}}')"));
                }
                db.batch_execute(&sql).await.unwrap();
            }
        })
    };
    wait_for(T, "parking under way", || async {
        f.parked().await.len() >= 500
    })
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    writer.await.unwrap();
    let end = f.current_lsn().await;
    f.wait_slot_past(end, "every row delivered or parked").await;
    wait_for(T, "every unroutable message parked", || async {
        f.parked().await.len() >= late
    })
    .await;
    f.bind("Order.late").await;
    wait_for(T, "recovery under way", || async {
        f.consumer()
            .ids()
            .iter()
            .filter(|id| id[1..].split('-').next().unwrap().parse::<usize>().unwrap() < 30)
            .count()
            >= 500
    })
    .await;
    relay.kill9();
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    f.consumer().wait_ids(&all, Duration::from_secs(180)).await;
    f.wait_retry_drained().await;
    // First deliveries in commit order per aggregate (a kill -9 may repeat what
    // was delivered but not yet recorded; consumers deduplicate by message_id).
    crate::support::assert_in_order(&f.consumer().all());
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// A relay killed (-9) after the broker confirmed rows but before it marked
/// them published: the slot was not confirmed past them, so the next relay
/// reads them again, publishes them again and marks them. No row is left
/// `pending` for a message that was delivered. (The marks are held back by a
/// trigger that sleeps, so the kill always comes first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_delivered_but_not_marked_at_kill_9_are_marked_by_the_next_relay() {
    unmarked_rows_survive_kill_9("kill9_marks", false).await;
}

/// The same with the replication stream lost and resumed in between (its
/// walsender terminated): the resumed stream tells the server only what the
/// relay had reported, not the position it resumes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_not_marked_when_the_stream_resumes_are_marked_after_kill_9() {
    unmarked_rows_survive_kill_9("kill9_marks_resume", true).await;
}

async fn unmarked_rows_survive_kill_9(name: &str, resume_first: bool) {
    let f = Fixture::new(name, true).await;
    let held = HeldUpdates::install(&f, None).await;
    let cfg = f.config(&[]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let all = ids("k9m", 20);
    let rows: Vec<(String, String, String)> = all
        .iter()
        .map(|id| (id.clone(), "agg-1".to_string(), "marked".to_string()))
        .collect();
    f.insert_batch(&rows).await;
    f.consumer().wait_ids(&all, T).await;
    // Well past the status interval: a relay that confirmed on the broker's
    // word alone would have moved the slot past the rows by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if resume_first {
        f.db.batch_execute(&format!(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = '{}'",
            f.slot
        ))
        .await
        .unwrap();
        relay.wait_log("replication stream resumed", T).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    relay.kill9();
    held.release(&f).await;
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    wait_published(&f, &all).await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// A trigger on the fixture's outbox table that holds its updates (those
/// `when` lets in) in a sleep of an hour, so a relay can be killed while its
/// marks wait.
struct HeldUpdates {
    func: String,
}

impl HeldUpdates {
    async fn install(f: &Fixture, when: Option<&str>) -> HeldUpdates {
        let t = &f.table;
        let func = format!("{}_hold_updates", t.replace('.', "_"));
        let when = when.map(|w| format!("when ({w}) ")).unwrap_or_default();
        f.db.batch_execute(&format!(
            "create or replace function {func}() returns trigger language plpgsql as \
             $$ begin perform pg_sleep(3600); return new; end $$; \
             create trigger hold_updates before update on {t} for each row {when}execute function {func}();"
        ))
        .await
        .unwrap();
        HeldUpdates { func }
    }

    /// After the relay was killed: ends its sessions (their marks still sleep
    /// in the trigger), then lets updates through.
    async fn release(self, f: &Fixture) {
        f.db.batch_execute(&format!(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name like 'outbox-relay % {slot}'; \
             drop trigger hold_updates on {t}; drop function {func}();",
            slot = f.slot,
            t = f.table,
            func = self.func
        ))
        .await
        .unwrap();
    }
}

/// Waits until every row of `ids` is `published`.
async fn wait_published(f: &Fixture, ids: &[String]) {
    wait_for(T, "every delivered row marked published", || async {
        f.db.query_one(
            &format!(
                "select count(*) from {} where id = any($1) and status = 'published'",
                f.table
            ),
            &[&ids],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == ids.len() as i64
    })
    .await;
}

/// A parked message delivered by a retry: its retry row is removed and its
/// outbox row marked `published` in one transaction. Here the mark is held (a
/// trigger sleeps on the update to `published`) and the relay killed -9
/// meanwhile: the retry row is still there, so the next relay delivers the
/// message again and marks it. Removed first and marked later (by the
/// housekeeping task), the rows stayed `failed` (as their park showed them)
/// for good: their retry rows were gone and the slot long past them. One
/// aggregate, so every retry comes from one page loaded before the store
/// blocks in the trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_delivered_but_not_marked_at_kill_9_is_marked_by_the_next_relay() {
    let f = Fixture::new("kill9_retry_marks", false).await;
    let held = HeldUpdates::install(&f, Some("new.status = 'published'")).await;
    let cfg = f.config(&[
        ("retry", "backoff_base = \"100ms\""),
        ("retry", "backoff_max = \"500ms\""),
        // The held mark must not time out (and go to housekeeping) before the kill.
        ("postgres", "statement_timeout = \"10min\""),
    ]);
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    let all = ids("k9r", 10);
    let rows: Vec<(String, String, String)> = all
        .iter()
        .map(|id| (id.clone(), "agg-1".to_string(), "late".to_string()))
        .collect();
    f.insert_batch(&rows).await;
    let end = f.current_lsn().await;
    f.wait_slot_past(end, "every row parked").await;
    wait_for(T, "every unroutable message parked", || async {
        f.parked().await.len() == all.len()
    })
    .await;
    f.bind("Order.late").await;
    f.consumer().wait_ids(&all, T).await;
    // The marks now sleep in the trigger; give the relay time to have done
    // whatever it does before marking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.kill9();
    held.release(&f).await;
    let mut relay = crate::support::Relay::spawn(&cfg, &f.dir, &[]);
    relay.wait_streaming().await;
    wait_published(&f, &all).await;
    f.wait_retry_drained().await;
    assert!(relay.terminate(T).await.success());
    f.cleanup().await;
}

/// Logical decoding hands a transaction out once its commit record is
/// flushed, a moment before other sessions see its rows: the relay can have
/// the broker's ack while its row is still invisible to the marking session
/// (found by the soak: one row in ~170 000 left `pending` after being
/// delivered). Here the row stays invisible for 30 ms (its transaction is
/// still open when the mark runs): the mark asks again and marks it; without
/// asking again it stayed `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_not_visible_yet_when_it_is_marked_is_marked_when_it_becomes_visible() {
    use outbox_relay::config::{ColumnMapping, OnSuccess};
    use outbox_relay::outbox_table::OutboxTable;
    let f = Fixture::new("mark_invisible", false).await;
    let table = outbox_relay::pg::TableName::parse(&f.table).unwrap();
    let marker = crate::support::pg().await;
    let outbox = OutboxTable::learn(&marker, table, &ColumnMapping::event_forge())
        .await
        .unwrap();
    f.insert_batch(&[("seen-1".into(), "agg-1".into(), "e".into())])
        .await;
    let writer = crate::support::pg().await;
    writer
        .batch_execute(&format!(
            "begin; insert into {} (id, aggregate_type, aggregate_id, event_type, payload) values ('late-1', 'Order', 'agg-1', 'e', '{{}}')",
            f.table
        ))
        .await
        .unwrap();
    let commit = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        writer.batch_execute("commit").await.unwrap();
        writer
    });
    outbox
        .on_success(
            &marker,
            OnSuccess::MarkPublished,
            &["seen-1".to_string(), "late-1".to_string()],
        )
        .await
        .unwrap();
    drop(commit.await.unwrap());
    for id in ["seen-1", "late-1"] {
        let (status, _, _) = f.row_state(id).await;
        assert_eq!(status, "published", "{id}");
    }
    f.cleanup().await;
}

/// A delivered retry is marked `published` by the retry store itself, while
/// the status update of its earlier failed attempt may still be on its way
/// through the housekeeping task: applied late, it must not show the row as
/// failing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_failure_update_does_not_unpublish_a_row() {
    use outbox_relay::config::{ColumnMapping, OnSuccess};
    use outbox_relay::outbox_table::{MirrorUpdate, OutboxTable};
    let f = Fixture::new("mirror_late", false).await;
    let table = outbox_relay::pg::TableName::parse(&f.table).unwrap();
    let db = crate::support::pg().await;
    let outbox = OutboxTable::learn(&db, table, &ColumnMapping::event_forge())
        .await
        .unwrap();
    f.insert_batch(&[
        ("done-1".into(), "agg-1".into(), "e".into()),
        ("open-1".into(), "agg-2".into(), "e".into()),
    ])
    .await;
    outbox
        .on_success(&db, OnSuccess::MarkPublished, &["done-1".to_string()])
        .await
        .unwrap();
    let late = |id: &str| MirrorUpdate {
        id: id.to_string(),
        status: "failed",
        reason: "no route".to_string(),
        delay: Some(Duration::from_secs(1)),
    };
    outbox
        .mirror(&db, &[late("done-1"), late("open-1")])
        .await
        .unwrap();
    assert_eq!(f.row_state("done-1").await.0, "published");
    assert_eq!(
        f.row_state("open-1").await,
        ("failed".to_string(), 1, Some("no route".to_string()))
    );
    f.cleanup().await;
}
