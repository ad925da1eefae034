//! An in-memory network harness for multi-node tests, in the spirit of raft-rs's
//! `Network`: seeded, with per-link drop rates, duplication, bounded delay (hence
//! reordering), partitions and restarts. Everything is deterministic given the seed.
//!
//! All nodes tick together (one [`Cluster::tick`] ticks each node once), which is the
//! "same rate, no drift" assumption the lease relies on. Messages due at a tick are
//! delivered after the tick, in random order, until none are due; a zero delay means
//! "arrives within the same tick".
//!
//! The harness also watches the safety properties on every step and records any
//! violation in [`Cluster::violations`].

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::rng::SplitMix64;
use crate::storage::{MemStorage, Storage};
use crate::{Config, Message, MessageKind, Node, NodeId, Role, Term, Tick};

/// A simulated site.
#[derive(Debug, Clone)]
pub struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    storage: BTreeMap<NodeId, MemStorage>,
    base: Config,
    rng: SplitMix64,
    time: Tick,
    default_drop: f64,
    link_drop: BTreeMap<(NodeId, NodeId), f64>,
    duplicate: f64,
    max_delay: Tick,
    cut: BTreeSet<(NodeId, NodeId)>,
    in_flight: Vec<(Tick, Message)>,
    /// Ghost state for the invariants.
    leaders: BTreeMap<Term, NodeId>,
    votes: BTreeMap<(NodeId, Term), NodeId>,
    /// Human-readable safety violations seen so far (empty in a correct run).
    pub violations: Vec<String>,
    /// Messages delivered so far.
    pub delivered: u64,
}

impl Cluster {
    /// `base` supplies the timing fields; `id` and `peers` are filled in per node. The
    /// config is deliberately not validated, so tests can show what an unsafe one does.
    pub fn new(ids: &[NodeId], base: &Config, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut nodes = BTreeMap::new();
        let mut storage = BTreeMap::new();
        for &id in ids {
            let cfg = Self::config_for(base, ids, id);
            nodes.insert(
                id,
                Node::new_unchecked(cfg, Default::default(), rng.next_u64()),
            );
            storage.insert(id, MemStorage::default());
        }
        Cluster {
            nodes,
            storage,
            base: base.clone(),
            rng,
            time: 0,
            default_drop: 0.0,
            link_drop: BTreeMap::new(),
            duplicate: 0.0,
            max_delay: 0,
            cut: BTreeSet::new(),
            in_flight: Vec::new(),
            leaders: BTreeMap::new(),
            votes: BTreeMap::new(),
            violations: Vec::new(),
            delivered: 0,
        }
    }

    fn config_for(base: &Config, ids: &[NodeId], id: NodeId) -> Config {
        Config {
            id,
            peers: ids.iter().copied().filter(|&p| p != id).collect(),
            ..base.clone()
        }
    }

    pub fn time(&self) -> Tick {
        self.time
    }
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Drop probability for every link without its own rate.
    pub fn set_default_drop(&mut self, p: f64) {
        self.default_drop = p;
    }
    /// Drop probability on the directed link `from -> to`.
    pub fn set_link_drop(&mut self, from: NodeId, to: NodeId, p: f64) {
        self.link_drop.insert((from, to), p);
    }
    /// Probability that a sent message is delivered twice.
    pub fn set_duplicate(&mut self, p: f64) {
        self.duplicate = p;
    }
    /// Each message is delayed uniformly by `0..=ticks` ticks (so messages reorder).
    pub fn set_max_delay(&mut self, ticks: Tick) {
        self.max_delay = ticks;
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }
    /// Cuts `id` off from everyone.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.ids().into_iter().filter(|&o| o != id).collect();
        self.partition(&[id], &others);
    }
    /// Restores every cut link (drop rates stay).
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Crash and reboot `id`: volatile state is lost, the persisted hard state is kept,
    /// messages already in flight to it may still arrive.
    pub fn restart(&mut self, id: NodeId) {
        let ids = self.ids();
        let Some(store) = self.storage.get(&id) else {
            return;
        };
        let hs = match store.load() {
            Ok(hs) => hs,
            Err(never) => match never {},
        };
        let cfg = Self::config_for(&self.base, &ids, id);
        let seed = self.rng.next_u64();
        self.nodes.insert(id, Node::new_unchecked(cfg, hs, seed));
    }

    /// Ticks every node once, then delivers everything due.
    pub fn tick(&mut self) {
        self.time += 1;
        let ids = self.ids();
        for &id in &ids {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.tick();
            }
            self.flush(id);
        }
        self.check();
        self.deliver_due();
    }

    /// Ticks `n` times.
    pub fn run(&mut self, n: Tick) {
        for _ in 0..n {
            self.tick();
        }
    }

    /// Ticks until `pred` holds (checked after each tick), at most `max` ticks. Returns
    /// the number of ticks taken.
    pub fn run_until(&mut self, max: Tick, mut pred: impl FnMut(&Cluster) -> bool) -> Option<Tick> {
        for i in 1..=max {
            self.tick();
            if pred(self) {
                return Some(i);
            }
        }
        None
    }

    /// Nodes that currently believe they are leader.
    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| n.id())
            .collect()
    }

    /// Nodes that currently hold a valid lease.
    pub fn lease_holders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.has_lease(n.now()))
            .map(|n| n.id())
            .collect()
    }

    /// Persist, then send: the [`Ready`](crate::Ready) contract.
    fn flush(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let ready = node.ready();
        if let Some(hs) = ready.persist {
            if let Some(s) = self.storage.get_mut(&id) {
                match s.save(&hs) {
                    Ok(()) => {}
                    Err(never) => match never {},
                }
            }
        }
        node.advance(&ready);
        for m in ready.messages {
            if let MessageKind::VoteResponse { granted: true } = m.kind {
                if let Some(prev) = self.votes.insert((m.from, m.term), m.to) {
                    if prev != m.to {
                        self.violations.push(format!(
                            "t={}: node {} voted for {} and {} in term {}",
                            self.time, m.from, prev, m.to, m.term
                        ));
                    }
                }
            }
            self.send(m);
        }
    }

    fn send(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) {
            return;
        }
        let p = self
            .link_drop
            .get(&(m.from, m.to))
            .copied()
            .unwrap_or(self.default_drop);
        if self.rng.chance(p) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.time + self.rng.in_range(0, self.max_delay);
            self.in_flight.push((at, m));
        }
    }

    fn deliver_due(&mut self) {
        // Bounded: a healthy protocol quiesces within a few exchanges per tick.
        for _ in 0..10_000 {
            let due: Vec<usize> = (0..self.in_flight.len())
                .filter(|&i| self.in_flight[i].0 <= self.time)
                .collect();
            if due.is_empty() {
                return;
            }
            let pick = due[self.rng.in_range(0, due.len() as u64 - 1) as usize];
            let (_, m) = self.in_flight.swap_remove(pick);
            if let Some(n) = self.nodes.get_mut(&m.to) {
                if n.step(m).is_ok() {
                    self.delivered += 1;
                }
            }
            self.flush(m.to);
            self.check();
        }
        self.violations.push(format!(
            "t={}: message storm, delivery did not quiesce",
            self.time
        ));
    }

    fn check(&mut self) {
        for n in self.nodes.values() {
            if n.role() == Role::Leader {
                let prev = *self.leaders.entry(n.term()).or_insert(n.id());
                if prev != n.id() {
                    self.violations.push(format!(
                        "t={}: two leaders in term {}: {} and {}",
                        self.time,
                        n.term(),
                        prev,
                        n.id()
                    ));
                }
            }
        }
        let holders = self.lease_holders();
        if holders.len() > 1 {
            self.violations
                .push(format!("t={}: overlapping leases {:?}", self.time, holders));
        }
    }
}
