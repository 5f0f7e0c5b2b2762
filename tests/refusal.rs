//! Bad input gets one clear line and a non-zero exit; secrets never show.

use crate::support::{Fixture, Relay, AMQP_URL, PG_URL};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Runs `outbox-relay <cmd> --config <file with text>` to completion.
async fn run_with(name: &str, cmd: &str, text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = std::env::temp_dir().join("outbox-relay-tests").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let mut relay = Relay::command(&[cmd, "--config", path.to_str().unwrap()], &dir, env);
    let status = relay.wait_exit(T).await;
    (status.code().unwrap_or(-1), relay.log_text())
}

fn base(name: &str) -> String {
    format!(
        "[postgres]\nurl = \"{PG_URL}\"\ntable = \"public.t_{name}\"\nslot = \"s_{name}\"\npublication = \"p_{name}\"\nretry_table = \"public.r_{name}\"\nslot_wait = \"1s\"\n\
         [amqp]\nurl = \"{AMQP_URL}\"\nexchange = \"ex_{name}\"\n[metrics]\nlisten = \"\"\n"
    )
}

#[tokio::test]
async fn malformed_toml_and_unknown_keys_are_named() {
    let (code, out) = run_with("bad_toml", "run", "[postgres\nurl = 1", &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is not valid"), "{out}");
    // A syntax error on the line that holds the password: the line is not echoed.
    let (code, out) = run_with(
        "bad_toml_secret",
        "run",
        "[postgres]\nurl = \"postgresql://relay:hunter2-secret@db/app\" trailing\n",
        &[],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 2"), "{out}");
    assert!(
        !out.contains("hunter2-secret"),
        "the password leaked: {out}"
    );
    let (code, out) = run_with("unknown_key", "run", "[postgres]\nslott = \"x\"\n", &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("slott"), "{out}");
    let (code, out) = run_with(
        "unknown_env",
        "run",
        "",
        &[("OUTBOX_RELAY_AMQP_EXCHANGEE", "x")],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("exchangee"), "{out}");
    let (code, out) = run_with("bad_value", "run", "[amqp]\nmax_in_flight = 0\n", &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("amqp.max_in_flight"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
}

#[tokio::test]
async fn unreachable_services_are_named_without_password() {
    let text = "[postgres]\nurl = \"postgresql://postgres:hunter2@127.0.0.1:1/test\"\n[metrics]\nlisten = \"\"\n";
    let (code, out) = run_with("pg_down", "run", text, &[]).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("cannot connect to Postgres at postgresql://postgres@127.0.0.1:1/test"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "password leaked: {out}");

    // The environment overrides the file.
    let (code, out) = run_with(
        "pg_down_env",
        "run",
        &base("pg_down_env"),
        &[(
            "OUTBOX_RELAY_POSTGRES_URL",
            "postgresql://postgres:hunter2@127.0.0.1:2/test",
        )],
    )
    .await;
    assert_ne!(code, 0);
    assert!(out.contains("127.0.0.1:2/test"), "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");

    let f = Fixture::new("amqp_down", false).await;
    let text = format!(
        "{}[amqp]\nurl = \"amqp://guest:hunter2@127.0.0.1:1/%2f\"\n[metrics]\nlisten = \"\"\n",
        base("amqp_down").split("[amqp]").next().unwrap()
    );
    let (code, out) = run_with("amqp_down", "run", &text, &[]).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("cannot connect to RabbitMQ at amqp://guest@127.0.0.1:1/%2f"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "password leaked: {out}");
    f.cleanup().await;
}

#[tokio::test]
async fn a_broker_that_accepts_but_never_answers_is_given_up_on() {
    // A listener that takes the TCP connection and says nothing (a broker still booting).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let (conn, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(20));
        drop(conn);
    });
    let f = Fixture::new("amqp_silent", false).await;
    let text = format!(
        "{}[amqp]\nurl = \"amqp://guest:hunter2@127.0.0.1:{port}/%2f\"\nconnect_timeout = \"1s\"\n[metrics]\nlisten = \"\"\n",
        base("amqp_silent").split("[amqp]").next().unwrap()
    );
    let started = std::time::Instant::now();
    let (code, out) = run_with("amqp_silent", "run", &text, &[]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited for the silent broker: {out}"
    );
    assert!(out.contains("amqp.connect_timeout"), "{out}");
    assert!(out.contains(&format!("127.0.0.1:{port}")), "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");
    f.cleanup().await;
    drop(held);
}

#[tokio::test]
async fn missing_table_and_columns() {
    let f = Fixture::bare("no_table").await;
    let (code, out) = run_with("no_table", "run", &base("no_table"), &[]).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("outbox table public.t_no_table does not exist") && out.contains("init"),
        "{out}"
    );
    f.db.batch_execute("create table public.t_no_table (id text primary key, payload json)")
        .await
        .unwrap();
    let (code, out) = run_with("no_table", "run", &base("no_table"), &[]).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("lacks required column(s) aggregate_type, aggregate_id, event_type"),
        "{out}"
    );
    // check says the same, one line per check, non-zero.
    let (code, out) = run_with("no_table", "check", &base("no_table"), &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("aggregate_type")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("wal_level")),
        "{out}"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn init_creates_what_is_missing_and_check_passes() {
    let f = Fixture::bare("init_check").await;
    let (code, out) = run_with("init_check", "init", &base("init_check"), &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("table public.t_init_check: created"), "{out}");
    assert!(out.contains("publication p_init_check: created"), "{out}");
    assert!(out.contains("slot s_init_check: created"), "{out}");
    let (code, out) = run_with("init_check", "init", &base("init_check"), &[]).await;
    assert_eq!(code, 0, "init twice: {out}");
    assert!(out.contains("table public.t_init_check: exists"), "{out}");
    let (code, out) = run_with("init_check", "check", &base("init_check"), &[]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        9,
        "{out}"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn check_names_each_missing_privilege_with_the_grant_that_fixes_it() {
    let f = Fixture::bare("privs").await;
    let role = "role_privs";
    let reset = format!(
        "do $$ begin if exists (select from pg_roles where rolname = '{role}') then \
         execute 'drop owned by {role}'; execute 'drop role {role}'; end if; end $$"
    );
    f.db.batch_execute(&reset).await.unwrap();
    let (code, out) = run_with("privs", "init", &base("privs"), &[]).await;
    assert_eq!(code, 0, "{out}");
    f.db.batch_execute(&format!("create role {role} login replication"))
        .await
        .unwrap();
    let as_role = base("privs").replace("postgres@", &format!("{role}@"));
    let (code, out) = run_with("privs", "check", &as_role, &[]).await;
    assert_ne!(code, 0, "{out}");
    let lacking: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("FAIL") && l.contains("privileges"))
        .collect();
    // The defaults (Event-Forge table, mark_published): SELECT, UPDATE and DELETE on
    // the outbox, all four on the retry table and its sequence, three on the records.
    for what in [
        "lacks SELECT on public.t_privs",
        "lacks UPDATE on public.t_privs",
        "lacks DELETE on public.t_privs",
        "lacks INSERT on public.r_privs",
        "lacks DELETE on public.r_privs",
        "lacks USAGE on sequence public.r_privs_seq_seq",
        "lacks UPDATE on public.outbox_relay_slots",
    ] {
        assert!(lacking.iter().any(|l| l.contains(what)), "{what}: {out}");
    }
    assert_eq!(lacking.len(), 11, "{out}");
    // The fix each line gives works: run them all, and the role lacks nothing.
    for line in &lacking {
        let grant = line.split_once("fix: ").expect("a fix").1;
        assert!(grant.starts_with("GRANT "), "{line}");
        f.db.batch_execute(grant).await.unwrap();
    }
    let (_, out) = run_with("privs", "check", &as_role, &[]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("holds every table privilege")),
        "{out}"
    );
    assert!(!out.contains("lacks"), "{out}");
    f.db.batch_execute(&reset).await.unwrap();
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_process_names_its_pid() {
    let f = Fixture::new("slot_busy", true).await;
    let mut first = f.spawn(&[]);
    first.wait_streaming().await;
    let pid = f
        .slot_active_pid()
        .await
        .expect("slot held by the first relay");
    let (code, out) = run_with(
        "slot_busy_second",
        "run",
        &std::fs::read_to_string(f.config(&[("postgres", "slot_wait = \"1s\"")])).unwrap(),
        &[],
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        out.contains(&format!("held by another process (pid {pid})")),
        "{out}"
    );
    assert!(first.terminate(T).await.success());
    f.cleanup().await;
}

#[tokio::test]
async fn wal_level_not_logical_is_refused_with_the_fix() {
    // A scratch cluster with wal_level = replica (the last setting wins), so the
    // shared server is never restarted for this test.
    let _cluster =
        crate::support::scratch::ScratchPg::plain("refusal", 54391, "wal_level = replica");
    let text = "[postgres]\nurl = \"postgresql://postgres@127.0.0.1:54391/postgres\"\n[metrics]\nlisten = \"\"\n";
    let (code, out) = run_with("wal_level", "run", text, &[]).await;
    assert_ne!(code, 0);
    assert!(
        out.contains("wal_level is 'replica'")
            && out.contains("ALTER SYSTEM SET wal_level = logical"),
        "{out}"
    );
    let (code, out) = run_with("wal_level", "check", text, &[]).await;
    assert_eq!(code, 1);
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("wal_level")),
        "{out}"
    );
}
