//! The relay loop: WAL in, AMQP out, LSN forward only behind broker acks or
//! durable retry state. The loop and its dispatch are in `main_loop` (with its
//! methods in `wal.rs`, `answers.rs` and `liveness.rs`); the state it drives
//! lives in its own rooms:
//!
//! - `window`: the in-flight window, per-aggregate turns, byte and message
//!   accounting, publish deadlines;
//! - `parked`: which aggregates have retry state and which heads are due;
//! - `marks`: how far the slot may be confirmed while acked rows wait for
//!   their `on_success`;
//! - `retries`: parking messages and re-publishing retried heads;
//! - `startup`: preflight, slot take-over and standby wait, heartbeat;
//! - `wiring`: `run`, which starts the tasks and channels and hands them to the loop.
//!
//! One row's path: `source` hands an XLogData payload to the decoder, which
//! makes an `OutboxEvent`; `sink::format` turns it into an AMQP message; the
//! window admits it and, when its aggregate is free, publishes it through the
//! sink task; the sink's confirm comes back here and resolves the message in the
//! `progress::Tracker`; once its transaction and all earlier ones are resolved
//! and committed, the commit's end LSN is set as applied on the replication
//! client, whose worker reports it to the server.

mod answers;
mod fastmap;
mod liveness;
mod main_loop;
mod marks;
mod parked;
mod retries;
mod routing;
mod signs;
mod startup;
mod wal;
mod window;
mod wiring;

pub use wiring::run;

pub use startup::heartbeat_application_name;
