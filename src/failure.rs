//! Why a message failed: one enum, its metric label and its message (the text
//! stored in the retry table and shown by `dead list`).

use crate::sink::Outcome;
use std::fmt;
use std::time::Duration;

/// A per-message failure. A broker outage is not one of these: it suspends
/// publishing without counting against any message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Negatively acknowledged by the broker.
    Nack,
    /// Unroutable (`mandatory`): returned, even though an ack followed.
    Returned { reply_code: u16, reply_text: String },
    /// The broker answered without a confirm: never a success.
    NotConfirmed,
    /// No confirm within `retry.publish_timeout`.
    Timeout { after: Duration },
    /// The body is larger than `amqp.max_message_bytes`.
    TooLarge { bytes: usize, limit: usize },
    /// Its properties and headers do not fit in one frame of the broker's `frame_max`.
    HeadersTooLarge { bytes: usize, frame_max: usize },
    /// The broker closed the channel or connection in answer to this publish.
    Refused { reply_code: u16, reply_text: String },
    /// The row cannot be expressed in AMQP (say, an id longer than a message_id may be).
    Unsendable(String),
    /// The row cannot become an event (payload not JSON, a required column NULL, ...).
    Malformed(String),
}

impl Failure {
    /// The broker's verdict as a failure; `None` for an ack.
    pub fn from_outcome(outcome: Outcome) -> Option<Failure> {
        match outcome {
            Outcome::Ack => None,
            Outcome::Nack => Some(Failure::Nack),
            Outcome::Returned {
                reply_code,
                reply_text,
            } => Some(Failure::Returned {
                reply_code,
                reply_text,
            }),
            Outcome::NotRequested => Some(Failure::NotConfirmed),
            Outcome::Refused(r) => Some(Failure::Refused {
                reply_code: r.reply_code,
                reply_text: r.reply_text,
            }),
            Outcome::HeadersTooLarge { bytes, frame_max } => {
                Some(Failure::HeadersTooLarge { bytes, frame_max })
            }
        }
    }

    /// The `reason` label of `outbox_relay_publish_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Nack | Failure::NotConfirmed => "nack",
            Failure::Returned { .. } => "returned",
            Failure::Timeout { .. } => "timeout",
            Failure::TooLarge { .. } | Failure::HeadersTooLarge { .. } => "too_large",
            Failure::Refused { .. } => "refused",
            Failure::Unsendable(_) | Failure::Malformed(_) => "malformed",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Nack => f.write_str("nacked by the broker"),
            Failure::Returned {
                reply_code,
                reply_text,
            } => write!(
                f,
                "returned as unroutable ({reply_code} {reply_text}): no queue is bound for its routing key"
            ),
            Failure::NotConfirmed => {
                f.write_str("the broker answered without a confirm (channel not in confirm mode)")
            }
            Failure::Timeout { after } => {
                write!(f, "no confirm within retry.publish_timeout ({after:?})")
            }
            Failure::TooLarge { bytes, limit } => write!(
                f,
                "message body of {bytes} bytes exceeds amqp.max_message_bytes ({limit})"
            ),
            Failure::HeadersTooLarge { bytes, frame_max } => write!(
                f,
                "its properties and headers take {bytes} bytes, more than the broker's frame_max ({frame_max}): shorten the header values (aggregate id, event type, metadata trace ids) or raise frame_max on the broker"
            ),
            Failure::Refused {
                reply_code,
                reply_text,
            } => write!(
                f,
                "the broker closed the channel in answer to this message ({reply_code} {reply_text})"
            ),
            Failure::Unsendable(why) => write!(f, "cannot be sent: {why}"),
            Failure::Malformed(why) => write!(f, "malformed row: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_a_registered_label_and_a_message() {
        let all = [
            Failure::Nack,
            Failure::Returned {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
            },
            Failure::NotConfirmed,
            Failure::Timeout {
                after: Duration::from_secs(1),
            },
            Failure::TooLarge { bytes: 9, limit: 1 },
            Failure::HeadersTooLarge {
                bytes: 200_000,
                frame_max: 131_072,
            },
            Failure::Refused {
                reply_code: 406,
                reply_text: "PRECONDITION_FAILED".into(),
            },
            Failure::Unsendable("id is too long".into()),
            Failure::Malformed("payload is not valid JSON".into()),
        ];
        for f in &all {
            assert!(
                crate::metrics::PUBLISH_FAILURE_REASONS.contains(&f.label()),
                "{f:?}"
            );
            assert!(!f.to_string().is_empty());
        }
        let exported = crate::metrics::metrics().render();
        for label in crate::metrics::PUBLISH_FAILURE_REASONS {
            assert!(
                exported.contains(&format!("reason=\"{label}\"")),
                "{label} is not registered"
            );
        }
        assert_eq!(Failure::from_outcome(Outcome::Ack), None);
        assert_eq!(
            Failure::from_outcome(Outcome::Nack).unwrap().label(),
            "nack"
        );
        assert!(all[1]
            .to_string()
            .starts_with("returned as unroutable (312 NO_ROUTE)"));
        assert!(all[3].to_string().contains("retry.publish_timeout"));
        assert!(all[4].to_string().contains("amqp.max_message_bytes"));
        assert!(all[8].to_string().contains("payload is not valid JSON"));
        assert!(all[5].to_string().contains("frame_max"));
    }
}
