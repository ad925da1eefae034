//! Reading the log from other threads: a shared handle on the database, and the one
//! block-range reader every log uses (the buffer's, and each origin's in a store).

use std::sync::{Arc, RwLock};

use redb::{Database, Durability, ReadableDatabase};

use super::block::{self};
use super::error::corrupt;
use super::{BufferError, BLOCKS};

/// A shared handle on the buffer's database for readers on other threads (the uplink).
/// The writer may swap the database underneath (it reopens it after an I/O error), so
/// readers take the lock only to begin a read transaction.
#[derive(Clone)]
pub struct Log {
    pub(super) db: Arc<RwLock<Database>>,
}

/// One stored batch, as the uplink ships it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub first_offset: u64,
    /// Offset after the block's last reading.
    pub end_offset: u64,
    pub bytes: Vec<u8>,
}

impl Log {
    pub(super) fn begin_read(&self) -> Result<redb::ReadTransaction, BufferError> {
        let db = self.db.read().map_err(|_| corrupt("lock", "poisoned"))?;
        Ok(db.begin_read()?)
    }

    pub(super) fn begin_write(&self) -> Result<redb::WriteTransaction, BufferError> {
        let db = self.db.read().map_err(|_| corrupt("lock", "poisoned"))?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        Ok(txn)
    }

    /// Blocks holding offsets from `from` on, oldest first, until about `max_readings`
    /// readings or `next_offset` (the first offset not yet committed).
    pub fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        next_offset: u64,
    ) -> Result<Vec<StoredBlock>, BufferError> {
        let read = self.begin_read()?;
        let table = read.open_table(BLOCKS)?;
        // The block holding `from` may start below it.
        let start = match table.range(..=from)?.next_back() {
            Some(row) => row?.0.value(),
            None => from,
        };
        let rows = table.range(start..next_offset)?.map(|row| {
            let (k, v) = row?;
            Ok((k.value(), v.value().to_vec()))
        });
        read_blocks(rows, from, max_readings, next_offset)
            .map_err(|e| e.either(|e| corrupt("block", e), |e: redb::StorageError| e.into()))
    }
}

/// Why [`read_blocks`] stopped: a block that does not decode, or the storage.
pub enum ReadError<E> {
    Block(block::BlockError),
    Storage(E),
}

impl<E> ReadError<E> {
    pub fn either<T>(
        self,
        block: impl FnOnce(block::BlockError) -> T,
        other: impl FnOnce(E) -> T,
    ) -> T {
        match self {
            ReadError::Block(e) => block(e),
            ReadError::Storage(e) => other(e),
        }
    }
}

/// The one block-range reader of every log (the buffer's, and each origin's in a store):
/// from `rows` — blocks in offset order, beginning with the one that holds `from` or
/// starts after it — those that hold offsets at or above `from` and start below `head`,
/// until about `max_readings` offsets. Each block's end is its own count, so a log with a
/// hole (summaries dropped, a replica trimmed) yields the blocks after it as they are;
/// the uplink then says the offsets in between are gone.
pub fn read_blocks<E>(
    rows: impl Iterator<Item = Result<(u64, Vec<u8>), E>>,
    from: u64,
    max_readings: u64,
    head: u64,
) -> Result<Vec<StoredBlock>, ReadError<E>> {
    let mut out = Vec::new();
    let mut readings = 0u64;
    for row in rows {
        let (first, bytes) = row.map_err(ReadError::Storage)?;
        if first >= head || readings >= max_readings {
            break;
        }
        let n = block::count(&bytes).map_err(ReadError::Block)?;
        let end = first.saturating_add(n);
        if end <= from {
            continue;
        }
        readings += end - first.max(from);
        out.push(StoredBlock {
            first_offset: first,
            end_offset: end,
            bytes,
        });
    }
    Ok(out)
}
