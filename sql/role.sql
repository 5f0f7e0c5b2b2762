-- A least-privilege role for outbox-relay, for the default names of
-- config.example.toml (public.outbox_messages, public.outbox_relay_parked).
-- Run as the owner of the outbox table after `outbox-relay init` (run by that owner)
-- has created the table, the retry table, the publication and the slot; then run
-- the relay as this role (postgres.url = "postgresql://outbox_relay:...@host/db").
-- Change the password.
CREATE ROLE outbox_relay WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO outbox_relay;
-- SELECT: re-read a row before a retry; UPDATE: status/retry columns and
-- mark_published; DELETE: on_success = "delete" and retention.
GRANT SELECT, UPDATE, DELETE ON public.outbox_messages TO outbox_relay;
-- The retry state the relay owns.
GRANT SELECT, INSERT, UPDATE, DELETE ON public.outbox_relay_parked TO outbox_relay;
GRANT USAGE ON SEQUENCE public.outbox_relay_parked_seq_seq TO outbox_relay;
-- The relay's record of its slot (read at start-up, written at start and clean stop).
GRANT SELECT, INSERT, UPDATE ON public.outbox_relay_slots TO outbox_relay;
