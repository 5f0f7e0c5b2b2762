//! Every way a slot is lost, each on a scratch Postgres cluster of its own (not
//! the shared server): **dropped** while the relay streams, **invalidated** by
//! `max_slot_wal_keep_size` while it is down, and a **fail-over** to a promoted
//! standby that never had it. Each time the relay refuses to read past the gap
//! with one line that says which, what may be missing and the command that
//! recovers it — and stays up, saying the same in `/readyz` and
//! `outbox_relay_slot_lost{how}`; `check` and `status` agree; `replay --pending`
//! recovers; the waiting relay then streams by itself, and every id arrives.
//!
//! The outbox table is Event-Forge's own (its models' DDL). Serial, under a lock
//! of its own (scripts/test.sh): the clusters take fixed ports 55451-55454.

mod support;

use std::path::PathBuf;
use std::time::Duration;
use support::scratch::ScratchPg;
use support::{http_get, scrape_metric as metric, wait_for, Consumer, Relay, AMQP_URL};
use tokio_postgres::{Client, NoTls};

const T: Duration = Duration::from_secs(60);

/// One test's scratch cluster, Event-Forge tables, exchange, queue and consumer.
struct Lab {
    name: String,
    pg: ScratchPg,
    db: Client,
    dir: PathBuf,
    consumer: Consumer,
}

impl Lab {
    async fn new(name: &str, pg: ScratchPg) -> Lab {
        let db = connect(&pg.url()).await;
        support::event_forge_schema(&db, "ef").await;
        let conn = support::amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let (exchange, queue) = (format!("ex_{name}"), format!("q_{name}"));
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        support::declare_bound_queue(&ch, &exchange, &queue, true).await;
        let _ = conn.close(200, "bye".into()).await;
        let dir = std::env::temp_dir().join("outbox-relay-tests").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Lab {
            name: name.to_string(),
            consumer: Consumer::start(queue),
            pg,
            db,
            dir,
        }
    }

    /// The config for the cluster at `url`.
    fn config(&self, url: &str) -> PathBuf {
        let text = format!(
            "[postgres]\nurl = \"{url}\"\ntable = \"ef.outbox_messages\"\nslot = \"s_{n}\"\n\
             publication = \"p_{n}\"\nreconnect_backoff_max = \"1s\"\nslot_wait = \"20s\"\n\
             [amqp]\nurl = \"{AMQP_URL}\"\nexchange = \"ex_{n}\"\nreconnect_backoff_max = \"1s\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info,outbox_relay=debug\"\n",
            n = self.name
        );
        let path = self.dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn slot(&self) -> String {
        format!("s_{}", self.name)
    }

    /// Inserts `n` rows (one transaction each) the way an Event-Forge service
    /// writes them (every NOT NULL column); returns their ids.
    async fn insert(&self, db: &Client, prefix: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            db.execute(
                "insert into ef.outbox_messages (id, aggregate_type, aggregate_id, event_type, payload, \
                 status, retry_count, max_retries, created_at, updated_at) \
                 values ($1, 'Order', $2, 'order.placed', '{}', 'pending', 0, 3, clock_timestamp(), clock_timestamp())",
                &[&id, &format!("agg-{}", i % 7)],
            )
            .await
            .unwrap();
            ids.push(id);
        }
        ids
    }

    /// A relay streams 20 rows (`{prefix}-0` ..) until they are marked
    /// published, then stops cleanly; returns their ids.
    async fn run_a_while(&self, cfg: &std::path::Path, prefix: &str) -> Vec<String> {
        let mut relay = Relay::spawn(cfg, &self.dir, &[]);
        relay.wait_streaming().await;
        let ids = self.insert(&self.db, prefix, 20).await;
        self.consumer.wait_ids(&ids, T).await;
        wait_for(T, "delivered rows marked published", || async {
            self.db
                .query_one(
                    "select count(*) from ef.outbox_messages where status = 'published'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 20
        })
        .await;
        assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
        ids
    }

    /// Every id arrived exactly once.
    fn assert_each_once(&self, ids: &[String]) {
        let got = self.consumer.all();
        for id in ids {
            assert_eq!(
                got.iter().filter(|r| &r.message_id() == id).count(),
                1,
                "{id} delivered once"
            );
        }
    }

    async fn cleanup(self) {
        self.consumer.stop();
        let conn = support::amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(
                format!("q_{}", self.name).as_str().into(),
                Default::default(),
            )
            .await;
        let _ = ch
            .exchange_delete(
                format!("ex_{}", self.name).as_str().into(),
                Default::default(),
            )
            .await;
        let _ = conn.close(200, "bye".into()).await;
        // The cluster (and with it the slot) goes when `pg` drops.
    }
}

async fn connect(url: &str) -> Client {
    let (db, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    db
}

/// What a relay, `check` and `status` say about a lost slot: `how` is the
/// metric's label, `words` what the line must say.
async fn assert_refused(
    lab: &Lab,
    relay: &mut Relay,
    cfg: &std::path::Path,
    how: &str,
    words: &[&str],
    pending: usize,
) {
    // One line; said again (within the 5 s check) when what it says changes, as
    // the pending rows do while the application writes on.
    let pending_words = format!("{pending} outbox row(s) are still 'pending'");
    let all: Vec<&str> = words
        .iter()
        .copied()
        .chain([
            "replay --pending",
            pending_words.as_str(),
            "ago)",
            "waiting (checking every",
        ])
        .collect();
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = relay.log_text();
        let last = log
            .lines()
            .rfind(|l| l.contains("ERROR") && l.contains(&lab.slot()))
            .map(str::to_string);
        if let Some(line) = &last {
            if all.iter().all(|w| line.contains(w)) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal saying {all:?}; the last: {last:?}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = relay.metrics_addr().await;
    let (code, body) = http_get(&addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(words[0]) && body.contains("replay --pending"),
        "{body}"
    );
    assert_eq!(
        metric(&addr, &format!("outbox_relay_slot_lost{{how=\"{how}\"}}")).await,
        1.0
    );
    let (code, out) = Relay::run_to_end(&["check"], cfg, &lab.dir).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("slot") && l.contains(words[0])),
        "{out}"
    );
    let (code, out) = Relay::run_to_end(&["status", "--json"], cfg, &lab.dir).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(status["slot"]["lost"], how, "{status}");
    assert_eq!(status["outbox_pending"], pending as i64, "{status}");
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay waits, it does not exit"
    );
}

/// `replay --pending`, then the waiting relay streams by itself.
async fn recover(
    lab: &Lab,
    relay: &mut Relay,
    cfg: &std::path::Path,
    gap: &[String],
    words: &[&str],
) {
    let (code, out) = Relay::run_to_end(&["replay", "--pending"], cfg, &lab.dir).await;
    assert_eq!(code, 0, "{out}");
    for w in words.iter().chain(&[
        "created a new slot",
        &format!("re-published {} pending row(s)", gap.len()),
    ]) {
        assert!(out.contains(w), "{w:?} missing: {out}");
    }
    lab.consumer.wait_ids(gap, T).await;
    relay
        .wait_log("the slot can be streamed from again", T)
        .await;
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    wait_for(T, "ready again", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    for how in ["dropped", "invalidated", "failover"] {
        assert_eq!(
            metric(&addr, &format!("outbox_relay_slot_lost{{how=\"{how}\"}}")).await,
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_the_relay_streams_is_refused_and_replay_recovers() {
    let lab = Lab::new("slot_dropped", ScratchPg::plain("slots", 55451, "")).await;
    let cfg = lab.config(&lab.pg.url());
    let mut relay = Relay::spawn(&cfg, &lab.dir, &[]);
    relay.wait_streaming().await;
    let before = lab.insert(&lab.db, "drop-before", 20).await;
    lab.consumer.wait_ids(&before, T).await;
    wait_for(T, "delivered rows marked published", || async {
        lab.db
            .query_one(
                "select count(*) from ef.outbox_messages where status = 'published'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 20
    })
    .await;
    // Dropped under the running relay: its walsender goes, the slot with it.
    for _ in 0..200 {
        lab.db
            .execute(
                "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = $1 and active_pid is not null",
                &[&lab.slot()],
            )
            .await
            .unwrap();
        if lab
            .db
            .execute("select pg_drop_replication_slot($1)", &[&lab.slot()])
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = lab.insert(&lab.db, "drop-gap", 30).await;
    assert_refused(&lab, &mut relay, &cfg, "dropped", &["was dropped"], 30).await;
    // Nothing was created behind the operator's back.
    let slots: i64 = lab
        .db
        .query_one("select count(*) from pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    // A replay in progress (held up here: the rows it marks published are locked)
    // marks itself in the slot record; while it runs the relay keeps waiting,
    // though the new slot exists, so nothing newer of an aggregate overtakes its
    // replayed rows.
    let mut locker = connect(&lab.pg.url()).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("lock table ef.outbox_messages in share mode")
        .await
        .unwrap();
    let mut replay = Relay::command(
        &["replay", "--pending", "--config", cfg.to_str().unwrap()],
        &lab.dir,
        &[],
    );
    // (Its first round, one row per aggregate, is published; marking it waits.)
    wait_for(T, "the replay's first round published", || async {
        lab.consumer
            .ids()
            .iter()
            .any(|id| id.starts_with("drop-gap"))
    })
    .await;
    let addr = relay.metrics_addr().await;
    wait_for(T, "the relay says a replay is running", || async {
        http_get(&addr, "/readyz")
            .await
            .1
            .contains("has not finished")
    })
    .await;
    support::holds_for(
        Duration::from_secs(6),
        "the relay waits for the replay",
        || async {
            !relay
                .log_text()
                .contains("the slot can be streamed from again")
        },
    )
    .await;
    lock.rollback().await.unwrap();
    let status = replay.wait_exit(T).await;
    assert!(status.success(), "{}", replay.log_text());
    assert!(
        replay.log_text().contains("re-published 30 pending row(s)"),
        "{}",
        replay.log_text()
    );
    relay
        .wait_log("the slot can be streamed from again", T)
        .await;
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    wait_for(T, "ready again", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;
    let after = lab.insert(&lab.db, "drop-after", 10).await;
    lab.consumer.wait_ids(&after, T).await;
    assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
    lab.assert_each_once(&[before, gap, after].concat());
    lab.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_refused_and_replay_recreates_it() {
    let pg = ScratchPg::plain(
        "slots",
        55452,
        "max_slot_wal_keep_size = 1MB\nmax_wal_size = 32MB\nmin_wal_size = 32MB",
    );
    let lab = Lab::new("slot_invalid", pg).await;
    let cfg = lab.config(&lab.pg.url());
    let before = lab.run_a_while(&cfg, "inv-before").await;
    // While the relay is down the application writes on, and the server moves
    // more than max_slot_wal_keep_size past the slot: at the checkpoint it
    // invalidates it.
    let gap = lab.insert(&lab.db, "inv-gap", 30).await;
    lab.db
        .batch_execute("create table churn (x text)")
        .await
        .unwrap();
    for _ in 0..3 {
        lab.db
            .batch_execute(
                "insert into churn select repeat('x', 1000) from generate_series(1, 20000); select pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    lab.db.batch_execute("checkpoint").await.unwrap();
    let wal_status: String = lab
        .db
        .query_one(
            "select wal_status from pg_replication_slots where slot_name = $1",
            &[&lab.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_status, "lost", "the server invalidated the slot");
    let mut relay = Relay::spawn(&cfg, &lab.dir, &[]);
    assert_refused(
        &lab,
        &mut relay,
        &cfg,
        "invalidated",
        &["was invalidated", "max_slot_wal_keep_size"],
        30,
    )
    .await;
    recover(
        &lab,
        &mut relay,
        &cfg,
        &gap,
        &["dropped the invalidated slot"],
    )
    .await;
    let after = lab.insert(&lab.db, "inv-after", 10).await;
    lab.consumer.wait_ids(&after, T).await;
    assert!(relay.terminate(T).await.success(), "{}", relay.log_text());
    lab.assert_each_once(&[before, gap, after].concat());
    lab.cleanup().await;
}

/// libpq's multi-host form names both servers; the relay runs across the
/// fail-over without a restart or a config change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_over_to_a_standby_without_the_slot_is_refused_and_replay_recovers() {
    let primary = ScratchPg::plain("slots", 55453, "wal_keep_size = 64MB");
    let lab = Lab::new("slot_failover", primary).await;
    let standby = ScratchPg::standby_of(&lab.pg, "slots-standby", 55454);
    // The relay, `check`, `status` and `replay` use whichever host takes writes
    // (read-write is the default with several hosts): the standby comes first.
    let both = "postgresql://postgres@127.0.0.1:55454,127.0.0.1:55453/postgres";
    let cfg = lab.config(both);
    let (code, out) = Relay::run_to_end(&["check"], &cfg, &lab.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("postgresql://postgres@127.0.0.1:55453/postgres (of postgresql://postgres@127.0.0.1:55454,127.0.0.1:55453/postgres: the host that takes writes now)"),
        "{out}"
    );
    let mut relay = Relay::spawn(&cfg, &lab.dir, &[]);
    relay.wait_streaming().await;
    let (_, out) = Relay::run_to_end(&["check"], &cfg, &lab.dir).await;
    assert!(
        out.contains("PostgreSQL before 17 keeps slots on the primary only"),
        "{out}"
    );
    let before = lab.insert(&lab.db, "fo-before", 20).await;
    lab.consumer.wait_ids(&before, T).await;
    wait_for(T, "delivered rows marked published", || async {
        lab.db
            .query_one(
                "select count(*) from ef.outbox_messages where status = 'published'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 20
    })
    .await;
    // The standby has everything, the slot record included; the primary dies and
    // the standby is promoted (a new timeline, no slot: PostgreSQL 15 keeps slots
    // on the primary only). The application writes on, through the same URL.
    standby.caught_up_with(&lab.pg);
    lab.pg.stop();
    standby.promote();
    let db = connect(&format!("{both}?target_session_attrs=read-write")).await;
    let gap = lab.insert(&db, "fo-gap", 30).await;
    // The same relay process finds the promoted host and refuses to read past
    // the gap; `replay --pending` (same config) recovers; it streams on.
    assert_refused(
        &lab,
        &mut relay,
        &cfg,
        "failover",
        &["failed over", "timeline 2", "promoted"],
        30,
    )
    .await;
    recover(&lab, &mut relay, &cfg, &gap, &[]).await;
    let after = lab.insert(&db, "fo-after", 10).await;
    lab.consumer.wait_ids(&after, T).await;
    let log = relay.log_text();
    assert!(
        log.contains("replication connects to the primary host=127.0.0.1 port=55454"),
        "{log}"
    );
    assert!(relay.terminate(T).await.success(), "{log}");
    lab.assert_each_once(&[before, gap, after].concat());
    drop(standby);
    lab.cleanup().await;
}
