-- What Postgres spends on the receiver's insert, by part: 100 000 Event-Forge
-- messages (a 400-byte JSON payload and metadata) in 200 statements of 500 rows
-- each, the receiver's statement shape (`src/inbox/queries.rs`: unnest of
-- arrays, ON CONFLICT (message_id, source) DO NOTHING), in one backend, timed by
-- psql. Each variant takes away one part:
--   full   Event-Forge's table as `init` makes it (sql/inbox_messages.sql);
--   bare   only the primary key and the (message_id, source) unique constraint
--          that deduplicates: the cost of the six secondary indexes;
--   text   as full, payload and metadata text: the cost of the JSON check;
--   floor  no index, no constraint, text: what is left (heap, WAL, the arrays);
--   copy   as full, through COPY into a temporary table, then one
--          INSERT ... SELECT ... ON CONFLICT per batch.
-- synchronous_commit is off: the statements are measured, not the flushes.
--
--   psql -h 127.0.0.1 -U postgres test -f benches/sql/inbox_insert_cost.sql
\set QUIET on
set client_min_messages = warning;
\pset tuples_only on
set synchronous_commit = off;
drop table if exists cost_src, cost_batches, cost_full, cost_bare, cost_text, cost_floor, cost_copy;
create table cost_src as
  select 'msg-' || i as m, 'order.placed' as e,
         '{"orderId":"order-' || lpad(i::text, 8, '0') || '","customer":{"id":"cust-' || (i % 100000) || '","email":"customer' || i || '@example.com","tier":"gold"},"lines":[{"sku":"SKU-1","qty":2,"price":19.99},{"sku":"SKU-2","qty":1,"price":5.25}],"total":45.23,"currency":"EUR","shipping":{"method":"standard","address":"Example Street 12, 10115 Berlin"},"note":"benchmark row"}' as p,
         '{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736"}' as md,
         i / 500 as batch
  from generate_series(0, 99999) i;
create table cost_batches as
  select batch, array_agg(m order by m) m, array_agg(e order by m) e,
         array_agg(p order by m) p, array_agg(md order by m) md
  from cost_src group by batch;

\ir inbox_table.sql

create or replace function cost_insert(name text, payload_type text, conflict bool)
returns void language plpgsql as $f$
declare b record;
begin
  for b in select * from cost_batches order by batch loop
    execute format('insert into %I (id, message_id, source, event_type, payload, metadata, status,
        retry_count, max_retries, created_at, updated_at, recovery_attempts)
      select gen_random_uuid()::text, u.m, $1, u.e, u.p::%s, u.md::%s, ''received'', 0, 3,
        clock_timestamp(), clock_timestamp(), 0
      from unnest($2::text[], $3::text[], $4::text[], $5::text[]) with ordinality as u(m, e, p, md, n)
      order by u.n %s', name, payload_type, payload_type,
      case when conflict then 'on conflict (message_id, source) do nothing' else '' end)
    using 'rabbitmq', b.m, b.e, b.p, b.md;
  end loop;
end $f$;

select bench_inbox_table('cost_full', 'json', true, true);
select bench_inbox_table('cost_bare', 'json', true, false);
select bench_inbox_table('cost_text', 'text', true, true);
select bench_inbox_table('cost_floor', 'text', false, false);
select bench_inbox_table('cost_copy', 'json', true, true);
checkpoint;
\timing on
\echo full
select cost_insert('cost_full', 'json', true);
\echo bare
select cost_insert('cost_bare', 'json', true);
\echo text
select cost_insert('cost_text', 'text', true);
\echo floor
select cost_insert('cost_floor', 'text', false);
\echo copy (COPY of the 100 000 rows, then 200 INSERT ... SELECT of 500)
\timing off
create temporary table cost_stage (m text, e text, p text, md text, batch int);
\timing on
\copy cost_stage from program 'psql -h 127.0.0.1 -U postgres test -Atc "copy cost_src to stdout"'
\timing off
-- Stands for one COPY per batch into an emptied stage: each INSERT reads its batch by index.
create index on cost_stage (batch);
analyze cost_stage;
\timing on
do $$ declare b int; begin for b in 0..199 loop
  insert into cost_copy (id, message_id, source, event_type, payload, metadata, status,
      retry_count, max_retries, created_at, updated_at, recovery_attempts)
    select gen_random_uuid()::text, m, 'rabbitmq', e, p::json, md::json, 'received', 0, 3,
      clock_timestamp(), clock_timestamp(), 0
    from cost_stage where batch = b order by m
    on conflict (message_id, source) do nothing;
end loop; end $$;
\timing off
drop table cost_src, cost_batches, cost_full, cost_bare, cost_text, cost_floor, cost_copy;
drop function bench_inbox_table, cost_insert;
