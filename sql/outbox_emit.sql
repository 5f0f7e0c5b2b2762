-- An outbox without a table (postgres.source = "messages"): call this inside
-- the transaction that makes the business change; the relay publishes the
-- message after the commit, and a rollback discards it. Any language that can
-- run SQL can write to the outbox this way; Rust services can use
-- outbox_relay_client::outbox::emit, which sends the same message.
--
--   begin;
--   insert into orders (id) values ('o-1');
--   select outbox_emit('Order', 'o-1', 'order.placed', '{"id": "o-1"}');
--   commit;
--
-- p_prefix must be the relay's postgres.message_prefix ("outbox" by default).
-- Returns the message id (a new UUID unless p_id is given).
create or replace function public.outbox_emit(
  p_aggregate_type text,
  p_aggregate_id text,
  p_event_type text,
  p_payload json,
  p_metadata json default null,
  p_id text default null,
  p_prefix text default 'outbox'
) returns text
language plpgsql volatile
as $$
declare
  v_id text := coalesce(p_id, gen_random_uuid()::text);
begin
  perform pg_logical_emit_message(true, p_prefix, json_build_object(
    'id', v_id,
    'aggregate_type', p_aggregate_type,
    'aggregate_id', p_aggregate_id,
    'event_type', p_event_type,
    'payload', p_payload,
    'metadata', p_metadata)::text);
  return v_id;
end
$$;
