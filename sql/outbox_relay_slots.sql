-- Relay-owned record of the replication slots relays consume, so that a relay
-- that has run before never silently creates a fresh slot: when a recorded slot
-- is missing (dropped, or a failover to a replica without it), the rows committed
-- since the relay last held it were never read, and the relay refuses to start
-- (see `outbox-relay replay --pending`). `outbox-relay init` and `run` create it
-- next to the retry table; safe to run twice. A table of an earlier version gets
-- the last five columns from `init` (ALTER TABLE ... ADD COLUMN IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS public.outbox_relay_slots (
    slot        text        PRIMARY KEY,            -- the logical replication slot
    outbox      text        NOT NULL,               -- the outbox table it carries (schema.table)
    created_at  timestamptz NOT NULL DEFAULT now(), -- when a relay created (or first found) the slot
    created_lsn pg_lsn,                             -- the slot's position then
    seen_at     timestamptz NOT NULL DEFAULT now(), -- the last time a relay started on it or stopped cleanly
    seen_lsn    pg_lsn,                             -- the slot's confirmed position then
    system_id   text,                               -- the server then (pg_control_system): another one after a fail-over
    timeline    bigint,                             -- its timeline then: a promoted standby writes a new one
    replaying_since timestamptz,                    -- a `replay --pending` started then and has not finished
    broker_node text,                               -- the RabbitMQ node (host:port) the relay last connected to
    broker_since timestamptz                        -- when
);
