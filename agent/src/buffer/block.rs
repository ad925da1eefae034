//! The on-disk encoding of the origin log's entries.
//!
//! One redb value holds one *block*, keyed by the origin offset of its first reading, and
//! a block covers the offsets `key..key + count`. There are two kinds:
//!
//! - **readings** (version byte 1): every reading of one commit; reading `i` has offset
//!   `key + i`. A block carries its own series table (device, metric, boot), so it can be
//!   read, exported or shipped to a peer without any other table. Sequence numbers and
//!   timestamps are delta-coded per series, and values that are short decimals (21.37) or
//!   exact `f32`s take 2–5 bytes instead of 8.
//! - **summaries** (version byte 2): what a full buffer kept of readings it downsampled —
//!   per (device, metric, window) their count, min, max, sum and last value — covering the
//!   offsets of the readings it replaced. It ships, replicates and is stored like any
//!   block, so a reading's offset is always covered upstream: raw, summarised, or (if the
//!   edge had to drop it) announced as skipped.
//!
//! Decoding never trusts a length it has not checked against the bytes, and counting a
//! block reads its header only: a batch from the network costs its own size in memory.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::aggregate::Summary;

const READINGS: u8 = 1;
const SUMMARIES: u8 = 2;

/// A reading as it is stored: stamped, deduplicated, ready to aggregate or export. The
/// names are shared by the readings of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub device: Arc<str>,
    pub metric: Arc<str>,
    pub boot: u32,
    /// `None` for readings sent without a sequence number.
    pub seq: Option<u32>,
    /// Unix milliseconds (device time, re-based if its clock was not set).
    pub ts_ms: i64,
    pub value: f64,
}

/// One summary of a summaries block: readings of one (device, metric) in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    pub device: String,
    pub metric: String,
    pub start_ms: i64,
    pub len_secs: u32,
    pub summary: Summary,
}

impl SummaryRow {
    /// As exported and republished: the fields of a window aggregate (without quantiles),
    /// `"downsampled": true`, and the offsets of the readings it replaced when known.
    pub fn to_json(&self, span: Option<(u64, u64)>) -> serde_json::Value {
        let s = &self.summary;
        let end = self
            .start_ms
            .saturating_add(i64::from(self.len_secs).saturating_mul(1000));
        let mut v = serde_json::json!({
            "kind": "summary",
            "device": self.device,
            "metric": self.metric,
            "window_secs": self.len_secs,
            "start_ms": self.start_ms,
            "end_ms": end,
            "count": s.count,
            "min": s.min,
            "max": s.max,
            "mean": s.mean(),
            "last": s.last,
            "last_ts": s.last_ts_ms,
            "downsampled": true,
        });
        if let Some((from, to)) = span {
            v["from_offset"] = from.into();
            v["to_offset"] = to.into();
        }
        v
    }
}

/// A summaries block: the readings of `covers` consecutive offsets, downsampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summaries {
    pub covers: u64,
    pub rows: Vec<SummaryRow>,
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Readings(Vec<Record>),
    Summaries(Summaries),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    #[error("block is empty")]
    Empty,
    #[error("block has unknown version {0}")]
    Version(u8),
    #[error("block is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("block holds summaries, not readings")]
    NotReadings,
}

#[derive(Serialize, Deserialize)]
struct SeriesRepr<'a> {
    device: &'a str,
    metric: &'a str,
    boot: u32,
}

#[derive(Serialize, Deserialize)]
struct EntryRepr {
    series: u32,
    /// Sequence number minus the previous one of the same series (0 stands for "none").
    dseq: i64,
    /// Timestamp minus the previous one of the same series (the first is against `base_ts`).
    dts: i64,
    value: Value,
}

#[derive(Serialize, Deserialize)]
struct Repr<'a> {
    base_ts: i64,
    #[serde(borrow)]
    series: Vec<SeriesRepr<'a>>,
    entries: Vec<EntryRepr>,
}

/// The head of a readings block: everything before its entries.
#[derive(Deserialize)]
struct Head<'a> {
    #[allow(dead_code)]
    base_ts: i64,
    #[serde(borrow)]
    series: Vec<SeriesRepr<'a>>,
}

/// A value as stored: decimals with 0–3 fraction digits as scaled integers, then `f32`,
/// then `f64`. Decoding gives back exactly the `f64` that was encoded.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
enum Value {
    D0(i64),
    D1(i64),
    D2(i64),
    D3(i64),
    F32(f32),
    F64(f64),
}

const SCALES: [f64; 4] = [1.0, 10.0, 100.0, 1000.0];
const EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53
/// The smallest an encoded entry can be (series, dseq, dts, value tag and one byte).
const MIN_ENTRY_BYTES: usize = 5;

impl Value {
    fn encode(v: f64) -> Value {
        for (k, scale) in SCALES.iter().enumerate() {
            let m = (v * scale).round();
            if m.abs() < EXACT_INT && m / scale == v {
                // In range and integral, so the cast is exact.
                #[allow(clippy::cast_possible_truncation)]
                let m = m as i64;
                return match k {
                    0 => Value::D0(m),
                    1 => Value::D1(m),
                    2 => Value::D2(m),
                    _ => Value::D3(m),
                };
            }
        }
        #[allow(clippy::cast_possible_truncation)]
        let narrow = v as f32;
        if f64::from(narrow) == v {
            Value::F32(narrow)
        } else {
            Value::F64(v)
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn decode(self) -> f64 {
        match self {
            Value::D0(m) => m as f64,
            Value::D1(m) => m as f64 / SCALES[1],
            Value::D2(m) => m as f64 / SCALES[2],
            Value::D3(m) => m as f64 / SCALES[3],
            Value::F32(v) => f64::from(v),
            Value::F64(v) => v,
        }
    }
}

/// Encodes records into one readings block.
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut index: HashMap<(&str, &str, u32), u32> = HashMap::new();
    let mut series: Vec<SeriesRepr<'_>> = Vec::new();
    // Per series: previous seq and previous timestamp.
    let mut prev: Vec<(i64, i64)> = Vec::new();
    let base_ts = records.first().map_or(0, |r| r.ts_ms);
    let mut entries = Vec::with_capacity(records.len());
    for r in records {
        let key = (&*r.device, &*r.metric, r.boot);
        let next = u32::try_from(series.len()).unwrap_or(u32::MAX);
        let s = *index.entry(key).or_insert_with(|| {
            series.push(SeriesRepr {
                device: key.0,
                metric: key.1,
                boot: key.2,
            });
            prev.push((0, base_ts));
            next
        });
        let (prev_seq, prev_ts) = &mut prev[s as usize];
        let seq = i64::from(r.seq.unwrap_or(0));
        entries.push(EntryRepr {
            series: s,
            dseq: seq - *prev_seq,
            dts: r.ts_ms.wrapping_sub(*prev_ts),
            value: Value::encode(r.value),
        });
        *prev_seq = seq;
        *prev_ts = r.ts_ms;
    }
    let repr = Repr {
        base_ts,
        series,
        entries,
    };
    let mut out = vec![READINGS];
    // Serializing plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(&repr).unwrap_or_default());
    out
}

/// Encodes a summaries block.
pub fn encode_summaries(s: &Summaries) -> Vec<u8> {
    let mut out = vec![SUMMARIES];
    out.extend(postcard::to_allocvec(s).unwrap_or_default());
    out
}

/// Decodes a readings block. Corrupt input is an error, never a panic; a summaries
/// block is [`BlockError::NotReadings`].
pub fn decode(bytes: &[u8]) -> Result<Vec<Record>, BlockError> {
    match decode_entry(bytes)? {
        Entry::Readings(r) => Ok(r),
        Entry::Summaries(_) => Err(BlockError::NotReadings),
    }
}

/// Decodes a block of either kind.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, BlockError> {
    let (&version, body) = bytes.split_first().ok_or(BlockError::Empty)?;
    match version {
        READINGS => decode_readings(body).map(Entry::Readings),
        SUMMARIES => decode_summaries(body).map(Entry::Summaries),
        v => Err(BlockError::Version(v)),
    }
}

fn decode_summaries(body: &[u8]) -> Result<Summaries, BlockError> {
    let s: Summaries =
        postcard::from_bytes(body).map_err(|_| BlockError::Corrupt("undecodable"))?;
    if s.covers == 0 {
        return Err(BlockError::Corrupt("summaries that cover nothing"));
    }
    Ok(s)
}

fn decode_readings(body: &[u8]) -> Result<Vec<Record>, BlockError> {
    let (head, rest) = postcard::take_from_bytes::<Head<'_>>(body)
        .map_err(|_| BlockError::Corrupt("undecodable"))?;
    // Check the entry count against the bytes before anything is allocated for it.
    entry_count(rest)?;
    let repr: Repr<'_> =
        postcard::from_bytes(body).map_err(|_| BlockError::Corrupt("undecodable"))?;
    let names: Vec<(Arc<str>, Arc<str>, u32)> = head
        .series
        .iter()
        .map(|s| (Arc::from(s.device), Arc::from(s.metric), s.boot))
        .collect();
    let mut prev: Vec<(i64, i64)> = vec![(0, repr.base_ts); names.len()];
    let mut out = Vec::with_capacity(repr.entries.len());
    for e in repr.entries {
        let s = e.series as usize;
        let (Some((device, metric, boot)), Some((prev_seq, prev_ts))) =
            (names.get(s), prev.get_mut(s))
        else {
            return Err(BlockError::Corrupt("series index out of range"));
        };
        let seq = prev_seq
            .checked_add(e.dseq)
            .ok_or(BlockError::Corrupt("sequence overflow"))?;
        let ts = prev_ts.wrapping_add(e.dts);
        *prev_seq = seq;
        *prev_ts = ts;
        let seq = u32::try_from(seq).map_err(|_| BlockError::Corrupt("sequence out of range"))?;
        out.push(Record {
            device: device.clone(),
            metric: metric.clone(),
            boot: *boot,
            seq: (seq != 0).then_some(seq),
            ts_ms: ts,
            value: e.value.decode(),
        });
    }
    Ok(out)
}

/// The number of entries announced at the start of `rest` (postcard's varint length of
/// the entries), checked against the bytes that are there.
fn entry_count(rest: &[u8]) -> Result<u64, BlockError> {
    let (mut n, mut shift) = (0u64, 0u32);
    let mut used = 0;
    for &b in rest.iter().take(10) {
        used += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let room = (rest.len() - used) / MIN_ENTRY_BYTES;
            if n > room as u64 {
                return Err(BlockError::Corrupt("more entries than bytes"));
            }
            return Ok(n);
        }
        shift += 7;
    }
    Err(BlockError::Corrupt("entry count"))
}

/// The offsets a block covers (its readings, or what its summaries replaced), from its
/// header only.
pub fn count(bytes: &[u8]) -> Result<u64, BlockError> {
    let (&version, body) = bytes.split_first().ok_or(BlockError::Empty)?;
    match version {
        READINGS => {
            let (_, rest) = postcard::take_from_bytes::<Head<'_>>(body)
                .map_err(|_| BlockError::Corrupt("undecodable"))?;
            entry_count(rest)
        }
        SUMMARIES => {
            let (covers, _) = postcard::take_from_bytes::<u64>(body)
                .map_err(|_| BlockError::Corrupt("undecodable"))?;
            if covers == 0 {
                return Err(BlockError::Corrupt("summaries that cover nothing"));
            }
            Ok(covers)
        }
        v => Err(BlockError::Version(v)),
    }
}

/// Is this a summaries block?
pub fn is_summaries(bytes: &[u8]) -> bool {
    bytes.first() == Some(&SUMMARIES)
}

/// Folds readings into `into`'s summaries per (device, metric, `window_secs` window); the
/// summaries then cover these readings' offsets too.
pub fn summarise(records: &[Record], window_secs: u32, into: &mut Summaries) {
    let len_ms = i64::from(window_secs.max(1)) * 1000;
    let mut at: HashMap<(String, String, i64), usize> = into
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.device.clone(), r.metric.clone(), r.start_ms), i))
        .collect();
    for r in records {
        let start = crate::aggregate::window_start(r.ts_ms, len_ms);
        let key = (r.device.to_string(), r.metric.to_string(), start);
        let i = *at.entry(key).or_insert_with(|| {
            into.rows.push(SummaryRow {
                device: r.device.to_string(),
                metric: r.metric.to_string(),
                start_ms: start,
                len_secs: window_secs.max(1),
                summary: Summary::default(),
            });
            into.rows.len() - 1
        });
        into.rows[i].summary.record(r.ts_ms, r.value);
    }
    into.covers += records.len() as u64;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (
            "[a-c]{1,3}",
            "[xy]{1,2}",
            0u32..3,
            proptest::option::of(1u32..u32::MAX),
            any::<i64>(),
            prop_oneof![
                any::<f64>().prop_filter("finite", |v| v.is_finite()),
                (-100_000i64..100_000).prop_map(|m| m as f64 / 100.0),
                any::<f32>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(f64::from),
            ],
        )
            .prop_map(|(device, metric, boot, seq, ts_ms, value)| Record {
                device: device.into(),
                metric: metric.into(),
                boot,
                seq,
                ts_ms,
                value,
            })
    }

    proptest! {
        #[test]
        fn blocks_round_trip(records in proptest::collection::vec(record(), 0..60)) {
            let bytes = encode(&records);
            prop_assert_eq!(count(&bytes).expect("counts"), records.len() as u64);
            prop_assert_eq!(decode(&bytes).expect("decodes"), records);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&bytes);
            let _ = count(&bytes);
        }
    }

    #[test]
    fn typical_readings_take_few_bytes() {
        let records: Vec<Record> = (0..1000)
            .map(|i| Record {
                device: format!("dev-{:03}", i % 50).into(),
                metric: "temp".into(),
                boot: 7,
                seq: Some(1000 + i / 50),
                ts_ms: 1_700_000_000_000 + i64::from(i) * 20,
                value: 20.0 + f64::from(i % 17) / 10.0,
            })
            .collect();
        let bytes = encode(&records);
        assert!(bytes.len() < 8 * records.len(), "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).expect("decodes"), records);
    }

    /// Regression: counting a block decoded it whole (two strings per reading), so a batch
    /// from the network took ~30× its size in memory; and a count in the header was
    /// believed before the bytes were there.
    #[test]
    fn counting_reads_the_header_and_lies_are_caught() {
        let records: Vec<Record> = (0..300)
            .map(|i| Record {
                device: "d".into(),
                metric: "t".into(),
                boot: 1,
                seq: Some(i + 1),
                ts_ms: i64::from(i),
                value: f64::from(i),
            })
            .collect();
        let bytes = encode(&records);
        assert_eq!(count(&bytes).expect("count"), 300);
        // The same block cut short still announces 300 entries: refused, not allocated.
        let cut = &bytes[..bytes.len() / 3];
        assert!(count(cut).is_err());
        assert!(decode(cut).is_err());
        // A header that announces 2^40 entries in a few bytes.
        let mut lie = vec![READINGS];
        lie.extend(postcard::to_allocvec(&(0i64, Vec::<SeriesRepr<'_>>::new())).expect("head"));
        lie.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
        assert!(count(&lie).is_err());
        assert!(decode(&lie).is_err());
    }

    #[test]
    fn summaries_cover_what_they_replaced() {
        let records: Vec<Record> = (0..10)
            .map(|i| Record {
                device: "d".into(),
                metric: if i % 2 == 0 { "t" } else { "h" }.into(),
                boot: 1,
                seq: Some(i + 1),
                ts_ms: 1_700_000_000_000 + i64::from(i) * 20_000,
                value: f64::from(i),
            })
            .collect();
        let mut s = Summaries {
            covers: 0,
            rows: Vec::new(),
        };
        summarise(&records, 60, &mut s);
        assert_eq!(s.covers, 10);
        let total: u64 = s.rows.iter().map(|r| r.summary.count).sum();
        assert_eq!(total, 10);
        assert!(s.rows.iter().all(|r| r.start_ms % 60_000 == 0));
        let bytes = encode_summaries(&s);
        assert!(is_summaries(&bytes));
        assert_eq!(count(&bytes).expect("count"), 10);
        assert_eq!(decode_entry(&bytes).expect("entry"), Entry::Summaries(s));
        assert!(matches!(decode(&bytes), Err(BlockError::NotReadings)));
    }
}
