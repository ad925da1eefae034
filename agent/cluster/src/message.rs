//! The election protocol's messages. The agent serializes them however it likes (they are
//! plain data); the state machine never touches the wire.

use crate::{NodeId, Term, Tick};

/// One protocol message. `term` is the sender's term, except for pre-votes, where it is
/// the term the pre-candidate *would* campaign in (its own term + 1) and for granted
/// pre-vote responses, which echo that term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub kind: MessageKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageKind {
    /// "Would you vote for me in `term`?" Changes nobody's term.
    PreVote,
    PreVoteResponse {
        granted: bool,
    },
    /// Raft's RequestVote. There is no log to compare: the cluster elects an uplink, it
    /// does not replicate a Raft log.
    Vote,
    VoteResponse {
        granted: bool,
    },
    /// A leader's heartbeat. `round` is the leader's own clock when it sent the round; the
    /// follower echoes it so the leader can date what a majority has acknowledged.
    Heartbeat {
        round: Tick,
    },
    HeartbeatResponse {
        round: Tick,
    },
}
