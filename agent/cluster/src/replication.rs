//! Replication bookkeeping, the one copy the agent runs: where an origin's log is
//! replicated, and below which offset it is durable on enough members.
//!
//! Every watermark is *exclusive*, like the uplink's `UplinkAck::next`: `w` means
//! "offsets `0..w` are durable there". An origin's `head` is the next offset it will
//! write, i.e. its own durable watermark.

use alloc::vec::Vec;

/// A log offset or watermark.
pub type Offset = u64;

/// The highest watermark below which an origin's readings are durable on at least
/// `min_insync` members, the origin itself counted: the `min_insync`-th highest of its
/// `head` and its replicas' `acks`. A replica cannot hold more than the origin wrote (an
/// ack above `head` counts as `head`). `min_insync` 0 is treated as 1 (the origin's own
/// head); more than the copies there are yields 0: nothing is that safe. This is what
/// `ack_after = "replicated"` acknowledges to devices.
pub fn insync_offset(
    head: Offset,
    acks: impl IntoIterator<Item = Offset>,
    min_insync: usize,
) -> Offset {
    let mut copies: Vec<Offset> = acks.into_iter().map(|a| a.min(head)).collect();
    copies.push(head);
    copies.sort_unstable_by(|a, b| b.cmp(a));
    copies.get(min_insync.max(1) - 1).copied().unwrap_or(0)
}

/// The members that replicate `me`'s log: its `rf - 1` successors in id order around the
/// ring of members (every peer when `rf` is 0), plus the leader, which forwards every log
/// upstream. `peers` are the members other than `me`.
pub fn replica_targets<T: Ord + Clone>(
    me: &T,
    peers: &[T],
    rf: usize,
    leader: Option<&T>,
) -> Vec<T> {
    let mut out: Vec<T> = if rf == 0 {
        peers.to_vec()
    } else {
        let mut members: Vec<&T> = peers.iter().collect();
        members.push(me);
        members.sort_unstable();
        members.dedup();
        let at = members.iter().position(|m| *m == me).unwrap_or(0);
        (1..rf.min(members.len()))
            .map(|i| members[(at + i) % members.len()].clone())
            .collect()
    };
    if let Some(l) = leader.filter(|l| *l != me && !out.contains(l)) {
        out.push(l.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insync_offset_is_the_kth_highest_copy_the_origin_counted() {
        // (head, replica acks, min_insync, durable below)
        let table: [(Offset, &[Offset], usize, Offset); 9] = [
            (100, &[40, 70], 1, 100),
            (100, &[40, 70], 2, 70),
            (100, &[40, 70], 3, 40),
            (100, &[40, 70], 4, 0),
            (100, &[40, 70], 0, 100),
            (100, &[], 1, 100),
            (100, &[], 2, 0),
            // A replica cannot hold more than the origin wrote.
            (50, &[90], 2, 50),
            (10, &[10, 10], 3, 10),
        ];
        for (head, acks, k, want) in table {
            assert_eq!(
                insync_offset(head, acks.iter().copied(), k),
                want,
                "head {head}, acks {acks:?}, min_insync {k}"
            );
        }
    }

    #[test]
    fn replica_targets_follow_the_ring_and_include_the_leader() {
        /// (me, peers, rf, leader, targets)
        type Case<'a> = (
            &'a str,
            &'a [&'a str],
            usize,
            Option<&'a str>,
            &'a [&'a str],
        );
        let p = ["b", "c", "d"];
        let table: [Case; 7] = [
            ("a", &p, 0, None, &["b", "c", "d"]),
            ("a", &p, 2, None, &["b"]),
            ("a", &p, 3, None, &["b", "c"]),
            ("c", &["a", "b", "d"], 3, None, &["d", "a"]),
            ("a", &p, 2, Some("d"), &["b", "d"]),
            ("a", &p, 2, Some("a"), &["b"]),
            ("a", &p, 1, Some("c"), &["c"]),
        ];
        for (me, peers, rf, leader, want) in table {
            assert_eq!(
                replica_targets(&me, peers, rf, leader.as_ref()),
                want,
                "{me} among {peers:?}, rf {rf}, leader {leader:?}"
            );
        }
    }
}
