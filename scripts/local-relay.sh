#!/usr/bin/env bash
# Newcomer's one command: prepare the local Postgres and RabbitMQ (idempotent),
# create the outbox table / publication / slot if missing, and run the relay
# with config.example.toml until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-services.sh
cargo build --release --quiet
./target/release/outbox-relay init --config config.example.toml
exec ./target/release/outbox-relay run --config config.example.toml
