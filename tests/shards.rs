//! Sharded relays: `init --shards 3` splits the outbox into three publications
//! (a row filter on a hash of the aggregate id) and three slots; three relays
//! (`run --shard I`) each publish to an exchange and queue of their own, so the
//! test sees which shard delivered what.

use crate::support::fixture::drop_pg_objects;
use crate::support::{
    assert_in_order, declare_bound_queue, wait_for, write_rows_in_background, Consumer, Fixture,
    Relay,
};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const SHARDS: u32 = 3;

/// The three shards' exchanges and queues, and a consumer on each.
struct Lanes {
    names: Vec<(String, String)>,
    consumers: Vec<Consumer>,
}

impl Lanes {
    async fn new(name: &str) -> Lanes {
        let conn = crate::support::amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut names = Vec::new();
        for i in 0..SHARDS {
            let (exchange, queue) = (format!("ex_{name}_{i}"), format!("q_{name}_{i}"));
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            declare_bound_queue(&ch, &exchange, &queue, true).await;
            names.push((exchange, queue));
        }
        let _ = conn.close(200, "bye".into()).await;
        let consumers = names
            .iter()
            .map(|(_, q)| Consumer::start(q.clone()))
            .collect();
        Lanes { names, consumers }
    }

    fn delivered(&self) -> usize {
        self.consumers.iter().map(|c| c.ids().len()).sum()
    }

    async fn cleanup(self) {
        let conn = crate::support::amqp_connect().await;
        let ch = conn.create_channel().await.unwrap();
        for (c, (exchange, queue)) in self.consumers.iter().zip(&self.names) {
            c.stop();
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            let _ = ch
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Shard `i`'s config file: the fixture's, split in three, its own exchange.
fn shard_config(f: &Fixture, i: u32) -> std::path::PathBuf {
    let exchange = format!("exchange = \"ex_{}_{i}\"", f.name);
    let shards = format!("shards = {SHARDS}");
    let shard = format!("shard = {i}");
    let text = std::fs::read_to_string(f.config(&[
        ("postgres", &shards),
        ("postgres", &shard),
        ("amqp", &exchange),
    ]))
    .unwrap();
    let path = f.dir.join(format!("shard-{i}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn drop_shards(f: &Fixture) {
    for i in 0..SHARDS {
        drop_pg_objects(
            &f.db,
            &format!("{}_{i}", f.slot),
            &format!("{}_{i}", f.publication),
            "public.no_such_table",
        )
        .await;
    }
}

/// Ids whose row shard `i`'s publication carries, as Postgres evaluates its
/// row filter.
async fn ids_of_shard(f: &Fixture, i: u32) -> HashSet<String> {
    let filter = outbox_relay::pg::shards::row_filter("aggregate_id", SHARDS, i);
    f.db.query(&format!("select id from {} where {filter}", f.table), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_deliver_every_row_once_in_order_through_a_kill_9() {
    let f = Fixture::new("shards", false).await;
    drop_shards(&f).await;
    let lanes = Lanes::new(&f.name).await;
    let base = f.dir.join("base.toml");
    std::fs::copy(f.config(&[]), &base).unwrap();
    let (code, out) = Relay::run_to_end(&["init", "--shards", "3"], &base, &f.dir).await;
    assert_eq!(code, 0, "{out}");
    for i in 0..SHARDS {
        assert!(
            out.contains(&format!(
                "publication p_shards_{i} (shard {i} of 3): created"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("slot s_shards_{i} (shard {i} of 3): created")),
            "{out}"
        );
    }
    let configs: Vec<_> = (0..SHARDS).map(|i| shard_config(&f, i)).collect();
    let mut relays: Vec<Relay> = configs
        .iter()
        .map(|c| Relay::spawn(c, &f.dir, &[]))
        .collect();
    for r in &mut relays {
        r.wait_streaming().await;
    }
    // 30 000 rows over 3 000 aggregates, 10 events each, interleaved.
    let rows: Vec<(String, String)> = (0..10)
        .flat_map(|n| (0..3000).map(move |a| (format!("sh{a}-{n}"), format!("sh{a}"))))
        .collect();
    let all: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    let writer = write_rows_in_background(f.table.clone(), rows);
    wait_for(T, "some delivered", || async { lanes.delivered() >= 5000 }).await;
    relays[1].kill9();
    relays[1] = Relay::spawn(&configs[1], &f.dir, &[]);
    relays[1].wait_streaming().await;
    writer.await.unwrap();
    wait_for(Duration::from_secs(180), "every row delivered", || async {
        lanes.delivered() == all.len()
    })
    .await;

    let mut seen_in: HashMap<String, u32> = HashMap::new();
    for (i, consumer) in lanes.consumers.iter().enumerate() {
        let i = i as u32;
        let got = consumer.ids();
        // Exactly the rows its row filter keeps: none of another shard's.
        assert_eq!(got, ids_of_shard(&f, i).await, "shard {i}");
        for id in got {
            assert!(
                seen_in.insert(id.clone(), i).is_none(),
                "{id} in two shards"
            );
        }
        // First deliveries in commit order per aggregate (after the kill the
        // restarted relay publishes again what was not confirmed).
        let received = consumer.all();
        assert_in_order(&received);
        // Only the relay killed mid-stream delivers anything twice.
        if i != 1 {
            assert_eq!(received.len(), consumer.ids().len(), "shard {i} duplicated");
        }
    }
    assert_eq!(seen_in.len(), all.len());

    // `status` and `check` show every shard; another split is refused with the
    // way to re-shard.
    let (code, out) = Relay::run_to_end(&["status", "--json"], &configs[0], &f.dir).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = Relay::run_to_end(&["status"], &base_sharded(&f), &f.dir).await;
    assert_eq!(code, 0, "{out}");
    for i in 0..SHARDS {
        assert!(out.contains(&format!("shard           {i} of 3")), "{out}");
        assert!(out.contains(&format!("s_shards_{i}")), "{out}");
    }
    let (code, out) = Relay::run_to_end(&["check"], &base_sharded(&f), &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("shard 2 of 3: ").count(), 2, "{out}");
    let (code, out) = Relay::run_to_end(&["init", "--shards", "4"], &base, &f.dir).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("postgres.shards = 4, but the outbox public.t_shards is 3 shard(s)")
            && out.contains("stop the writers"),
        "{out}"
    );
    let (code, out) = Relay::run_to_end(&["run"], &base_sharded(&f), &f.dir).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("say which shard this relay is for"), "{out}");

    // Shard 1's slot is lost while the relays are down: its replay re-publishes
    // the pending rows of shard 1 only; the other shards deliver theirs from
    // their slots.
    // The relays that ran throughout mark every row they delivered; the one
    // killed may leave rows it delivered unmarked (their marks died with it,
    // after the slot had moved past them: docs/limits.md), which replay then
    // publishes again.
    let marked = tokio::time::timeout(T, async {
        while pending(&f, 0).await != 0 || pending(&f, 2).await != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if marked.is_err() {
        // What is left, and what the relays said: seen once under heavy load.
        let left: Vec<String> = f
            .db
            .query(
                &format!(
                    "select id || ' ' || aggregate_id || ' ' || updated_at::text from {} where status = 'pending'",
                    f.table
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        panic!(
            "shards 0 and 2 did not mark every row published within {T:?}; pending: {left:?}\nrelay 0:\n{}\nrelay 2:\n{}",
            relays[0].log_text(),
            relays[2].log_text()
        );
    }
    for r in &mut relays {
        assert!(r.terminate(T).await.success(), "{}", r.log_text());
    }
    let late: Vec<(String, String)> = (0..300)
        .map(|a| (format!("shl{a}-0"), format!("shl{a}")))
        .collect();
    let late_ids: Vec<String> = late.iter().map(|(id, _)| id.clone()).collect();
    write_rows_in_background(f.table.clone(), late)
        .await
        .unwrap();
    f.db.execute("select pg_drop_replication_slot('s_shards_1')", &[])
        .await
        .unwrap();
    let shard_one = ids_of_shard(&f, 1).await;
    let late_of_one = late_ids.iter().filter(|id| shard_one.contains(*id)).count();
    assert!(
        late_of_one > 50 && late_of_one < 250,
        "{late_of_one} of 300 hash to shard 1"
    );
    let of_one = pending(&f, 1).await as usize;
    assert!(of_one >= late_of_one, "{of_one} pending in shard 1");
    eprintln!(
        "shard 1: {} delivered row(s) left pending by the kill",
        of_one - late_of_one
    );
    // `status` of shard 1 counts its own pending rows only.
    let (code, out) = Relay::run_to_end(&["status", "--json"], &configs[1], &f.dir).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(status["slot"]["lost"], "dropped", "{status}");
    assert_eq!(status["outbox_pending"], of_one as i64, "{status}");
    let (code, out) = Relay::run_to_end(&["replay", "--pending"], &configs[1], &f.dir).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("re-published {of_one} pending row(s)")),
        "{of_one} of shard 1: {out}"
    );
    for (i, c) in configs.iter().enumerate() {
        relays[i] = Relay::spawn(c, &f.dir, &[]);
    }
    wait_for(T, "the late rows delivered", || async {
        lanes.delivered() == all.len() + late_ids.len()
    })
    .await;
    for (i, consumer) in lanes.consumers.iter().enumerate() {
        let got: HashSet<String> = consumer
            .ids()
            .into_iter()
            .filter(|id| id.starts_with("shl"))
            .collect();
        let want: HashSet<String> = ids_of_shard(&f, i as u32)
            .await
            .into_iter()
            .filter(|id| id.starts_with("shl"))
            .collect();
        assert_eq!(got, want, "shard {i}'s late rows");
        let late_deliveries = consumer
            .all()
            .iter()
            .filter(|r| r.message_id().starts_with("shl"))
            .count();
        assert_eq!(late_deliveries, want.len(), "shard {i}: each late row once");
    }

    for r in &mut relays {
        assert!(r.terminate(T).await.success(), "{}", r.log_text());
    }
    lanes.cleanup().await;
    drop_shards(&f).await;
    f.cleanup().await;
}

/// Outbox rows of shard `i` still `pending`.
async fn pending(f: &Fixture, i: u32) -> i64 {
    let filter = outbox_relay::pg::shards::row_filter("aggregate_id", SHARDS, i);
    f.db.query_one(
        &format!(
            "select count(*) from {} where status = 'pending' and {filter}",
            f.table
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The fixture's config split in three, no shard named.
fn base_sharded(f: &Fixture) -> std::path::PathBuf {
    let text = std::fs::read_to_string(f.config(&[("postgres", "shards = 3")])).unwrap();
    let path = f.dir.join("sharded.toml");
    std::fs::write(&path, text).unwrap();
    path
}
