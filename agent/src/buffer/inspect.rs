//! Reading a buffer from outside the agent (`fogline-agent buffer stats|check|export`)
//! and checking one: every table decodes, and the meta counters match the rows.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::aggregate::{Summary, WindowState};

use super::block::{self, Record, SummaryRow};
use super::capacity::{row_bytes, ROW_OVERHEAD};
use super::error::corrupt;
use super::seq::DeviceState;
use super::{
    buffer_path, open_db, Buffer, BufferError, Meta, BLOCKS, DEVICES, META, ROLLUPS, WINDOWS,
};

/// The offsets `from..to` a summaries block covers.
pub type Span = (u64, u64);

/// Checks every table decodes and the counters agree with the contents; returns the
/// problems found (none: consistent).
pub(super) fn check_db(db: &mut Database) -> Result<Vec<String>, BufferError> {
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

pub(super) fn for_each_record(
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

impl Buffer {
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
}
