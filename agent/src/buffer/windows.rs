//! Window aggregates in the buffer: checkpointed with the log, swept once past their
//! lateness, loaded back when a late reading needs a window that was spilled.

use redb::ReadableTable;

use crate::aggregate::{WindowKey, WindowState};

use super::{Buffer, BufferError, Log, Meta, META, WINDOWS};

/// Stored windows looked at per checkpoint for those past their lateness.
pub(super) const SWEEP_ROWS: usize = 2048;

/// A window as last checkpointed, if it is in `table`.
pub(super) fn stored_window(
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
pub(super) fn load_window(
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

impl Buffer {
    /// The next commit also writes the changed windows.
    pub fn request_checkpoint(&mut self) {
        self.checkpoint_due = true;
    }

    /// Writes changed windows into `txn` if a checkpoint is due. Returns whether it did.
    pub(super) fn write_checkpoint(
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
    pub(super) fn sweep_windows(
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

    pub fn open_windows(&self) -> usize {
        self.agg.open_windows()
    }
}
