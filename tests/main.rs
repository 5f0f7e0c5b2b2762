//! Integration tests against the real Postgres and RabbitMQ (run
//! scripts/setup-services.sh first). Each test owns its table, publication,
//! slot, exchange and queue. Tests that restart shared services live in
//! tests/faults.rs, which runs serially.

mod support;

mod crash;
mod delivery;
mod event_forge;
mod inbox;
mod isolation;
mod mapping;
mod messages;
mod nodes;
mod operate;
mod ordering;
mod processor;
mod receivers;
mod recovery;
mod refusal;
mod retry;
mod routing;
mod shards;
mod store;
