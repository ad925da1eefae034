//! The `meta` table: counters that must survive restarts, and the log's incarnation.

use redb::ReadableTable;
use serde::Serialize;

use super::BufferError;

/// Counters that live in the `meta` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    /// Offset the next reading of this origin gets.
    pub next_offset: u64,
    pub raw_bytes: u64,
    pub raw_readings: u64,
    pub rollup_bytes: u64,
    pub rollup_rows: u64,
    pub downsampled: u64,
    pub dropped: u64,
    /// Windows in the `windows` table include every block below this offset.
    pub agg_offset: u64,
    /// The gateway has durably stored every reading below this offset.
    pub uplink_acked: u64,
    /// Readings deleted because the gateway had them and their retention had passed.
    pub delivered_deleted: u64,
}

/// Meta key of the buffer's incarnation (not part of [`Meta`]: it never changes).
pub(super) const INCARNATION: &str = "incarnation";

/// `<node>.<incarnation as 8 hex digits>`.
pub fn origin_id(node: &str, incarnation: u32) -> String {
    format!("{node}.{incarnation:08x}")
}

pub(super) const META_KEYS: [&str; 10] = [
    "next_offset",
    "raw_bytes",
    "raw_readings",
    "rollup_bytes",
    "rollup_rows",
    "downsampled",
    "dropped",
    "agg_offset",
    "uplink_acked",
    "delivered_deleted",
];

impl Meta {
    pub(super) fn fields(&self) -> [u64; 10] {
        [
            self.next_offset,
            self.raw_bytes,
            self.raw_readings,
            self.rollup_bytes,
            self.rollup_rows,
            self.downsampled,
            self.dropped,
            self.agg_offset,
            self.uplink_acked,
            self.delivered_deleted,
        ]
    }

    pub(super) fn from_fields(f: [u64; 10]) -> Meta {
        Meta {
            next_offset: f[0],
            raw_bytes: f[1],
            raw_readings: f[2],
            rollup_bytes: f[3],
            rollup_rows: f[4],
            downsampled: f[5],
            dropped: f[6],
            agg_offset: f[7],
            uplink_acked: f[8],
            delivered_deleted: f[9],
        }
    }

    pub(super) fn load(table: &impl ReadableTable<&'static str, u64>) -> Result<Meta, BufferError> {
        let mut f = [0u64; 10];
        for (slot, key) in f.iter_mut().zip(META_KEYS) {
            if let Some(v) = table.get(key)? {
                *slot = v.value();
            }
        }
        Ok(Meta::from_fields(f))
    }

    pub(super) fn save(
        &self,
        table: &mut redb::Table<'_, &'static str, u64>,
    ) -> Result<(), BufferError> {
        for (key, v) in META_KEYS.iter().zip(self.fields()) {
            table.insert(*key, v)?;
        }
        Ok(())
    }

    /// Bytes counted against the capacity.
    pub fn total_bytes(&self) -> u64 {
        self.raw_bytes + self.rollup_bytes
    }
}
