//! Replication bookkeeping: who holds which prefix of which origin's log.
//!
//! Every watermark here is *exclusive*, like the uplink's `UplinkAck::next`: a value `w`
//! means "offsets `0..w` are durable there". An origin's `head` is the next offset it will
//! write, i.e. its own durable watermark. All updates are monotonic (a late, smaller ack
//! is ignored), so acks may be applied in any order and more than once.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::NodeId;

/// A log offset or watermark.
pub type Offset = u64;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OriginState {
    head: Offset,
    /// Per member other than the origin.
    acked: BTreeMap<NodeId, Offset>,
    gateway: Offset,
}

/// Why an update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The id is not a member of the site.
    UnknownNode(NodeId),
}

impl fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicationError::UnknownNode(id) => write!(f, "node {id} is not a site member"),
        }
    }
}

impl core::error::Error for ReplicationError {}

/// Per-origin durability watermarks for every member of the site. Pure data; the agent
/// feeds it from replication acks, its own commits and the gateway's acks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    members: Vec<NodeId>,
    origins: BTreeMap<NodeId, OriginState>,
}

impl Replication {
    /// `members` is every node of the site, this one included. Every member is an origin.
    pub fn new(members: impl IntoIterator<Item = NodeId>) -> Self {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        let origins = members
            .iter()
            .map(|&o| {
                let acked = members
                    .iter()
                    .filter(|&&m| m != o)
                    .map(|&m| (m, 0))
                    .collect();
                (
                    o,
                    OriginState {
                        acked,
                        ..OriginState::default()
                    },
                )
            })
            .collect();
        Replication { members, origins }
    }

    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    fn origin_mut(&mut self, origin: NodeId) -> Result<&mut OriginState, ReplicationError> {
        self.origins
            .get_mut(&origin)
            .ok_or(ReplicationError::UnknownNode(origin))
    }

    fn origin(&self, origin: NodeId) -> Result<&OriginState, ReplicationError> {
        self.origins
            .get(&origin)
            .ok_or(ReplicationError::UnknownNode(origin))
    }

    /// The origin has durably written everything below `head`.
    pub fn set_head(&mut self, origin: NodeId, head: Offset) -> Result<(), ReplicationError> {
        let o = self.origin_mut(origin)?;
        o.head = o.head.max(head);
        Ok(())
    }

    /// `node` has durably stored `origin`'s log below `offset`. An ack from the origin
    /// itself is its head.
    pub fn record_ack(
        &mut self,
        origin: NodeId,
        node: NodeId,
        offset: Offset,
    ) -> Result<(), ReplicationError> {
        if !self.members.contains(&node) {
            return Err(ReplicationError::UnknownNode(node));
        }
        let o = self.origin_mut(origin)?;
        if node == origin {
            o.head = o.head.max(offset);
            return Ok(());
        }
        // A replica cannot hold what the origin never wrote; if it does, our view of the
        // head is simply stale.
        o.head = o.head.max(offset);
        let a = o.acked.entry(node).or_insert(0);
        *a = (*a).max(offset);
        Ok(())
    }

    /// The gateway has durably stored `origin`'s log below `offset`.
    pub fn record_gateway_ack(
        &mut self,
        origin: NodeId,
        offset: Offset,
    ) -> Result<(), ReplicationError> {
        let o = self.origin_mut(origin)?;
        o.gateway = o.gateway.max(offset);
        Ok(())
    }

    pub fn head(&self, origin: NodeId) -> Result<Offset, ReplicationError> {
        Ok(self.origin(origin)?.head)
    }

    pub fn acked(&self, origin: NodeId, node: NodeId) -> Result<Offset, ReplicationError> {
        let o = self.origin(origin)?;
        if node == origin {
            return Ok(o.head);
        }
        o.acked
            .get(&node)
            .copied()
            .ok_or(ReplicationError::UnknownNode(node))
    }

    pub fn gateway_acked(&self, origin: NodeId) -> Result<Offset, ReplicationError> {
        Ok(self.origin(origin)?.gateway)
    }

    /// The highest watermark below which `origin`'s readings are durable on at least
    /// `min_insync` nodes, the origin itself counted. `min_insync` 0 is treated as 1 (the
    /// origin's own head); a value above the member count yields 0: nothing is that safe.
    /// This is what `ack_after = "replicated"` acks to devices.
    pub fn insync_offset(
        &self,
        origin: NodeId,
        min_insync: usize,
    ) -> Result<Offset, ReplicationError> {
        let o = self.origin(origin)?;
        let mut copies: Vec<Offset> = o.acked.values().map(|&a| a.min(o.head)).collect();
        copies.push(o.head);
        copies.sort_unstable_by(|a, b| b.cmp(a));
        let k = min_insync.max(1);
        Ok(copies.get(k - 1).copied().unwrap_or(0))
    }

    /// Below this watermark `origin`'s readings may be deleted on this node: the gateway
    /// has them (so no peer, and no future leader, needs them from us), and we never
    /// claim to delete past what the origin has written. Retention policy (keeping acked
    /// readings a while longer) is the caller's business.
    pub fn deletable_below(&self, origin: NodeId) -> Result<Offset, ReplicationError> {
        let o = self.origin(origin)?;
        Ok(o.gateway.min(o.head))
    }

    /// How far `node`'s copy of `origin` trails the origin's head.
    pub fn lag(&self, origin: NodeId, node: NodeId) -> Result<Offset, ReplicationError> {
        let head = self.head(origin)?;
        Ok(head.saturating_sub(self.acked(origin, node)?))
    }

    /// `(node, acked, lag)` for every member other than the origin, for `/status`.
    pub fn peers(
        &self,
        origin: NodeId,
    ) -> Result<impl Iterator<Item = (NodeId, Offset, Offset)> + '_, ReplicationError> {
        let o = self.origin(origin)?;
        Ok(o.acked
            .iter()
            .map(move |(&n, &a)| (n, a, o.head.saturating_sub(a))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Replication {
        Replication::new([1, 2, 3])
    }

    #[test]
    fn insync_offset_counts_the_origin_itself() {
        let mut r = site();
        r.set_head(1, 100).expect("member");
        assert_eq!(r.insync_offset(1, 1), Ok(100));
        assert_eq!(r.insync_offset(1, 2), Ok(0));
        r.record_ack(1, 2, 60).expect("member");
        assert_eq!(r.insync_offset(1, 2), Ok(60));
        assert_eq!(r.insync_offset(1, 3), Ok(0));
        r.record_ack(1, 3, 80).expect("member");
        assert_eq!(r.insync_offset(1, 2), Ok(80));
        assert_eq!(r.insync_offset(1, 3), Ok(60));
    }

    #[test]
    fn insync_offset_with_more_copies_than_members_is_zero() {
        let mut r = site();
        r.set_head(2, 10).expect("member");
        r.record_ack(2, 1, 10).expect("member");
        r.record_ack(2, 3, 10).expect("member");
        assert_eq!(r.insync_offset(2, 3), Ok(10));
        assert_eq!(r.insync_offset(2, 4), Ok(0));
        assert_eq!(r.insync_offset(2, 0), Ok(10), "0 behaves like 1");
    }

    #[test]
    fn acks_are_monotonic_and_idempotent() {
        let mut r = site();
        r.set_head(1, 50).expect("member");
        r.record_ack(1, 2, 40).expect("member");
        r.record_ack(1, 2, 30).expect("member");
        r.record_ack(1, 2, 40).expect("member");
        assert_eq!(r.acked(1, 2), Ok(40));
        r.set_head(1, 20).expect("member");
        assert_eq!(r.head(1), Ok(50));
        r.record_gateway_ack(1, 30).expect("member");
        r.record_gateway_ack(1, 10).expect("member");
        assert_eq!(r.gateway_acked(1), Ok(30));
    }

    #[test]
    fn a_replica_ack_beyond_the_known_head_moves_the_head() {
        let mut r = site();
        r.record_ack(3, 1, 70).expect("member");
        assert_eq!(r.head(3), Ok(70));
        assert_eq!(r.insync_offset(3, 2), Ok(70));
    }

    #[test]
    fn deletable_below_is_the_gateway_ack_capped_by_the_head() {
        let mut r = site();
        r.set_head(1, 100).expect("member");
        assert_eq!(r.deletable_below(1), Ok(0), "nothing acked upstream yet");
        r.record_gateway_ack(1, 40).expect("member");
        assert_eq!(r.deletable_below(1), Ok(40));
        r.record_gateway_ack(2, 40).expect("member");
        assert_eq!(
            r.deletable_below(2),
            Ok(0),
            "never past what the origin wrote"
        );
    }

    #[test]
    fn lag_per_peer_is_head_minus_ack() {
        let mut r = site();
        r.set_head(1, 100).expect("member");
        r.record_ack(1, 2, 75).expect("member");
        assert_eq!(r.lag(1, 2), Ok(25));
        assert_eq!(r.lag(1, 3), Ok(100));
        assert_eq!(r.lag(1, 1), Ok(0));
        let peers: Vec<_> = r.peers(1).expect("member").collect();
        assert_eq!(peers, [(2, 75, 25), (3, 0, 100)]);
    }

    #[test]
    fn unknown_nodes_are_errors_not_panics() {
        let mut r = site();
        assert_eq!(r.set_head(9, 1), Err(ReplicationError::UnknownNode(9)));
        assert_eq!(r.record_ack(1, 9, 1), Err(ReplicationError::UnknownNode(9)));
        assert_eq!(r.insync_offset(9, 2), Err(ReplicationError::UnknownNode(9)));
        assert_eq!(r.lag(1, 9), Err(ReplicationError::UnknownNode(9)));
    }
}
