//! The durable buffer: the agent's origin log in redb, the per-device dedup state that
//! backs the end-to-end ack, window aggregates, and capacity management.
//!
//! Tables (one redb file, `<data_dir>/buffer.redb`):
//! - `blocks`: first origin offset → one block ([`block`]): the readings of one commit, or
//!   the summaries that replaced the oldest readings when the buffer was full. Summary
//!   blocks are always the oldest part of the log; they ship upstream like readings.
//! - `devices`: device id → [`seq::DeviceState`] (which seqs are stored, boot epochs).
//! - `windows`: (device, metric, window, start) → window state, checkpointed together with
//!   `meta.agg_offset`; blocks past that offset are replayed into the windows at start-up.
//! - `rollups`: summaries written by agents before summary blocks (kept, exported, and
//!   dropped first when room is needed; never shipped).
//! - `meta`: counters that must survive restarts (next offset, bytes, totals).
//!
//! A batch, the dedup state it changed and (when due) the window checkpoint are written
//! in one transaction with one fsync: either all of it is durable or none of it is, so an
//! acknowledged reading is stored exactly once whatever moment the process dies at.
//!
//! Here: opening (restoring the dedup state and windows, replaying the log's tail) and
//! the commit. Beside it: [`block`] (the block format), [`seq`] (dedup per device),
//! `meta` (the counters), `log` (reading the log from other threads), `windows` (window
//! checkpoints and spills), `capacity` (downsampling, dropping, deleting what the gateway
//! has), `disk` (a full disk: the reserve file, reopening, holding the size), `inspect`
//! (`buffer stats|check|export` on a stopped agent), `error`.

pub mod block;
mod capacity;
pub mod config;
mod disk;
mod error;
mod inspect;
mod log;
mod meta;
pub mod seq;
mod windows;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fogline_firmware::wire::Ack;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::aggregate::{AggregateConfig, Aggregator, Fold, WindowKey, WindowState};
use crate::ingest::{DeviceTime, Incoming, Reject};
use block::Record;
use capacity::ROW_OVERHEAD;
use disk::{free_disk_bytes, Reserve};
use error::corrupt;
use meta::INCARNATION;
use seq::{DeviceState, Insert};
use windows::{load_window, stored_window};

pub use capacity::Room;
pub use config::{buffer_path, BufferConfig};
pub use error::BufferError;
pub use inspect::{for_each_summary, Inspect, Span};
pub use log::{read_blocks, Log, ReadError, StoredBlock};
pub use meta::{origin_id, Meta};

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const WINDOWS: TableDefinition<(&str, &str, u32, i64), &[u8]> = TableDefinition::new("windows");
const ROLLUPS: TableDefinition<(i64, &str, &str), &[u8]> = TableDefinition::new("rollups");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What a commit did.
#[derive(Debug, Default)]
pub struct Committed {
    /// New watermark per (device, boot) that took part in the batch.
    pub acks: Vec<(String, Ack)>,
    pub accepted: u64,
    pub duplicates: u64,
    /// Readings of the batch (by index) that were not stored, and why: none of them may
    /// be acknowledged.
    pub refused: Vec<(usize, Reject)>,
    pub too_late: u64,
}

/// The agent's buffer. Owned by one thread; every write goes through it.
pub struct Buffer {
    db: Arc<RwLock<Database>>,
    path: PathBuf,
    cfg: BufferConfig,
    meta: Meta,
    devices: HashMap<String, DeviceState>,
    agg: Aggregator,
    /// Every committed block below this offset has been folded into `agg`.
    folded_offset: u64,
    checkpoint_due: bool,
    /// A failed checkpoint lost track of which windows changed: write them all next time.
    checkpoint_all: bool,
    evicted: Vec<WindowKey>,
    /// Where the next sweep of stored windows past their lateness starts.
    sweep_from: Option<(String, String, u32, i64)>,
    /// Random id of this buffer's log, fixed when the buffer was created.
    incarnation: u32,
    reserve: Reserve,
    /// While the disk is short of `min_free_disk_bytes`: the logical size the buffer is
    /// held at, so that redb reuses the pages it frees instead of growing the file.
    disk_cap: Option<u64>,
    /// Largest buffer file size seen while under disk pressure (see `keep_disk_free`).
    file_len_at_pressure: u64,
    /// Size of the last block written: what the next commit will probably add.
    last_block_bytes: u64,
    /// Where the raw readings start: below it the log holds summary blocks only.
    summary_end: u64,
}

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, BufferError> {
    Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => BufferError::Locked(path.to_path_buf()),
            other => other.into(),
        })
}

impl Buffer {
    /// Opens (or creates) the buffer in `cfg.data_dir`, restores the dedup state and the
    /// windows, and replays blocks the last window checkpoint did not cover.
    pub fn open(
        cfg: &BufferConfig,
        agg_cfg: &AggregateConfig,
        now_ms: i64,
    ) -> Result<Buffer, BufferError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| BufferError::DataDir(cfg.data_dir.clone(), e))?;
        let path = buffer_path(&cfg.data_dir);
        let db = open_db(&path, cfg.cache_bytes)?;
        let txn = db.begin_write()?;
        let incarnation = {
            txn.open_table(BLOCKS)?;
            txn.open_table(DEVICES)?;
            txn.open_table(WINDOWS)?;
            txn.open_table(ROLLUPS)?;
            let mut meta = txn.open_table(META)?;
            let existing = meta.get(INCARNATION)?.map(|v| v.value());
            match existing {
                Some(v) => v,
                None => {
                    // A new buffer starts a new log: its offsets must never be taken
                    // for those of a log that lived in a wiped data directory.
                    let v = u64::from(fastrand::u32(..));
                    meta.insert(INCARNATION, v)?;
                    v
                }
            }
        };
        txn.commit()?;
        crate::fsync::sync_dir_of(&path)
            .map_err(|e| BufferError::DataDir(cfg.data_dir.clone(), e))?;

        let mut agg = Aggregator::new(&agg_cfg.windows_secs, agg_cfg.lateness_secs);
        let read = db.begin_read()?;
        let mut meta = Meta::load(&read.open_table(META)?)?;
        if let Some(row) = read.open_table(BLOCKS)?.last()? {
            // The meta row is written in the same transaction as every block; this only
            // guards against reusing an offset if that ever stopped being true.
            let end =
                row.0.value() + block::count(row.1.value()).map_err(|e| corrupt("block", e))?;
            meta.next_offset = meta.next_offset.max(end);
        }
        // Summary blocks are the oldest part of the log; raw readings start after them.
        let mut summary_end = 0;
        for row in read.open_table(BLOCKS)?.iter()? {
            let (k, v) = row?;
            if !block::is_summaries(v.value()) {
                break;
            }
            summary_end = k.value() + block::count(v.value()).map_err(|e| corrupt("block", e))?;
        }
        let mut devices = HashMap::new();
        for row in read.open_table(DEVICES)?.iter()? {
            let (k, v) = row?;
            let state: DeviceState =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("device state", e))?;
            devices.insert(k.value().to_owned(), state);
        }
        // Windows that ended a while ago stay in storage until a late reading needs them.
        let windows = read.open_table(WINDOWS)?;
        for row in windows.iter()? {
            let (k, v) = row?;
            let (device, metric, len_secs, start_ms) = k.value();
            let key = WindowKey {
                device: device.into(),
                metric: metric.into(),
                len_secs,
                start_ms,
            };
            if !Aggregator::resident_at(&key, now_ms) {
                continue;
            }
            let state = WindowState::from_bytes(v.value())
                .ok_or_else(|| corrupt("window", format!("{device}/{metric}")))?;
            agg.restore(key, state);
        }
        // Blocks committed after the last window checkpoint.
        let mut replayed = 0u64;
        let mut load = |k: &WindowKey| stored_window(&windows, k);
        for row in read.open_table(BLOCKS)?.range(meta.agg_offset..)? {
            let (_, v) = row?;
            if block::is_summaries(v.value()) {
                // Folded into the windows before it was downsampled.
                continue;
            }
            for r in block::decode(v.value()).map_err(|e| corrupt("block", e))? {
                agg.fold(&r.device, &r.metric, r.ts_ms, r.value, now_ms, &mut load);
                replayed += 1;
            }
        }
        drop(windows);
        drop(read);
        if replayed > 0 {
            tracing::info!(replayed, "replayed readings into the aggregates");
        }
        let reserve = Reserve::new(&cfg.data_dir, cfg.min_free_disk_bytes);
        if let Some(free) = free_disk_bytes(&cfg.data_dir) {
            reserve.ensure(free.saturating_sub(cfg.min_free_disk_bytes));
        }
        Ok(Buffer {
            db: Arc::new(RwLock::new(db)),
            incarnation: incarnation as u32,
            reserve,
            disk_cap: None,
            file_len_at_pressure: 0,
            last_block_bytes: 0,
            summary_end,
            path,
            cfg: cfg.clone(),
            folded_offset: meta.next_offset,
            meta,
            devices,
            agg,
            checkpoint_due: replayed > 0,
            checkpoint_all: false,
            evicted: Vec::new(),
            sweep_from: None,
        })
    }

    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// The id of this buffer's log upstream and at peers: `<node>.<incarnation>`. A
    /// wiped data directory gets a new incarnation, so a new log never collides with
    /// the offsets of the old one, which may still be on its way from peers.
    pub fn origin(&self, node: &str) -> String {
        origin_id(node, self.incarnation)
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current watermark of a device's boot, if known.
    pub fn watermark(&self, device: &str, boot: u32) -> Option<u32> {
        self.devices
            .get(device)
            .and_then(|d| d.boot(boot))
            .map(|b| b.seqs.watermark())
    }

    /// Deduplicates, stamps and durably stores one batch (one fsync), then folds it into
    /// the aggregates. On error nothing of the batch is stored or remembered, so the
    /// devices' re-sends will be accepted later.
    pub fn commit(&mut self, batch: &[Incoming]) -> Result<Committed, BufferError> {
        let mut out = Committed::default();
        let mut overlay: HashMap<String, DeviceState> = HashMap::new();
        // A set: a batch from thousands of devices made a list scan quadratic.
        let mut acked: std::collections::HashSet<(String, u32)> = std::collections::HashSet::new();
        let mut records = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let state = overlay
                .entry(r.device.clone())
                .or_insert_with(|| self.devices.get(&r.device).cloned().unwrap_or_default());
            let boot = state.boot_mut(r.boot, r.received_ms);
            if let Some(seq) = r.seq {
                acked.insert((r.device.clone(), r.boot));
                match boot.seqs.insert(seq) {
                    Insert::Duplicate => {
                        out.duplicates += 1;
                        continue;
                    }
                    Insert::TooManyGaps => {
                        out.refused.push((i, Reject::TooManyGaps));
                        continue;
                    }
                    Insert::TooFarAhead => {
                        out.refused.push((i, Reject::SeqJump));
                        continue;
                    }
                    Insert::New => {}
                }
            }
            let ts_ms = match r.time {
                DeviceTime::Wall(ms) => ms,
                DeviceTime::SinceBoot(up) => boot.rebase(up, r.received_ms),
                DeviceTime::Unknown | DeviceTime::Ahead(_) => r.received_ms,
            };
            records.push(Record {
                device: r.device.as_str().into(),
                metric: r.metric.as_str().into(),
                boot: r.boot,
                seq: r.seq,
                ts_ms,
                value: r.value,
            });
        }

        if !records.is_empty() {
            let mut meta = self.meta;
            let txn = self.begin()?;
            {
                let encoded = block::encode(&records);
                let n = records.len() as u64;
                txn.open_table(BLOCKS)?
                    .insert(meta.next_offset, encoded.as_slice())?;
                meta.next_offset += n;
                meta.raw_readings += n;
                meta.raw_bytes += encoded.len() as u64 + ROW_OVERHEAD;
                self.last_block_bytes = encoded.len() as u64 + ROW_OVERHEAD;
                let mut devices = txn.open_table(DEVICES)?;
                for (device, state) in &overlay {
                    let bytes =
                        postcard::to_allocvec(state).map_err(|e| corrupt("device state", e))?;
                    devices.insert(device.as_str(), bytes.as_slice())?;
                }
            }
            let persisted = self.write_checkpoint(&txn, &mut meta)?;
            Meta::save(&meta, &mut txn.open_table(META)?)?;
            if let Err(e) = txn.commit() {
                if persisted {
                    self.checkpoint_all = true;
                }
                return Err(e.into());
            }
            self.meta = meta;
            self.devices.extend(overlay);
            out.accepted = records.len() as u64;
            let now_ms = crate::now_ms();
            if persisted {
                self.agg.spill(now_ms);
            }
            let log = self.log();
            let mut read = None;
            let mut load = |k: &WindowKey| load_window(&log, &mut read, k);
            for r in &records {
                if let Fold::TooLateFor(n) = self
                    .agg
                    .fold(&r.device, &r.metric, r.ts_ms, r.value, now_ms, &mut load)
                {
                    out.too_late += n as u64;
                }
            }
            self.folded_offset = self.meta.next_offset;
        }
        // Duplicates-only batches change nothing durable: their acks come from the state
        // that is already on disk.
        for (device, boot) in acked {
            if let Some(seq) = self.watermark(&device, boot) {
                out.acks.push((device, Ack { boot, seq }));
            }
        }
        Ok(out)
    }

    fn begin(&self) -> Result<redb::WriteTransaction, BufferError> {
        self.log().begin_write()
    }

    /// A read handle for other threads.
    pub fn log(&self) -> Log {
        Log {
            db: self.db.clone(),
        }
    }
}

/// A tiny in-memory database used only while the real one is being reopened.
fn open_db_placeholder() -> Result<Database, BufferError> {
    Ok(Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?)
}

#[cfg(test)]
mod tests;
