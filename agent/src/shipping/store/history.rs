//! The gateway's history: every stored readings block indexed per series it holds, by
//! (site, device, metric, earliest time), and every window aggregate by (site, device,
//! metric, window, start), written in the same transaction as the log. A range of one
//! series is read from the index and the few blocks it names, never by scanning the log.
//! Only the gateway keeps it ([`super::Store::keep_history`]); a replica store does not.
//!
//! One index entry per (block, series) rather than per reading: a block holds one commit
//! of many devices, so the index costs a few inserts per commit, not one per reading (a
//! per-reading index cut the gateway's ingest about fourfold, BENCHMARKS.md).

use std::collections::HashMap;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::{StoreError, LOG};
use crate::buffer::block::{self, Entry, Record};

/// (site, device, metric, earliest ts in the block, origin, block's first offset).
type BlockKey<'a> = (&'a str, &'a str, &'a str, i64, &'a str, u64);
/// → the latest ts of the series in the block.
const BLOCKS: TableDefinition<BlockKey<'static>, i64> = TableDefinition::new("history_blocks");
/// (site, device, metric, window secs, window start ms) → the aggregate's JSON.
const AGGREGATES: TableDefinition<(&str, &str, &str, u32, i64), &str> =
    TableDefinition::new("history_aggregates");
/// (site, device, metric) → (readings indexed, the longest time span of the series in
/// one block): a block holding a time `t` starts no earlier than `t - span`.
const SERIES: TableDefinition<(&str, &str, &str), (u64, i64)> =
    TableDefinition::new("history_series");

/// A reading as the history API serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryReading {
    pub ts_ms: i64,
    pub value: f64,
    pub origin: String,
    pub offset: u64,
    pub boot: u32,
    pub seq: Option<u32>,
}

/// Where a page of readings ends: the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub ts_ms: i64,
    pub origin: String,
    pub offset: u64,
}

impl Cursor {
    /// `<ts>_<offset>_<origin>` (an origin may hold `_`, so it goes last).
    pub fn encode(&self) -> String {
        format!("{}_{}_{}", self.ts_ms, self.offset, self.origin)
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let mut parts = s.splitn(3, '_');
        let ts_ms = parts.next()?.parse().ok()?;
        let offset = parts.next()?.parse().ok()?;
        let origin = parts.next()?.to_owned();
        Some(Cursor {
            ts_ms,
            origin,
            offset,
        })
    }
}

/// One series and a time range, `[from, to)`, in Unix ms.
#[derive(Debug, Clone)]
pub struct Range<'a> {
    pub site: &'a str,
    pub device: &'a str,
    pub metric: &'a str,
    pub from: i64,
    pub to: i64,
}

pub(super) fn create(w: &WriteTransaction) -> Result<(), StoreError> {
    w.open_table(BLOCKS)?;
    w.open_table(AGGREGATES)?;
    w.open_table(SERIES)?;
    Ok(())
}

/// Is the index empty (a store written before it existed, or a new one)?
pub(super) fn is_empty(w: &WriteTransaction) -> Result<bool, StoreError> {
    Ok(w.open_table(SERIES)?.first()?.is_none())
}

/// Indexes one stored block of `site`/`origin` starting at offset `first`: one entry per
/// series in it.
pub(super) fn index_block(
    w: &WriteTransaction,
    site: &str,
    origin: &str,
    first: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let entry = block::decode_entry(bytes)
        .map_err(|e| StoreError::Corrupt(format!("block {site}/{origin}@{first}: {e}")))?;
    let Entry::Readings(records) = entry else {
        // Summaries arrive as aggregates of their windows too (the receiver's work).
        return Ok(());
    };
    // (device, metric) → (min ts, max ts, readings)
    let mut spans: HashMap<(&str, &str), (i64, i64, u64)> = HashMap::new();
    for r in &records {
        let e = spans
            .entry((&*r.device, &*r.metric))
            .or_insert((r.ts_ms, r.ts_ms, 0));
        e.0 = e.0.min(r.ts_ms);
        e.1 = e.1.max(r.ts_ms);
        e.2 += 1;
    }
    let mut blocks = w.open_table(BLOCKS)?;
    let mut series = w.open_table(SERIES)?;
    for ((device, metric), (min, max, n)) in spans {
        blocks.insert((site, device, metric, min, origin, first), max)?;
        let key = (site, device, metric);
        let (count, span) = series.get(key)?.map_or((0, 0), |v| v.value());
        series.insert(key, (count + n, span.max(max.saturating_sub(min))))?;
    }
    Ok(())
}

/// Indexes an aggregate published on `agg/<site>/<device>/<metric>/<len>s`; other topics
/// and JSON without a `start_ms` are left out.
pub(super) fn index_aggregate(
    w: &WriteTransaction,
    topic: &str,
    json: &str,
) -> Result<(), StoreError> {
    let Some((site, device, metric, len)) = parse_agg_topic(topic) else {
        return Ok(());
    };
    let Some(start) = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["start_ms"].as_i64())
    else {
        return Ok(());
    };
    w.open_table(AGGREGATES)?
        .insert((site, device, metric, len, start), json)?;
    let mut series = w.open_table(SERIES)?;
    if series.get((site, device, metric))?.is_none() {
        series.insert((site, device, metric), (0, 0))?;
    }
    Ok(())
}

/// `agg/<site>/<device>/<metric>/<len>s` as (site, device, metric, len).
pub fn parse_agg_topic(topic: &str) -> Option<(&str, &str, &str, u32)> {
    let mut p = topic.strip_prefix("agg/")?.split('/');
    let (site, device, metric, len) = (p.next()?, p.next()?, p.next()?, p.next()?);
    if p.next().is_some() {
        return None;
    }
    Some((site, device, metric, len.strip_suffix('s')?.parse().ok()?))
}

/// Readings of one series in its range, oldest first (by time, then origin and offset),
/// after `after`, at most `limit`; and the cursor of the next page if there is more.
///
/// The index entries of the series come in order of their blocks' earliest time; every
/// reading buffered with a time before the next entry's earliest is final, so readings
/// are handed out in order while blocks are still being read, and reading stops once the
/// page is full.
pub(super) fn readings(
    read: &ReadTransaction,
    range: &Range<'_>,
    after: Option<&Cursor>,
    limit: usize,
) -> Result<(Vec<HistoryReading>, Option<Cursor>), StoreError> {
    let (site, device, metric) = (range.site, range.device, range.metric);
    let Some(span) = read
        .open_table(SERIES)?
        .get((site, device, metric))?
        .map(|v| v.value().1)
    else {
        return Ok((Vec::new(), None));
    };
    let from = after.map_or(range.from, |c| c.ts_ms.max(range.from));
    let after_key = after.map(|c| (c.ts_ms, c.origin.as_str(), c.offset));
    let wanted = |r: &HistoryReading| {
        r.ts_ms >= range.from
            && r.ts_ms < range.to
            && after_key.is_none_or(|k| (r.ts_ms, r.origin.as_str(), r.offset) > k)
    };
    let blocks = read.open_table(BLOCKS)?;
    let log = read.open_table(LOG)?;
    let mut out: Vec<HistoryReading> = Vec::new();
    let mut pending: Vec<HistoryReading> = Vec::new();
    let entries = blocks.range(
        (site, device, metric, from.saturating_sub(span), "", 0)
            ..(site, device, metric, range.to, "", 0),
    )?;
    for entry in entries {
        if out.len() > limit {
            break;
        }
        let (k, v) = entry?;
        let (_, _, _, min_ts, origin, first) = k.value();
        if v.value() < from {
            continue;
        }
        settle(&mut pending, &mut out, Some(min_ts));
        let Some(bytes) = log.get((site, origin, first))? else {
            continue; // deleted since (a reset origin): nothing to serve
        };
        let records = block::decode(bytes.value())
            .map_err(|e| StoreError::Corrupt(format!("block {site}/{origin}@{first}: {e}")))?;
        for (i, r) in records.into_iter().enumerate() {
            if &*r.device != device || &*r.metric != metric {
                continue;
            }
            let reading = history_reading(r, origin, first + i as u64);
            if wanted(&reading) {
                pending.push(reading);
            }
        }
    }
    settle(&mut pending, &mut out, None);
    if out.len() <= limit {
        return Ok((out, None));
    }
    out.truncate(limit);
    let next = out.last().map(|last| Cursor {
        ts_ms: last.ts_ms,
        origin: last.origin.clone(),
        offset: last.offset,
    });
    Ok((out, next))
}

/// Moves the pending readings older than `before` (all: `None`) to `out`, in order.
fn settle(pending: &mut Vec<HistoryReading>, out: &mut Vec<HistoryReading>, before: Option<i64>) {
    pending.sort_by(|a, b| (a.ts_ms, &a.origin, a.offset).cmp(&(b.ts_ms, &b.origin, b.offset)));
    let split = before.map_or(pending.len(), |t| pending.partition_point(|r| r.ts_ms < t));
    out.extend(pending.drain(..split));
}

fn history_reading(r: Record, origin: &str, offset: u64) -> HistoryReading {
    HistoryReading {
        ts_ms: r.ts_ms,
        value: r.value,
        origin: origin.to_owned(),
        offset,
        boot: r.boot,
        seq: r.seq,
    }
}

/// Aggregates of one series at one window length whose windows start in the range,
/// oldest first, after the window starting at `after`, at most `limit`; and the start of
/// the last one if there is more.
pub(super) fn aggregates(
    read: &ReadTransaction,
    range: &Range<'_>,
    window_secs: u32,
    after: Option<i64>,
    limit: usize,
) -> Result<(Vec<String>, Option<i64>), StoreError> {
    let table = read.open_table(AGGREGATES)?;
    let (site, device, metric) = (range.site, range.device, range.metric);
    let from = after.map_or(range.from, |a| a.saturating_add(1).max(range.from));
    let mut out = Vec::new();
    let mut last = None;
    let rows = table.range(
        (site, device, metric, window_secs, from)..(site, device, metric, window_secs, range.to),
    )?;
    for row in rows {
        let (k, v) = row?;
        if out.len() == limit {
            return Ok((out, last));
        }
        last = Some(k.value().4);
        out.push(v.value().to_owned());
    }
    Ok((out, None))
}

/// Every indexed aggregate as (its topic, its JSON), by series, window and start.
pub(super) fn all_aggregates(
    read: &ReadTransaction,
    mut f: impl FnMut(String, &str),
) -> Result<(), StoreError> {
    for row in read.open_table(AGGREGATES)?.iter()? {
        let (k, v) = row?;
        let (site, device, metric, len, _) = k.value();
        f(format!("agg/{site}/{device}/{metric}/{len}s"), v.value());
    }
    Ok(())
}

/// Every series (site, device, metric, readings) under `site` and `device` if given.
pub(super) fn series(
    read: &ReadTransaction,
    site: Option<&str>,
    device: Option<&str>,
) -> Result<Vec<(String, String, String, u64)>, StoreError> {
    let table = read.open_table(SERIES)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let (s, d, m) = k.value();
        if site.is_some_and(|want| want != s) || device.is_some_and(|want| want != d) {
            continue;
        }
        out.push((s.to_owned(), d.to_owned(), m.to_owned(), v.value().0));
    }
    Ok(out)
}
