//! A save of the election's hard state can fail (a full disk: the very condition fogline
//! is built to survive). The review found the agent calling `advance` after a failed save,
//! so the node took the unsaved vote for durable: it answered the candidate's retry with a
//! grant, and after a crash (back on the old state) voted for another candidate in the
//! same term. [`Driver`] sends nothing, and does not lead, until its state is saved.

use fogline_cluster::{Config, Driver, HardState, Message, MessageKind, Storage};

/// Storage whose saves fail while `failing` is set.
#[derive(Debug, Default, Clone)]
struct Flaky {
    saved: HardState,
    failing: bool,
    saves_failed: u32,
}

#[derive(Debug, PartialEq, Eq)]
struct DiskFull;

impl Storage for Flaky {
    type Error = DiskFull;
    fn load(&self) -> Result<HardState, DiskFull> {
        Ok(self.saved)
    }
    fn save(&mut self, state: &HardState) -> Result<(), DiskFull> {
        if self.failing {
            self.saves_failed += 1;
            return Err(DiskFull);
        }
        self.saved = *state;
        Ok(())
    }
}

fn cfg() -> Config {
    let mut c = Config::new(1, [2, 3]);
    c.election_timeout_min = 5;
    c.election_timeout_max = 5;
    c.heartbeat_interval = 1;
    c.lease = 4;
    c
}

fn vote_request(from: u64, term: u64) -> Message {
    Message {
        from,
        to: 1,
        term,
        kind: MessageKind::Vote,
    }
}

/// Ticks past a fresh node's stickiness (it grants nothing right after booting).
fn booted(storage: Flaky) -> Driver<Flaky> {
    let mut d = Driver::new(cfg(), storage, 9).expect("valid config");
    for _ in 0..5 {
        d.tick();
        let _ = d.ready();
    }
    d
}

fn grants(sent: &[Message], term: u64) -> Vec<u64> {
    sent.iter()
        .filter(|m| m.term == term && m.kind == MessageKind::VoteResponse { granted: true })
        .map(|m| m.to)
        .collect()
}

#[test]
fn a_vote_that_could_not_be_saved_is_never_sent_nor_given_twice() {
    let mut sent = Vec::new();
    let mut d = booted(Flaky::default());
    d.storage_mut().failing = true;
    // Candidate 2 asks for term 7's vote: the save fails, nothing goes out.
    d.step(vote_request(2, 7)).expect("peer");
    assert!(d.ready().is_err(), "the save failed");
    // It asks again (candidates retry): still unsaved, still nothing.
    d.step(vote_request(2, 7)).expect("peer");
    if let Ok(msgs) = d.ready() {
        sent.extend(msgs);
    }
    assert!(grants(&sent, 7).is_empty(), "sent before saved: {sent:?}");
    assert!(d.storage().saves_failed >= 2, "the save is tried again");
    // A crash: the node comes back on what was saved, and candidate 3 asks.
    let storage = d.into_storage();
    let mut d = booted(Flaky {
        failing: false,
        ..storage
    });
    d.step(vote_request(3, 7)).expect("peer");
    sent.extend(d.ready().expect("saved"));
    assert_eq!(grants(&sent, 7), vec![3], "one vote in term 7: {sent:?}");
    assert_eq!(d.storage().saved.voted_for, Some(3));
}

#[test]
fn a_leader_that_cannot_save_does_not_lead() {
    let mut d = booted(Flaky::default());
    // Pre-vote and vote as a candidate, with peer 2's answers.
    let mut term = 0;
    for _ in 0..20 {
        d.tick();
        for m in d.ready().expect("saved") {
            let answer = match m.kind {
                MessageKind::PreVote => MessageKind::PreVoteResponse { granted: true },
                MessageKind::Vote => MessageKind::VoteResponse { granted: true },
                MessageKind::Heartbeat { round } => MessageKind::HeartbeatResponse { round },
                _ => continue,
            };
            term = m.term;
            let _ = d.step(Message {
                from: m.to,
                to: 1,
                term: m.term,
                kind: answer,
            });
        }
        if d.leading() {
            break;
        }
    }
    assert!(d.leading(), "became leader with a lease (term {term})");
    // A higher term arrives while the disk is full: the node follows in memory, but it
    // cannot save that; it must not act as leader of anything meanwhile.
    d.storage_mut().failing = true;
    let _ = d.step(Message {
        from: 3,
        to: 1,
        term: term + 5,
        kind: MessageKind::Heartbeat { round: 0 },
    });
    assert!(d.ready().is_err());
    assert!(!d.leading());
    assert!(d.unsaved());
    d.storage_mut().failing = false;
    d.tick();
    let _ = d.ready().expect("saved now");
    assert!(!d.unsaved());
    assert_eq!(d.storage().saved.term, term + 5);
}
