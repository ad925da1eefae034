//! Each origin's room in a store: sizes tracked, and an origin over its budget
//! downsampled (oldest readings into summary blocks), then its oldest blocks dropped.

use std::collections::HashMap;

use redb::Durability;
use redb::{ReadableDatabase, ReadableTable};

use crate::buffer::block::{self, Summaries};

use super::{Key, Store, StoreError, LOG};

/// What [`Store::trim`] did to one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    pub key: Key,
    /// Readings folded into summaries.
    pub downsampled: u64,
    /// Offsets dropped (the uplink then says they are gone).
    pub dropped: u64,
}

impl Store {
    /// Deletes an origin's oldest blocks while `take(first, end, bytes)` says so; returns
    /// the readings and bytes deleted.
    pub(super) fn delete_oldest(
        &mut self,
        site: &str,
        origin: &str,
        mut take: impl FnMut(u64, u64, u64) -> bool,
    ) -> Result<(u64, u64), StoreError> {
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        let (mut readings, mut bytes) = (0, 0);
        {
            let mut log = w.open_table(LOG)?;
            let mut doomed = Vec::new();
            for row in log.range((site, origin, 0)..=(site, origin, u64::MAX))? {
                let (k, v) = row?;
                let first = k.value().2;
                let n = block::count(v.value()).map_err(|e| {
                    StoreError::Corrupt(format!("block {site}/{origin}@{first}: {e}"))
                })?;
                let len = v.value().len() as u64;
                if !take(first, first + n, len) {
                    break;
                }
                doomed.push(first);
                readings += n;
                bytes += len;
            }
            for first in doomed {
                log.remove((site, origin, first))?;
            }
        }
        if readings > 0 {
            w.commit()?;
            if let Some(sizes) = self.sizes.as_mut() {
                if let Some(size) = sizes.get_mut(&(site.to_owned(), origin.to_owned())) {
                    *size = size.saturating_sub(bytes);
                }
            }
        }
        Ok((readings, bytes))
    }

    /// Starts keeping the stored bytes of every origin (one scan), for [`Store::trim`].
    pub fn track_sizes(&mut self) -> Result<(), StoreError> {
        let mut sizes: HashMap<Key, u64> = HashMap::new();
        let read = self.db.begin_read()?;
        for row in read.open_table(LOG)?.iter()? {
            let (k, v) = row?;
            let (site, origin, _) = k.value();
            *sizes
                .entry((site.to_owned(), origin.to_owned()))
                .or_default() += v.value().len() as u64;
        }
        self.sizes = Some(sizes);
        Ok(())
    }

    /// Keeps every origin within `max_bytes` (after [`Store::track_sizes`]), as a full
    /// buffer does: an origin above it has its oldest raw readings folded into summaries
    /// per `window_secs` window (which then ship upstream in their place), until it is
    /// below nine tenths of it; summaries may take half of it, beyond that the oldest
    /// blocks go. Returns, per origin trimmed, the readings downsampled and dropped.
    pub fn trim(&mut self, max_bytes: u64, window_secs: u32) -> Result<Vec<Trimmed>, StoreError> {
        let over: Vec<Key> = self
            .sizes
            .iter()
            .flatten()
            .filter(|(_, &size)| size > max_bytes)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in over {
            out.push(self.trim_origin(key, max_bytes, window_secs)?);
        }
        Ok(out)
    }

    pub(super) fn trim_origin(
        &mut self,
        key: Key,
        max_bytes: u64,
        window_secs: u32,
    ) -> Result<Trimmed, StoreError> {
        let (site, origin) = (key.0.as_str(), key.1.as_str());
        let corrupt = |first: u64, e: block::BlockError| {
            StoreError::Corrupt(format!("block {site}/{origin}@{first}: {e}"))
        };
        let target = max_bytes - max_bytes / 10;
        let summary_cap = max_bytes / 2;
        let mut size = self
            .sizes
            .as_ref()
            .and_then(|s| s.get(&key))
            .copied()
            .unwrap_or(0);
        let mut out = Trimmed {
            key: key.clone(),
            downsampled: 0,
            dropped: 0,
        };
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        {
            let mut log = w.open_table(LOG)?;
            // (first offset, bytes, summaries?) of every block, oldest first.
            let mut blocks: Vec<(u64, u64, bool)> = Vec::new();
            for row in log.range((site, origin, 0)..=(site, origin, u64::MAX))? {
                let (k, v) = row?;
                blocks.push((
                    k.value().2,
                    v.value().len() as u64,
                    block::is_summaries(v.value()),
                ));
            }
            let summary_bytes: u64 = blocks.iter().filter(|b| b.2).map(|b| b.1).sum();
            // Fold the oldest raw blocks into one summaries block.
            let mut folded: Option<(u64, Summaries)> = None;
            let mut estimate = 0;
            for &(first, len, is_summary) in &blocks {
                if is_summary {
                    continue;
                }
                // `estimate`: what the summaries folded so far will take.
                if size + estimate <= target || summary_bytes + estimate >= summary_cap {
                    break;
                }
                let Some(v) = log.remove((site, origin, first))? else {
                    continue;
                };
                let records = block::decode(v.value()).map_err(|e| corrupt(first, e))?;
                drop(v);
                let (_, s) = folded.get_or_insert_with(|| {
                    (
                        first,
                        Summaries {
                            covers: 0,
                            rows: Vec::new(),
                        },
                    )
                });
                block::summarise(&records, window_secs, s);
                out.downsampled += records.len() as u64;
                size = size.saturating_sub(len);
                estimate = s
                    .rows
                    .iter()
                    .map(|r| (r.device.len() + r.metric.len()) as u64 + 56)
                    .sum();
            }
            if let Some((first, s)) = folded {
                let bytes = block::encode_summaries(&s);
                size += bytes.len() as u64;
                log.insert((site, origin, first), bytes.as_slice())?;
            }
            // Then drop the oldest blocks (summaries first: they are the oldest).
            while size > target {
                let Some(row) = log
                    .range((site, origin, 0)..=(site, origin, u64::MAX))?
                    .next()
                else {
                    break;
                };
                let (k, v) = row?;
                let first = k.value().2;
                let (len, covers) = (
                    v.value().len() as u64,
                    block::count(v.value()).map_err(|e| corrupt(first, e))?,
                );
                drop((k, v));
                log.remove((site, origin, first))?;
                size = size.saturating_sub(len);
                out.dropped += covers;
            }
        }
        w.commit()?;
        if let Some(sizes) = self.sizes.as_mut() {
            sizes.insert(key, size);
        }
        Ok(out)
    }
}
