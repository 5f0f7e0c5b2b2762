-- Relay-owned retry state: messages that failed (nack, unroutable, no confirm in
-- time, too large, malformed row), delayed messages (scheduled_at in the future)
-- and the later messages of the same aggregate parked behind them, in commit order.
-- `outbox-relay init` and `run` create it (with the configured name); safe to run twice.
CREATE TABLE IF NOT EXISTS public.outbox_relay_parked (
    seq            bigserial   PRIMARY KEY,            -- commit order: rows are parked in stream order
    slot           text        NOT NULL,               -- the relay (slot) that owns the row
    id             text        NOT NULL,               -- the outbox row's id (AMQP message_id)
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text,
    payload        text,                               -- as read from the stream (a malformed row keeps what it had)
    metadata       text,
    created_at     text,
    commit_time    bigint      NOT NULL,               -- commit time, microseconds since 2000-01-01 (createdAt fallback)
    status         text        NOT NULL DEFAULT 'parked',  -- parked | dead
    attempts       integer     NOT NULL DEFAULT 0,     -- failed publish attempts so far
    max_retries    integer     NOT NULL,
    error_message  text,                               -- last failure; NULL while only parked behind another
    scheduled_at   timestamptz NOT NULL DEFAULT now(), -- not before this time
    parked_at      timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_relay_parked_aggregate
    ON public.outbox_relay_parked (slot, aggregate_type, aggregate_id, seq);
