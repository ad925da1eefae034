//! The gateway's store in PostgreSQL (`store.url = "postgres://…"`): the system of record
//! for fleets that outgrow one machine. Any number of gateways share one database and
//! serve any site; every (site, origin) log in it stays complete, in offset order, each
//! offset once.
//!
//! Exactly once without a time window: a commit locks the watermark row of every origin
//! it touches (`SELECT … FOR UPDATE`, in key order, so two gateways never deadlock),
//! checks each batch against the locked watermark with the embedded store's rule
//! ([`store::join`]), copies the new readings in (binary `COPY`), advances the
//! watermark, stores the aggregates and commits; only then does the receiver publish the
//! ack. Two gateways that receive the same origin during a failover take turns on its
//! row, and whichever comes second finds the first one's readings already below the
//! watermark.
//!
//! Aggregates that reach one gateway reach every gateway's MQTT listener: the commit
//! that stores them sends `NOTIFY fogline_aggregates` with each topic, delivered to the
//! others' [`spawn_relay`] only if and when it commits; they read the newest JSON from
//! `aggregates_latest` and republish it retained. No second channel to run or secure,
//! and a gateway that missed notifications (its connection dropped) republishes all.

mod migrate;
mod read;
mod relay;
pub mod schema;
mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fogline_agent::buffer::block::Entry;
use fogline_agent::shipping::proto::BatchFrame;
use fogline_agent::shipping::store::{
    self, Applied, Join, Key, LogStore, OriginState, Span, StoreError,
};
use postgres::{Client, NoTls};

pub use migrate::{migrate, Report};
pub use read::{export, stats, PgHistory};
pub use relay::{spawn_relay, Relay};
use schema::Partitions;
use write::{copy_readings, count_series, insert_summaries, store_aggregates, Aggregates};

/// The channel the gateways' commits notify aggregate topics on.
const CHANNEL: &str = "fogline_aggregates";

pub(crate) fn db(e: postgres::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// Connects to `url` (a `postgres://USER@HOST:PORT/DB` URL or a key=value string).
pub fn connect(url: &str) -> Result<Client, StoreError> {
    let mut client = Client::connect(url, NoTls)
        .map_err(|e| StoreError::Database(format!("{}: {e}", redact(url))))?;
    // "relation already exists, skipping" and the like are not news.
    client
        .batch_execute("SET client_min_messages = warning")
        .map_err(db)?;
    Ok(client)
}

/// `url` without a password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Is `s` a PostgreSQL URL (rather than a directory)?
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Unix ms as a time PostgreSQL can hold (years 1 to 9999; a reading's clock could say
/// anything, and one absurd time must not make a commit fail forever).
pub(crate) fn to_time(ms: i64) -> SystemTime {
    const MIN: i64 = -62_135_596_800_000; // 0001-01-01
    const MAX: i64 = 253_402_300_799_999; // 9999-12-31
    let ms = ms.clamp(MIN, MAX);
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

pub(crate) fn from_time(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A batch as received, decoded once, checked again under lock at commit.
struct Frame {
    key: Key,
    span: Span,
    entry: Entry,
}

/// Work gathered for one commit.
#[derive(Default)]
pub struct PgTxn {
    frames: Vec<Frame>,
    /// The origins as the batches would leave them, if the watermarks are as cached.
    pending: HashMap<Key, OriginState>,
    aggregates: Vec<(String, String)>,
}

/// The store in PostgreSQL, for one gateway's writer thread.
pub struct PgStore {
    url: String,
    client: Client,
    /// Every origin as of this gateway's last look: at start, its own commits, and acks.
    origins: HashMap<Key, OriginState>,
    /// Origins whose watermark this gateway's last commit locked: exact as cached.
    fresh: HashSet<Key>,
    partitions: Partitions,
    retention_days: u32,
    retention_checked: Option<Instant>,
    /// The writer's backend pid: the relay skips its own notifications.
    own_pid: Arc<AtomicI32>,
    /// A second connection for the reads the receiver makes through `&self`.
    reader: std::sync::Mutex<Option<Client>>,
}

/// A reading or summary row on its way into a table.
struct Rows {
    readings: Vec<(usize, u64, fogline_agent::buffer::block::Record)>,
    summaries: Vec<(usize, u64, u64, fogline_agent::buffer::block::Summaries)>,
}

impl PgStore {
    /// Connects, creates the tables if they are missing and loads every origin.
    pub fn open(url: &str, retention_days: u32) -> Result<PgStore, StoreError> {
        let mut client = connect(url)?;
        schema::create(&mut client)?;
        let own_pid = Arc::new(AtomicI32::new(backend_pid(&mut client)?));
        let mut store = PgStore {
            url: url.to_owned(),
            client,
            origins: HashMap::new(),
            fresh: HashSet::new(),
            partitions: Partitions::default(),
            retention_days,
            retention_checked: None,
            own_pid,
            reader: std::sync::Mutex::new(None),
        };
        store.origins = store.load_origins()?;
        // Just read: exact until another gateway moves them.
        store.fresh = store.origins.keys().cloned().collect();
        let today = schema::day_of(fogline_agent::now_ms());
        for table in schema::PARTITIONED {
            store
                .partitions
                .ensure(&mut store.client, table, [today, today + 1])?;
        }
        store.keep_retention()?;
        Ok(store)
    }

    /// Runs `f` on the reading connection (made when first needed, again after a loss).
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| StoreError::Database("the reader lock is poisoned".into()))?;
        if reader.as_ref().is_none_or(Client::is_closed) {
            *reader = Some(connect(&self.url)?);
        }
        match reader.as_mut() {
            Some(client) => f(client),
            None => Err(StoreError::Database("no reading connection".into())),
        }
    }

    /// The writer connection's backend pid, shared with [`spawn_relay`].
    pub fn own_pid(&self) -> Arc<AtomicI32> {
        self.own_pid.clone()
    }

    fn load_origins(&mut self) -> Result<HashMap<Key, OriginState>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT site, origin, next_offset, stored, skipped, downsampled FROM fogline.origins",
                &[],
            )
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), origin_state(r, 2)))
            .collect())
    }

    /// After a lost connection (the database restarted): a new one, before the next
    /// commit. Nothing is lost meanwhile: a failed commit is not acked.
    fn reconnect_if_closed(&mut self) -> Result<(), StoreError> {
        if !self.client.is_closed() {
            return Ok(());
        }
        tracing::warn!(store = %redact(&self.url), "the database connection was lost: reconnecting");
        self.client = connect(&self.url)?;
        self.own_pid
            .store(backend_pid(&mut self.client)?, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the partitions older than `store.retention_days`, at start and hourly.
    fn keep_retention(&mut self) -> Result<(), StoreError> {
        if self.retention_days == 0
            || self
                .retention_checked
                .is_some_and(|at| at.elapsed() < Duration::from_secs(3600))
        {
            return Ok(());
        }
        self.retention_checked = Some(Instant::now());
        let today = schema::day_of(fogline_agent::now_ms());
        let dropped = self
            .partitions
            .drop_before(&mut self.client, today - i64::from(self.retention_days))?;
        if !dropped.is_empty() {
            tracing::info!(partitions = ?dropped, retention_days = self.retention_days, "dropped partitions past their retention");
        }
        Ok(())
    }

    fn commit_txn(&mut self, txn: PgTxn) -> Result<(), StoreError> {
        self.reconnect_if_closed()?;
        // Partitions for every day the batches and aggregates touch, first.
        let mut days: BTreeMap<&'static str, HashSet<i64>> = BTreeMap::new();
        for f in &txn.frames {
            match &f.entry {
                Entry::Readings(records) => days
                    .entry("readings")
                    .or_default()
                    .extend(records.iter().map(|r| schema::day_of(r.ts_ms))),
                Entry::Summaries(s) => days
                    .entry("summaries")
                    .or_default()
                    .extend(s.rows.iter().map(|r| schema::day_of(r.start_ms))),
            }
        }
        let aggregates = Aggregates::of(&txn.aggregates);
        days.entry("aggregates")
            .or_default()
            .extend(aggregates.history.keys().map(|k| schema::day_of(k.4)));
        for (table, days) in days {
            self.partitions.ensure(&mut self.client, table, days)?;
        }
        let (keys, mut frames): (Vec<Key>, Vec<Option<(Span, Entry)>>) = txn
            .frames
            .into_iter()
            .map(|f| (f.key, Some((f.span, f.entry))))
            .unzip();

        // Frames per origin, in arrival order; origins in key order (the lock order).
        let mut by_origin: BTreeMap<&Key, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            by_origin.entry(key).or_default().push(i);
        }
        let mut tx = self.client.transaction().map_err(db)?;
        let lock = tx
            .prepare(
                "SELECT next_offset, stored, skipped, downsampled FROM fogline.origins \
                 WHERE site = $1 AND origin = $2 FOR UPDATE",
            )
            .map_err(db)?;
        let create = tx
            .prepare(
                "INSERT INTO fogline.origins (site, origin) VALUES ($1, $2) \
                 ON CONFLICT (site, origin) DO NOTHING",
            )
            .map_err(db)?;
        let update = tx
            .prepare(
                "UPDATE fogline.origins SET next_offset = $3, stored = $4, skipped = $5, \
                 downsampled = $6, updated_at = now() WHERE site = $1 AND origin = $2",
            )
            .map_err(db)?;
        let mut rows = Rows {
            readings: Vec::new(),
            summaries: Vec::new(),
        };
        let mut states = HashMap::new();
        for (key, indexes) in &by_origin {
            let (site, origin) = (key.0.as_str(), key.1.as_str());
            tx.execute(&create, &[&site, &origin]).map_err(db)?;
            let row = tx.query_one(&lock, &[&site, &origin]).map_err(db)?;
            let mut state = origin_state(&row, 0);
            let before = state;
            for &i in indexes {
                let Some((span, entry)) = frames[i].take() else {
                    continue;
                };
                let Join::Stored { first, skip, end } = store::join_span(&mut state, &span) else {
                    continue;
                };
                match entry {
                    Entry::Readings(records) => {
                        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
                        for (n, r) in records.into_iter().enumerate().skip(skip) {
                            rows.readings.push((i, span.first_offset + n as u64, r));
                        }
                    }
                    Entry::Summaries(mut s) => {
                        s.covers = end - first;
                        rows.summaries.push((i, first, s.covers, s));
                    }
                }
            }
            if state != before {
                tx.execute(
                    &update,
                    &[
                        &site,
                        &origin,
                        &as_i64(state.next),
                        &as_i64(state.stored),
                        &as_i64(state.skipped),
                        &as_i64(state.downsampled),
                    ],
                )
                .map_err(db)?;
            }
            states.insert((*key).clone(), state);
        }
        copy_readings(&mut tx, &keys, &rows)?;
        insert_summaries(&mut tx, &keys, &rows)?;
        count_series(&mut tx, &keys, &rows)?;
        store_aggregates(&mut tx, &aggregates)?;
        tx.commit().map_err(db)?;

        self.fresh = states.keys().cloned().collect();
        self.origins.extend(states);
        if let Err(e) = self.keep_retention() {
            tracing::warn!("cannot drop the partitions past their retention: {e}");
        }
        Ok(())
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn origin_state(row: &postgres::Row, at: usize) -> OriginState {
    let get = |i: usize| u64::try_from(row.get::<_, i64>(at + i)).unwrap_or(0);
    OriginState {
        next: get(0),
        stored: get(1),
        skipped: get(2),
        downsampled: get(3),
    }
}

fn backend_pid(client: &mut Client) -> Result<i32, StoreError> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .map_err(db)?
        .get(0))
}

impl LogStore for PgStore {
    type Txn = PgTxn;

    fn origins(&self) -> &HashMap<Key, OriginState> {
        &self.origins
    }

    /// Keeps the batch, decoded, for the commit, which checks it against the locked
    /// watermark; the answer here is as the cached watermark has it (the counters'). A
    /// batch that cannot decode or claims impossible offsets is refused outright, and so
    /// is one below the cached watermark (watermarks only grow: it is below the real one
    /// too).
    fn apply(&self, txn: &mut PgTxn, site: &str, origin: &str, frame: &BatchFrame<'_>) -> Applied {
        let span = match Span::of(frame) {
            Ok(span) => span,
            Err(why) => return why,
        };
        let key = (site.to_owned(), origin.to_owned());
        let mut state = txn
            .pending
            .get(&key)
            .or_else(|| self.origins.get(&key))
            .copied()
            .unwrap_or_default();
        let applied = match store::join_span(&mut state, &span) {
            Join::Stored { first, end, .. } => Applied::Stored(end - first),
            Join::Refused(
                why @ (Applied::Malformed | Applied::Implausible | Applied::Duplicate),
            ) => return why,
            // Perhaps not a gap at all: another gateway may have stored what is missing.
            Join::Refused(why) => why,
        };
        let Ok(entry) = fogline_agent::buffer::block::decode_entry(frame.block) else {
            return Applied::Malformed;
        };
        if matches!(applied, Applied::Stored(_)) {
            txn.pending.insert(key.clone(), state);
        }
        txn.frames.push(Frame { key, span, entry });
        applied
    }

    fn put_aggregate(txn: &mut PgTxn, topic: String, json: String) {
        txn.aggregates.push((topic, json));
    }

    fn pending_aggregate<'t>(txn: &'t PgTxn, topic: &str) -> Option<&'t str> {
        txn.aggregates
            .iter()
            .rev()
            .find(|(t, _)| t == topic)
            .map(|(_, j)| j.as_str())
    }

    fn aggregate(&self, topic: &str) -> Result<Option<String>, StoreError> {
        self.read(|client| {
            Ok(client
                .query_opt(
                    "SELECT body FROM fogline.aggregates_latest WHERE topic = $1",
                    &[&topic],
                )
                .map_err(db)?
                .map(|r| r.get(0)))
        })
    }

    fn aggregates(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(all_aggregates)
    }

    fn commit(&mut self, txn: PgTxn) -> Result<(), StoreError> {
        if txn.frames.is_empty() && txn.aggregates.is_empty() {
            return Ok(());
        }
        let result = self.commit_txn(txn);
        if result.is_err() {
            // What the commit would have changed is unknown: read it again when asked.
            self.fresh.clear();
        }
        result
    }

    fn watermark(&mut self, site: &str, origin: &str) -> Result<u64, StoreError> {
        let key = (site.to_owned(), origin.to_owned());
        if self.fresh.contains(&key) {
            return Ok(self.origins.get(&key).map_or(0, |s| s.next));
        }
        self.reconnect_if_closed()?;
        let row = self
            .client
            .query_opt(
                "SELECT next_offset, stored, skipped, downsampled FROM fogline.origins \
                 WHERE site = $1 AND origin = $2",
                &[&site, &origin],
            )
            .map_err(db)?;
        Ok(match row {
            Some(row) => {
                let state = origin_state(&row, 0);
                self.origins.insert(key, state);
                state.next
            }
            None => 0,
        })
    }
}

fn all_aggregates(client: &mut Client) -> Result<Vec<(String, String)>, StoreError> {
    Ok(client
        .query("SELECT topic, body FROM fogline.aggregates_latest", &[])
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
