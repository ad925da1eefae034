//! The on-disk encoding of a batch of readings.
//!
//! One redb value holds every reading of one commit, keyed by the origin offset of its
//! first reading; reading `i` of the block has offset `key + i`. A block carries its own
//! series table (device, metric, boot), so it can be read, exported or shipped to a peer
//! without any other table. Sequence numbers and timestamps are delta-coded per series,
//! and values that are short decimals (21.37) or exact `f32`s take 2–5 bytes instead of 8.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

const BLOCK_VERSION: u8 = 1;

/// A reading as it is stored: stamped, deduplicated, ready to aggregate or export.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub device: String,
    pub metric: String,
    pub boot: u32,
    /// `None` for readings sent without a sequence number.
    pub seq: Option<u32>,
    /// Unix milliseconds (device time, re-based if its clock was not set).
    pub ts_ms: i64,
    pub value: f64,
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

/// Encodes records into one block value.
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut index: HashMap<(&str, &str, u32), u32> = HashMap::new();
    let mut series: Vec<SeriesRepr<'_>> = Vec::new();
    // Per series: previous seq and previous timestamp.
    let mut prev: Vec<(i64, i64)> = Vec::new();
    let base_ts = records.first().map_or(0, |r| r.ts_ms);
    let mut entries = Vec::with_capacity(records.len());
    for r in records {
        let key = (r.device.as_str(), r.metric.as_str(), r.boot);
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
    let mut out = vec![BLOCK_VERSION];
    // Serializing plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(&repr).unwrap_or_default());
    out
}

/// Decodes a block. Corrupt input is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<Vec<Record>, BlockError> {
    let (&version, body) = bytes.split_first().ok_or(BlockError::Empty)?;
    if version != BLOCK_VERSION {
        return Err(BlockError::Version(version));
    }
    let repr: Repr<'_> =
        postcard::from_bytes(body).map_err(|_| BlockError::Corrupt("undecodable"))?;
    let mut prev: Vec<(i64, i64)> = vec![(0, repr.base_ts); repr.series.len()];
    let mut out = Vec::with_capacity(repr.entries.len());
    for e in repr.entries {
        let s = e.series as usize;
        let (Some(series), Some((prev_seq, prev_ts))) = (repr.series.get(s), prev.get_mut(s))
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
            device: series.device.to_owned(),
            metric: series.metric.to_owned(),
            boot: series.boot,
            seq: (seq != 0).then_some(seq),
            ts_ms: ts,
            value: e.value.decode(),
        });
    }
    Ok(out)
}

/// Number of readings in a block without building them.
pub fn count(bytes: &[u8]) -> Result<usize, BlockError> {
    decode(bytes).map(|r| r.len())
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
                device,
                metric,
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
            prop_assert_eq!(decode(&bytes).expect("decodes"), records);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn typical_readings_take_few_bytes() {
        let records: Vec<Record> = (0..1000)
            .map(|i| Record {
                device: format!("dev-{:03}", i % 50),
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
}
