-- Event-Forge's inbox table for the SQL benchmarks (`\ir`-ed by them), as
-- sql/inbox_messages.sql makes it, under another name: `indexed` adds the
-- primary key and the (message_id, source) constraint that deduplicates,
-- `secondary` the six secondary indexes (Event-Forge's five and the partial
-- index of unfinished rows); `payload_type` json or text.
create or replace function bench_inbox_table(name text, payload_type text, indexed bool, secondary bool)
returns void language plpgsql as $f$
begin
  execute format('create table %I (
    id varchar(36) %s, message_id varchar(255) not null, source varchar(255) not null,
    event_type varchar(255) not null, payload %s not null, metadata %s,
    status varchar(50) not null, retry_count integer not null, max_retries integer not null,
    processed_at timestamptz, error_message text, scheduled_at timestamptz,
    created_at timestamptz not null, updated_at timestamptz not null,
    recovery_attempts integer not null, last_recovered_at timestamptz, recovery_reason text %s)',
    name, case when indexed then 'primary key' else '' end, payload_type, payload_type,
    case when indexed then format(', constraint %I unique (message_id, source)', name || '_uq') else '' end);
  if secondary then
    execute format('create index on %I (status)', name);
    execute format('create index on %I (created_at)', name);
    execute format('create index on %I (processed_at)', name);
    execute format('create index on %I (scheduled_at)', name);
    execute format('create index on %I (status, updated_at) where status = ''processing''', name);
    execute format('create index on %I (created_at, id) where status in (''received'', ''failed'', ''processing'')', name);
  end if;
end $f$;
