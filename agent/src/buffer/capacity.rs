//! Capacity: when the buffer is full, the oldest raw readings become summary blocks,
//! then the oldest summaries and readings are dropped; readings the gateway has are
//! deleted once their retention is over.

use redb::ReadableTable;

use crate::aggregate::Summary;

use super::block::{self, Summaries};
use super::error::corrupt;
use super::{Buffer, BufferError, Meta, BLOCKS, META, ROLLUPS};

/// Bytes counted per stored row on top of its value, for the capacity budget.
pub(super) const ROW_OVERHEAD: u64 = 16;

/// Summaries of downsampled readings may take at most this share of the capacity; beyond
/// it the oldest summaries are dropped first.
pub(super) const ROLLUP_SHARE: f64 = 0.5;

/// Blocks handled per call of [`Buffer::make_room`], so one call never stalls ingest long.
pub(super) const MAKE_ROOM_STEP: usize = 4096;

/// What [`Buffer::make_room`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub downsampled: u64,
    pub dropped: u64,
}

/// Pops the oldest blocks that end at or below `upto` while the buffer is above
/// `target` bytes. Returns the readings deleted.
pub(super) fn pop_delivered(
    blocks: &mut redb::Table<'_, u64, &'static [u8]>,
    upto: u64,
    meta: &mut Meta,
    target: u64,
) -> Result<u64, BufferError> {
    let mut deleted = 0;
    while meta.total_bytes() > target || target == u64::MAX {
        let Some(row) = blocks.first()? else { break };
        let (first, n) = (
            row.0.value(),
            block::count(row.1.value()).map_err(|e| corrupt("block", e))?,
        );
        drop(row);
        if first + n > upto {
            break;
        }
        let Some(v) = blocks.remove(first)? else {
            break;
        };
        forget_block(v.value(), meta)?;
        meta.delivered_deleted += n;
        deleted += n;
    }
    Ok(deleted)
}

/// Takes a block that leaves the table off the counters.
pub(super) fn forget_block(bytes: &[u8], meta: &mut Meta) -> Result<(), BufferError> {
    let size = bytes.len() as u64 + ROW_OVERHEAD;
    match block::decode_entry(bytes).map_err(|e| corrupt("block", e))? {
        block::Entry::Readings(r) => {
            meta.raw_bytes = meta.raw_bytes.saturating_sub(size);
            meta.raw_readings = meta.raw_readings.saturating_sub(r.len() as u64);
        }
        block::Entry::Summaries(s) => {
            meta.rollup_bytes = meta.rollup_bytes.saturating_sub(size);
            meta.rollup_rows = meta.rollup_rows.saturating_sub(s.rows.len() as u64);
        }
    }
    Ok(())
}

/// Drops the oldest summaries block (summaries are the oldest part of the log); returns
/// the readings it summarised (0: there was none).
pub(super) fn pop_summaries(
    blocks: &mut redb::Table<'_, u64, &'static [u8]>,
    meta: &mut Meta,
) -> Result<u64, BufferError> {
    let Some(row) = blocks.first()? else {
        return Ok(0);
    };
    if !block::is_summaries(row.1.value()) {
        return Ok(0);
    }
    let key = row.0.value();
    drop(row);
    let Some(v) = blocks.remove(key)? else {
        return Ok(0);
    };
    let covers = block::count(v.value()).map_err(|e| corrupt("block", e))?;
    forget_block(v.value(), meta)?;
    Ok(covers)
}

pub(super) fn row_bytes(device: &str, metric: &str, value: &[u8]) -> u64 {
    (device.len() + metric.len() + value.len()) as u64 + ROW_OVERHEAD
}

impl Buffer {
    /// When the buffer is above `downsample_at` of its capacity, folds the oldest raw
    /// readings into per-window summaries and, when those take too much room, drops the
    /// oldest summaries, then the oldest raw readings, until it is below `downsample_to`.
    /// Does a bounded amount of work per call.
    pub fn make_room(&mut self) -> Result<Room, BufferError> {
        let max = self.cfg.max_bytes as f64;
        // Leave room for the next batch too, or a large batch would overshoot the
        // capacity before the next call.
        let next = self.last_block_bytes;
        if (self.meta.total_bytes() + next) as f64 <= max * self.cfg.downsample_at {
            return Ok(Room::default());
        }
        let target = ((max * self.cfg.downsample_to) as u64).saturating_sub(next);
        self.make_room_until(target, false)
    }

    /// Records the gateway's durable ack (it only moves forward).
    pub fn set_uplink_acked(&mut self, offset: u64) {
        self.meta.uplink_acked = self
            .meta
            .uplink_acked
            .max(offset.min(self.meta.next_offset));
    }

    /// Deletes blocks that lie wholly below `upto` (at most the gateway-acked offset):
    /// the gateway has them, and the caller decided their retention is over.
    pub fn delete_delivered(&mut self, upto: u64) -> Result<u64, BufferError> {
        let upto = upto.min(self.meta.uplink_acked);
        let mut meta = self.meta;
        let txn = self.begin()?;
        let deleted = {
            let mut blocks = txn.open_table(BLOCKS)?;
            let deleted = pop_delivered(&mut blocks, upto, &mut meta, u64::MAX)?;
            Meta::save(&meta, &mut txn.open_table(META)?)?;
            deleted
        };
        if deleted == 0 {
            return Ok(0);
        }
        txn.commit()?;
        self.meta = meta;
        Ok(deleted)
    }

    pub(super) fn make_room_until(
        &mut self,
        target: u64,
        drop_only: bool,
    ) -> Result<Room, BufferError> {
        let window = self.cfg.downsample_window_secs;
        let summary_cap = (self.cfg.max_bytes as f64 * ROLLUP_SHARE) as u64;
        let mut meta = self.meta;
        let mut room = Room::default();
        let txn = self.begin()?;
        self.checkpoint_due = true;
        self.write_checkpoint(&txn, &mut meta)?;
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            let mut legacy = txn.open_table(ROLLUPS)?;
            // Readings the gateway already has go first: nothing is lost with them.
            pop_delivered(&mut blocks, meta.uplink_acked, &mut meta, target)?;
            // The oldest raw blocks downsampled in this call: one summaries block, written
            // where the first of them was; `pending` estimates its size meanwhile.
            let mut folded: Option<(u64, Summaries)> = None;
            let mut pending = 0u64;
            let mut steps = 0;
            while meta.total_bytes() + pending > target && steps < MAKE_ROOM_STEP {
                steps += 1;
                let downsample = !drop_only
                    && meta.raw_readings > 0
                    && meta.rollup_bytes + pending < summary_cap;
                let no_summaries = meta.rollup_rows == 0 && folded.is_none();
                if downsample || (no_summaries && meta.raw_readings > 0) {
                    let Some(first) = blocks.range(self.summary_end..)?.next() else {
                        break;
                    };
                    let key = first?.0.value();
                    let Some(v) = blocks.remove(key)? else {
                        break;
                    };
                    let bytes = v.value().len() as u64 + ROW_OVERHEAD;
                    let records = block::decode(v.value()).map_err(|e| corrupt("block", e))?;
                    drop(v);
                    let n = records.len() as u64;
                    meta.raw_bytes = meta.raw_bytes.saturating_sub(bytes);
                    meta.raw_readings = meta.raw_readings.saturating_sub(n);
                    if downsample {
                        let (_, s) = folded.get_or_insert_with(|| {
                            (
                                key,
                                Summaries {
                                    covers: 0,
                                    rows: Vec::new(),
                                },
                            )
                        });
                        block::summarise(&records, window, s);
                        pending = ROW_OVERHEAD
                            + s.rows
                                .iter()
                                .map(|r| (r.device.len() + r.metric.len()) as u64 + 56)
                                .sum::<u64>();
                        meta.downsampled += n;
                        room.downsampled += n;
                    } else {
                        meta.dropped += n;
                        room.dropped += n;
                    }
                    self.summary_end = self.summary_end.max(key + n);
                } else if folded.is_some() {
                    // Summaries are over their share: what this call folded is stored
                    // (it is the newest of them), and the oldest go next.
                    self.write_summaries(&mut blocks, folded.take(), &mut meta)?;
                    pending = 0;
                } else if meta.rollup_rows > 0 {
                    let dropped = match legacy.pop_first()? {
                        Some((k, v)) => {
                            let (_, device, metric) = k.value();
                            let summary: Summary = postcard::from_bytes(v.value())
                                .map_err(|e| corrupt("rollup", e))?;
                            meta.rollup_bytes = meta.rollup_bytes.saturating_sub(row_bytes(
                                device,
                                metric,
                                v.value(),
                            ));
                            meta.rollup_rows = meta.rollup_rows.saturating_sub(1);
                            summary.count
                        }
                        None => pop_summaries(&mut blocks, &mut meta)?,
                    };
                    if dropped == 0 {
                        break;
                    }
                    meta.dropped += dropped;
                    room.dropped += dropped;
                } else {
                    break;
                }
            }
            self.write_summaries(&mut blocks, folded, &mut meta)?;
            Meta::save(&meta, &mut txn.open_table(META)?)?;
        }
        txn.commit()?;
        self.meta = meta;
        Ok(room)
    }

    /// Stores what [`Buffer::make_room_until`] folded: a summaries block where its first
    /// reading was.
    pub(super) fn write_summaries(
        &mut self,
        blocks: &mut redb::Table<'_, u64, &'static [u8]>,
        folded: Option<(u64, Summaries)>,
        meta: &mut Meta,
    ) -> Result<(), BufferError> {
        let Some((key, s)) = folded else {
            return Ok(());
        };
        let bytes = block::encode_summaries(&s);
        meta.rollup_bytes += bytes.len() as u64 + ROW_OVERHEAD;
        meta.rollup_rows += s.rows.len() as u64;
        blocks.insert(key, bytes.as_slice())?;
        self.summary_end = self.summary_end.max(key + s.covers);
        Ok(())
    }
}
