//! The election state machine.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::config::{Config, ConfigError};
use crate::message::{Message, MessageKind};
use crate::rng::SplitMix64;
use crate::{NodeId, Term, Tick};

/// What must survive a restart: the current term and whom this node voted for in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    /// Asking for pre-votes; term not yet bumped.
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    /// The name `/status` shows. A pre-candidate is reported as "candidate".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate | Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Output of one or more `tick`/`step` calls. **Contract:** if `persist` is `Some`, save
/// it durably first, then send `messages`, then call [`Node::advance`]. Sending before
/// the save could let a node that crashes in between vote twice in one term.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a Ready carries state to persist and messages to send"]
pub struct Ready {
    pub persist: Option<HardState>,
    pub messages: Vec<Message>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.persist.is_none() && self.messages.is_empty()
    }
}

/// Why a message was refused by [`Node::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepError {
    /// The message is addressed to another node.
    NotForMe { to: NodeId },
    /// The sender is not a configured member.
    UnknownSender(NodeId),
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::NotForMe { to } => write!(f, "message addressed to node {to}"),
            StepError::UnknownSender(id) => write!(f, "message from unknown node {id}"),
        }
    }
}

impl core::error::Error for StepError {}

/// A snapshot for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub now: Tick,
    /// The lease is valid while `now < lease_until` (leader only).
    pub lease_until: Option<Tick>,
}

/// One member's election state machine. See the crate docs for the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    cfg: Config,
    rng: SplitMix64,
    /// This node's logical clock: ticks since it was created.
    now: Tick,
    term: Term,
    voted_for: Option<NodeId>,
    persisted: HardState,
    role: Role,
    leader: Option<NodeId>,
    election_elapsed: Tick,
    randomized_timeout: Tick,
    /// Ticks since this node last heard from a leader of its term, stepped down as leader,
    /// or booted. Saturates at `election_timeout_min`: only `< min` matters (stickiness).
    contact_elapsed: Tick,
    heartbeat_elapsed: Tick,
    /// Pre-candidate / candidate: who answered, and how.
    votes: BTreeMap<NodeId, bool>,
    /// Leader: send time of the newest own round each peer acknowledged (this term).
    acked_round: BTreeMap<NodeId, Tick>,
    /// Leader: send time of the newest round it started.
    last_round: Tick,
    /// Leader: send time of the newest round a majority acknowledged (or election time).
    quorum_at: Tick,
    /// Leader: the lease is valid while `now < lease_until`.
    lease_until: Tick,
    msgs: Vec<Message>,
}

impl Node {
    /// Creates (or restarts) a node from its persisted state. `seed` drives the election
    /// jitter; give each node (and each restart) a different one, e.g. from the OS RNG.
    ///
    /// A fresh or restarted node grants no votes for `election_timeout_min` ticks: it
    /// may have acknowledged a leader's heartbeat just before it crashed, and the lease
    /// argument needs it to stay loyal for that long.
    pub fn new(cfg: Config, state: HardState, seed: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self::new_unchecked(cfg, state, seed))
    }

    /// Like [`Node::new`] without validating the config. Only for tests that show the
    /// model checker catches an unsafe configuration.
    #[doc(hidden)]
    pub fn new_unchecked(mut cfg: Config, state: HardState, seed: u64) -> Self {
        cfg.peers.sort_unstable();
        cfg.peers.dedup();
        let mut node = Node {
            rng: SplitMix64::new(seed),
            now: 0,
            term: state.term,
            voted_for: state.voted_for,
            persisted: state,
            role: Role::Follower,
            leader: None,
            election_elapsed: 0,
            randomized_timeout: cfg.election_timeout_min,
            contact_elapsed: 0,
            heartbeat_elapsed: 0,
            votes: BTreeMap::new(),
            acked_round: BTreeMap::new(),
            last_round: 0,
            quorum_at: 0,
            lease_until: 0,
            msgs: Vec::new(),
            cfg,
        };
        node.reset_randomized_timeout();
        node
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    /// This node's logical clock (ticks since creation).
    pub fn now(&self) -> Tick {
        self.now
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            voted_for: self.voted_for,
        }
    }

    /// Whether this node holds a valid leader lease at `now` on its own clock (normally
    /// `self.now()`; a later value asks "will I still hold it then, barring news?").
    pub fn has_lease(&self, now: Tick) -> bool {
        self.role == Role::Leader && now < self.lease_until
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.cfg.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            now: self.now,
            lease_until: (self.role == Role::Leader).then_some(self.lease_until),
        }
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.now += 1;
        if self.contact_elapsed < self.cfg.election_timeout_min {
            self.contact_elapsed += 1;
        }
        if self.role == Role::Leader {
            if self.cfg.check_quorum && self.now - self.quorum_at >= self.cfg.election_timeout_min {
                self.become_follower(self.term, None);
                return;
            }
            self.heartbeat_elapsed += 1;
            if self.heartbeat_elapsed >= self.cfg.heartbeat_interval {
                self.broadcast_heartbeat();
            }
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.randomized_timeout {
                self.campaign();
            }
        }
    }

    /// Feeds one received message.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.cfg.id {
            return Err(StepError::NotForMe { to: m.to });
        }
        if !self.cfg.peers.contains(&m.from) {
            return Err(StepError::UnknownSender(m.from));
        }
        if m.term > self.term {
            match m.kind {
                MessageKind::PreVote | MessageKind::Vote if self.sticky() => {
                    // Loyal to a live leader (or just booted): ignore, and do not let the
                    // request bump our term either.
                    return Ok(());
                }
                // A pre-vote never changes anyone's term; nor does a granted answer.
                MessageKind::PreVote | MessageKind::PreVoteResponse { granted: true } => {}
                MessageKind::Heartbeat { .. } => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            // Tell stale senders our term so they catch up; drop stale answers.
            let reply = match m.kind {
                MessageKind::Heartbeat { round } => MessageKind::HeartbeatResponse { round },
                MessageKind::PreVote => MessageKind::PreVoteResponse { granted: false },
                MessageKind::Vote => MessageKind::VoteResponse { granted: false },
                _ => return Ok(()),
            };
            self.send(m.from, self.term, reply);
            return Ok(());
        }

        match m.kind {
            MessageKind::PreVote => {
                let granted = !self.sticky()
                    && (m.term > self.term || self.voted_for.is_none_or(|v| v == m.from));
                let term = if granted { m.term } else { self.term };
                self.send(m.from, term, MessageKind::PreVoteResponse { granted });
            }
            MessageKind::Vote => {
                let granted = !self.sticky() && self.voted_for.is_none_or(|v| v == m.from);
                if granted {
                    self.voted_for = Some(m.from);
                    self.election_elapsed = 0;
                }
                self.send(m.from, self.term, MessageKind::VoteResponse { granted });
            }
            MessageKind::PreVoteResponse { granted } => {
                // Grants echo the proposed term; refusals carry the refuser's (equal) term.
                let this_round = if granted {
                    m.term == self.term + 1
                } else {
                    m.term == self.term
                };
                if self.role == Role::PreCandidate && this_round {
                    self.votes.insert(m.from, granted);
                    self.count_votes();
                }
            }
            MessageKind::VoteResponse { granted } => {
                if self.role == Role::Candidate {
                    self.votes.insert(m.from, granted);
                    self.count_votes();
                }
            }
            MessageKind::Heartbeat { round } => {
                if self.role != Role::Leader {
                    if self.role != Role::Follower || self.leader != Some(m.from) {
                        self.become_follower(self.term, Some(m.from));
                    }
                    self.election_elapsed = 0;
                    self.contact_elapsed = 0;
                    self.send(m.from, self.term, MessageKind::HeartbeatResponse { round });
                }
                // A leader never hears a heartbeat of its own term: one leader per term.
            }
            MessageKind::HeartbeatResponse { round } => {
                if self.role == Role::Leader && round <= self.last_round {
                    let e = self.acked_round.entry(m.from).or_insert(round);
                    *e = (*e).max(round);
                    self.update_lease();
                }
            }
        }
        Ok(())
    }

    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty() || self.hard_state() != self.persisted
    }

    /// Takes what has to be persisted and sent. See [`Ready`] for the contract.
    pub fn ready(&mut self) -> Ready {
        let hs = self.hard_state();
        Ready {
            persist: (hs != self.persisted).then_some(hs),
            messages: core::mem::take(&mut self.msgs),
        }
    }

    /// Confirms that `ready.persist` is durable (call after saving it).
    pub fn advance(&mut self, ready: &Ready) {
        if let Some(hs) = ready.persist {
            self.persisted = hs;
        }
    }

    /// A node that heard from a live leader (or was itself leader, or booted) less than
    /// `election_timeout_min` ticks ago refuses votes and pre-votes. This is what makes
    /// the lease safe.
    fn sticky(&self) -> bool {
        self.role == Role::Leader || self.contact_elapsed < self.cfg.election_timeout_min
    }

    fn send(&mut self, to: NodeId, term: Term, kind: MessageKind) {
        self.msgs.push(Message {
            from: self.cfg.id,
            to,
            term,
            kind,
        });
    }

    fn reset_randomized_timeout(&mut self) {
        self.randomized_timeout = self
            .rng
            .in_range(self.cfg.election_timeout_min, self.cfg.election_timeout_max);
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if self.role == Role::Leader {
            // We acked our own rounds: stay loyal to our own lease for a full window.
            self.contact_elapsed = 0;
        }
        if term != self.term {
            self.term = term;
            self.voted_for = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.election_elapsed = 0;
        self.votes.clear();
        self.acked_round.clear();
        self.lease_until = 0;
        self.reset_randomized_timeout();
    }

    fn campaign(&mut self) {
        if self.cfg.pre_vote {
            self.role = Role::PreCandidate;
            self.start_round(self.term + 1, MessageKind::PreVote);
        } else {
            self.become_candidate();
        }
    }

    fn become_candidate(&mut self) {
        self.term += 1;
        self.voted_for = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.start_round(self.term, MessageKind::Vote);
    }

    fn start_round(&mut self, term: Term, kind: MessageKind) {
        self.leader = None;
        self.election_elapsed = 0;
        self.reset_randomized_timeout();
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        for i in 0..self.cfg.peers.len() {
            let p = self.cfg.peers[i];
            self.send(p, term, kind);
        }
        self.count_votes();
    }

    fn count_votes(&mut self) {
        let yes = self.votes.values().filter(|g| **g).count();
        let no = self.votes.len() - yes;
        let q = self.cfg.quorum();
        if yes >= q {
            match self.role {
                Role::PreCandidate => self.become_candidate(),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if no >= q {
            self.become_follower(self.term, None);
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.votes.clear();
        self.acked_round.clear();
        self.quorum_at = self.now;
        self.lease_until = 0;
        self.broadcast_heartbeat();
    }

    fn broadcast_heartbeat(&mut self) {
        self.heartbeat_elapsed = 0;
        self.last_round = self.now;
        let round = self.now;
        for i in 0..self.cfg.peers.len() {
            let p = self.cfg.peers[i];
            self.send(p, self.term, MessageKind::Heartbeat { round });
        }
        self.update_lease();
    }

    /// The newest round acknowledged by a majority (this node acks its own rounds) dates
    /// both the lease and the check-quorum deadline.
    fn update_lease(&mut self) {
        let q = self.cfg.quorum();
        let mut acks: Vec<Tick> = self.acked_round.values().copied().collect();
        acks.push(self.last_round);
        if acks.len() < q {
            return;
        }
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let sent = acks[q - 1];
        self.quorum_at = self.quorum_at.max(sent);
        self.lease_until = self.lease_until.max(sent + self.cfg.lease);
    }
}
