#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

pgoutput seeds come from a real capture (pgoutput-capture.hex: one XLogData
payload per line, from pg_logical_slot_peek_binary_changes with proto_version 1
on Event-Forge's own table, as fuzz/README.md shows); the others are written here.
The piece format is fuzz/checks.rs's `Pieces`."""
import json, os, struct, pathlib

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpus"

def piece(p):
    if p is None:
        return b"\xff"
    if isinstance(p, str):
        p = p.encode()
    p = p[:0x7FFF]
    if len(p) < 0x80:
        return bytes([len(p)]) + p
    return bytes([0x80 | (len(p) >> 8), len(p) & 0xFF]) + p

def pieces(*ps):
    return b"".join(piece(p) for p in ps)

def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)

# pgoutput: the whole captured stream, then each transaction after the Relation.
msgs = [bytes.fromhex(l.strip()) for l in (HERE / "pgoutput-capture.hex").read_text().split() if l.strip()]
write("pgoutput", "capture-all", pieces(*msgs))
relation = next(m for m in msgs if m[:1] == b"R")
txn, n = [], 0
for m in msgs:
    txn.append(m)
    if m[:1] == b"C":
        write("pgoutput", f"capture-txn{n}", pieces(relation, *txn))
        txn, n = [], n + 1

# row_values: flags, commit time, one piece per column.
forge = ["7d1c1f2e-0000-4000-8000-000000000001", "Order", "o-1", "OrderPlaced",
         '{"total":12.5}', '{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7"}',
         "pending", "0", "3", None, None, None, None, "2026-11-27 06:00:00.25+00", "2026-11-27 06:00:00.25+00"]
commit = struct.pack(">q", 817_000_000_000_000)
write("row_values", "forge", b"\x00" + commit + pieces(*forge))
write("row_values", "forge-text-payload", b"\x06" + commit + pieces(*forge))
odd = list(forge)
odd[1], odd[4], odd[13] = 'Ordér "ü"\n', '"x"', "294276-12-31 23:59:59+00"
write("row_values", "forge-odd", b"\x02" + struct.pack(">q", -(2**63)) + pieces(*odd))
big = list(forge)
big[4] = '{"big":"' + "x" * 20000 + '"}'
write("row_values", "forge-big", b"\x00" + commit + pieces(*big))
tenant = ["e-1", "acme", "Order", "o-1", "placed", '{"a":1}', None, "2026-11-27 06:00:00+00"]
write("row_values", "tenant", b"\x01" + commit + pieces(*tenant))
t2 = list(tenant)
t2[1] = None
write("row_values", "tenant-null", b"\x01" + commit + pieces(*t2))
t3 = list(tenant)
t3[1] = "t" * 300
write("row_values", "tenant-long", b"\x07" + commit + pieces(*t3))

# message_content
for name, content in {
    "ok": {"id": "m-1", "aggregate_type": "Order", "aggregate_id": "o-1", "event_type": "placed",
           "payload": {"total": 1}, "metadata": {"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": "00f067aa0ba902b7"}},
    "null-payload": {"id": "m-2", "aggregate_type": "A", "aggregate_id": "b", "event_type": "c", "payload": None},
    "missing": {"id": "m-3", "aggregate_type": "A"},
    "numbers": {"id": 5, "aggregate_type": "A", "aggregate_id": "b", "event_type": "c", "payload": 1e400},
}.items():
    write("message_content", name, json.dumps(content).encode())
write("message_content", "not-json", b"\x00\xff{")

# delivery: AMQP basic properties as on the wire, the routing key, the body.
def shortstr(s):
    s = s.encode()
    return bytes([len(s)]) + s
def table(entries):
    body = b"".join(shortstr(k) + b"S" + struct.pack(">I", len(v)) + v.encode() for k, v in entries)
    return struct.pack(">I", len(body)) + body
def props(content_type=None, headers=None, message_id=None, timestamp=None):
    flags, out = 0, b""
    if content_type is not None:
        flags |= 1 << 15; out += shortstr(content_type)
    if headers is not None:
        flags |= 1 << 13; out += table(headers)
    if message_id is not None:
        flags |= 1 << 7; out += shortstr(message_id)
    if timestamp is not None:
        flags |= 1 << 6; out += struct.pack(">Q", timestamp)
    return struct.pack(">H", flags) + out
envelope = json.dumps({"id": "m-1", "aggregateType": "Order", "aggregateId": "o-1", "eventType": "placed",
                       "payload": {"n": 123456789012345678901234567890}, "metadata": {"k": "v"},
                       "createdAt": "2026-11-27T06:00:00Z"}).encode()
write("delivery", "event-forge", pieces(props("application/json", [("x-event-type", "placed")], "m-1", 1764223200), "Order.placed") + envelope)
write("delivery", "no-properties", pieces(b"", "k") + b'{"id": 7, "payload": [1]}')
write("delivery", "no-id", pieces(props("text/plain"), "k") + b'{"x": 1}')
write("delivery", "not-json", pieces(props(message_id="m-2"), "k") + b"\xff\xfe")
write("delivery", "scalar", pieces(props(message_id="m-3"), "") + b'"text"')

# config: the example and hand-typed variants.
example = (HERE.parents[1] / "config.example.toml").read_text()
write("config", "example", example.encode())
write("config", "minimal", b'[postgres]\nurl = "postgresql://postgres@127.0.0.1:5432/test"\n[amqp]\nurl = "amqp://guest:guest@127.0.0.1:5672/%2f"\n')
write("config", "env", b'[postgres]\nurl = "postgresql://postgres@127.0.0.1:5432/test"\n[amqp]\nurl = "amqp://guest:guest@127.0.0.1:5672/%2f"\n#ENV\nOUTBOX_RELAY_AMQP_MAX_IN_FLIGHT=12\nOUTBOX_RELAY_POSTGRES_SLOT_WAIT=1h\nOUTBOX_RELAY_AMQP_URL=amqp://a,amqp://b\n')
write("config", "templates", b'[postgres]\nurl = "postgresql://postgres@127.0.0.1:5432/test"\ntable = "public.app_events"\nmapping = "custom"\n[mapping]\nid = "event_id"\naggregate_type = "stream"\naggregate_id = "stream_id"\nevent_type = "kind"\npayload = "data"\n[amqp]\nurl = ["amqp://guest:guest@127.0.0.1:5672/%2f", "amqp://guest:Zq9vSecretPw7x@10.0.0.2:5672/%2f"]\nexchange = "{tenant}-events"\nrouting_key = "{tenant}.{{x}}.{event_type}"\n[amqp.headers]\nx-tenant = "{tenant}"\n[inbox]\nqueue = "q"\n')
write("config", "typos", b'[postgres]\nurl = "postgresql://postgres@127.0.0.1:5432/test"\nstatus_interval = "100 ms"\nshards = -1\n[amqp]\nurl = "amqp://guest:guest@127.0.0.1:5672/%2f"\nmax_in_flight = 0\nexchnage = "x"\n')

# urls: what follows `user:password@` (or stands beside password=).
for name, text in {
    "host": "127.0.0.1:5432/test",
    "multi": "a:5432,b:5433/test?target_session_attrs=read-write&sslmode=verify-full",
    "kv": "host=a,b port=1,2 user=u dbname=d sslmode=require",
    "ipv6": "[::1]:5672/%2f?heartbeat=10&auth_mechanism=external",
    "bad": "host:notaport/db?sslmode=bogus",
}.items():
    write("urls", name, text.encode())
