//! [`Driver`]: a [`Node`] with its [`Storage`], kept to [`Ready`]'s contract.

use alloc::vec::Vec;

use crate::{Config, ConfigError, Message, Node, StepError, Storage};

/// Steps a [`Node`] and keeps its hard state durable before anything it produced goes
/// out. When a save fails (a full disk), nothing is sent and the node does not lead —
/// its vote or term exists only in memory, and acting on it could make it vote twice in
/// a term after a crash. The save is tried again at the next [`Driver::ready`]; until it
/// succeeds the node is as good as partitioned, which the protocol is safe against.
#[derive(Debug)]
pub struct Driver<S: Storage> {
    node: Node,
    storage: S,
    /// The node's hard state differs from what `storage` holds.
    unsaved: bool,
}

/// Why a [`Driver`] could not start.
#[derive(Debug)]
pub enum DriverError<E> {
    Config(ConfigError),
    Storage(E),
}

impl<S: Storage> Driver<S> {
    /// Starts (or restarts) a node from what `storage` holds. `seed` as for [`Node::new`].
    pub fn new(cfg: Config, storage: S, seed: u64) -> Result<Self, DriverError<S::Error>> {
        let hs = storage.load().map_err(DriverError::Storage)?;
        let node = Node::new(cfg, hs, seed).map_err(DriverError::Config)?;
        Ok(Driver {
            node,
            storage,
            unsaved: false,
        })
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        self.node.step(m)
    }

    /// The messages to send now, after saving the hard state if it changed. On a failed
    /// save nothing may be sent: the error is returned and the messages are dropped (the
    /// protocol re-sends what matters).
    pub fn ready(&mut self) -> Result<Vec<Message>, S::Error> {
        if !self.node.has_ready() {
            return Ok(Vec::new());
        }
        let ready = self.node.ready();
        if let Some(hs) = &ready.persist {
            if let Err(e) = self.storage.save(hs) {
                // Not advanced: the next `ready` asks for the save again.
                self.unsaved = true;
                return Err(e);
            }
        }
        self.unsaved = false;
        self.node.advance(&ready);
        Ok(ready.messages)
    }

    /// Leader, with a lease that holds a tick from now, and its state saved.
    pub fn leading(&self) -> bool {
        !self.unsaved && self.node.is_leader() && self.node.has_lease(self.node.now() + 1)
    }

    /// A save failed and has not succeeded since.
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    pub fn into_storage(self) -> S {
        self.storage
    }
}
