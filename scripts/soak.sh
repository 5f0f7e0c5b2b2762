#!/usr/bin/env bash
# The soak: the whole chain (relays, receiver, Processor) under a steady load with
# one fault every --fault-every (default 2m), in turn; prints one JSON line and
# exits 0 only when every order took effect exactly once, in order, nothing is
# left parked or pending, the slot recovered within 10 s of each fault and every
# process' memory, descriptors and threads stayed flat (examples/soak/main.rs).
#
#   scripts/soak.sh --minutes 30                    # the full run (docs/soak.md)
#   scripts/soak.sh --minutes 3 --fault-every 17s --rate 600   # CI's short version (scripts/test.sh)
#
# Uses the local services (scripts/setup-services.sh) and restarts them: run it
# alone. Logs go to target/soak/<time>/ (or --dir).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin outbox-relay --example soak
cargo build --release -p outbox-relay-client --example inbox_worker
args=("$@")
if [[ " $* " != *" --dir "* && " $* " != *" --dir="* ]]; then
  args+=(--dir "target/soak/$(date -u +%Y%m%dT%H%M%SZ)")
fi
exec target/release/examples/soak \
  --relay target/release/outbox-relay \
  --worker target/release/examples/inbox_worker \
  "${args[@]}"
