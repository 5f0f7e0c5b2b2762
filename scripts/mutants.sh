#!/usr/bin/env bash
# Mutation testing of the pure state machines with cargo-mutants
# (`cargo install cargo-mutants`): each group of files is mutated and only the
# unit and property tests that guard it are run, without any service. Results
# go to target/mutants/<group>/ (caught.txt, missed.txt, timeout.txt,
# unviable.txt); tests/MUTATIONS.md records them and why each survivor lives.
# Slow on purpose (one build per mutant): not part of scripts/test.sh.
#   scripts/mutants.sh            every group
#   scripts/mutants.sh window     one group
set -euo pipefail
cd "$(dirname "$0")/.."
run() {
  local group=$1 filter=$2; shift 2
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "$group" ] && return 0
  local files=()
  for f in "$@"; do files+=(-f "$f"); done
  echo "== $group: $*"
  cargo mutants "${files[@]}" --no-shuffle --timeout 120 --build-timeout 900 \
    -C --lib --cargo-test-arg="$filter" \
    -o "target/mutants/$group" || true
}
run_client() {
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "client" ] && return 0
  echo "== client: the Processor's claim rules and the backoff"
  cargo mutants -p outbox-relay-client -f client/src/claim.rs -f client/src/backoff.rs \
    --no-shuffle --timeout 60 -o target/mutants/client || true
}
ONLY=${1:-}
mkdir -p target/mutants
run window relay::window src/relay/window.rs src/relay/window/peer.rs src/relay/window/routing.rs
run routing relay::routing src/relay/routing.rs
run parked relay::parked src/relay/parked.rs
run progress progress src/progress.rs
run acks inbox::acks src/inbox/acks.rs
run table_fault inbox::table_fault src/inbox/table_fault.rs
run trouble pg::trouble src/pg/trouble.rs
run_client
