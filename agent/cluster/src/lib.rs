//! Sans-io leader election and replication bookkeeping for a fogline site.
//!
//! Nothing in here touches a clock, a socket, a disk or a global RNG: the agent feeds
//! logical ticks and received messages in, and gets back messages to send and state to
//! persist. That is what lets the safety properties be model-checked
//! (`tests/model_check.rs`) and the multi-node behaviour be simulated ([`sim`]).
//!
//! # Map
//!
//! - [`Node`] (`node.rs`): the election state machine — `tick()`, `step(msg)`, `ready()`,
//!   `advance()`; role, term, leader and lease queries.
//! - [`Config`] (`config.rs`): ids and timing, validated ([`Config::validate`]).
//! - [`Message`] (`message.rs`): the six protocol messages.
//! - [`Storage`] / [`MemStorage`] (`storage.rs`): where the [`HardState`] lives.
//! - [`Driver`] (`driver.rs`): a node and its storage, saved before anything is sent;
//!   a node whose save failed sends nothing and does not lead.
//! - [`replication`]: where an origin's log is replicated ([`replica_targets`]) and below
//!   which offset it is durable on enough members ([`insync_offset`]).
//! - [`sim`]: an in-memory network harness (drops, duplicates, delays, partitions,
//!   restarts), seeded and deterministic.
//! - [`rng`]: the SplitMix64 PRNG used for election jitter and by the harness.
//!
//! # Protocol
//!
//! Raft's election rules, without a log (the site elects its uplink; each origin's log is
//! replicated by its own writer, see [`replication`]):
//!
//! - Every member persists `HardState { term, voted_for }` and votes at most once per
//!   term. Terms only grow.
//! - A follower that hears nothing from a leader for a randomized election timeout in
//!   `election_timeout_min..=election_timeout_max` ticks becomes a *pre-candidate*: it
//!   asks `PreVote` for `term + 1` **without** bumping its term. Only with a majority of
//!   pre-votes (itself included) does it become a *candidate*: bump the term, vote for
//!   itself, ask `Vote`. A majority of votes makes it *leader*. A node partitioned away
//!   therefore cannot inflate its term and disrupt the majority when it comes back.
//! - The leader sends a `Heartbeat { round }` every `heartbeat_interval` ticks, where
//!   `round` is its own clock at sending; followers echo it.
//! - **Leader stickiness**: a node that heard a heartbeat from the leader of its term less
//!   than `election_timeout_min` ticks ago — or is leader, or stepped down as leader, or
//!   booted, less than that long ago — ignores `Vote` and `PreVote` requests (and does not
//!   adopt their term).
//! - **Check-quorum**: a leader whose newest majority-acknowledged round is
//!   `election_timeout_min` ticks old steps down (`check_quorum = true`).
//! - Any message with a higher term makes a node adopt the term and follow (except the
//!   ignored vote requests above, pre-votes and granted pre-vote answers); stale
//!   requests get an answer carrying the newer term so their sender catches up.
//!
//! # The lease
//!
//! The leader holds a lease until `sent(r) + lease` on its own clock, where `r` is the
//! newest heartbeat round acknowledged by a majority (counting itself), and
//! `lease < election_timeout_min` ([`Config::validate`] insists). [`Node::has_lease`]
//! answers from that.
//!
//! Why two leases never overlap: take leaders `A` (term `t1`) and `B` (term `t2 > t1`).
//! `B` won a majority of votes in `t2`; `A`'s lease at time `x` rests on a round `r` sent
//! at `s <= x < s + lease` and acknowledged by a majority. The two majorities share a node
//! `F`. `F` acknowledged `r` while in term `t1` and voted in `t2 > t1`; terms only grow, so
//! it acknowledged first (at time `>= s`), which reset its contact clock, and stickiness
//! kept it from voting before `s + election_timeout_min` (if `F` is `A` itself, it was
//! leader or just stepped down, which is sticky too; if `F` restarted in between, booting
//! is sticky too). So `B` was elected, and sent its first round, at or after
//! `s + election_timeout_min > s + lease > x`: `B`'s lease starts after `A`'s ends.
//!
//! This is an argument in *ticks*: it assumes all nodes' tick clocks run at the same rate
//! (the leader measures `lease` on its clock, followers measure stickiness on theirs).
//! With a relative drift bound `ρ` between any two clocks, the lease is safe when
//! `lease * (1 + ρ) < election_timeout_min * (1 - ρ)`; keep a margin (the defaults use
//! 8 vs 10 ticks) and tick from a monotonic clock. Message delay does not matter: rounds
//! are dated when sent, never when acknowledged.
//!
//! "The same logical time" in the model checker is one global tick: every node ticks once
//! per global tick, so each node's clock is the global tick minus its boot tick.
//!
//! # Driving it (the agent)
//!
//! ```
//! use fogline_cluster::{Config, MemStorage, Node, Storage};
//!
//! let cfg = Config::new(1, [2, 3]);
//! let mut store = MemStorage::default(); // the agent's redb-backed Storage
//! let hs = store.load().expect("infallible");
//! let mut node = Node::new(cfg, hs, 0x5eed /* from the OS RNG */).expect("valid config");
//! // Every tick (say 100 ms, from a monotonic clock) and for every received message:
//! node.tick();
//! // node.step(msg) for each message decoded from the peers' MQTT topic.
//! let ready = node.ready();
//! if let Some(hs) = &ready.persist {
//!     store.save(hs).expect("infallible"); // durable BEFORE sending
//! }
//! for _msg in &ready.messages { /* publish to msg.to */ }
//! node.advance(&ready);
//! // Forward upstream only while node.has_lease(node.now()).
//! assert!(!node.is_leader());
//! ```
//!
//! The uplink should forward only while `has_lease(now)` holds (checking a later `now`
//! covers an operation that takes a few ticks). `/status` reads [`Node::status`].
#![no_std]

extern crate alloc;

mod config;
mod driver;
mod message;
mod node;
pub mod replication;
pub mod rng;
pub mod sim;
mod storage;

pub use config::{Config, ConfigError};
pub use driver::{Driver, DriverError};
pub use message::{Message, MessageKind};
pub use node::{HardState, Node, Ready, Role, Status, StepError};
pub use replication::{insync_offset, replica_targets, Offset};
pub use storage::{MemStorage, Storage};

/// A member's id (the agent maps it to a configured peer).
pub type NodeId = u64;
/// An election term.
pub type Term = u64;
/// Logical time, in ticks of the caller's clock.
pub type Tick = u64;
