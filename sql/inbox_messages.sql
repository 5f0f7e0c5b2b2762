-- Event-Forge inbox table (Event-Forge 1.5.0 schema), written by `outbox-relay inbox`
-- and read by the library's Processor (and by Event-Forge's own InboxService).
-- `outbox-relay init` runs this file (with the configured table name) when [inbox] is
-- configured; it is safe to run twice.
CREATE TABLE IF NOT EXISTS public.inbox_messages (
    id                varchar(36)  PRIMARY KEY,
    message_id        varchar(255) NOT NULL,
    source            varchar(255) NOT NULL,
    event_type        varchar(255) NOT NULL,
    payload           json         NOT NULL,
    metadata          json,
    status            varchar(50)  NOT NULL DEFAULT 'received',
    retry_count       integer      NOT NULL DEFAULT 0,
    max_retries       integer      NOT NULL DEFAULT 3,
    processed_at      timestamptz,
    error_message     text,
    scheduled_at      timestamptz,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    updated_at        timestamptz  NOT NULL DEFAULT now(),
    recovery_attempts integer      NOT NULL DEFAULT 0,
    last_recovered_at timestamptz,
    recovery_reason   text,
    CONSTRAINT uq_inbox_message_source UNIQUE (message_id, source)
);
CREATE INDEX IF NOT EXISTS idx_inbox_status ON public.inbox_messages (status);
CREATE INDEX IF NOT EXISTS idx_inbox_created ON public.inbox_messages (created_at);
CREATE INDEX IF NOT EXISTS idx_inbox_processed ON public.inbox_messages (processed_at);
CREATE INDEX IF NOT EXISTS idx_inbox_scheduled ON public.inbox_messages (scheduled_at);
CREATE INDEX IF NOT EXISTS idx_inbox_recovery_sweep ON public.inbox_messages (status, updated_at)
    WHERE status = 'processing';
-- outbox-relay's addition (Event-Forge's tables lack it; create it on those too): the
-- Processor claims the oldest unfinished row, and per-aggregate ordering looks for
-- unfinished predecessors. Without it each claim walks past every processed row.
CREATE INDEX IF NOT EXISTS idx_inbox_unfinished ON public.inbox_messages (created_at, id)
    WHERE status IN ('received', 'failed', 'processing');
