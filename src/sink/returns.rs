//! Matching returned (unroutable) messages to the publishes they belong to.

use super::{Answer, Outcome};
use lapin::Confirmation;
use std::collections::HashMap;

/// Matches returned (unroutable) messages to their publishes. RabbitMQ sends a
/// publish's `basic.return` before its `basic.ack`, but lapin attaches each return
/// to the next confirm it resolves — with `multiple` acks, any of several publishes.
/// So returns are counted by message id and consumed by that id's own confirm.
#[derive(Default)]
pub struct Returns {
    /// Returns not yet matched: message id -> (count, reply code, reply text).
    pending: HashMap<String, (u32, u16, String)>,
}

impl Returns {
    /// Turns a batch of ready confirms into outcomes; an error means the connection is gone.
    pub fn classify(&mut self, batch: Vec<Answer>) -> Result<Vec<(u64, Outcome)>, lapin::Error> {
        let mut kinds = Vec::with_capacity(batch.len());
        for (seq, message, result) in batch {
            let confirmation = result?;
            let (kind, returned) = match confirmation {
                Confirmation::Ack(r) => (Outcome::Ack, r),
                Confirmation::Nack(r) => (Outcome::Nack, r),
                Confirmation::NotRequested => (Outcome::NotRequested, None),
            };
            if let Some(ret) = returned {
                let id = ret
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                let entry = self.pending.entry(id).or_insert((
                    0,
                    ret.reply_code,
                    ret.reply_text.to_string(),
                ));
                entry.0 += 1;
            }
            kinds.push((seq, message, kind));
        }
        Ok(kinds
            .into_iter()
            .map(|(seq, message, kind)| {
                let id = message.id.as_str();
                let outcome = match self.pending.get_mut(id) {
                    Some(entry) => {
                        entry.0 -= 1;
                        let outcome = Outcome::Returned {
                            reply_code: entry.1,
                            reply_text: entry.2.clone(),
                        };
                        if entry.0 == 0 {
                            self.pending.remove(id);
                        }
                        outcome
                    }
                    None => kind,
                };
                (seq, outcome)
            })
            .collect())
    }
}
