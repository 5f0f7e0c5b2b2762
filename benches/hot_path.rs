//! Micro-benchmarks of the per-message hot path: pgoutput Insert → OutboxEvent →
//! AMQP body, properties and headers.
//!
//!   cargo bench --bench hot_path

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use outbox_relay::config::ColumnMapping;
use outbox_relay::pg::TableName;
use outbox_relay::source::{Decoded, Decoder};

const COLUMNS: &[(&str, u32)] = &[
    ("id", 1043),
    ("aggregate_type", 1043),
    ("aggregate_id", 1043),
    ("event_type", 1043),
    ("payload", 114),
    ("metadata", 114),
    ("status", 1043),
    ("retry_count", 23),
    ("max_retries", 23),
    ("error_message", 25),
    ("scheduled_at", 1184),
    ("locked_by", 1043),
    ("locked_at", 1184),
    ("created_at", 1184),
    ("updated_at", 1184),
];

fn relation() -> Bytes {
    let mut b = vec![b'R'];
    b.extend_from_slice(&16384u32.to_be_bytes());
    b.extend_from_slice(b"public\0outbox_messages\0d");
    b.extend_from_slice(&(COLUMNS.len() as u16).to_be_bytes());
    for (name, oid) in COLUMNS {
        b.push(0);
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    Bytes::from(b)
}

/// An Event-Forge row with a ~400-byte payload and trace metadata.
fn insert() -> Bytes {
    let payload = format!(
        "{{\"orderId\":\"order-00012345\",\"customer\":{{\"id\":\"cust-004242\",\"email\":\"customer4242@example.com\",\"tier\":\"gold\"}},\"lines\":[{{\"sku\":\"SKU-00042\",\"qty\":2,\"price\":19.99}},{{\"sku\":\"SKU-01234\",\"qty\":1,\"price\":5.25}}],\"total\":45.23,\"currency\":\"EUR\",\"shipping\":{{\"method\":\"standard\",\"address\":\"Example Street 12, 10115 Berlin\"}},\"note\":\"{}\"}}",
        "x".repeat(60)
    );
    let values: Vec<Option<String>> = vec![
        Some("0b6f1c2e-9d3a-4c2b-8f1e-5a7d9c0e1f23".into()),
        Some("Order".into()),
        Some("order-00012345".into()),
        Some("order.placed".into()),
        Some(payload),
        Some(
            "{\"traceId\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"spanId\":\"00f067aa0ba902b7\"}"
                .into(),
        ),
        Some("pending".into()),
        Some("0".into()),
        Some("3".into()),
        None,
        None,
        None,
        None,
        Some("2026-11-27 06:00:00.123456+00".into()),
        Some("2026-11-27 06:00:00.123456+00".into()),
    ];
    let mut b = vec![b'I'];
    b.extend_from_slice(&16384u32.to_be_bytes());
    b.push(b'N');
    b.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in &values {
        match v {
            None => b.push(b'n'),
            Some(s) => {
                b.push(b't');
                b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
    }
    Bytes::from(b)
}

fn hot_path(c: &mut Criterion) {
    let mut decoder = Decoder::new(
        TableName::parse("public.outbox_messages").unwrap(),
        ColumnMapping::event_forge(),
    );
    decoder.decode(relation()).unwrap();
    let data = insert();
    let event = match decoder.decode(data.clone()).unwrap() {
        Decoded::Event(e) => e,
        other => panic!("{other:?}"),
    };
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_insert", |b| {
        b.iter(|| black_box(decoder.decode(black_box(data.clone())).unwrap()))
    });
    group.bench_function("encode_message", |b| {
        b.iter(|| black_box(outbox_relay::sink::format::encode(black_box(&event), 0).unwrap()))
    });
    group.bench_function("decode_and_encode", |b| {
        b.iter(|| {
            let Decoded::Event(e) = decoder.decode(black_box(data.clone())).unwrap() else {
                unreachable!()
            };
            black_box(outbox_relay::sink::format::encode(&e, 0).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
