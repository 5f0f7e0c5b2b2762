#!/usr/bin/env bash
# The project's test command (README and .ci/run use this): lint, unit tests,
# integration tests, then the fault tests that restart shared services, serially.
# Needs the local services prepared by scripts/setup-services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --lib --bins
# The soak's own checks (which reading counts as a process' steady one).
cargo test --example soak
# The rustdoc examples (no_run: compiled, not run), of both crates.
cargo test --workspace --doc
# Every fuzz corpus file and finding, replayed on stable through the fuzz targets'
# checks (fuzz/README.md): no services, no nightly.
cargo test --test fuzz_corpus
# The client crate builds without the relay's heavy dependencies (no broker
# client, HTTP server, TLS stack or allocator of its own).
if cargo tree -p outbox-relay-client -e normal --prefix none | grep -E '^(lapin|hyper|rustls|aws-lc|mimalloc) '; then
  echo "outbox-relay-client depends on a heavy crate (above)" >&2
  exit 1
fi
# TLS and secrets: scratch Postgres and RabbitMQ instances on ports of their own
# (55441-55443, 56711-56718), so the shared services are not touched; a lock of its
# own keeps two checkouts from starting them on the same ports at once; one test at
# a time (each boots its own RabbitMQ node).
cargo test --test security --no-run
flock -o -x "${OUTBOX_RELAY_SECURITY_LOCK:-/tmp/outbox-relay-security.lock}" \
  cargo test --test security -- --test-threads=1
# Every way a slot is lost (dropped, invalidated, a fail-over to a promoted
# standby), on scratch Postgres clusters (ports 55451-55454), under the same lock.
cargo test --test slots --no-run
flock -o -x "${OUTBOX_RELAY_SECURITY_LOCK:-/tmp/outbox-relay-security.lock}" \
  cargo test --test slots -- --test-threads=1
# A three-node RabbitMQ cluster of scratch nodes (ports 56810-56832): nodes
# killed under the relay and the receiver, then the whole cluster; one cluster
# for the binary, under the same lock.
cargo test --test cluster --no-run
flock -o -x "${OUTBOX_RELAY_SECURITY_LOCK:-/tmp/outbox-relay-security.lock}" \
  cargo test --test cluster -- --test-threads=1
# Integration tests share the local services; the fault tests restart them. The lock
# keeps several checkouts on one machine from disturbing each other: tests of two
# checkouts use the same object names, so each binary holds it alone; CI holds it
# alone anyway. `-o`: the lock
# stays with flock and is not inherited by what the tests start (a restarted
# Postgres would otherwise hold it forever).
LOCK=${OUTBOX_RELAY_SERVICES_LOCK:-/tmp/outbox-relay-services.lock}
cargo test --test main --no-run
flock -o -x "$LOCK" cargo test --test main
# Restarts RabbitMQ and Postgres: one test at a time, nothing else running beside them.
cargo test --test faults --no-run
flock -o -x "$LOCK" cargo test --test faults -- --test-threads=1
# The inbox fault tests close every broker connection and kill receivers: the same.
# The chain test kills a processor process: examples/inbox_worker.rs.
cargo build --workspace --examples
cargo test --test inbox_faults --no-run
flock -o -x "$LOCK" cargo test --test inbox_faults -- --test-threads=1
# The soak's short version (docs/soak.md): the whole chain under 600 rows/s with
# each of the eight faults once, 17 s apart; it restarts both services, so it runs
# alone, last, under the same lock. 600, not the full run's 1 000: after the 20 s
# memory alarm the slot must be back under 1 MB within 10 s, and at 1 000/s this
# 2-core machine drains that backlog in 7.7-10.6 s (one CI run missed by 0.6 s).
flock -o -x "$LOCK" bash scripts/soak.sh --minutes 3 --fault-every 17s --rate 600
