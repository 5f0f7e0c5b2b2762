use super::*;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml_with_env(
        text,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn the_example_config_documents_the_defaults() {
    let example = load(include_str!("../../config.example.toml"), &[]).unwrap();
    let defaults = load("", &[]).unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(
        parse_duration("7d").unwrap(),
        Duration::from_secs(7 * 86400)
    );
    assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5x").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.postgres.table.to_string(), "public.outbox_messages");
    assert_eq!(c.postgres.status_interval, Duration::from_millis(100));
    assert_eq!(c.postgres.on_success, OnSuccess::MarkPublished);
    assert_eq!(c.amqp.exchange, "events");
    assert_eq!(c.amqp.dead_letter_exchange, None);
    assert_eq!(c.relay.ordering, Ordering::Strict);
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
}

#[test]
fn typed_values_come_out_of_validation() {
    let c = load(
        "[postgres]\nurl = \"postgresql://relay@db:6543/app\"\ntable = \"app.out\"\nmapping = \"debezium\"\n[metrics]\nlisten = \"\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.postgres.target.port, 6543);
    assert_eq!(c.postgres.table.schema, "app");
    assert_eq!(c.postgres.columns, ColumnMapping::debezium());
    assert_eq!(c.postgres.on_success, OnSuccess::Keep);
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn unknown_key_is_named() {
    let e = load("[postgres]\nslott = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("slott"), "{e}");
    let e = load("[nope]\n", &[]).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn env_overrides_file() {
    let c = load(
        "[postgres]\nslot = \"a\"\n[amqp]\nmax_in_flight = 5\n",
        &[
            ("OUTBOX_RELAY_POSTGRES_SLOT", "b"),
            ("OUTBOX_RELAY_AMQP_MAX_IN_FLIGHT", "7"),
            ("OUTBOX_RELAY_RETRY_BACKOFF_BASE", "1s"),
            ("OUTBOX_RELAY_CONFIG", "ignored.toml"),
            ("OTHER", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.postgres.slot, "b");
    assert_eq!(c.amqp.max_in_flight, 7);
    assert_eq!(c.retry.backoff_base, Duration::from_secs(1));
}

#[test]
fn unknown_env_key_is_named() {
    let e = load("", &[("OUTBOX_RELAY_POSTGRES_SLOTT", "b")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("slott"), "{e}");
    let e = load("", &[("OUTBOX_RELAY_NOPE", "b")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("OUTBOX_RELAY_NOPE"), "{e}");
}

#[test]
fn validation_names_the_key() {
    for (text, key) in [
        ("[postgres]\nslot = \"Bad-Name\"\n", "postgres.slot"),
        ("[postgres]\ntable = \"a;b\"\n", "postgres.table"),
        ("[postgres]\nurl = \"postgresql://h/db\"\n", "postgres.url"),
        ("[amqp]\nmax_in_flight = 0\n", "amqp.max_in_flight"),
        ("[amqp]\nurl = \"http://x\"\n", "amqp.url"),
        ("[relay]\nshutdown_timeout = \"10\"\n", "shutdown_timeout"),
        ("[retry]\nbackoff_max = \"1s\"\n", "retry.backoff_max"),
        ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
        (
            "[postgres]\nmapping = \"debezium\"\non_success = \"mark_published\"\n",
            "postgres.on_success",
        ),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn debug_hides_passwords() {
    let c = load(
        "[postgres]\nurl = \"postgresql://u:hunter2@h/db\"\n[amqp]\nurl = \"amqp://u:hunter3@h:5672/%2f\"\nallow_insecure_password = true\n",
        &[],
    )
    .unwrap();
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2") && !s.contains("hunter3"), "{s}");
}

#[test]
fn passwords_come_from_files_and_never_go_out_in_clear() {
    let dir = std::env::temp_dir().join(format!("outbox-relay-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = dir.join("pg");
    std::fs::write(&pg, "hunter4\n").unwrap();
    let mq = dir.join("mq");
    std::fs::write(&mq, "hunter5").unwrap();
    let c = load(
        &format!(
            "[postgres]\nurl = \"postgresql://u@h/db?sslmode=require\"\npassword_file = \"{}\"\n\
             [amqp]\nurl = \"amqps://u@h:5671/%2f\"\npassword_file = \"{}\"\n",
            pg.display(),
            mq.display()
        ),
        &[],
    )
    .unwrap();
    assert_eq!(c.postgres.target.password(), "hunter4");
    assert!(c.amqp.nodes[0].expose().contains(":hunter5@"));
    let s = format!("{c:?}");
    assert!(!s.contains("hunter4") && !s.contains("hunter5"), "{s}");
    // Both a URL password and a file: which one is meant?
    let e = load(
        &format!(
            "[postgres]\nurl = \"postgresql://u:x@h/db\"\npassword_file = \"{}\"\n",
            pg.display()
        ),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("postgres.password_file"), "{e}");
    let e = load("[postgres]\npassword_file = \"/nonexistent/pw\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("postgres.password_file") && e.contains("/nonexistent/pw"),
        "{e}"
    );
    // A device or a pipe is refused at once: never read without end.
    for (key, text) in [
        (
            "postgres.password_file",
            "[postgres]\npassword_file = \"/dev/zero\"\n",
        ),
        (
            "amqp.tls_ca_file",
            "[amqp]\nurl = \"amqps://h:5671/%2f\"\ntls_ca_file = \"/dev/zero\"\n",
        ),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("not a regular file"), "{e}");
    }
    // amqp:// with a password to another host is clear text: refused unless allowed.
    let e = load(
        "[amqp]\nurl = \"amqp://u:hunter6@broker.example:5672/%2f\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("amqp.url") && e.contains("amqps://"), "{e}");
    assert!(!e.contains("hunter6"), "{e}");
    // TLS files are read at start-up, errors name the key.
    let e = load(
        "[amqp]\nurl = \"amqps://u:p@h:5671/%2f\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("amqp.tls_ca_file"), "{e}");
    let e = load(
        "[amqp]\nurl = \"amqps://u@h:5671/%2f?auth_mechanism=external\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tls_cert_file"), "{e}");
    let e = load("[metrics]\ntoken_file = \"/nonexistent/token\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("metrics.token_file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_syntax_error_never_prints_the_line_that_holds_the_password() {
    let e = load(
        "[postgres]\nurl = \"postgresql://u:hunter2@h/db\" oops\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("hunter2"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    let e = load("[amqp]\nurl = 'amqp://u:hunter3@h:5672\n", &[])
        .unwrap_err()
        .to_string();
    assert!(!e.contains("hunter3"), "{e}");
}

#[test]
fn a_cluster_is_a_list_of_urls_or_a_comma_separated_string() {
    let list = load(
        "[amqp]\nurl = [\"amqp://u:p@127.0.0.1:5672/%2f\", \"amqp://u:p@localhost:5673/%2f\"]\n",
        &[],
    )
    .unwrap();
    let nodes: Vec<String> = list.amqp.nodes.iter().map(|n| n.node()).collect();
    assert_eq!(nodes, ["127.0.0.1:5672", "localhost:5673"]);
    // As an environment variable gives it: one string, commas between the nodes.
    let env = load(
        "",
        &[(
            "OUTBOX_RELAY_AMQP_URL",
            " amqp://127.0.0.1:5672/%2f , amqps://127.0.0.1/%2f,",
        )],
    )
    .unwrap();
    let nodes: Vec<String> = env.amqp.nodes.iter().map(|n| n.node()).collect();
    assert_eq!(nodes, ["127.0.0.1:5672", "127.0.0.1:5671"]);
    assert!(
        !list.amqp.redacted().contains(":p@"),
        "{}",
        list.amqp.redacted()
    );
    // Each node is held to the same rules, and the error says which one.
    let e = load(
        "[amqp]\nurl = [\"amqp://127.0.0.1:5672/%2f\", \"amqp://u:hunter7@rabbit-2.example:5672/%2f\"]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("amqp.url[1]") && e.contains("clear text"), "{e}");
    assert!(!e.contains("hunter7"), "{e}");
    let e = load("[amqp]\nurl = []\n", &[]).unwrap_err().to_string();
    assert!(
        e.contains("amqp.url") && e.contains("names no broker"),
        "{e}"
    );
    let e = load("[amqp]\nurl = \" , \"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no broker"), "{e}");
}

#[test]
fn a_custom_mapping_names_its_columns_and_the_templates_add_theirs() {
    let c = load(
        "[postgres]\nmapping = \"custom\"\n[mapping]\nid = \"event_id\"\naggregate_type = \"stream\"\n\
         aggregate_id = \"stream_id\"\nevent_type = \"kind\"\npayload = \"data\"\ncreated_at = \"created\"\n\
         [amqp]\nexchange = \"{tenant}-events\"\nrouting_key = \"{tenant}.{event_type}\"\nbody = \"payload\"\n\
         headers = { x-region = \"{region}\" }\n",
        &[],
    )
    .unwrap();
    let m = &c.postgres.columns;
    assert_eq!(
        (m.id.as_str(), m.payload.as_str(), m.created_at.as_deref()),
        ("event_id", "data", Some("created"))
    );
    assert_eq!(
        m.extra,
        ["tenant", "region"],
        "the templates' columns are read with each row"
    );
    assert_eq!(
        m.named_optional,
        ["created"],
        "a named optional column must exist"
    );
    assert_eq!(c.postgres.on_success, OnSuccess::Keep);
    assert_eq!(c.amqp.wire.fixed_exchange(), None);
    assert_eq!(c.amqp.wire.body, wire::BodyShape::Payload);
    // A preset with one column renamed.
    let d = load(
        "[postgres]\nmapping = \"debezium\"\n[mapping]\npayload = \"body\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        (
            d.postgres.columns.payload.as_str(),
            d.postgres.columns.event_type.as_str()
        ),
        ("body", "type")
    );
    // The routing key from the environment.
    let e = load("", &[("OUTBOX_RELAY_AMQP_ROUTING_KEY", "{event_type}")]).unwrap();
    assert_eq!(e.amqp.wire.routing_key.source(), "{event_type}");
}

#[test]
fn a_mapping_that_cannot_work_is_refused_naming_the_key() {
    for (text, key, words) in [
        ("[postgres]\nmapping = \"custom\"\n[mapping]\nid = \"i\"\n", "mapping.aggregate_type", "missing: aggregate_type, aggregate_id, event_type, payload"),
        ("[mapping]\npayload = \"id\"\n", "mapping.payload", "already mapped to id"),
        ("[mapping]\nmetadata = \"\"\n", "mapping.metadata", "cannot be a column name"),
        ("[mapping]\ntenant = \"t\"\n", "tenant", "unknown"),
        ("[postgres]\nmapping = \"custom\"\non_success = \"mark_published\"\n[mapping]\nid = \"i\"\naggregate_type = \"a\"\naggregate_id = \"b\"\nevent_type = \"e\"\npayload = \"p\"\n", "postgres.on_success", "mark_published"),
        ("[amqp]\nrouting_key = \"{tenant\"\n", "amqp.routing_key", "not closed"),
        ("[amqp]\nbody = \"xml\"\n", "body", "xml"),
        ("[amqp]\nproperties = { kind = \"x\" }\n", "kind", "unknown"),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(words), "{text}: {e}");
    }
}
