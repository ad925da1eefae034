//! Tumbling-window aggregates per (device, metric): count, min, max, mean, last and
//! quantiles — exact while a window holds few readings, then from a DDSketch (relative
//! error 1 %).
//!
//! Pure: the caller feeds committed records and the current time and takes what must be
//! published or persisted. Windows stay open for late readings until `end + lateness`;
//! a late reading corrects its window, which is then republished.

mod config;
mod window;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub use config::AggregateConfig;
pub use window::{to_json, Summary, WindowState};

/// Identifies one window. Device and metric names are shared by all windows of a series
/// (see [`Aggregator`]), so a key costs no allocation of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub device: Arc<str>,
    pub metric: Arc<str>,
    pub len_secs: u32,
    pub start_ms: i64,
}

impl WindowKey {
    pub fn end_ms(&self) -> i64 {
        self.start_ms
            .saturating_add(i64::from(self.len_secs).saturating_mul(1000))
    }

    /// `agg/<device>/<metric>/<len>s`
    pub fn topic(&self) -> String {
        format!("agg/{}/{}/{}s", self.device, self.metric, self.len_secs)
    }
}

/// The start of the `len_ms` window holding `ts_ms` (saturating: a stored timestamp may
/// be anything).
pub fn window_start(ts_ms: i64, len_ms: i64) -> i64 {
    ts_ms.saturating_sub(ts_ms.rem_euclid(len_ms.max(1)))
}

/// A window that starts further ahead of the agent's clock than this is not opened
/// (ingest already stamps such readings with their arrival time).
const MAX_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// How long after its end a window stays in memory (it is spilled to storage later, and
/// read back if a late reading comes).
pub const RESIDENT_AFTER_END_MS: i64 = 5_000;

/// What happened to a reading fed to the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Applied,
    /// Applied to some windows; this many were already past their lateness and skipped.
    TooLateFor(usize),
}

/// A window in memory, and what is owed for it.
struct Resident {
    state: WindowState,
    /// Changed since it was last published.
    unpublished: bool,
    /// Changed since it was last handed to a checkpoint.
    unstored: bool,
}

/// All open windows.
pub struct Aggregator {
    windows_secs: Vec<u32>,
    lateness_ms: i64,
    open: HashMap<WindowKey, Resident>,
    /// One shared copy of each device and metric name the open windows use.
    names: HashSet<Arc<str>>,
    newest_ms: i64,
}

impl Aggregator {
    pub fn new(windows_secs: &[u32], lateness_secs: u32) -> Self {
        Aggregator {
            windows_secs: windows_secs.to_vec(),
            lateness_ms: i64::from(lateness_secs) * 1000,
            open: HashMap::new(),
            names: HashSet::new(),
            newest_ms: i64::MIN,
        }
    }

    /// The shared copy of `name`.
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.insert(shared.clone());
        shared
    }

    /// A key for `device`/`metric` whose names are shared with the other windows.
    pub fn key(&mut self, device: &str, metric: &str, len_secs: u32, start_ms: i64) -> WindowKey {
        WindowKey {
            device: self.intern(device),
            metric: self.intern(metric),
            len_secs,
            start_ms,
        }
    }

    /// Restores a persisted window (at start-up).
    pub fn restore(&mut self, key: WindowKey, state: WindowState) {
        let key = self.key(&key.device, &key.metric, key.len_secs, key.start_ms);
        self.open.insert(
            key,
            Resident {
                state,
                unpublished: false,
                unstored: false,
            },
        );
    }

    /// Folds one committed reading into each of its windows. `now_ms` is the agent's
    /// clock; a window is closed for good once `now_ms > end + lateness`. A window not in
    /// memory is asked of `load` first: it may have been spilled (see
    /// [`Aggregator::spill`]) and still be open for late readings.
    pub fn fold(
        &mut self,
        device: &str,
        metric: &str,
        ts_ms: i64,
        value: f64,
        now_ms: i64,
        load: &mut dyn FnMut(&WindowKey) -> Option<WindowState>,
    ) -> Fold {
        self.newest_ms = self.newest_ms.max(now_ms);
        let mut late = 0;
        let (device, metric) = (self.intern(device), self.intern(metric));
        for i in 0..self.windows_secs.len() {
            let len_secs = self.windows_secs[i];
            let len_ms = i64::from(len_secs) * 1000;
            let key = WindowKey {
                device: device.clone(),
                metric: metric.clone(),
                len_secs,
                start_ms: window_start(ts_ms, len_ms),
            };
            let w = match self.open.get_mut(&key) {
                Some(w) => w,
                None => {
                    if key.end_ms().saturating_add(self.lateness_ms) < now_ms
                        || key.start_ms > now_ms.saturating_add(MAX_AHEAD_MS)
                    {
                        // Closed for good, or so far ahead of the agent's clock (a
                        // device's clock that ingest did not see, e.g. in an old block)
                        // that it would stay open until then.
                        late += 1;
                        continue;
                    }
                    let state = load(&key).unwrap_or_default();
                    self.open.entry(key).or_insert(Resident {
                        state,
                        unpublished: true,
                        unstored: true,
                    })
                }
            };
            w.state.record(ts_ms, value);
            w.unpublished = true;
            w.unstored = true;
        }
        if late == 0 {
            Fold::Applied
        } else {
            Fold::TooLateFor(late)
        }
    }

    /// Windows changed since the last call, with their JSON.
    pub fn take_publish(&mut self, quantiles: &[f64]) -> Vec<(String, String)> {
        self.take_changed()
            .iter()
            .filter_map(|k| self.publication(k, quantiles))
            .collect()
    }

    /// Windows changed since the last call, in order; see [`Aggregator::publication`].
    pub fn take_changed(&mut self) -> Vec<WindowKey> {
        let mut changed: Vec<WindowKey> = self
            .open
            .iter_mut()
            .filter(|(_, w)| w.unpublished)
            .map(|(k, w)| {
                w.unpublished = false;
                k.clone()
            })
            .collect();
        changed.sort();
        changed
    }

    /// A window's topic and JSON.
    pub fn publication(&self, key: &WindowKey, quantiles: &[f64]) -> Option<(String, String)> {
        let w = self.open.get(key)?;
        Some((key.topic(), to_json(key, &w.state, quantiles)))
    }

    /// Windows changed since the last checkpoint, or every window in memory after a
    /// failed checkpoint lost track of changes. The caller stores each with
    /// [`WindowState::to_bytes`], one at a time: serializing thousands of windows up front
    /// would hold them all in memory twice.
    pub fn take_persist(&mut self, all: bool) -> Vec<WindowKey> {
        self.open
            .iter_mut()
            .filter_map(|(k, w)| {
                let take = all || w.unstored;
                w.unstored = false;
                take.then(|| k.clone())
            })
            .collect()
    }

    /// Forgets windows past their lateness (after they were published), returning their
    /// keys so the caller can delete them from storage.
    pub fn evict(&mut self, now_ms: i64) -> Vec<WindowKey> {
        // Names no key holds any more: those of windows evicted earlier (the keys
        // returned by the last call are gone by now).
        self.names.retain(|n| Arc::strong_count(n) > 1);
        let lateness = self.lateness_ms;
        let expired: Vec<WindowKey> = self
            .open
            .iter()
            .filter(|(k, w)| k.end_ms().saturating_add(lateness) < now_ms && !w.unpublished)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.open.remove(k);
        }
        expired
    }

    /// Lets go of windows that ended more than [`RESIDENT_AFTER_END_MS`] ago and have
    /// nothing unpublished or unstored. Call it only right after a checkpoint was
    /// committed: every such window is then in storage as it is in memory, where a late
    /// reading finds it (through `load` in [`Aggregator::fold`]). Without this, each
    /// series would keep every window of the lateness period in memory: with 10 s windows
    /// and 10 minutes of lateness, 60 of them.
    pub fn spill(&mut self, now_ms: i64) -> usize {
        let before = self.open.len();
        self.open.retain(|k, w| {
            k.end_ms().saturating_add(RESIDENT_AFTER_END_MS) >= now_ms
                || w.unpublished
                || w.unstored
        });
        before - self.open.len()
    }

    /// Whether a window is kept in memory at start-up (the others load when needed).
    pub fn resident_at(key: &WindowKey, now_ms: i64) -> bool {
        key.end_ms().saturating_add(RESIDENT_AFTER_END_MS) >= now_ms
    }

    pub fn lateness_ms(&self) -> i64 {
        self.lateness_ms
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    pub fn get(&self, key: &WindowKey) -> Option<&WindowState> {
        self.open.get(key).map(|w| &w.state)
    }
}

#[cfg(test)]
mod tests;
