-- What the order of the receiver's row ids costs Postgres: 200 000 Event-Forge
-- messages with random message ids (Event-Forge's outbox ids are UUIDv4) into
-- Event-Forge's inbox table as `init` makes it, 400 statements of 500 rows in
-- the receiver's statement shape (`src/inbox/queries.rs`), one backend, each
-- timed after a checkpoint (so each pays its full-page writes):
--   sql_v4    ids made by the statement, gen_random_uuid() (the receiver before);
--   given_v4  random ids passed in an array: the same order, made by the client;
--   given_v7  time-ordered ids (UUIDv7: milliseconds first) passed in an array:
--             every insert into the primary key goes to its right-hand edge.
-- synchronous_commit is off: the statements are measured, not the flushes.
--
--   psql -h 127.0.0.1 -U postgres test -f benches/sql/inbox_id_order.sql
\set QUIET on
set client_min_messages = warning;
\pset tuples_only on
set synchronous_commit = off;
drop table if exists ido_src, ido_batches, ido_sql_v4, ido_given_v4, ido_given_v7;
create table ido_src as
  select gen_random_uuid()::text as m, 'order.placed' as e,
         '{"orderId":"order-' || lpad(i::text, 8, '0') || '","customer":{"id":"cust-' || (i % 100000) || '","email":"customer' || i || '@example.com","tier":"gold"},"lines":[{"sku":"SKU-1","qty":2,"price":19.99},{"sku":"SKU-2","qty":1,"price":5.25}],"total":45.23,"currency":"EUR","shipping":{"method":"standard","address":"Example Street 12, 10115 Berlin"},"note":"benchmark row"}' as p,
         '{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736"}' as md,
         gen_random_uuid()::text as v4,
         -- UUIDv7: 48 bits of Unix milliseconds (one millisecond per 10 rows
         -- here), version 7, the rest random.
         (select encode(set_byte(overlay(b placing substring(int8send(1765000000000 + i / 10) from 3) from 1 for 6),
                                 6, (get_byte(b, 6) & 15) | 112), 'hex')::uuid::text
            from (select uuid_send(gen_random_uuid()) as b, i) r) as v7,
         i / 500 as batch
  from generate_series(0, 199999) i;
create table ido_batches as
  select batch, array_agg(m order by v7) m, array_agg(e order by v7) e,
         array_agg(p order by v7) p, array_agg(md order by v7) md,
         array_agg(v4 order by v7) v4, array_agg(v7 order by v7) v7
  from ido_src group by batch;

\ir inbox_table.sql

-- ids: 'sql' (gen_random_uuid() in the statement), 'v4' or 'v7' (passed in).
create or replace function ido_insert(name text, ids text) returns void language plpgsql as $f$
declare b record;
begin
  for b in select * from ido_batches order by batch loop
    execute format('insert into %I (id, message_id, source, event_type, payload, metadata, status,
        retry_count, max_retries, created_at, updated_at, recovery_attempts)
      select %s, u.m, $1, u.e, u.p::json, u.md::json, ''received'', 0, 3,
        clock_timestamp(), clock_timestamp(), 0
      from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) with ordinality as u(m, e, p, md, i, n)
      order by u.n on conflict (message_id, source) do nothing', name,
      case when ids = 'sql' then 'gen_random_uuid()::text' else 'u.i' end)
    using 'rabbitmq', b.m, b.e, b.p, b.md, case when ids = 'v7' then b.v7 else b.v4 end;
  end loop;
end $f$;

select bench_inbox_table('ido_' || v, 'json', true, true) from unnest(array['sql_v4', 'given_v4', 'given_v7']) v;

-- One variant after a checkpoint (so each pays its full-page writes): its
-- time and the WAL it wrote.
create or replace function ido_run(variant text, ids text)
returns table (variant_ text, seconds numeric, wal_mb numeric) language plpgsql as $f$
declare wal0 pg_lsn; t0 timestamptz;
begin
  checkpoint;
  wal0 := pg_current_wal_lsn();
  t0 := clock_timestamp();
  perform ido_insert('ido_' || variant, ids);
  return query select variant, round(extract(epoch from clock_timestamp() - t0)::numeric, 2),
    round(pg_wal_lsn_diff(pg_current_wal_lsn(), wal0) / 1048576);
end $f$;

select * from ido_run('sql_v4', 'sql');
select * from ido_run('given_v4', 'v4');
select * from ido_run('given_v7', 'v7');
\echo primary key size (MB): sql_v4, given_v4, given_v7
select pg_relation_size('ido_sql_v4_pkey') / 1048576, pg_relation_size('ido_given_v4_pkey') / 1048576,
       pg_relation_size('ido_given_v7_pkey') / 1048576;
drop table ido_src, ido_batches, ido_sql_v4, ido_given_v4, ido_given_v7;
drop function bench_inbox_table, ido_insert, ido_run;
