//! The election's messages on the wire: JSON on `fogline/cluster/<site>/<to>`, with
//! string node ids mapped to the cluster crate's numeric ones.

use fogline_cluster::MessageKind;
use serde::{Deserialize, Serialize};

/// The number the election state machine knows a node by: FNV-1a of its id.
pub fn node_num(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The topic a member receives election messages on.
pub fn cluster_topic(site: &str, to: &str) -> String {
    format!("fogline/cluster/{site}/{to}")
}

/// An election message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub from: String,
    pub to: String,
    pub term: u64,
    #[serde(flatten)]
    pub kind: WireKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireKind {
    PreVote,
    PreVoteResponse { granted: bool },
    Vote,
    VoteResponse { granted: bool },
    Heartbeat { round: u64 },
    HeartbeatResponse { round: u64 },
}

impl From<MessageKind> for WireKind {
    fn from(k: MessageKind) -> Self {
        match k {
            MessageKind::PreVote => WireKind::PreVote,
            MessageKind::PreVoteResponse { granted } => WireKind::PreVoteResponse { granted },
            MessageKind::Vote => WireKind::Vote,
            MessageKind::VoteResponse { granted } => WireKind::VoteResponse { granted },
            MessageKind::Heartbeat { round } => WireKind::Heartbeat { round },
            MessageKind::HeartbeatResponse { round } => WireKind::HeartbeatResponse { round },
        }
    }
}

impl From<WireKind> for MessageKind {
    fn from(k: WireKind) -> Self {
        match k {
            WireKind::PreVote => MessageKind::PreVote,
            WireKind::PreVoteResponse { granted } => MessageKind::PreVoteResponse { granted },
            WireKind::Vote => MessageKind::Vote,
            WireKind::VoteResponse { granted } => MessageKind::VoteResponse { granted },
            WireKind::Heartbeat { round } => MessageKind::Heartbeat { round },
            WireKind::HeartbeatResponse { round } => MessageKind::HeartbeatResponse { round },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn election_messages_round_trip_as_json() {
        let w = Wire {
            from: "a".into(),
            to: "b".into(),
            term: 3,
            kind: WireKind::VoteResponse { granted: true },
        };
        let json = serde_json::to_string(&w).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"from":"a","to":"b","term":3,"kind":"vote_response","granted":true}"#
        );
        assert_eq!(serde_json::from_str::<Wire>(&json).ok(), Some(w));
        for k in [
            MessageKind::PreVote,
            MessageKind::Heartbeat { round: 9 },
            MessageKind::HeartbeatResponse { round: 9 },
            MessageKind::PreVoteResponse { granted: false },
        ] {
            assert_eq!(MessageKind::from(WireKind::from(k)), k);
        }
    }
}
