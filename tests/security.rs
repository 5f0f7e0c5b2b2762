//! Security tests that really encrypt: a CA, server and client certificates
//! made here, a scratch Postgres cluster with `ssl = on` and a scratch RabbitMQ
//! node with only a TLS listener, each on ports of its own, so the shared
//! services stay untouched (no lock needed). Both are killed on drop, also when
//! a test panics.

mod support;

use outbox_relay::pg::PgTarget;
use outbox_relay::source::{self, SourceSettings};
use std::path::Path;
use std::time::Duration;
use support::scratch::{sh_pg, ScratchPg, ScratchRabbit};
use support::tls::{tls_pg, tls_rabbit, Certs, MQ_MARKER, PG_MARKER};
use support::{http_get, Relay};

const T: Duration = Duration::from_secs(60);

/// Sets `ssl` and the server certificate, then reloads.
fn reconfigure(pg: &ScratchPg, ssl: bool, cert: &str) {
    pg.psql(&format!(
        "alter system set ssl = {}",
        if ssl { "on" } else { "off" }
    ));
    pg.psql(&format!("alter system set ssl_cert_file = '{cert}.pem'"));
    pg.psql(&format!("alter system set ssl_key_file = '{cert}.key'"));
    pg.psql("select pg_reload_conf()");
    // The postmaster applies the reload asynchronously: wait for the new setting.
    let want = if ssl { "on" } else { "off" };
    for _ in 0..100 {
        if pg.psql("show ssl").trim() == want
            && pg.psql("show ssl_cert_file").trim() == format!("{cert}.pem")
        {
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("postgres did not reload its ssl settings");
}

fn rabbit_url(rabbit: &ScratchRabbit) -> String {
    format!("amqps://sec_user:{MQ_MARKER}@localhost:{}/%2f", rabbit.port)
}

fn ca_tls(certs: &Certs) -> lapin::tcp::OwnedTLSConfig {
    lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(std::fs::read_to_string(certs.path("ca.pem")).unwrap()),
    }
}

async fn amqps(rabbit: &ScratchRabbit, certs: &Certs) -> Result<lapin::Connection, lapin::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    lapin::Connection::connect_with_config(
        &rabbit_url(rabbit),
        lapin::ConnectionProperties::default(),
        ca_tls(certs),
        lapin::runtime::default_runtime().unwrap(),
    )
    .await
}

async fn wait_rabbit(rabbit: &ScratchRabbit, certs: &Certs) -> lapin::Connection {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match amqps(rabbit, certs).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!(
                "scratch rabbitmq did not come up: {e}\n{}",
                std::fs::read_to_string(rabbit.dir.join("out.log")).unwrap_or_default()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn pg_url(pg: &ScratchPg, host: &str, params: &str) -> String {
    format!("postgresql://postgres@{host}:{}/postgres?{params}", pg.port)
}

/// The target as the configuration builds it: URL plus the password from a file.
fn target(url: &str, allow_insecure: bool) -> Result<PgTarget, String> {
    let mut t = PgTarget::parse(url)?.with_password(PG_MARKER.to_string());
    t.allow_insecure_password = allow_insecure;
    Ok(t)
}

/// Opens an SQL connection and a replication stream on `slot`: both errors,
/// as one line each, or `Ok` with whether the SQL session is encrypted.
async fn both_kinds(t: &PgTarget, slot: &str) -> (Result<bool, String>, Result<(), String>) {
    let sql = match t.connect().await {
        Ok(c) => {
            let row = c
                .query_one(
                    "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            Ok(row.get::<_, bool>(0))
        }
        Err(e) => Err(e.to_string()),
    };
    let settings = SourceSettings {
        target: t.clone(),
        slot: slot.to_string(),
        publication: "sec_pub".to_string(),
        status_interval: Duration::from_secs(1),
        buffer_events: 16,
    };
    let repl = match tokio::time::timeout(
        T,
        source::start(
            &settings,
            pgwire_replication::Lsn(0),
            pgwire_replication::Lsn(0),
        ),
    )
    .await
    {
        Ok(Ok(client)) => {
            client.stop();
            drop(client);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("replication start timed out".into()),
    };
    (sql, repl)
}

fn assert_one_line_naming(result: &Result<impl std::fmt::Debug, String>, key: &str, what: &str) {
    let e = result.as_ref().expect_err(what);
    assert!(
        e.starts_with(&format!("postgres.url {key}")),
        "{what}: expected an error naming {key}, got: {e}"
    );
    assert!(!e.contains('\n'), "{what}: not one line: {e}");
    assert!(!e.contains(PG_MARKER), "{what}: the password leaked: {e}");
}

#[tokio::test]
async fn postgres_tls_rules_hold_for_sql_and_replication_alike() {
    let dir = std::env::temp_dir().join("outbox-relay-sec-certs-1");
    let certs = Certs::make(&dir);
    let pg = tls_pg(55441, &certs);
    pg.psql("create table sec_t (id int)");
    pg.psql("create publication sec_pub for table sec_t");
    pg.psql("select pg_create_logical_replication_slot('sec_slot', 'pgoutput')");
    let ca = certs.path("ca.pem");

    // verify-full, with a client certificate: both kinds connect, encrypted.
    let full = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        certs.path("client.pem"),
        certs.path("client.key")
    );
    let t = target(&pg_url(&pg, "localhost", &full), false).unwrap();
    let (sql, repl) = both_kinds(&t, "sec_slot").await;
    assert_eq!(sql, Ok(true), "verify-full sql");
    assert_eq!(repl, Ok(()), "verify-full replication");

    // A CA that did not sign the server's certificate.
    let wrong = format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.path("wrong-ca.pem")
    );
    let t = target(&pg_url(&pg, "localhost", &wrong), false).unwrap();
    let (sql, repl) = both_kinds(&t, "sec_slot").await;
    assert_one_line_naming(&sql, "sslrootcert=", "wrong CA, sql");
    assert_one_line_naming(&repl, "sslrootcert=", "wrong CA, replication");

    // A certificate for another host name: verify-full refuses, verify-ca accepts.
    reconfigure(&pg, true, "server-other");
    let t = target(
        &pg_url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        false,
    )
    .unwrap();
    let (sql, repl) = both_kinds(&t, "sec_slot").await;
    assert_one_line_naming(&sql, "sslmode=verify-full", "wrong host name, sql");
    assert_one_line_naming(&repl, "sslmode=verify-full", "wrong host name, replication");
    assert!(sql.unwrap_err().contains("not valid for host localhost"));
    let t = target(
        &pg_url(
            &pg,
            "localhost",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
        false,
    )
    .unwrap();
    let (sql, repl) = both_kinds(&t, "sec_slot").await;
    assert_eq!(sql, Ok(true), "verify-ca sql");
    assert_eq!(repl, Ok(()), "verify-ca replication");

    // A server without TLS: require fails on both kinds.
    reconfigure(&pg, false, "server");
    let t = target(&pg_url(&pg, "127.0.0.1", "sslmode=require"), false).unwrap();
    let (sql, repl) = both_kinds(&t, "sec_slot").await;
    assert_one_line_naming(&sql, "sslmode=require", "no TLS on the server, sql");
    assert_one_line_naming(
        &repl,
        "sslmode=require",
        "no TLS on the server, replication",
    );

    // Without TLS the server asks for the password in clear text: refused, both
    // under disable and under prefer, unless explicitly allowed.
    for mode in ["disable", "prefer"] {
        let t = target(&pg_url(&pg, "127.0.0.1", &format!("sslmode={mode}")), false).unwrap();
        let (sql, repl) = both_kinds(&t, "sec_slot").await;
        for (kind, r) in [("sql", sql.map(|_| ())), ("replication", repl)] {
            let e = r.expect_err(&format!("clear-text password over {mode}, {kind}"));
            assert!(
                e.contains("asks for the password in clear text"),
                "{mode} {kind}: {e}"
            );
            assert!(e.contains("allow_insecure_password"), "{e}");
            assert!(!e.contains(PG_MARKER), "{e}");
        }
        let t = target(&pg_url(&pg, "127.0.0.1", &format!("sslmode={mode}")), true).unwrap();
        let (sql, repl) = both_kinds(&t, "sec_slot").await;
        assert_eq!(sql, Ok(false), "allowed clear text over {mode}, sql");
        assert_eq!(repl, Ok(()), "allowed clear text over {mode}, replication");
    }
    drop_slot_when_inactive(&pg, "sec_slot").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Drops `slot` once no walsender holds it any more.
async fn drop_slot_when_inactive(pg: &ScratchPg, slot: &str) {
    let deadline = std::time::Instant::now() + T;
    while pg
        .psql(&format!(
            "select count(*) from pg_replication_slots where slot_name = '{slot}' and active"
        ))
        .trim()
        != "0"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "slot {slot} stays active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.psql(&format!("select pg_drop_replication_slot('{slot}')"));
}

/// Runs `outbox-relay <args>` to its end; returns the exit code and everything it wrote.
async fn run_cmd(args: &[&str], dir: &Path) -> (i32, String) {
    let mut relay = Relay::command(args, dir, &[]);
    let status = relay.wait_exit(T).await;
    (status.code().unwrap_or(-1), relay.log_text())
}

#[tokio::test]
async fn rows_flow_over_tls_on_both_sides_and_no_output_holds_a_password() {
    let dir = std::env::temp_dir().join("outbox-relay-sec-e2e");
    let _ = std::fs::remove_dir_all(&dir);
    let certs = Certs::make(&dir.join("certs"));
    let rabbit = tls_rabbit(56711, &certs, false);
    let pg = tls_pg(55442, &certs);
    let broker = wait_rabbit(&rabbit, &certs).await;

    // The consumer's queue, bound before the relay publishes.
    let ch = broker.create_channel().await.unwrap();
    support::declare_bound_queue(&ch, "sec_events", "sec_q", false).await;

    let pw_pg = dir.join("pg.password");
    std::fs::write(&pw_pg, format!("{PG_MARKER}\n")).unwrap();
    let pw_mq = dir.join("mq.password");
    std::fs::write(&pw_mq, MQ_MARKER).unwrap();
    let pg_url = format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        pg.port,
        certs.path("ca.pem"),
        certs.path("client.pem"),
        certs.path("client.key")
    );
    let config = format!(
        "[postgres]\nurl = \"{pg_url}\"\npassword_file = \"{}\"\ntable = \"public.sec_outbox\"\nslot = \"sec_slot\"\npublication = \"sec_pub\"\nretry_table = \"public.sec_parked\"\n\
         [amqp]\nurl = \"amqps://sec_user@localhost:{}/%2f\"\npassword_file = \"{}\"\ntls_ca_file = \"{}\"\nexchange = \"sec_events\"\n\
         [inbox]\nqueue = \"sec_inbox\"\ntable = \"public.sec_inbox\"\nbind_exchange = \"sec_events\"\non_invalid = \"reject\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"trace\"\n",
        pw_pg.display(),
        rabbit.port,
        pw_mq.display(),
        certs.path("ca.pem"),
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, &config).unwrap();
    let cfg = path.to_str().unwrap();
    pg.psql(&outbox_relay::pg::catalog::outbox_ddl(
        &outbox_relay::pg::TableName::parse("public.sec_outbox").unwrap(),
    ));

    pg.psql(&outbox_relay::inbox::queries::inbox_ddl(
        &outbox_relay::pg::TableName::parse("public.sec_inbox").unwrap(),
    ));

    let mut outputs = Vec::new();
    // The inbox receiver from the same file: amqps with the CA of [amqp] too.
    let mut receiver = Relay::command(&["inbox", "--config", cfg], &dir, &[]);
    receiver.wait_log("inbox consuming", T).await;
    let mut relay = Relay::command(&["run", "--config", cfg], &dir, &[]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;

    let ids: Vec<String> = (0..50)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    let values: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            format!(
                "('{id}', 'sec', 'a{}', 'sec.happened', '{{\"n\": {i}}}')",
                i % 7
            )
        })
        .collect();
    pg.psql(&format!(
        "insert into public.sec_outbox (id, aggregate_type, aggregate_id, event_type, payload) values {}",
        values.join(",")
    ));
    use futures_util::StreamExt;
    let mut consumer = ch
        .basic_consume(
            "sec_q".into(),
            "sec_c".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + T;
    while seen.len() < ids.len() {
        let d = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} messages arrived:\n{}",
                    seen.len(),
                    ids.len(),
                    relay.log_text()
                )
            })
            .unwrap()
            .unwrap();
        if let Some(id) = d.properties.message_id() {
            seen.insert(id.to_string());
        }
        d.ack(Default::default()).await.unwrap();
    }
    assert!(ids.iter().all(|id| seen.contains(id)));
    support::wait_for(T, "the receiver recorded every message", || async {
        pg.psql("select count(*) from public.sec_inbox").trim() == "50"
    })
    .await;

    // Every session of the relay (SQL and the walsender) is encrypted.
    let plain = pg.psql(
        "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid) \
         where a.application_name like 'outbox-relay%' and not s.ssl",
    );
    assert_eq!(plain.trim(), "0", "an unencrypted relay session");
    let encrypted_walsenders = pg.psql(
        "select count(*) from pg_stat_replication r join pg_stat_ssl s using (pid) where s.ssl",
    );
    assert_eq!(
        encrypted_walsenders.trim(),
        "1",
        "the replication stream is not encrypted"
    );

    let (code, metrics) = http_get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    outputs.push(("/metrics".to_string(), metrics));
    for path in ["/readyz", "/healthz"] {
        outputs.push((path.to_string(), http_get(&addr, path).await.1));
    }
    for args in [
        vec!["check", "--config", cfg],
        vec!["status", "--json", "--config", cfg],
        vec!["dead", "list", "--config", cfg],
        vec!["dead", "list", "--json", "--config", cfg],
    ] {
        let (code, out) = run_cmd(&args, &dir).await;
        assert_eq!(code, 0, "{}: {out}", args.join(" "));
        outputs.push((args.join(" "), out));
    }

    // Any role may NOTIFY the requeue channel: a flood from one without any
    // privilege makes at most about one reload a second.
    pg.psql(&format!(
        "create role sec_nobody login password '{PG_MARKER}'"
    ));
    let reloads = |text: &str| text.matches("reading the retry queue again").count();
    let before = reloads(&relay.log_text());
    let channel = outbox_relay::retry::requeue_channel("sec_slot");
    let started = std::time::Instant::now();
    for round in 0..10 {
        sh_pg(&format!(
            "{}/psql -h {} -p {} -U sec_nobody -d postgres -Atc \"select pg_notify('{channel}', g::text) from generate_series({}, {}) g\" >/dev/null",
            pg.bin,
            pg.dir.display(),
            pg.port,
            round * 100,
            round * 100 + 99
        ));
    }
    // Heard, and coalesced: by any moment, no more reloads than about one for each
    // second since the flood began (a slow machine only makes fewer).
    support::wait_for(T, "the notifications heard", || async {
        reloads(&relay.log_text()) > before
    })
    .await;
    support::holds_for(
        Duration::from_secs(3),
        "about one reload a second at most",
        || async {
            let made = reloads(&relay.log_text()) - before;
            made as u64 <= started.elapsed().as_secs() + 2
        },
    )
    .await;
    let (code, _) = get(&addr, "/readyz", "").await;
    assert_eq!(code, 200, "not ready after the flood");

    // A role that lacks privileges: check names each with its GRANT.
    pg.psql(&format!(
        "create role sec_reader login replication password '{PG_MARKER}'; grant select on public.sec_outbox to sec_reader"
    ));
    let reader = config.replacen("postgresql://postgres@", "postgresql://sec_reader@", 1);
    let reader_path = dir.join("reader.toml");
    std::fs::write(&reader_path, &reader).unwrap();
    let (code, out) = run_cmd(&["check", "--config", reader_path.to_str().unwrap()], &dir).await;
    assert_eq!(code, 1, "{out}");
    for grant in [
        r#"GRANT UPDATE ON "public"."sec_outbox" TO "sec_reader";"#,
        r#"GRANT DELETE ON "public"."sec_outbox" TO "sec_reader";"#,
        r#"GRANT INSERT ON "public"."sec_parked" TO "sec_reader";"#,
        r#"GRANT SELECT ON "public"."outbox_relay_slots" TO "sec_reader";"#,
        r#"sec_parked_seq_seq TO "sec_reader";"#,
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(grant)),
            "check does not say {grant}:\n{out}"
        );
    }
    assert!(
        !out.contains(r#"GRANT SELECT ON "public"."sec_outbox""#),
        "{out}"
    );
    outputs.push(("check as a role without privileges".into(), out));
    assert!(relay.terminate(T).await.success());
    outputs.push(("run (trace)".into(), relay.log_text()));
    assert!(receiver.terminate(T).await.success());
    outputs.push(("inbox (trace)".into(), receiver.log_text()));

    // Errors: a TOML syntax error on the URL line, a wrong CA on each side.
    let broken = config.replacen(
        &format!("url = \"{pg_url}\""),
        &format!("url = \"postgresql://postgres:{PG_MARKER}@localhost/x\" oops"),
        1,
    );
    let bad = dir.join("broken.toml");
    std::fs::write(&bad, broken).unwrap();
    let (code, out) = run_cmd(&["check", "--config", bad.to_str().unwrap()], &dir).await;
    assert_ne!(code, 0);
    outputs.push(("toml syntax error".into(), out));
    let wrong_pg = config.replacen(
        &format!("sslrootcert={}", certs.path("ca.pem")),
        &format!("sslrootcert={}", certs.path("wrong-ca.pem")),
        1,
    );
    let bad = dir.join("wrong-pg-ca.toml");
    std::fs::write(&bad, &wrong_pg).unwrap();
    let (code, out) = run_cmd(&["run", "--config", bad.to_str().unwrap()], &dir).await;
    assert_ne!(code, 0);
    assert!(out.contains("postgres.url sslrootcert="), "{out}");
    outputs.push(("wrong postgres CA".into(), out));
    let wrong_mq = config.replace(
        &format!("tls_ca_file = \"{}\"", certs.path("ca.pem")),
        &format!("tls_ca_file = \"{}\"", certs.path("wrong-ca.pem")),
    );
    let bad = dir.join("wrong-mq-ca.toml");
    std::fs::write(&bad, &wrong_mq).unwrap();
    let cfg_wrong =
        outbox_relay::Config::from_toml_with_env(&wrong_mq, "test", Vec::new()).unwrap();
    let e = match outbox_relay::amqp::open(&outbox_relay::amqp::AmqpSettings::from_config(
        &cfg_wrong.amqp,
    ))
    .await
    {
        Ok(_) => panic!("a broker certificate from another CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.starts_with("amqp.tls_ca_file:"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    outputs.push(("wrong amqp CA".into(), e));
    // The broker's certificate names localhost, not 127.0.0.1.
    let by_ip = config.replace(
        &format!("amqps://sec_user@localhost:{}", rabbit.port),
        &format!("amqps://sec_user@127.0.0.1:{}", rabbit.port),
    );
    let cfg_ip = outbox_relay::Config::from_toml_with_env(&by_ip, "test", Vec::new()).unwrap();
    let e = match outbox_relay::amqp::open(&outbox_relay::amqp::AmqpSettings::from_config(
        &cfg_ip.amqp,
    ))
    .await
    {
        Ok(_) => panic!("a broker certificate for another host name was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.starts_with("amqp.url: the broker's certificate is not valid for host 127.0.0.1"),
        "{e}"
    );
    outputs.push(("wrong amqp host name".into(), e));
    let (code, out) = run_cmd(&["check", "--config", bad.to_str().unwrap()], &dir).await;
    assert_ne!(code, 0);
    outputs.push(("check with a wrong amqp CA".into(), out));

    for (what, text) in &outputs {
        assert!(
            !text.is_empty() || what.starts_with('/'),
            "{what} wrote nothing"
        );
        for marker in [PG_MARKER, MQ_MARKER] {
            assert!(!text.contains(marker), "{what} shows a password:\n{text}");
        }
    }
    drop_slot_when_inactive(&pg, "sec_slot").await;
    let _ = broker.close(200, "bye".into()).await;
    drop(rabbit);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw HTTP/1.1 GET with extra header lines; returns the status code (0: no
/// answer) and the body.
async fn get(addr: &str, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn the_metrics_endpoint_withstands_abuse_and_the_relay_keeps_publishing() {
    let dir = std::env::temp_dir().join("outbox-relay-sec-abuse");
    let _ = std::fs::remove_dir_all(&dir);
    let certs = Certs::make(&dir.join("certs"));
    let rabbit = tls_rabbit(56716, &certs, true);
    let pg = tls_pg(55443, &certs);
    let broker = wait_rabbit(&rabbit, &certs).await;
    let ch = broker.create_channel().await.unwrap();
    support::declare_bound_queue(&ch, "sec_events", "sec_q", false).await;
    let token = dir.join("token");
    std::fs::write(&token, "sec-token-123\n").unwrap();
    let config = format!(
        "[postgres]\nurl = \"postgresql://postgres:{PG_MARKER}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}\"\ntable = \"public.sec_outbox\"\nslot = \"sec_slot\"\npublication = \"sec_pub\"\nretry_table = \"public.sec_parked\"\n\
         [amqp]\nurl = \"amqps://localhost:{}/%2f?auth_mechanism=external\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nexchange = \"sec_events\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        pg.port,
        certs.path("ca.pem"),
        rabbit.port,
        certs.path("ca.pem"),
        certs.path("mq-client.pem"),
        certs.path("mq-client.key"),
        token.display(),
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, &config).unwrap();
    pg.psql(&outbox_relay::pg::catalog::outbox_ddl(
        &outbox_relay::pg::TableName::parse("public.sec_outbox").unwrap(),
    ));
    let mut relay = Relay::command(&["run", "--config", path.to_str().unwrap()], &dir, &[]);
    relay.wait_streaming().await;
    let addr = relay.metrics_addr().await;
    let auth = "Authorization: Bearer sec-token-123\r\n";

    // The token guards /metrics and /readyz, not /healthz.
    assert_eq!(get(&addr, "/metrics", "").await.0, 401);
    assert_eq!(
        get(&addr, "/readyz", "Authorization: Bearer wrong\r\n")
            .await
            .0,
        401
    );
    assert_eq!(get(&addr, "/healthz", "").await.0, 200);
    let (code, body) = get(&addr, "/metrics", auth).await;
    assert_eq!(code, 200);
    assert!(body.contains("slot_lag_bytes"), "{body}");

    let sessions = || {
        pg.psql("select count(*) from pg_stat_activity where application_name like 'outbox-relay%'")
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let before = sessions();

    // A client that connects and sends nothing: cut off after the header timeout.
    let slow_addr = addr.clone();
    let slow = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(slow_addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    });
    // A 1 MB header: 431, read while it is still being written.
    let big_addr = addr.clone();
    let big = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = tokio::net::TcpStream::connect(big_addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
            req.extend(std::iter::repeat_n(b'a', 1024 * 1024));
            req.extend_from_slice(b"\r\n\r\n");
            let _ = w.write_all(&req).await;
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(30), r.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        writer.abort();
        String::from_utf8_lossy(&buf).into_owned()
    });
    // 300 concurrent scrapes while rows are written and published.
    let scrapes: Vec<_> = (0..300)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                get(&addr, "/metrics", "Authorization: Bearer sec-token-123\r\n")
                    .await
                    .0
            })
        })
        .collect();
    let ids: Vec<String> = (0..200)
        .map(|i| format!("00000000-0000-4000-8001-{i:012}"))
        .collect();
    let values: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| format!("('{id}', 'sec', 'a{}', 'sec.happened', '{{}}')", i % 13))
        .collect();
    for chunk in values.chunks(20) {
        pg.psql(&format!(
            "insert into public.sec_outbox (id, aggregate_type, aggregate_id, event_type, payload) values {}",
            chunk.join(",")
        ));
    }
    let mut most = before;
    use futures_util::StreamExt;
    let mut consumer = ch
        .basic_consume(
            "sec_q".into(),
            "sec_c".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < ids.len() {
        most = most.max(sessions());
        let d = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} messages arrived during the abuse:\n{}",
                    seen.len(),
                    ids.len(),
                    relay.log_text()
                )
            })
            .unwrap()
            .unwrap();
        if let Some(id) = d.properties.message_id() {
            seen.insert(id.to_string());
        }
        d.ack(Default::default()).await.unwrap();
    }
    let mut codes = std::collections::HashMap::new();
    for s in scrapes {
        most = most.max(sessions());
        *codes.entry(s.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(codes.get(&200), Some(&300), "scrape answers: {codes:?}");
    assert!(
        most <= before + 1,
        "Postgres saw {most} relay sessions during the scrapes, {before} before"
    );
    let response = big.await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "1 MB header answered: {response:?}"
    );
    let cut = slow
        .await
        .unwrap()
        .expect("the silent client was never cut off");
    assert!(
        cut >= Duration::from_secs(3) && cut < Duration::from_secs(30),
        "the silent client was cut off after {cut:?}"
    );
    // Still answering afterwards.
    assert_eq!(get(&addr, "/metrics", auth).await.0, 200);
    assert_eq!(get(&addr, "/healthz", "").await.0, 200);
    assert!(relay.terminate(T).await.success());
    drop_slot_when_inactive(&pg, "sec_slot").await;
    let _ = broker.close(200, "bye".into()).await;
    drop(rabbit);
    let _ = std::fs::remove_dir_all(&dir);
}
