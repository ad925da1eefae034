//! Static configuration of one [`Node`](crate::Node).

use alloc::vec::Vec;
use core::fmt;

use crate::{NodeId, Tick};

/// What a node needs to know about itself and the site. All durations are in ticks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// This node's id. Must not appear in `peers`.
    pub id: NodeId,
    /// Every other member of the site. Quorum is a majority of `peers.len() + 1`.
    pub peers: Vec<NodeId>,
    /// Lower bound (inclusive) of the randomized election timeout. Also the stickiness
    /// window: a node that heard from a leader less than this many ticks ago grants no votes.
    pub election_timeout_min: Tick,
    /// Upper bound (inclusive) of the randomized election timeout.
    pub election_timeout_max: Tick,
    /// A leader starts a heartbeat round every this many ticks.
    pub heartbeat_interval: Tick,
    /// How long after *sending* a majority-acknowledged heartbeat round the leader may
    /// consider its lease valid. Must be shorter than `election_timeout_min`.
    pub lease: Tick,
    /// A leader that has not had a heartbeat round acknowledged by a majority within
    /// `election_timeout_min` ticks steps down.
    pub check_quorum: bool,
    /// Run a pre-vote round (no term bump) before a real election.
    pub pre_vote: bool,
}

impl Config {
    /// Defaults meant for a 100 ms tick: election timeout 1–2 s, heartbeat 200 ms, lease 800 ms.
    pub fn new(id: NodeId, peers: impl IntoIterator<Item = NodeId>) -> Self {
        Config {
            id,
            peers: peers.into_iter().collect(),
            election_timeout_min: 10,
            election_timeout_max: 20,
            heartbeat_interval: 2,
            lease: 8,
            check_quorum: true,
            pre_vote: true,
        }
    }

    /// Number of members (this node and its peers).
    pub fn members(&self) -> usize {
        self.peers.len() + 1
    }

    /// Votes (or acks) needed for a majority, counting this node.
    pub fn quorum(&self) -> usize {
        self.members() / 2 + 1
    }

    /// Checks the invariants the safety argument relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.peers.contains(&self.id) {
            return Err(ConfigError::SelfInPeers(self.id));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if self.peers[..i].contains(p) {
                return Err(ConfigError::DuplicatePeer(*p));
            }
        }
        if self.election_timeout_min == 0 || self.election_timeout_min > self.election_timeout_max {
            return Err(ConfigError::ElectionTimeout);
        }
        if self.heartbeat_interval == 0 || self.heartbeat_interval >= self.election_timeout_min {
            return Err(ConfigError::HeartbeatInterval);
        }
        if self.lease == 0 || self.lease >= self.election_timeout_min {
            return Err(ConfigError::Lease);
        }
        Ok(())
    }
}

/// Why a [`Config`] was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The node's own id is listed among its peers.
    SelfInPeers(NodeId),
    /// A peer is listed twice.
    DuplicatePeer(NodeId),
    /// `election_timeout_min` must be at least 1 and at most `election_timeout_max`.
    ElectionTimeout,
    /// `heartbeat_interval` must be at least 1 and below `election_timeout_min`.
    HeartbeatInterval,
    /// `lease` must be at least 1 and below `election_timeout_min`.
    Lease,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::SelfInPeers(id) => write!(f, "node {id} lists itself as a peer"),
            ConfigError::DuplicatePeer(id) => write!(f, "peer {id} is listed twice"),
            ConfigError::ElectionTimeout => {
                f.write_str("election timeout range must satisfy 1 <= min <= max")
            }
            ConfigError::HeartbeatInterval => {
                f.write_str("heartbeat interval must satisfy 1 <= interval < election_timeout_min")
            }
            ConfigError::Lease => {
                f.write_str("lease must satisfy 1 <= lease < election_timeout_min (lease safety)")
            }
        }
    }
}

impl core::error::Error for ConfigError {}
