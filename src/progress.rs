//! Ack-gated progress: transactions in commit order, each done when every one
//! of its messages is resolved. The applied LSN is the end LSN of the last
//! transaction that is done and has no unfinished transaction before it.

use pgwire_replication::Lsn;
use std::collections::VecDeque;

/// Identifies a transaction inside the tracker.
pub type TxnId = u64;

#[derive(Debug)]
struct Txn {
    /// Commit end LSN, once the Commit message arrived.
    end_lsn: Option<Lsn>,
    /// Messages not yet resolved (acked, or durably parked).
    pending: u32,
}

/// Tracks transactions from Begin to "all messages resolved and committed".
#[derive(Debug, Default)]
pub struct Tracker {
    txns: VecDeque<Txn>,
    /// Id of `txns[0]`.
    front_id: TxnId,
    /// A Begin arrived and its Commit has not.
    open: bool,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every transaction (the stream replays them). Ids keep increasing, so
    /// a late resolution of a forgotten transaction is ignored.
    pub fn reset(&mut self) {
        self.front_id += self.txns.len() as u64;
        self.txns.clear();
        self.open = false;
    }

    /// A transaction starts; returns its id.
    pub fn begin(&mut self) -> TxnId {
        debug_assert!(!self.open, "Begin inside an open transaction");
        self.txns.push_back(Txn {
            end_lsn: None,
            pending: 0,
        });
        self.open = true;
        self.front_id + self.txns.len() as u64 - 1
    }

    /// The open transaction, if any.
    pub fn current(&self) -> Option<TxnId> {
        self.open
            .then(|| self.front_id + self.txns.len() as u64 - 1)
    }

    /// One more message belongs to `txn`.
    pub fn add_message(&mut self, txn: TxnId) {
        if let Some(t) = self.get_mut(txn) {
            t.pending += 1;
        }
    }

    /// One message of `txn` is resolved.
    pub fn resolve(&mut self, txn: TxnId) {
        if let Some(t) = self.get_mut(txn) {
            debug_assert!(t.pending > 0);
            t.pending = t.pending.saturating_sub(1);
        }
    }

    /// The open transaction committed at `end_lsn`.
    pub fn commit(&mut self, end_lsn: Lsn) {
        if self.open {
            if let Some(t) = self.txns.back_mut() {
                t.end_lsn = Some(end_lsn);
            }
            self.open = false;
        }
    }

    /// Pops every finished transaction at the front; returns the newest end LSN popped.
    pub fn advance(&mut self) -> Option<Lsn> {
        let mut applied = None;
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(lsn) if front.pending == 0 => {
                    applied = Some(lsn);
                    self.txns.pop_front();
                    self.front_id += 1;
                }
                _ => break,
            }
        }
        applied
    }

    /// Nothing is open or waiting: a keepalive position can be confirmed.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    /// Transactions received and not yet applied.
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    fn get_mut(&mut self, txn: TxnId) -> Option<&mut Txn> {
        let idx = txn.checked_sub(self.front_id)? as usize;
        self.txns.get_mut(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::from_u64(n)
    }

    #[test]
    fn lsn_waits_for_every_message_of_earlier_transactions() {
        let mut t = Tracker::new();
        let a = t.begin();
        t.add_message(a);
        t.add_message(a);
        t.commit(lsn(10));
        let b = t.begin();
        t.add_message(b);
        t.commit(lsn(20));
        assert_eq!(t.advance(), None);
        t.resolve(b);
        assert_eq!(t.advance(), None, "b is done but a is not");
        t.resolve(a);
        assert_eq!(t.advance(), None);
        t.resolve(a);
        assert_eq!(t.advance(), Some(lsn(20)));
        assert!(t.is_idle());
    }

    #[test]
    fn messages_resolved_before_commit_wait_for_it() {
        let mut t = Tracker::new();
        let a = t.begin();
        t.add_message(a);
        t.resolve(a);
        assert_eq!(t.advance(), None, "no Commit yet");
        assert!(!t.is_idle());
        t.commit(lsn(7));
        assert_eq!(t.advance(), Some(lsn(7)));
    }

    #[test]
    fn reset_ignores_late_resolutions() {
        let mut t = Tracker::new();
        let old = t.begin();
        t.add_message(old);
        t.reset();
        let new = t.begin();
        assert_ne!(old, new);
        t.add_message(new);
        t.resolve(old);
        t.commit(lsn(9));
        assert_eq!(
            t.advance(),
            None,
            "the old id must not resolve the new transaction"
        );
        t.resolve(new);
        assert_eq!(t.advance(), Some(lsn(9)));
    }

    #[test]
    fn ids_stay_unique_after_transactions_are_applied() {
        let mut t = Tracker::new();
        let a = t.begin();
        t.commit(lsn(3));
        assert_eq!(t.advance(), Some(lsn(3)));
        let b = t.begin();
        assert_ne!(a, b, "an applied transaction's id is not given again");
        t.add_message(b);
        t.resolve(a);
        t.commit(lsn(4));
        assert_eq!(
            t.advance(),
            None,
            "a late resolution of `a` leaves `b` alone"
        );
        t.resolve(b);
        assert_eq!(t.advance(), Some(lsn(4)));
    }

    #[test]
    fn empty_transactions_complete_at_commit() {
        let mut t = Tracker::new();
        t.begin();
        t.commit(lsn(5));
        t.begin();
        assert_eq!(t.current(), Some(1));
        t.commit(lsn(6));
        assert_eq!(t.advance(), Some(lsn(6)));
        assert_eq!(t.current(), None);
    }
}
