//! Operator commands: `init` (create what is missing), `check` (preflight),
//! `status`, `dead list` / `dead requeue`, and `replay --pending`. Each returns typed values whose
//! `Display` is what the command prints.

mod check;
mod dead;
mod init;
mod privileges;
mod replay;
mod status;

pub use check::{check, Check, Checks};
pub use dead::{dead_list, dead_requeue, DeadList};
pub use init::{init, init_inbox};
pub use replay::{replay_pending, ReplayReport};
pub use status::{status, statuses, InboxBacklog, SlotStatus, Status, Statuses};

use crate::config::Config;
use crate::retry::queries::RetryTable;

/// The retry rows of this relay's slot.
fn retry_table(config: &Config) -> RetryTable {
    RetryTable::new(
        config.postgres.retry_table.clone(),
        config.postgres.slot.clone(),
        config.retry.on_dead,
    )
}
