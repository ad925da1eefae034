//! The replicated-ack gate: with `cluster.ack_after = "replicated"`, what a commit owes
//! its devices and connections (watermarks, PUBACKs, refusals) waits until the log is
//! durable on `min_insync` agents below the commit's end. Sans-io: the writer holds each
//! commit and releases what the in-sync offset covers.

use std::collections::{HashMap, VecDeque};

use fogline_firmware::wire::Ack;

use crate::ingest::Outcome;

/// Commits waiting at most; beyond it the newest are merged into the one before (their
/// acks then wait a little longer, never less).
pub const MAX_WAITING: usize = 4096;

/// What a commit owes: the newest watermark per device, and its readings' outcomes in the
/// order their connections queued them.
#[derive(Debug, Default)]
pub struct Owed {
    pub acks: HashMap<String, Ack>,
    pub outcomes: Vec<Outcome>,
}

/// Commits waiting for replication, oldest first.
#[derive(Debug, Default)]
pub struct Gate {
    waiting: VecDeque<(u64, Owed)>,
}

impl Gate {
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Holds what a commit ending at offset `end` owes.
    pub fn hold(&mut self, end: u64, owed: Owed) {
        self.waiting.push_back((end, owed));
        if self.waiting.len() > MAX_WAITING {
            if let Some((end, newest)) = self.waiting.pop_back() {
                if let Some((prev_end, prev)) = self.waiting.back_mut() {
                    *prev_end = end;
                    prev.acks.extend(newest.acks);
                    prev.outcomes.extend(newest.outcomes);
                }
            }
        }
    }

    /// What the commits wholly below `covered` (durable on enough agents) owe, in order.
    pub fn release(&mut self, covered: u64) -> Owed {
        let mut out = Owed::default();
        while self.waiting.front().is_some_and(|(end, _)| *end <= covered) {
            if let Some((_, owed)) = self.waiting.pop_front() {
                out.acks.extend(owed.acks);
                out.outcomes.extend(owed.outcomes);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Commits, Done, Reject};
    use std::sync::Arc;

    fn owed(device: &str, seq: u32, cursor: &Arc<Commits>, token: u64) -> Owed {
        Owed {
            acks: [(device.to_owned(), Ack { boot: 1, seq })].into(),
            outcomes: vec![Outcome {
                done: Done {
                    commits: cursor.clone(),
                    token,
                },
                refused: None,
            }],
        }
    }

    #[test]
    fn a_commit_is_released_only_once_it_is_covered() {
        let c = Arc::new(Commits::default());
        let mut g = Gate::default();
        g.hold(10, owed("d", 5, &c, 1));
        g.hold(20, owed("d", 9, &c, 2));
        let r = g.release(9);
        assert!(
            r.acks.is_empty() && r.outcomes.is_empty(),
            "nothing covered yet"
        );
        let r = g.release(15);
        assert_eq!(r.acks["d"].seq, 5);
        assert_eq!(r.outcomes.len(), 1);
        r.outcomes.iter().for_each(Outcome::release);
        assert_eq!(c.committed(), 1, "only the first reading's PUBACK may go");
        let r = g.release(20);
        assert_eq!(r.acks["d"].seq, 9);
        assert!(g.is_empty());
    }

    #[test]
    fn a_refusal_waits_with_its_commit_and_never_passes_an_earlier_reading() {
        let c = Arc::new(Commits::default());
        let mut g = Gate::default();
        g.hold(10, owed("d", 1, &c, 1));
        let mut refused = owed("d", 1, &c, 2);
        refused.outcomes[0].refused = Some(Reject::TooManyGaps);
        g.hold(11, refused);
        // The refusal's commit is covered only with the earlier one.
        g.release(10).outcomes.iter().for_each(Outcome::release);
        assert_eq!(c.committed(), 1);
        g.release(11).outcomes.iter().for_each(Outcome::release);
        assert_eq!(c.committed(), 2);
        assert_eq!(c.take_refusal(2), Some(Reject::TooManyGaps));
    }

    #[test]
    fn beyond_the_limit_the_newest_merge_and_wait_for_the_later_end() {
        let c = Arc::new(Commits::default());
        let mut g = Gate::default();
        for i in 0..=MAX_WAITING as u64 {
            g.hold(i + 1, owed("d", i as u32 + 1, &c, i + 1));
        }
        // The last two merged: releasing up to the second last end releases neither.
        let r = g.release(MAX_WAITING as u64);
        assert_eq!(r.outcomes.len(), MAX_WAITING - 1);
        let r = g.release(MAX_WAITING as u64 + 1);
        assert_eq!(r.outcomes.len(), 2);
        assert!(g.is_empty());
    }
}
