//! TODO docs
#![no_std]

extern crate alloc;

mod config;
mod message;
mod node;
pub mod replication;
pub mod rng;
pub mod sim;
mod storage;

pub use config::{Config, ConfigError};
pub use message::{Message, MessageKind};
pub use node::{HardState, Node, Ready, Role, Status, StepError};
pub use replication::{Offset, Replication, ReplicationError};
pub use storage::{MemStorage, Storage};

/// A member's id (the agent maps it to a configured peer).
pub type NodeId = u64;
/// An election term.
pub type Term = u64;
/// Logical time, in ticks of the caller's clock.
pub type Tick = u64;
