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

pub mod block;
pub mod config;
pub mod seq;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fogline_firmware::wire::Ack;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::aggregate::AggregateConfig;
use crate::aggregate::{Aggregator, Fold, Summary, WindowKey, WindowState};
use crate::ingest::{DeviceTime, Incoming, Reject};
use block::{Record, Summaries, SummaryRow};
pub use config::{buffer_path, BufferConfig};
use seq::{DeviceState, Insert};

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const WINDOWS: TableDefinition<(&str, &str, u32, i64), &[u8]> = TableDefinition::new("windows");
const ROLLUPS: TableDefinition<(i64, &str, &str), &[u8]> = TableDefinition::new("rollups");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Bytes counted per stored row on top of its value, for the capacity budget.
const ROW_OVERHEAD: u64 = 16;
/// Summaries of downsampled readings may take at most this share of the capacity; beyond
/// it the oldest summaries are dropped first.
const ROLLUP_SHARE: f64 = 0.5;
/// Blocks handled per call of [`Buffer::make_room`], so one call never stalls ingest long.
const MAKE_ROOM_STEP: usize = 4096;
/// Stored windows looked at per checkpoint for those past their lateness.
const SWEEP_ROWS: usize = 2048;

/// Errors of the buffer. Storage errors keep redb's own message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("the buffer {0} is in use by another process (is an agent running on it?)")]
    Locked(PathBuf),
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl BufferError {
    /// True when the disk is out of space (the write can succeed after making room).
    pub fn is_disk_full(&self) -> bool {
        match self {
            BufferError::Storage(redb::Error::Io(e)) => {
                e.kind() == std::io::ErrorKind::StorageFull
                    || e.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(e.raw_os_error(), Some(28 | 122))
            }
            _ => false,
        }
    }

    /// True when redb refuses further writes until the database is reopened.
    pub fn needs_reopen(&self) -> bool {
        matches!(
            self,
            BufferError::Storage(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for BufferError {
            fn from(e: $t) -> Self { BufferError::Storage(e.into()) }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::DatabaseError> for BufferError {
    fn from(e: redb::DatabaseError) -> Self {
        BufferError::Storage(e.into())
    }
}

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
const INCARNATION: &str = "incarnation";

/// `<node>.<incarnation as 8 hex digits>`.
pub fn origin_id(node: &str, incarnation: u32) -> String {
    format!("{node}.{incarnation:08x}")
}

const META_KEYS: [&str; 10] = [
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
    fn fields(&self) -> [u64; 10] {
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

    fn from_fields(f: [u64; 10]) -> Meta {
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

    fn load(table: &impl ReadableTable<&'static str, u64>) -> Result<Meta, BufferError> {
        let mut f = [0u64; 10];
        for (slot, key) in f.iter_mut().zip(META_KEYS) {
            if let Some(v) = table.get(key)? {
                *slot = v.value();
            }
        }
        Ok(Meta::from_fields(f))
    }

    fn save(&self, table: &mut redb::Table<'_, &'static str, u64>) -> Result<(), BufferError> {
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

/// What [`Buffer::make_room`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub downsampled: u64,
    pub dropped: u64,
}

/// A shared handle on the buffer's database for readers on other threads (the uplink).
/// The writer may swap the database underneath (it reopens it after an I/O error), so
/// readers take the lock only to begin a read transaction.
#[derive(Clone)]
pub struct Log {
    db: Arc<RwLock<Database>>,
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
    fn begin_read(&self) -> Result<redb::ReadTransaction, BufferError> {
        let db = self.db.read().map_err(|_| corrupt("lock", "poisoned"))?;
        Ok(db.begin_read()?)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, BufferError> {
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

/// Bytes available to this process on the filesystem holding `dir`.
fn free_disk_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A file of real (not sparse) bytes kept beside the buffer. A copy-on-write database
/// needs free pages even to delete, so when the disk is completely full this file is
/// deleted to give redb room to drop the oldest readings. Recreated once there is room.
struct Reserve {
    path: PathBuf,
    size: u64,
}

impl Reserve {
    fn new(data_dir: &Path, min_free: u64) -> Reserve {
        Reserve {
            path: data_dir.join("reserve.bin"),
            size: (min_free / 2).min(8 << 20),
        }
    }

    /// Creates the reserve if it is missing and `spare` bytes allow it.
    fn ensure(&self, spare: u64) {
        if self.size == 0 || spare < self.size || self.path.exists() {
            return;
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&self.path)?;
            let chunk = vec![0u8; 64 * 1024];
            let mut left = self.size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&self.path);
            tracing::warn!(
                "cannot create the disk reserve {}: {e}",
                self.path.display()
            );
        }
    }

    /// Deletes the reserve; true if there was one.
    fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
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

fn corrupt(what: &'static str, detail: impl ToString) -> BufferError {
    BufferError::Corrupt {
        what,
        detail: detail.to_string(),
    }
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

    /// The next commit also writes the changed windows.
    pub fn request_checkpoint(&mut self) {
        self.checkpoint_due = true;
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

    /// Writes changed windows into `txn` if a checkpoint is due. Returns whether it did.
    fn write_checkpoint(
        &mut self,
        txn: &redb::WriteTransaction,
        meta: &mut Meta,
    ) -> Result<bool, BufferError> {
        if !self.checkpoint_due && !self.checkpoint_all {
            return Ok(false);
        }
        let changed = self.agg.take_persist(self.checkpoint_all);
        let mut windows = txn.open_table(WINDOWS)?;
        for k in &changed {
            if let Some(w) = self.agg.get(k) {
                windows.insert(
                    (&*k.device, &*k.metric, k.len_secs, k.start_ms),
                    w.to_bytes().as_slice(),
                )?;
            }
        }
        for k in self.evicted.drain(..) {
            windows.remove((&*k.device, &*k.metric, k.len_secs, k.start_ms))?;
        }
        self.sweep_windows(&mut windows)?;
        meta.agg_offset = self.folded_offset;
        self.checkpoint_due = false;
        self.checkpoint_all = false;
        Ok(true)
    }

    /// Deletes stored windows past their lateness that are not in memory (spilled ones,
    /// which [`Aggregator::evict`] does not see), looking at a bounded slice of the table
    /// per checkpoint and going round it.
    fn sweep_windows(
        &mut self,
        windows: &mut redb::Table<(&'static str, &'static str, u32, i64), &'static [u8]>,
    ) -> Result<(), BufferError> {
        let now_ms = crate::now_ms();
        let lateness = self.agg.lateness_ms();
        let mut expired = Vec::new();
        let mut next = None;
        {
            let rows = match &self.sweep_from {
                Some((d, m, l, s)) => windows.range((d.as_str(), m.as_str(), *l, *s)..)?,
                None => windows.range::<(&str, &str, u32, i64)>(..)?,
            };
            for (seen, row) in rows.enumerate() {
                let (k, _) = row?;
                let (device, metric, len_secs, start_ms) = k.value();
                let owned = (device.to_owned(), metric.to_owned(), len_secs, start_ms);
                if seen == SWEEP_ROWS {
                    next = Some(owned);
                    break;
                }
                let end = start_ms.saturating_add(i64::from(len_secs) * 1000);
                if end.saturating_add(lateness) < now_ms {
                    expired.push(owned);
                }
            }
        }
        for (device, metric, len_secs, start_ms) in &expired {
            windows.remove((device.as_str(), metric.as_str(), *len_secs, *start_ms))?;
        }
        self.sweep_from = next;
        Ok(())
    }

    /// Writes the window checkpoint in a transaction of its own (used at shutdown).
    pub fn checkpoint(&mut self) -> Result<(), BufferError> {
        self.checkpoint_due = true;
        let mut meta = self.meta;
        let txn = self.begin()?;
        self.write_checkpoint(&txn, &mut meta)?;
        {
            Meta::save(&meta, &mut txn.open_table(META)?)?;
        }
        if let Err(e) = txn.commit() {
            self.checkpoint_all = true;
            return Err(e.into());
        }
        self.meta = meta;
        self.agg.spill(crate::now_ms());
        Ok(())
    }

    /// Aggregates changed since the last call, as (topic, JSON); also forgets windows past
    /// their lateness.
    pub fn take_aggregates(&mut self, quantiles: &[f64]) -> Vec<(String, String)> {
        let out = self.agg.take_publish(quantiles);
        self.evict_windows();
        out
    }

    /// Windows changed since the last call, for [`Buffer::aggregate`]; call
    /// [`Buffer::evict_windows`] once they are published.
    pub fn changed_windows(&mut self) -> Vec<WindowKey> {
        self.agg.take_changed()
    }

    /// A window's aggregate, as (topic, JSON).
    pub fn aggregate(&self, key: &WindowKey, quantiles: &[f64]) -> Option<(String, String)> {
        self.agg.publication(key, quantiles)
    }

    /// Forgets windows past their lateness.
    pub fn evict_windows(&mut self) {
        let expired = self.agg.evict(crate::now_ms());
        self.evicted.extend(expired);
    }

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

    /// After an I/O error redb refuses further writes until it is reopened.
    pub fn reopen(&mut self) -> Result<(), BufferError> {
        let mut db = self.db.write().map_err(|_| corrupt("lock", "poisoned"))?;
        drop(std::mem::replace(&mut *db, open_db_placeholder()?));
        *db = open_db(&self.path, self.cfg.cache_bytes)?;
        Ok(())
    }

    /// Frees space after the disk filled up: releases the reserve file so redb has room
    /// for the transaction, reopens the database, drops (does not downsample, which
    /// would write more) the oldest tenth of the readings and holds the buffer at that
    /// size until the disk has room again.
    pub fn free_disk(&mut self) -> Result<Room, BufferError> {
        let released = self.reserve.release();
        self.reopen()?;
        let cap = self.lower_disk_cap();
        let room = self.make_room_until(cap, true)?;
        tracing::warn!(
            dropped = room.dropped,
            reserve_released = released,
            held_at_bytes = cap,
            "disk full: dropped the oldest readings to keep ingesting"
        );
        Ok(room)
    }

    /// Lowers the disk-pressure cap to nine tenths of the current size (or of the cap).
    fn lower_disk_cap(&mut self) -> u64 {
        let total = self.meta.total_bytes();
        let base = self.disk_cap.map_or(total, |cap| cap.min(total));
        let cap = base - base / 10;
        self.disk_cap = Some(cap);
        cap
    }

    /// Keeps `buffer.min_free_disk_bytes` free on the filesystem. While less is free the
    /// buffer becomes a ring at a fixed size: every commit is followed by dropping as
    /// many of the oldest readings, so redb reuses the freed pages instead of growing
    /// the file into the last free bytes. When the file grows anyway (fragmentation) or
    /// the disk gets critically low, the size is lowered by a tenth. Once the disk has
    /// room again the cap is lifted. Returns the readings dropped.
    pub fn keep_disk_free(&mut self) -> Result<u64, BufferError> {
        let Some(free) = free_disk_bytes(&self.cfg.data_dir) else {
            return Ok(0);
        };
        let min_free = self.cfg.min_free_disk_bytes;
        if free >= min_free {
            self.reserve.ensure(free - min_free);
            if self.disk_cap.take().is_some() {
                tracing::info!(
                    free_bytes = free,
                    "the disk has room again: buffer cap lifted"
                );
            }
            self.file_len_at_pressure = 0;
            return Ok(0);
        }
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let grew = len > self.file_len_at_pressure;
        let critical = free < min_free / 4 && grew;
        let lowered =
            self.disk_cap.is_none() || (grew && self.file_len_at_pressure > 0) || critical;
        self.file_len_at_pressure = self.file_len_at_pressure.max(len);
        let cap = if lowered {
            self.lower_disk_cap()
        } else {
            self.disk_cap.unwrap_or(0)
        };
        if self.meta.total_bytes() <= cap {
            return Ok(0);
        }
        let room = self.make_room_until(cap, true)?;
        if lowered {
            tracing::warn!(
                free_bytes = free,
                min_free_disk_bytes = min_free,
                dropped = room.dropped,
                held_at_bytes = cap,
                "the disk is nearly full: dropping the oldest readings instead of growing the buffer"
            );
        }
        Ok(room.dropped)
    }

    fn make_room_until(&mut self, target: u64, drop_only: bool) -> Result<Room, BufferError> {
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
    fn write_summaries(
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

    /// Every raw reading from `from` on, in offset order, with its offset.
    pub fn for_each_record(
        &self,
        from: u64,
        mut f: impl FnMut(u64, Record) -> Result<(), BufferError>,
    ) -> Result<(), BufferError> {
        let db = self.db.read().map_err(|_| corrupt("lock", "poisoned"))?;
        for_each_record(&*db, from, &mut f)
    }

    /// Checks every table decodes and the counters agree with the contents.
    pub fn check(&mut self) -> Result<Vec<String>, BufferError> {
        let mut db = self.db.write().map_err(|_| corrupt("lock", "poisoned"))?;
        check_db(&mut db)
    }

    /// Every summary of downsampled readings, oldest first: see [`for_each_summary`].
    pub fn summaries(&self) -> Result<Vec<(Option<Span>, SummaryRow)>, BufferError> {
        let db = self.db.read().map_err(|_| corrupt("lock", "poisoned"))?;
        let mut out = Vec::new();
        for_each_summary(&*db, &mut |span, row| {
            out.push((span, row));
            Ok(())
        })?;
        Ok(out)
    }

    pub fn open_windows(&self) -> usize {
        self.agg.open_windows()
    }
}

/// Checks every table decodes and the counters agree with the contents; returns the
/// problems found (none: consistent).
fn check_db(db: &mut Database) -> Result<Vec<String>, BufferError> {
    let mut problems = Vec::new();
    if !db.check_integrity()? {
        problems.push("redb integrity check repaired the file".to_owned());
    }
    let read = db.begin_read()?;
    let (mut bytes, mut readings, mut expect_next) = (0u64, 0u64, None::<u64>);
    let (mut summary_bytes, mut summary_rows) = (0u64, 0u64);
    let mut last_end = 0u64;
    let mut raw_seen = false;
    for row in read.open_table(BLOCKS)?.iter()? {
        let (k, v) = row?;
        let key = k.value();
        let size = v.value().len() as u64 + ROW_OVERHEAD;
        let covers = match block::decode_entry(v.value()) {
            Ok(block::Entry::Readings(records)) => {
                raw_seen = true;
                readings += records.len() as u64;
                bytes += size;
                records.len() as u64
            }
            Ok(block::Entry::Summaries(s)) => {
                if raw_seen {
                    problems.push(format!(
                        "summaries at offset {key} come after raw readings (they must be \
                         the oldest part of the log)"
                    ));
                }
                summary_rows += s.rows.len() as u64;
                summary_bytes += size;
                s.covers
            }
            Err(e) => {
                problems.push(format!("block at offset {key}: {e}"));
                continue;
            }
        };
        if key < last_end {
            problems.push(format!("block at offset {key} overlaps the previous one"));
        }
        last_end = key + covers;
        expect_next = Some(last_end);
    }
    let meta = Meta::load(&read.open_table(META)?)?;
    if readings != meta.raw_readings {
        problems.push(format!(
            "meta says {} raw readings, blocks hold {readings}",
            meta.raw_readings
        ));
    }
    if bytes != meta.raw_bytes {
        problems.push(format!(
            "meta says {} raw bytes, blocks hold {bytes}",
            meta.raw_bytes
        ));
    }
    if let Some(next) = expect_next {
        if next > meta.next_offset {
            problems.push(format!(
                "next offset {} is below the end of the last block {next}",
                meta.next_offset
            ));
        }
    }
    for row in read.open_table(DEVICES)?.iter()? {
        let (k, v) = row?;
        if postcard::from_bytes::<DeviceState>(v.value()).is_err() {
            problems.push(format!("device state of {} does not decode", k.value()));
        }
    }
    let (mut rollup_rows, mut rollup_bytes) = (summary_rows, summary_bytes);
    for row in read.open_table(ROLLUPS)?.iter()? {
        let (k, v) = row?;
        let (start, device, metric) = k.value();
        if postcard::from_bytes::<Summary>(v.value()).is_err() {
            problems.push(format!("rollup {device}/{metric}@{start} does not decode"));
        }
        rollup_rows += 1;
        rollup_bytes += row_bytes(device, metric, v.value());
    }
    if rollup_rows != meta.rollup_rows || rollup_bytes != meta.rollup_bytes {
        problems.push(format!(
            "meta says {} rollups in {} bytes, table holds {rollup_rows} in {rollup_bytes}",
            meta.rollup_rows, meta.rollup_bytes
        ));
    }
    for row in read.open_table(WINDOWS)?.iter()? {
        let (k, v) = row?;
        if WindowState::from_bytes(v.value()).is_none() {
            let (d, m, len, start) = k.value();
            problems.push(format!("window {d}/{m}/{len}s@{start} does not decode"));
        }
    }
    Ok(problems)
}

/// A tiny in-memory database used only while the real one is being reopened.
fn open_db_placeholder() -> Result<Database, BufferError> {
    Ok(Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?)
}

/// Pops the oldest blocks that end at or below `upto` while the buffer is above
/// `target` bytes. Returns the readings deleted.
fn pop_delivered(
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
fn forget_block(bytes: &[u8], meta: &mut Meta) -> Result<(), BufferError> {
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
fn pop_summaries(
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

fn row_bytes(device: &str, metric: &str, value: &[u8]) -> u64 {
    (device.len() + metric.len() + value.len()) as u64 + ROW_OVERHEAD
}

/// A window as last checkpointed, if it is in `table`.
fn stored_window(
    table: &impl ReadableTable<(&'static str, &'static str, u32, i64), &'static [u8]>,
    k: &WindowKey,
) -> Option<WindowState> {
    match table.get((&*k.device, &*k.metric, k.len_secs, k.start_ms)) {
        Ok(Some(v)) => {
            let state = WindowState::from_bytes(v.value());
            if state.is_none() {
                tracing::warn!(
                    "stored window {}/{}/{}s cannot be decoded (see `fogline-agent buffer \
                     check`), it restarts empty",
                    k.device,
                    k.metric,
                    k.len_secs
                );
            }
            state
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(
                "cannot read window {}/{}/{}s from storage, it restarts empty: {e}",
                k.device,
                k.metric,
                k.len_secs
            );
            None
        }
    }
}

/// [`stored_window`] through a read transaction begun on first use.
fn load_window(
    log: &Log,
    read: &mut Option<redb::ReadTransaction>,
    k: &WindowKey,
) -> Option<WindowState> {
    if read.is_none() {
        match log.begin_read() {
            Ok(r) => *read = Some(r),
            Err(e) => {
                tracing::warn!("cannot read stored windows: {e}");
                return None;
            }
        }
    }
    let table = read.as_ref()?.open_table(WINDOWS).ok()?;
    stored_window(&table, k)
}

fn for_each_record(
    db: &impl ReadableDatabase,
    from: u64,
    f: &mut dyn FnMut(u64, Record) -> Result<(), BufferError>,
) -> Result<(), BufferError> {
    let read = db.begin_read()?;
    let table = read.open_table(BLOCKS)?;
    // The block holding `from` may start below it.
    let start = match table.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    for row in table.range(start..)? {
        let (k, v) = row?;
        let first = k.value();
        if block::is_summaries(v.value()) {
            continue;
        }
        let records = block::decode(v.value()).map_err(|e| corrupt("block", e))?;
        for (i, r) in records.into_iter().enumerate() {
            let offset = first + i as u64;
            if offset >= from {
                f(offset, r)?;
            }
        }
    }
    Ok(())
}

/// The offsets `from..to` a summaries block covers.
pub type Span = (u64, u64);

/// Every summary of downsampled readings, oldest first, with the offsets its block covers
/// (`None` for the summaries older agents kept in the `rollups` table, which have none).
pub fn for_each_summary(
    db: &impl ReadableDatabase,
    f: &mut dyn FnMut(Option<Span>, SummaryRow) -> Result<(), BufferError>,
) -> Result<(), BufferError> {
    let read = db.begin_read()?;
    for row in read.open_table(ROLLUPS)?.iter()? {
        let (k, v) = row?;
        let (start, device, metric) = k.value();
        let summary: Summary = postcard::from_bytes(v.value()).map_err(|e| corrupt("rollup", e))?;
        f(
            None,
            SummaryRow {
                device: device.to_owned(),
                metric: metric.to_owned(),
                start_ms: start,
                len_secs: 0,
                summary,
            },
        )?;
    }
    for row in read.open_table(BLOCKS)?.iter()? {
        let (k, v) = row?;
        if !block::is_summaries(v.value()) {
            break;
        }
        let block::Entry::Summaries(s) =
            block::decode_entry(v.value()).map_err(|e| corrupt("block", e))?
        else {
            continue;
        };
        let span = (k.value(), k.value() + s.covers);
        for r in s.rows {
            f(Some(span), r)?;
        }
    }
    Ok(())
}

/// Read-only access to a stopped agent's data directory, for the `buffer` commands.
pub struct Inspect {
    db: Database,
    path: PathBuf,
}

impl Inspect {
    pub fn open(data_dir: &Path) -> Result<Inspect, BufferError> {
        let path = buffer_path(data_dir);
        if !path.exists() {
            return Err(corrupt(
                "data directory",
                format!("{} holds no buffer.redb", data_dir.display()),
            ));
        }
        let db = open_db(&path, 16 << 20)?;
        Ok(Inspect { db, path })
    }

    pub fn meta(&self) -> Result<Meta, BufferError> {
        let read = self.db.begin_read()?;
        Meta::load(&read.open_table(META)?)
    }

    pub fn devices(&self) -> Result<u64, BufferError> {
        use redb::ReadableTableMetadata;
        let read = self.db.begin_read()?;
        Ok(read.open_table(DEVICES)?.len()?)
    }

    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// The offset of the oldest raw reading (summary blocks come before it).
    pub fn first_offset(&self) -> Result<Option<u64>, BufferError> {
        Ok(self.first_offsets()?.1)
    }

    /// The offset the log starts at (its oldest block, summaries included), and the
    /// offset of its oldest raw reading.
    pub fn first_offsets(&self) -> Result<(Option<u64>, Option<u64>), BufferError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(BLOCKS)?;
        let mut log = None;
        for row in table.iter()? {
            let (k, v) = row?;
            log.get_or_insert(k.value());
            if !block::is_summaries(v.value()) {
                return Ok((log, Some(k.value())));
            }
        }
        Ok((log, None))
    }

    pub fn for_each_record(
        &self,
        mut f: impl FnMut(u64, Record) -> Result<(), BufferError>,
    ) -> Result<(), BufferError> {
        for_each_record(&self.db, 0, &mut f)
    }

    /// See [`for_each_summary`].
    pub fn for_each_summary(
        &self,
        mut f: impl FnMut(Option<Span>, SummaryRow) -> Result<(), BufferError>,
    ) -> Result<(), BufferError> {
        for_each_summary(&self.db, &mut f)
    }

    /// Runs [`Buffer::check`]'s consistency checks.
    pub fn check(&mut self) -> Result<Vec<String>, BufferError> {
        check_db(&mut self.db)
    }
}

#[cfg(test)]
mod tests;
