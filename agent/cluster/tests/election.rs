//! Example-based tests of single-node behaviour: each drives one `Node` by hand.

use fogline_cluster::{Config, HardState, Message, MessageKind, Node, Role};

fn cfg(id: u64) -> Config {
    let mut c = Config::new(id, [1, 2, 3].into_iter().filter(|&p| p != id));
    c.election_timeout_min = 5;
    c.election_timeout_max = 5;
    c.heartbeat_interval = 1;
    c.lease = 4;
    c
}

fn msg(from: u64, to: u64, term: u64, kind: MessageKind) -> Message {
    Message {
        from,
        to,
        term,
        kind,
    }
}

fn node(id: u64) -> Node {
    Node::new(cfg(id), HardState::default(), 7).expect("valid config")
}

fn ticks(n: &mut Node, k: u64) {
    for _ in 0..k {
        n.tick();
    }
}

/// Makes node 1 leader of term 1 with node 2's vote.
fn leader() -> Node {
    let mut n = node(1);
    ticks(&mut n, 5);
    assert_eq!(n.role(), Role::PreCandidate);
    n.step(msg(2, 1, 1, MessageKind::PreVoteResponse { granted: true }))
        .expect("peer");
    assert_eq!(n.role(), Role::Candidate);
    n.step(msg(2, 1, 1, MessageKind::VoteResponse { granted: true }))
        .expect("peer");
    assert_eq!(n.role(), Role::Leader);
    n
}

#[test]
fn config_rejects_a_lease_as_long_as_the_election_timeout() {
    let mut c = cfg(1);
    c.lease = 5;
    assert!(c.validate().is_err());
    assert!(Node::new(c, HardState::default(), 0).is_err());
    let mut c = cfg(1);
    c.peers.push(1);
    assert!(c.validate().is_err());
}

#[test]
fn pre_vote_does_not_bump_the_term_and_a_vote_does() {
    let mut n = node(1);
    ticks(&mut n, 5);
    assert_eq!(n.role(), Role::PreCandidate);
    assert_eq!(n.term(), 0);
    let r = n.ready();
    assert_eq!(r.persist, None, "a pre-vote changes nothing durable");
    assert!(r
        .messages
        .iter()
        .all(|m| m.kind == MessageKind::PreVote && m.term == 1));
    n.advance(&r);
    n.step(msg(3, 1, 1, MessageKind::PreVoteResponse { granted: true }))
        .expect("peer");
    assert_eq!(n.role(), Role::Candidate);
    let r = n.ready();
    assert_eq!(
        r.persist,
        Some(HardState {
            term: 1,
            voted_for: Some(1)
        }),
        "the self-vote must be persisted before the vote requests go out"
    );
    assert_eq!(r.messages.len(), 2);
    n.advance(&r);
    assert_eq!(n.ready().persist, None, "advance marks it durable");
}

#[test]
fn a_fresh_node_refuses_votes_for_one_election_timeout() {
    let mut n = node(2);
    n.step(msg(1, 2, 1, MessageKind::Vote)).expect("peer");
    assert_eq!(n.term(), 0, "ignored requests do not bump the term");
    assert!(n.ready().messages.is_empty());
    ticks(&mut n, 4);
    n.step(msg(1, 2, 1, MessageKind::Vote)).expect("peer");
    assert!(n.ready().messages.is_empty());
    n.tick();
    // Tick 5: its own election timer fires too (pre-vote), but it may now vote.
    let _ = n.ready();
    n.step(msg(1, 2, 1, MessageKind::Vote)).expect("peer");
    let r = n.ready();
    assert_eq!(
        r.messages,
        [msg(2, 1, 1, MessageKind::VoteResponse { granted: true })]
    );
    assert_eq!(r.persist.and_then(|h| h.voted_for), Some(1));
}

#[test]
fn a_node_votes_once_per_term_even_after_restart() {
    let mut n = node(2);
    ticks(&mut n, 5);
    let _ = n.ready();
    n.step(msg(1, 2, 1, MessageKind::Vote)).expect("peer");
    let r = n.ready();
    let hs = r.persist.expect("vote persisted");
    let mut n = Node::new(cfg(2), hs, 99).expect("valid");
    ticks(&mut n, 5);
    let _ = n.ready();
    n.step(msg(3, 2, 1, MessageKind::Vote)).expect("peer");
    assert_eq!(
        n.ready().messages,
        [msg(2, 3, 1, MessageKind::VoteResponse { granted: false })]
    );
}

#[test]
fn a_follower_with_a_live_leader_ignores_pre_votes_and_votes() {
    let mut n = node(2);
    n.step(msg(1, 2, 1, MessageKind::Heartbeat { round: 0 }))
        .expect("peer");
    assert_eq!(n.leader(), Some(1));
    assert_eq!(n.term(), 1);
    let _ = n.ready();
    ticks(&mut n, 4);
    n.step(msg(3, 2, 2, MessageKind::PreVote)).expect("peer");
    n.step(msg(3, 2, 2, MessageKind::Vote)).expect("peer");
    assert!(n.ready().messages.is_empty());
    assert_eq!(n.term(), 1);
    assert_eq!(n.leader(), Some(1));
}

#[test]
fn the_lease_runs_from_the_send_time_of_the_majority_acked_round() {
    let mut n = leader();
    let t0 = n.now();
    assert!(!n.has_lease(t0), "no round acknowledged yet");
    n.step(msg(2, 1, 1, MessageKind::HeartbeatResponse { round: t0 }))
        .expect("peer");
    assert!(n.has_lease(t0));
    assert!(n.has_lease(t0 + 3));
    assert!(!n.has_lease(t0 + 4), "lease = 4 ticks after sending");
    // A late ack of an old round does not extend it past its own send time.
    ticks(&mut n, 3);
    n.step(msg(3, 1, 1, MessageKind::HeartbeatResponse { round: t0 }))
        .expect("peer");
    assert!(!n.has_lease(t0 + 4));
}

#[test]
fn check_quorum_makes_an_isolated_leader_step_down() {
    let mut n = leader();
    ticks(&mut n, 4);
    assert_eq!(n.role(), Role::Leader);
    n.tick();
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.leader(), None);
    assert!(!n.has_lease(n.now()));
}

#[test]
fn a_higher_term_heartbeat_response_deposes_the_leader() {
    let mut n = leader();
    n.step(msg(2, 1, 5, MessageKind::HeartbeatResponse { round: 0 }))
        .expect("peer");
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.term(), 5);
    assert_eq!(n.ready().persist.map(|h| h.term), Some(5));
}

#[test]
fn step_rejects_misaddressed_and_unknown_messages() {
    let mut n = node(1);
    assert!(n.step(msg(2, 3, 1, MessageKind::Vote)).is_err());
    assert!(n.step(msg(9, 1, 1, MessageKind::Vote)).is_err());
}

#[test]
fn a_single_node_site_elects_itself_and_holds_the_lease() {
    let mut c = cfg(1);
    c.peers.clear();
    let mut n = Node::new(c, HardState::default(), 1).expect("valid");
    ticks(&mut n, 5);
    assert_eq!(n.role(), Role::Leader);
    assert!(n.has_lease(n.now()));
    assert_eq!(n.status().leader, Some(1));
    assert_eq!(n.status().role.as_str(), "leader");
}
