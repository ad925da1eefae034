//! A store of shipped origin logs: every (site, origin) log complete and in offset order,
//! the per-(site, origin) watermark that is acked back to the sender, and the newest
//! aggregate per topic (republished after a restart). The gateway keeps its store in one;
//! a site agent keeps its replicas of its peers' logs in another.
//!
//! A batch is accepted only if it joins its origin's log without a hole (see
//! [`Store::apply`]); re-sent batches are recognised by their offsets and stored once.

mod budget;
pub mod history;
mod join;

pub use budget::Trimmed;
pub use join::{join, join_span, tail, Join, LogStore, Span};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::buffer::block::{self, Entry, Record, SummaryRow};
use crate::buffer::StoredBlock;
use crate::shipping::proto::BatchFrame;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

const LOG: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("log");
const ORIGINS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("origins");
const AGGREGATES: TableDefinition<&str, &str> = TableDefinition::new("aggregates");

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot create directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error(
        "the store {0} is in use by another process (is a gateway or an agent running on it?)"
    )]
    Locked(PathBuf),
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("corrupt {0}")]
    Corrupt(String),
    /// An external database (the gateway's PostgreSQL store).
    #[error("database: {0}")]
    Database(String),
    #[error("{0} is not kept by this store")]
    Unsupported(&'static str),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Storage(e.into()) }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError,
    redb::DatabaseError
);

/// Per (site, origin): where its log stands at the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginState {
    /// Every reading below this offset is stored (or was given up at the edge).
    pub next: u64,
    pub stored: u64,
    /// Offsets the agent vouched were dropped at the edge before it could send them.
    pub skipped: u64,
    /// Offsets that arrived as summaries (downsampled at the edge, a full buffer).
    pub downsampled: u64,
}

/// [`OriginState`] as stores written before summaries kept it.
#[derive(serde::Deserialize)]
struct OriginStateV1 {
    next: u64,
    stored: u64,
    skipped: u64,
}

impl OriginState {
    fn decode(bytes: &[u8]) -> Result<OriginState, postcard::Error> {
        match postcard::from_bytes::<OriginState>(bytes) {
            Ok(s) => Ok(s),
            Err(e) => match postcard::from_bytes::<OriginStateV1>(bytes) {
                Ok(old) => Ok(OriginState {
                    next: old.next,
                    stored: old.stored,
                    skipped: old.skipped,
                    downsampled: 0,
                }),
                Err(_) => Err(e),
            },
        }
    }
}

/// What [`Store::apply`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored this many new readings.
    Stored(u64),
    /// Everything in it was already stored.
    Duplicate,
    /// It starts past the watermark: an earlier batch is missing. Not stored.
    Gap,
    /// The block inside does not decode. Not stored.
    Malformed,
    /// It claims offsets no honest log reaches ([`MAX_OFFSET`]): a forgery. Not stored.
    Implausible,
}

/// No honest origin log gets this far: 2^48 offsets is 100,000 readings a second for 89
/// years. A batch reaching past it is refused, so a forged batch claiming a huge
/// `first_offset` cannot move an origin's watermark beyond every real batch (which
/// would then all be taken for duplicates, and acked).
pub const MAX_OFFSET: u64 = 1 << 48;

impl Applied {
    pub fn label(self) -> &'static str {
        match self {
            Applied::Stored(_) => "stored",
            Applied::Duplicate => "duplicate",
            Applied::Gap => "gap",
            Applied::Malformed => "malformed",
            Applied::Implausible => "implausible",
        }
    }
}

/// (site, origin).
pub type Key = (String, String);

/// A batch of work for one commit.
#[derive(Default)]
pub struct Txn {
    blocks: Vec<(Key, u64, Vec<u8>)>,
    origins: HashMap<Key, OriginState>,
    aggregates: Vec<(String, String)>,
}

impl Txn {
    /// The newest aggregate of `topic` put in this transaction.
    pub fn aggregate(&self, topic: &str) -> Option<&str> {
        self.aggregates
            .iter()
            .rev()
            .find(|(t, _)| t == topic)
            .map(|(_, j)| j.as_str())
    }
}

pub struct Store {
    db: Arc<Database>,
    origins: HashMap<Key, OriginState>,
    /// Stored bytes per origin, once [`Store::track_sizes`] was called.
    sizes: Option<HashMap<Key, u64>>,
    /// Index readings and aggregates by series and time ([`history`]), once
    /// [`Store::keep_history`] was called.
    history: bool,
}

/// Reads a store while its writer goes on (redb readers see the last commit).
#[derive(Clone)]
pub struct StoreReader {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::DataDir(dir.to_path_buf(), e))?;
        }
        let path = path.to_path_buf();
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(path.clone()),
                other => other.into(),
            })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(LOG)?;
            txn.open_table(ORIGINS)?;
            txn.open_table(AGGREGATES)?;
        }
        txn.commit()?;
        crate::fsync::sync_dir_of(&path).map_err(|e| StoreError::DataDir(path.clone(), e))?;
        let mut origins = HashMap::new();
        let read = db.begin_read()?;
        for row in read.open_table(ORIGINS)?.iter()? {
            let (k, v) = row?;
            let (site, origin) = k.value();
            let state = OriginState::decode(v.value())
                .map_err(|e| StoreError::Corrupt(format!("origin {site}/{origin}: {e}")))?;
            origins.insert((site.to_owned(), origin.to_owned()), state);
        }
        Ok(Store {
            db: Arc::new(db),
            origins,
            sizes: None,
            history: false,
        })
    }

    /// A store in memory (for tests and the fuzzer): nothing survives it.
    pub fn in_memory() -> Result<Store, StoreError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        let txn = db.begin_write()?;
        {
            txn.open_table(LOG)?;
            txn.open_table(ORIGINS)?;
            txn.open_table(AGGREGATES)?;
        }
        txn.commit()?;
        Ok(Store {
            db: Arc::new(db),
            origins: HashMap::new(),
            sizes: None,
            history: false,
        })
    }

    /// From now on every commit also indexes its readings and aggregates by series and
    /// time (the gateway's history API). A store whose index is empty (new, or written
    /// before the index existed) has its whole log indexed first, in one transaction.
    pub fn keep_history(&mut self) -> Result<u64, StoreError> {
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        history::create(&w)?;
        let mut indexed = 0;
        if history::is_empty(&w)? {
            let read = self.db.begin_read()?;
            let log = read.open_table(LOG)?;
            for row in log.iter()? {
                let (k, v) = row?;
                let (site, origin, first) = k.value();
                history::index_block(&w, site, origin, first, v.value())?;
                indexed += block::count(v.value()).unwrap_or(0);
            }
            for row in read.open_table(AGGREGATES)?.iter()? {
                let (k, v) = row?;
                history::index_aggregate(&w, k.value(), v.value())?;
            }
        }
        w.commit()?;
        self.history = true;
        Ok(indexed)
    }

    pub fn reader(&self) -> StoreReader {
        StoreReader {
            db: self.db.clone(),
        }
    }

    pub fn origins(&self) -> &HashMap<Key, OriginState> {
        &self.origins
    }

    /// The watermark of an origin (0 if never seen), counting pending work in `txn`.
    pub fn next(&self, txn: &Txn, site: &str, origin: &str) -> u64 {
        let key = (site.to_owned(), origin.to_owned());
        txn.origins
            .get(&key)
            .or_else(|| self.origins.get(&key))
            .map_or(0, |s| s.next)
    }

    /// Adds a batch to `txn` if it joins the origin's log without a hole ([`join`]). The
    /// block is counted from its header only; it is decoded just when it overlaps what is
    /// stored (then only its new tail is kept).
    pub fn apply(
        &self,
        txn: &mut Txn,
        site: &str,
        origin: &str,
        frame: &BatchFrame<'_>,
    ) -> Applied {
        let key = (site.to_owned(), origin.to_owned());
        let mut state = txn
            .origins
            .get(&key)
            .or_else(|| self.origins.get(&key))
            .copied()
            .unwrap_or_default();
        let (first, skip, end) = match join(&mut state, frame) {
            Join::Stored { first, skip, end } => (first, skip, end),
            Join::Refused(why) => return why,
        };
        let bytes = if skip == 0 {
            frame.block.to_vec()
        } else {
            // Partly stored already: keep only the new tail.
            match tail(frame.block, skip, end - first) {
                Some(Entry::Readings(records)) => block::encode(&records),
                Some(Entry::Summaries(s)) => block::encode_summaries(&s),
                None => return Applied::Malformed,
            }
        };
        txn.blocks.push((key.clone(), first, bytes));
        txn.origins.insert(key, state);
        Applied::Stored(end - first)
    }

    pub fn put_aggregate(txn: &mut Txn, topic: String, json: String) {
        txn.aggregates.push((topic, json));
    }

    /// The stored aggregate of `topic`, if any.
    pub fn aggregate(&self, topic: &str) -> Result<Option<String>, StoreError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(AGGREGATES)?;
        Ok(table.get(topic)?.map(|v| v.value().to_owned()))
    }

    /// Writes `txn` with one fsync.
    pub fn commit(&mut self, txn: Txn) -> Result<(), StoreError> {
        if txn.blocks.is_empty() && txn.origins.is_empty() && txn.aggregates.is_empty() {
            return Ok(());
        }
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        {
            let mut log = w.open_table(LOG)?;
            for ((site, origin), first, bytes) in &txn.blocks {
                log.insert((site.as_str(), origin.as_str(), *first), bytes.as_slice())?;
            }
            let mut origins = w.open_table(ORIGINS)?;
            for ((site, origin), state) in &txn.origins {
                let bytes =
                    postcard::to_allocvec(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                origins.insert((site.as_str(), origin.as_str()), bytes.as_slice())?;
            }
            let mut aggs = w.open_table(AGGREGATES)?;
            for (topic, json) in &txn.aggregates {
                aggs.insert(topic.as_str(), json.as_str())?;
            }
        }
        if self.history {
            for ((site, origin), first, bytes) in &txn.blocks {
                history::index_block(&w, site, origin, *first, bytes)?;
            }
            for (topic, json) in &txn.aggregates {
                history::index_aggregate(&w, topic, json)?;
            }
        }
        w.commit()?;
        if let Some(sizes) = self.sizes.as_mut() {
            for (key, _, bytes) in &txn.blocks {
                *sizes.entry(key.clone()).or_default() += bytes.len() as u64;
            }
        }
        self.origins.extend(txn.origins);
        Ok(())
    }

    /// See [`StoreReader::blocks_from`].
    pub fn blocks_from(
        &self,
        site: &str,
        origin: &str,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> Result<Vec<StoredBlock>, StoreError> {
        self.reader()
            .blocks_from(site, origin, from, max_readings, head)
    }

    /// Deletes an origin's blocks that lie wholly below `upto`; returns the readings
    /// deleted. The watermark stays: a re-sent batch below it is still a duplicate.
    pub fn delete_below(&mut self, site: &str, origin: &str, upto: u64) -> Result<u64, StoreError> {
        Ok(self.delete_oldest(site, origin, |_, end, _| end <= upto)?.0)
    }

    /// Every stored aggregate (to republish them retained at start-up).
    pub fn aggregates(&self) -> Result<Vec<(String, String)>, StoreError> {
        let read = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in read.open_table(AGGREGATES)?.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    /// Every stored reading, per (site, origin) in offset order.
    pub fn for_each_record(
        &self,
        mut f: impl FnMut(&str, &str, u64, Record),
    ) -> Result<(), StoreError> {
        self.for_each_entry(|site, origin, first, entry| {
            if let Entry::Readings(records) = entry {
                for (i, r) in records.into_iter().enumerate() {
                    f(site, origin, first + i as u64, r);
                }
            }
        })
    }

    /// Every stored summary of downsampled readings, per (site, origin) in offset order,
    /// with the offsets its block covers.
    pub fn for_each_summary(
        &self,
        mut f: impl FnMut(&str, &str, (u64, u64), SummaryRow),
    ) -> Result<(), StoreError> {
        self.for_each_entry(|site, origin, first, entry| {
            if let Entry::Summaries(s) = entry {
                let span = (first, first + s.covers);
                for row in s.rows {
                    f(site, origin, span, row);
                }
            }
        })
    }

    fn for_each_entry(&self, mut f: impl FnMut(&str, &str, u64, Entry)) -> Result<(), StoreError> {
        let read = self.db.begin_read()?;
        for row in read.open_table(LOG)?.iter()? {
            let (k, v) = row?;
            let (site, origin, first) = k.value();
            let entry = block::decode_entry(v.value())
                .map_err(|e| StoreError::Corrupt(format!("block {site}/{origin}@{first}: {e}")))?;
            f(site, origin, first, entry);
        }
        Ok(())
    }
}

impl StoreReader {
    /// A page of one series' readings, oldest first (see [`history`]); needs
    /// [`Store::keep_history`].
    pub fn history_readings(
        &self,
        range: &history::Range<'_>,
        after: Option<&history::Cursor>,
        limit: usize,
    ) -> Result<(Vec<history::HistoryReading>, Option<history::Cursor>), StoreError> {
        history::readings(&self.db.begin_read()?, range, after, limit)
    }

    /// A page of one series' aggregates at one window length, by window start.
    pub fn history_aggregates(
        &self,
        range: &history::Range<'_>,
        window_secs: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<i64>), StoreError> {
        history::aggregates(&self.db.begin_read()?, range, window_secs, after, limit)
    }

    /// Every aggregate in the history index, as (topic, JSON), oldest window first per
    /// series.
    pub fn for_each_history_aggregate(
        &self,
        f: impl FnMut(String, &str),
    ) -> Result<(), StoreError> {
        history::all_aggregates(&self.db.begin_read()?, f)
    }

    /// Every series with history: (site, device, metric, readings).
    pub fn history_series(
        &self,
        site: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        history::series(&self.db.begin_read()?, site, device)
    }

    /// Blocks of one origin holding offsets from `from` on, oldest first, until about
    /// `max_readings` readings or `head`.
    pub fn blocks_from(
        &self,
        site: &str,
        origin: &str,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> Result<Vec<StoredBlock>, StoreError> {
        let read = self.db.begin_read()?;
        let log = read.open_table(LOG)?;
        // The block holding `from` may start below it.
        let start = match log
            .range((site, origin, 0)..=(site, origin, from))?
            .next_back()
        {
            Some(row) => row?.0.value().2,
            None => from,
        };
        let rows = log
            .range((site, origin, start)..(site, origin, head))?
            .map(|row| {
                let (k, v) = row?;
                Ok((k.value().2, v.value().to_vec()))
            });
        crate::buffer::read_blocks(rows, from, max_readings, head).map_err(|e| {
            e.either(
                |e| StoreError::Corrupt(format!("block {site}/{origin}: {e}")),
                |e: redb::StorageError| e.into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_of(n: usize, seq0: u32) -> Vec<u8> {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                device: "d".into(),
                metric: "t".into(),
                boot: 1,
                seq: Some(seq0 + i as u32),
                ts_ms: 1_700_000_000_000 + i as i64,
                value: i as f64,
            })
            .collect();
        block::encode(&records)
    }

    fn apply(store: &mut Store, start: u64, first: u64, block: &[u8]) -> Applied {
        let mut txn = Txn::default();
        let frame = BatchFrame {
            start,
            first_offset: first,
            block,
        };
        let applied = store.apply(&mut txn, "s", "a", &frame);
        store.commit(txn).expect("commit");
        applied
    }

    #[test]
    fn batches_are_stored_once_in_order_without_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let mut s = Store::open(&path, 1 << 20).expect("open");
        let b0 = block_of(10, 1);
        let b1 = block_of(5, 11);
        assert_eq!(apply(&mut s, 0, 0, &b0), Applied::Stored(10));
        assert_eq!(apply(&mut s, 0, 0, &b0), Applied::Duplicate, "re-sent");
        assert_eq!(
            apply(&mut s, 20, 20, &b1),
            Applied::Gap,
            "offsets 10..20 missing"
        );
        assert_eq!(apply(&mut s, 10, 10, &b1), Applied::Stored(5));
        // A batch overlapping the watermark stores only its new tail.
        let b2 = block_of(10, 11);
        assert_eq!(apply(&mut s, 10, 10, &b2), Applied::Stored(5));
        // The agent dropped 20..25 before sending: it says so with `start`.
        assert_eq!(apply(&mut s, 20, 25, &block_of(3, 100)), Applied::Stored(3));
        assert_eq!(apply(&mut s, 0, 0, b"\x09garbage"), Applied::Malformed);
        // A forgery: the watermark may not jump past every offset an honest log reaches.
        assert_eq!(
            apply(&mut s, 28, MAX_OFFSET - 2, &block_of(3, 200)),
            Applied::Implausible
        );
        assert_eq!(
            apply(&mut s, 28, u64::MAX - 1, &block_of(3, 200)),
            Applied::Implausible
        );
        drop(s);
        let mut s = Store::open(&path, 1 << 20).expect("reopen");
        let state = s.origins()[&("s".to_owned(), "a".to_owned())];
        assert_eq!(
            state,
            OriginState {
                next: 28,
                stored: 23,
                skipped: 5,
                downsampled: 0,
            }
        );
        let mut offsets = Vec::new();
        s.for_each_record(|_, _, offset, _| offsets.push(offset))
            .expect("read");
        let expected: Vec<u64> = (0..20).chain(25..28).collect();
        assert_eq!(offsets, expected);

        // Reading back in blocks, and deleting what lies wholly below a watermark.
        let blocks = s.blocks_from("s", "a", 12, 100, 28).expect("blocks");
        let spans: Vec<(u64, u64)> = blocks
            .iter()
            .map(|b| (b.first_offset, b.end_offset))
            .collect();
        assert_eq!(spans, vec![(10, 15), (15, 20), (25, 28)]);
        assert_eq!(s.blocks_from("s", "a", 0, 1, 28).expect("blocks").len(), 1);
        assert_eq!(
            s.delete_below("s", "a", 17).expect("delete"),
            15,
            "0..10 and 10..15"
        );
        let left: Vec<u64> = s
            .blocks_from("s", "a", 0, 100, 28)
            .expect("blocks")
            .iter()
            .map(|b| b.first_offset)
            .collect();
        assert_eq!(left, vec![15, 25]);
        assert_eq!(s.origins()[&("s".to_owned(), "a".to_owned())].next, 28);

        // Within its budget nothing changes.
        s.track_sizes().expect("sizes");
        let left_bytes: u64 = s
            .blocks_from("s", "a", 0, 100, 28)
            .expect("blocks")
            .iter()
            .map(|b| b.bytes.len() as u64)
            .sum();
        assert_eq!(
            s.trim(left_bytes, 60).expect("trim"),
            vec![],
            "within budget"
        );
    }

    /// Regression: the replica's reader returned the block below a hole (ending before
    /// `from`), and the uplink's `end - from` underflowed.
    #[test]
    fn a_log_with_a_hole_reads_from_the_block_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("store.redb"), 1 << 20).expect("open");
        assert_eq!(apply(&mut s, 0, 0, &block_of(10, 1)), Applied::Stored(10));
        // 10..20 were dropped at the origin: it says so with `start`.
        assert_eq!(apply(&mut s, 10, 20, &block_of(5, 21)), Applied::Stored(5));
        let blocks = s.blocks_from("s", "a", 10, 100, 25).expect("blocks");
        let spans: Vec<(u64, u64)> = blocks
            .iter()
            .map(|b| (b.first_offset, b.end_offset))
            .collect();
        assert_eq!(spans, vec![(20, 25)]);
        assert!(blocks.iter().all(|b| b.end_offset > 10));
    }

    /// The history index: pages of one series by time, each reading once; a store
    /// written without the index gets it when history is turned on.
    #[test]
    fn history_pages_a_series_by_time_and_is_built_for_an_old_store() {
        use history::{Cursor, Range};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let mut s = Store::open(&path, 1 << 20).expect("open");
        // Written before history was on: 10 readings, ts 1_700_000_000_000 + i.
        assert_eq!(apply(&mut s, 0, 0, &block_of(10, 1)), Applied::Stored(10));
        assert_eq!(
            s.keep_history().expect("history"),
            10,
            "the old log is indexed"
        );
        // From now on every commit indexes what it stores, in the same transaction.
        assert_eq!(apply(&mut s, 10, 10, &block_of(5, 11)), Applied::Stored(5));
        let mut txn = Txn::default();
        Store::put_aggregate(
            &mut txn,
            "agg/s/d/t/60s".into(),
            r#"{"start_ms":1699999980000,"count":15}"#.into(),
        );
        s.commit(txn).expect("commit");
        let r = s.reader();
        let all = Range {
            site: "s",
            device: "d",
            metric: "t",
            from: i64::MIN,
            to: i64::MAX,
        };
        // block_of(5, 11) repeats ts +0..+4: two readings at each of those times.
        let mut seen = Vec::new();
        let mut after: Option<Cursor> = None;
        loop {
            let (page, next) = r.history_readings(&all, after.as_ref(), 4).expect("page");
            assert!(page.len() <= 4);
            seen.extend(page.iter().map(|p| (p.ts_ms, p.offset)));
            match next {
                Some(c) => after = Some(Cursor::decode(&c.encode()).expect("cursor")),
                None => break,
            }
        }
        let mut want: Vec<(i64, u64)> = (0..10)
            .map(|i| (1_700_000_000_000 + i, i as u64))
            .chain((0..5).map(|i| (1_700_000_000_000 + i, 10 + i as u64)))
            .collect();
        want.sort();
        assert_eq!(seen, want, "every reading once, by time");
        let range = Range {
            from: 1_700_000_000_002,
            to: 1_700_000_000_004,
            ..all.clone()
        };
        let (page, next) = r.history_readings(&range, None, 100).expect("range");
        assert_eq!(page.len(), 4, "ts +2 and +3, twice each");
        assert!(next.is_none());
        let (aggs, _) = r.history_aggregates(&all, 60, None, 10).expect("aggs");
        assert_eq!(aggs.len(), 1);
        assert!(r
            .history_aggregates(&all, 10, None, 10)
            .expect("aggs")
            .0
            .is_empty());
        assert_eq!(
            r.history_series(Some("s"), None).expect("series"),
            vec![("s".into(), "d".into(), "t".into(), 15)]
        );
        // Re-opened: the index is there, not built again.
        drop(r);
        drop(s);
        let mut s = Store::open(&path, 1 << 20).expect("reopen");
        assert_eq!(s.keep_history().expect("history"), 0);
        let (page, _) = s.reader().history_readings(&all, None, 100).expect("page");
        assert_eq!(page.len(), 15);
    }

    /// Regression: offset arithmetic on a batch from the network was unchecked.
    #[test]
    fn absurd_offsets_are_refused_not_overflowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("store.redb"), 1 << 20).expect("open");
        let b = block_of(10, 1);
        assert_eq!(apply(&mut s, 0, u64::MAX - 3, &b), Applied::Implausible);
        assert_eq!(apply(&mut s, 0, 0, &b), Applied::Stored(10));
    }

    /// An origin over its budget has its oldest readings summarised (no offset lost),
    /// then, when summaries alone are too many, its oldest blocks dropped.
    #[test]
    fn an_origin_over_its_budget_is_downsampled_then_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(&dir.path().join("store.redb"), 1 << 20).expect("open");
        s.track_sizes().expect("sizes");
        let mut next = 0u64;
        for i in 0..40u32 {
            assert_eq!(
                apply(&mut s, next, next, &block_of(50, 1 + i * 50)),
                Applied::Stored(50)
            );
            next += 50;
        }
        let size = |s: &Store| -> u64 {
            s.blocks_from("s", "a", 0, u64::MAX, next)
                .expect("blocks")
                .iter()
                .map(|b| b.bytes.len() as u64)
                .sum()
        };
        let before = size(&s);
        let budget = before * 3 / 4;
        let trimmed = s.trim(budget, 60).expect("trim");
        assert_eq!(trimmed.len(), 1, "{trimmed:?}");
        assert!(trimmed[0].downsampled > 0, "{trimmed:?}");
        assert_eq!(trimmed[0].dropped, 0, "{trimmed:?}");
        assert!(size(&s) <= budget, "{} > {budget}", size(&s));
        // The log still covers every offset: summaries first, then readings.
        let blocks = s.blocks_from("s", "a", 0, u64::MAX, next).expect("blocks");
        assert_eq!(blocks.first().map(|b| b.first_offset), Some(0));
        for w in blocks.windows(2) {
            assert_eq!(w[0].end_offset, w[1].first_offset, "a hole");
        }
        assert!(block::is_summaries(&blocks[0].bytes));
        let mut summarised = 0;
        s.for_each_summary(|_, _, _, row| summarised += row.summary.count)
            .expect("summaries");
        assert_eq!(summarised, trimmed[0].downsampled);
        // A budget the summaries alone do not fit into: the oldest blocks go.
        let summary_block = blocks[0].bytes.len() as u64;
        let trimmed = s.trim(summary_block / 2, 60).expect("trim");
        assert!(trimmed[0].dropped > 0, "{trimmed:?}");
        let first = s
            .blocks_from("s", "a", 0, u64::MAX, next)
            .expect("blocks")
            .first()
            .map(|b| b.first_offset);
        assert_eq!(
            first.unwrap_or(next),
            trimmed[0].dropped,
            "the oldest went, from offset 0 on"
        );
    }
}
