//! Exhaustive model check of the election's safety properties on a 3-node site.
//!
//! The model: one global logical clock; a `Tick` action ticks every node once (all nodes
//! tick at the same rate, so "the same logical time" is the same global tick, and each
//! node's own clock is that global tick minus its boot time). Between ticks any message
//! in flight may be delivered (in any order: reordering), delivered and kept (duplication)
//! or dropped (loss). Partitions are a pattern of losses, so arbitrary loss covers every
//! partition schedule. A `Restart` replaces a node by a fresh one built from its persisted
//! hard state (volatile state lost, in-flight messages to it may still arrive), with one of
//! two seeds so both election-timeout draws are explored. Each node's `Ready` is applied
//! atomically: persist, then send. A crash between the two is the same as a crash before
//! the step (nothing was sent, nothing persisted), i.e. the incoming message was lost.
//!
//! Invariants checked in every reachable state:
//! 1. at most one leader per term, ever (ghost history of (term, leader));
//! 2. no two nodes hold a valid lease at the same global tick (`has_lease(node.now())`);
//! 3. no node grants votes to two candidates in one term, across restarts (ghost history of
//!    granted `VoteResponse`s, plus a check on every persisted `HardState`).
//!
//! The search is a DFS with a visited set of 128-bit state fingerprints. All bounds
//! (time, restarts, messages in flight) are part of the state, so the search is
//! exhaustive within them. Run with `--nocapture` to see the counts.

use std::collections::{BTreeSet, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

use fogline_cluster::{Config, HardState, Message, MessageKind, Node, NodeId, Role, Term};

const IDS: [NodeId; 3] = [1, 2, 3];

#[derive(Clone)]
struct Params {
    base: Config,
    max_time: u64,
    max_restarts: u8,
    /// Seeds tried per node at start and per restart (1 is enough when the timeout range
    /// is a single value: no random draw happens at all).
    seed_variants: u64,
    /// Deliveries that keep the message for another delivery (duplication).
    max_dups: u8,
    max_in_flight: usize,
    /// A message sent at global tick t can be delivered until the end of tick t + max_delay.
    max_delay: u64,
    /// Restart from `HardState::default()` instead of the persisted state (a planted bug).
    amnesia: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct State {
    time: u64,
    nodes: Vec<Node>,
    stored: Vec<HardState>,
    /// (global tick when sent, message)
    net: BTreeSet<(u64, Message)>,
    restarts: u8,
    dups: u8,
    leaders: BTreeSet<(Term, NodeId)>,
    votes: BTreeSet<(NodeId, Term, NodeId)>,
}

#[derive(Debug, Default)]
struct Stats {
    states: u64,
    transitions: u64,
    max_stack: usize,
    /// States in which leaders of two different terms have existed (a leader change).
    states_after_leader_change: u64,
    /// States in which a node holds a lease after a leader change.
    lease_after_leader_change: u64,
    states_after_restart: u64,
}

fn config(base: &Config, id: NodeId) -> Config {
    Config {
        id,
        peers: IDS.iter().copied().filter(|&p| p != id).collect(),
        ..base.clone()
    }
}

/// 64-bit fingerprint: with a few million states the chance that a collision hides a
/// state is about n^2 / 2^65, below 1e-6.
fn fingerprint(s: &State) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Persist-then-send for node `i`, recording ghost history. Err on a double vote.
fn flush(s: &mut State, i: usize, p: &Params) -> Result<(), String> {
    let ready = s.nodes[i].ready();
    if let Some(hs) = ready.persist {
        let old = s.stored[i];
        if old.term == hs.term {
            if let (Some(a), Some(b)) = (old.voted_for, hs.voted_for) {
                if a != b {
                    return Err(format!(
                        "node {} persisted votes for {a} and {b} in term {}",
                        IDS[i], hs.term
                    ));
                }
            }
        }
        if hs.term < old.term {
            return Err(format!("node {} persisted a smaller term", IDS[i]));
        }
        s.stored[i] = hs;
    }
    s.nodes[i].advance(&ready);
    for m in ready.messages {
        if let MessageKind::VoteResponse { granted: true } = m.kind {
            if let Some(&(_, _, other)) = s
                .votes
                .iter()
                .find(|(v, t, c)| *v == m.from && *t == m.term && *c != m.to)
            {
                return Err(format!(
                    "node {} granted votes to {other} and {} in term {}",
                    m.from, m.to, m.term
                ));
            }
            s.votes.insert((m.from, m.term, m.to));
        }
        if s.net.len() < p.max_in_flight {
            s.net.insert((s.time, m));
        } // else: lost, which is a behaviour the network may exhibit anyway
    }
    Ok(())
}

fn check(s: &mut State) -> Result<(), String> {
    for n in &s.nodes {
        if n.role() == Role::Leader {
            s.leaders.insert((n.term(), n.id()));
        }
    }
    let terms: Vec<Term> = s.leaders.iter().map(|(t, _)| *t).collect();
    if terms.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("two leaders in one term: {:?}", s.leaders));
    }
    let holders: Vec<NodeId> = s
        .nodes
        .iter()
        .filter(|n| n.has_lease(n.now()))
        .map(|n| n.id())
        .collect();
    if holders.len() > 1 {
        return Err(format!(
            "overlapping leases at global tick {}: {holders:?} (leaders so far {:?})",
            s.time, s.leaders
        ));
    }
    Ok(())
}

fn finish(mut n: State) -> Result<State, String> {
    check(&mut n).map(|()| n)
}

fn successors(s: &State, p: &Params) -> Vec<Result<State, String>> {
    let mut out = Vec::new();
    if s.time < p.max_time {
        // A tick, optionally preceded by one crash-restart. Crashes happen between ticks:
        // a crash in the middle of a tick is the same as one at the next boundary with the
        // messages it would still have received lost. Messages in flight may still reach
        // the new incarnation (max_delay >= 1).
        let mut starts = vec![s.clone()];
        if s.restarts < p.max_restarts {
            for (i, &id) in IDS.iter().enumerate() {
                for variant in 0..p.seed_variants {
                    let mut n = s.clone();
                    n.restarts += 1;
                    let hs = if p.amnesia {
                        HardState::default()
                    } else {
                        n.stored[i]
                    };
                    let seed = 1000 * variant + 10 * s.time + i as u64;
                    n.nodes[i] = Node::new_unchecked(config(&p.base, id), hs, seed);
                    starts.push(n);
                }
            }
        }
        for mut n in starts {
            n.time += 1;
            let now = n.time;
            n.net.retain(|(sent, _)| now - sent <= p.max_delay);
            let mut res = Ok(());
            for i in 0..n.nodes.len() {
                n.nodes[i].tick();
                res = res.and_then(|()| flush(&mut n, i, p));
            }
            out.push(res.and_then(|()| finish(n)));
        }
    }
    for e in &s.net {
        let m = &e.1;
        let i = IDS.iter().position(|&id| id == m.to).expect("known node");
        for keep in [false, true] {
            if keep && s.dups >= p.max_dups {
                continue;
            }
            let mut n = s.clone();
            if keep {
                n.dups += 1;
            } else {
                n.net.remove(e);
            }
            n.nodes[i].step(*m).expect("well-formed message");
            out.push(flush(&mut n, i, p).and_then(|()| finish(n)));
        }
    }
    out
}

fn explore(p: &Params) -> (Stats, Option<String>) {
    let mut stats = Stats::default();
    let mut visited: HashSet<u64> = HashSet::new();
    let mut stack: Vec<State> = Vec::new();
    // Initial states: two seeds per node, so every combination of first timeouts.
    for combo in 0..(1u64 << (3 * (p.seed_variants - 1))) {
        let nodes: Vec<Node> = IDS
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let seed = ((combo >> i) & 1) * 7919 + id;
                Node::new_unchecked(config(&p.base, id), HardState::default(), seed)
            })
            .collect();
        let s = State {
            time: 0,
            nodes,
            stored: vec![HardState::default(); IDS.len()],
            net: BTreeSet::new(),
            restarts: 0,
            dups: 0,
            leaders: BTreeSet::new(),
            votes: BTreeSet::new(),
        };
        if visited.insert(fingerprint(&s)) {
            stack.push(s);
        }
    }
    while let Some(s) = stack.pop() {
        stats.states += 1;
        let terms: BTreeSet<Term> = s.leaders.iter().map(|(t, _)| *t).collect();
        if terms.len() >= 2 {
            stats.states_after_leader_change += 1;
            if s.nodes.iter().any(|n| n.has_lease(n.now())) {
                stats.lease_after_leader_change += 1;
            }
        }
        if s.restarts > 0 {
            stats.states_after_restart += 1;
        }
        for next in successors(&s, p) {
            stats.transitions += 1;
            match next {
                Ok(n) => {
                    if visited.insert(fingerprint(&n)) {
                        stack.push(n);
                    }
                }
                Err(e) => return (stats, Some(e)),
            }
        }
        stats.max_stack = stats.max_stack.max(stack.len());
    }
    (stats, None)
}

/// Timing small enough to explore: election timeout `2..=et_max` ticks, heartbeat every
/// tick, lease 1 tick (the largest lease `validate` accepts for this timeout).
fn small(et_max: u64) -> Config {
    let mut c = Config::new(0, []);
    c.election_timeout_min = 2;
    c.election_timeout_max = et_max;
    c.heartbeat_interval = 1;
    c.lease = 1;
    c.check_quorum = true;
    c.pre_vote = true;
    c
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Debug builds are ~12x slower; optimized runs (`--profile bench-fast`) go deeper.
fn pick(debug: u64, optimized: u64) -> u64 {
    if cfg!(debug_assertions) {
        debug
    } else {
        optimized
    }
}

fn params(base: Config, ticks: u64, delay: u64) -> Params {
    Params {
        seed_variants: if base.election_timeout_min == base.election_timeout_max {
            1
        } else {
            2
        },
        base,
        max_time: env_u64("FOGLINE_MC_TICKS", ticks),
        max_restarts: env_u64("FOGLINE_MC_RESTARTS", 1) as u8,
        max_dups: env_u64("FOGLINE_MC_DUPS", 1) as u8,
        max_in_flight: env_u64("FOGLINE_MC_IN_FLIGHT", 3) as usize,
        max_delay: env_u64("FOGLINE_MC_DELAY", delay),
        amnesia: false,
    }
}

fn run(name: &str, p: &Params) -> (Stats, Option<String>) {
    let start = Instant::now();
    let (stats, violation) = explore(p);
    println!(
        "{name}: 3 nodes, ticks<={}, restarts<={}, dups<={}, in-flight<={}, delay<={}: {stats:?} in {:.1?}; violation: {violation:?}",
        p.max_time,
        p.max_restarts,
        p.max_dups,
        p.max_in_flight,
        p.max_delay,
        start.elapsed()
    );
    (stats, violation)
}

/// Fixed election timeout (no random draws, so no seeds to enumerate), messages live
/// within the tick they are sent in: deepest horizon, reaches leader changes.
#[test]
fn exhaustive_safety_with_loss_reordering_duplication_and_restarts() {
    let p = params(small(2), pick(4, 6), 0);
    let (stats, violation) = run("safety", &p);
    assert_eq!(violation, None);
    assert!(
        stats.states >= pick(250_000, 4_000_000),
        "explored too little: {stats:?}"
    );
    assert!(stats.states_after_restart > 0, "never restarted: {stats:?}");
    assert!(
        stats.states_after_leader_change > 0 && stats.lease_after_leader_change > 0,
        "never reached a second leader holding a lease: {stats:?}"
    );
}

/// Randomized timeouts (every combination of draws via seeds) and messages that arrive a
/// tick late (across a restart, too): shallower horizon.
#[test]
fn exhaustive_safety_with_random_timeouts_and_late_messages() {
    let p = params(small(3), pick(2, 3), 1);
    let (stats, violation) = run("safety, late messages", &p);
    assert_eq!(violation, None);
    assert!(
        stats.states >= pick(10_000, 1_000_000),
        "explored too little: {stats:?}"
    );
    assert!(stats.states_after_restart > 0, "never restarted: {stats:?}");
}

/// The checker must be able to fail: a lease longer than the stickiness window overlaps.
#[test]
fn checker_finds_overlapping_leases_when_lease_exceeds_election_timeout() {
    let mut c = small(2);
    // Check-quorum would depose the old leader exactly when its followers may vote again
    // and mask the bug; turn it off so only the lease rule stands between the two.
    c.check_quorum = false;
    c.lease = c.election_timeout_min + 1;
    let (_, violation) = run("planted bug: long lease", &params(c, 4, 0));
    let v = violation.expect("a too-long lease must be caught");
    assert!(v.contains("overlapping leases"), "{v}");
}

/// The checker must be able to fail: a restart that forgets its vote votes twice.
#[test]
fn checker_finds_double_votes_when_restart_forgets_hard_state() {
    let mut p = params(small(2), 5, 0);
    p.amnesia = true;
    let (_, violation) = run("planted bug: amnesia", &p);
    let v = violation.expect("forgetting the vote must be caught");
    assert!(v.contains("votes") || v.contains("two leaders"), "{v}");
}
