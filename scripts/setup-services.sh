#!/usr/bin/env bash
# Prepares the local PostgreSQL and RabbitMQ for outbox-relay (idempotent).
#  - PostgreSQL: wal_level=logical, enough replication slots and WAL senders for
#    the tests (each test holds its own slot), restart only when a setting changed.
#  - RabbitMQ: started when it is not running.
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), PGDATABASE (test).
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export PGDATABASE="${PGDATABASE:-test}"
WANT_SLOTS=64
WANT_SENDERS=64

log() { printf 'setup: %s\n' "$*"; }

pg_cluster_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

pg_ready() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }

pg_start() {
  local v; v=$(pg_cluster_version)
  if [ -z "$v" ]; then
    log "PostgreSQL is not reachable at $PGHOST:$PGPORT and no local cluster exists under /etc/postgresql"
    exit 1
  fi
  pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
}

wait_pg() {
  for _ in $(seq 1 60); do
    pg_ready && psql -d postgres -Atqc 'select 1' >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "PostgreSQL did not come up at $PGHOST:$PGPORT within 30 s"; exit 1
}

if ! pg_ready; then log "starting PostgreSQL"; pg_start; fi
wait_pg

setting() { psql -d postgres -Atqc "show $1"; }
changed=0
if [ "$(setting wal_level)" != "logical" ]; then
  psql -d postgres -qc "alter system set wal_level = logical"; changed=1
fi
if [ "$(setting max_replication_slots)" -lt "$WANT_SLOTS" ]; then
  psql -d postgres -qc "alter system set max_replication_slots = $WANT_SLOTS"; changed=1
fi
if [ "$(setting max_wal_senders)" -lt "$WANT_SENDERS" ]; then
  psql -d postgres -qc "alter system set max_wal_senders = $WANT_SENDERS"; changed=1
fi
if [ "$changed" = 1 ]; then
  v=$(pg_cluster_version)
  log "restarting PostgreSQL $v to apply wal_level=logical / slots / senders"
  pg_ctlcluster --skip-systemctl-redirect "$v" main restart
  wait_pg
fi
if ! psql -d postgres -Atqc "select 1 from pg_database where datname = '$PGDATABASE'" | grep -q 1; then
  psql -d postgres -qc "create database \"$PGDATABASE\""
fi
log "PostgreSQL ready: wal_level=$(setting wal_level) max_replication_slots=$(setting max_replication_slots) max_wal_senders=$(setting max_wal_senders)"

# RabbitMQ
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
fi
for _ in $(seq 1 120); do
  if rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
rabbitmqctl -q await_startup >/dev/null || { log "RabbitMQ did not start"; exit 1; }
log "RabbitMQ ready"
