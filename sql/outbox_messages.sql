-- Event-Forge outbox table (Event-Forge 1.5.0 schema), read as-is by outbox-relay.
-- `outbox-relay init` runs this file (with the configured table name); it is safe to run twice.
CREATE TABLE IF NOT EXISTS public.outbox_messages (
    id             varchar(36)  PRIMARY KEY,
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    event_type     varchar(255) NOT NULL,
    payload        json         NOT NULL,
    metadata       json,
    status         varchar(50)  NOT NULL DEFAULT 'pending',
    retry_count    integer      NOT NULL DEFAULT 0,
    max_retries    integer      NOT NULL DEFAULT 3,
    error_message  text,
    scheduled_at   timestamptz,
    locked_by      varchar(255),
    locked_at      timestamptz,
    created_at     timestamptz  NOT NULL DEFAULT now(),
    updated_at     timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_outbox_messages_status_scheduled ON public.outbox_messages (status, scheduled_at);
CREATE INDEX IF NOT EXISTS idx_outbox_messages_created_at ON public.outbox_messages (created_at);
CREATE INDEX IF NOT EXISTS idx_outbox_messages_locked_by ON public.outbox_messages (locked_by);
