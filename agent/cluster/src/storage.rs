//! Where the [`HardState`] lives between restarts.

use crate::HardState;

/// Durable storage for the election's hard state. The agent implements it over its redb
/// database; [`MemStorage`] is the in-memory version for tests and the harness.
///
/// `save` must be durable (fsync'd) before it returns: the messages of the same
/// [`Ready`](crate::Ready) are sent only afterwards.
pub trait Storage {
    type Error;
    /// The last saved state, or `HardState::default()` for a fresh node.
    fn load(&self) -> Result<HardState, Self::Error>;
    fn save(&mut self, state: &HardState) -> Result<(), Self::Error>;
}

/// In-memory [`Storage`]; survives a simulated restart because the harness keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MemStorage {
    state: HardState,
    /// How many times `save` was called (useful for asserting persist-before-send).
    pub saves: u64,
}

impl MemStorage {
    pub fn new(state: HardState) -> Self {
        MemStorage { state, saves: 0 }
    }
}

impl Storage for MemStorage {
    type Error = core::convert::Infallible;

    fn load(&self) -> Result<HardState, Self::Error> {
        Ok(self.state)
    }

    fn save(&mut self, state: &HardState) -> Result<(), Self::Error> {
        self.state = *state;
        self.saves += 1;
        Ok(())
    }
}
