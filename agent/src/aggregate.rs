//! Tumbling-window aggregates per (device, metric): count, min, max, mean, last and
//! quantiles — exact while a window holds few readings, then from a DDSketch (relative
//! error 1 %).
//!
//! Pure: the caller feeds committed records and the current time and takes what must be
//! published or persisted. Windows stay open for late readings until `end + lateness`;
//! a late reading corrects its window, which is then republished.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

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

/// A window keeps its values exactly up to this many readings, then moves them into a
/// sketch. A DDSketch allocates its bins 128 at a time (1 KiB or more), while most windows
/// of a slow sensor hold a handful of readings: a thousand sensors reporting every few
/// seconds would otherwise spend megabytes on nearly empty sketches.
const EXACT_MAX: usize = 64;

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

/// The values behind a window's quantiles.
#[derive(Clone)]
enum Values {
    Exact(Vec<f64>),
    Sketch(Box<DDSketch>),
}

/// Count, min, max, sum and the last value (by device time) of some readings: a window's
/// running summary, and what downsampling keeps of readings it folds away.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    pub last_ts_ms: i64,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            last: 0.0,
            last_ts_ms: i64::MIN,
        }
    }
}

impl Summary {
    pub fn record(&mut self, ts_ms: i64, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        if ts_ms >= self.last_ts_ms {
            self.last = value;
            self.last_ts_ms = ts_ms;
        }
    }

    /// Both summaries in one.
    pub fn merge(&mut self, other: &Summary) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        if other.last_ts_ms >= self.last_ts_ms {
            self.last = other.last;
            self.last_ts_ms = other.last_ts_ms;
        }
    }

    #[allow(clippy::cast_precision_loss)]
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// Running summary of one window, and the values behind its quantiles.
#[derive(Clone)]
pub struct WindowState {
    pub summary: Summary,
    values: Values,
}

impl Default for WindowState {
    fn default() -> Self {
        WindowState {
            summary: Summary::default(),
            values: Values::Exact(Vec::new()),
        }
    }
}

/// Bins a window's sketch may grow to. At 1 % relative accuracy, 256 bins cover values
/// within a factor of about 170 of the window's largest (p50, p95 and p99 of any sensor
/// that does not span more than two orders of magnitude in one window); smaller values
/// are collapsed into the lowest bin. Each bin is 8 bytes, allocated 128 at a time: the
/// crate's default of 2,048 let a window of widely spread values take 4 KiB and more.
/// (A sketch read back from storage gets the crate's default limit.)
const SKETCH_BINS: u32 = 256;

fn new_sketch() -> Box<DDSketch> {
    Box::new(DDSketch::new(SketchConfig::new(0.01, SKETCH_BINS, 1.0e-9)))
}

impl WindowState {
    pub fn record(&mut self, ts_ms: i64, value: f64) {
        self.summary.record(ts_ms, value);
        match &mut self.values {
            Values::Exact(v) if v.len() < EXACT_MAX => v.push(value),
            Values::Exact(v) => {
                let mut sketch = new_sketch();
                for &x in v.iter() {
                    sketch.add(x);
                }
                sketch.add(value);
                self.values = Values::Sketch(sketch);
            }
            Values::Sketch(sketch) => sketch.add(value),
        }
    }

    /// The nearest-rank quantile: the smallest value with at least `q` of the readings at
    /// or below it. Exact for small windows; from the sketch (within 1 %) for larger ones,
    /// clamped to the exact min and max. DDSketch itself rounds the rank down, which for
    /// small windows reports p99 of {20, 22.5, 27.5} as 22.5; nearest-rank says 27.5,
    /// which is what a dashboard reader expects.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let Summary {
            count, min, max, ..
        } = self.summary;
        if count == 0 {
            return None;
        }
        let n = count as f64;
        let rank = ((q.clamp(0.0, 1.0) * n).ceil() - 1.0).max(0.0);
        match &self.values {
            Values::Exact(v) => {
                let mut sorted = v.clone();
                sorted.sort_by(f64::total_cmp);
                sorted
                    .get((rank as usize).min(sorted.len().saturating_sub(1)))
                    .copied()
            }
            Values::Sketch(sketch) => {
                let adjusted = if count > 1 { rank / (n - 1.0) } else { 0.0 };
                let v = sketch.quantile(adjusted.clamp(0.0, 1.0)).ok().flatten()?;
                Some(v.clamp(min, max))
            }
        }
    }

    /// Compact persistent form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (sketch, exact) = match &self.values {
            Values::Exact(v) => (Vec::new(), v.clone()),
            Values::Sketch(s) => (s.to_java_bytes(), Vec::new()),
        };
        let head = Persisted {
            summary: self.summary,
            sketch,
            exact,
        };
        postcard::to_allocvec(&head).unwrap_or_default()
    }

    /// Reads [`WindowState::to_bytes`], and the form before exact values (a sketch only).
    pub fn from_bytes(bytes: &[u8]) -> Option<WindowState> {
        let p = match postcard::from_bytes::<Persisted>(bytes) {
            Ok(p) => p,
            Err(_) => {
                let old = postcard::from_bytes::<PersistedSketch>(bytes).ok()?;
                Persisted {
                    summary: old.summary,
                    sketch: old.sketch,
                    exact: Vec::new(),
                }
            }
        };
        let values = if p.sketch.is_empty() {
            if p.exact.len() as u64 != p.summary.count || p.exact.len() > EXACT_MAX {
                return None;
            }
            Values::Exact(p.exact)
        } else {
            Values::Sketch(Box::new(DDSketch::from_java_bytes(&p.sketch).ok()?))
        };
        Some(WindowState {
            summary: p.summary,
            values,
        })
    }
}

/// A window as stored: either `sketch` (DDSketch's Java encoding) or `exact` is empty.
/// postcard writes a nested struct's fields in place, so the summary's bytes are those of
/// the flat form written before.
#[derive(Serialize, serde::Deserialize)]
struct Persisted {
    summary: Summary,
    sketch: Vec<u8>,
    exact: Vec<f64>,
}

/// A window as stored before exact values: always a sketch.
#[derive(Serialize, serde::Deserialize)]
struct PersistedSketch {
    summary: Summary,
    sketch: Vec<u8>,
}

/// The published JSON of a window.
pub fn to_json(key: &WindowKey, w: &WindowState, quantiles: &[f64]) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("device".into(), key.device.as_ref().into());
    obj.insert("metric".into(), key.metric.as_ref().into());
    obj.insert("window_secs".into(), key.len_secs.into());
    obj.insert("start_ms".into(), key.start_ms.into());
    obj.insert("end_ms".into(), key.end_ms().into());
    let s = &w.summary;
    obj.insert("count".into(), s.count.into());
    obj.insert("min".into(), s.min.into());
    obj.insert("max".into(), s.max.into());
    obj.insert("mean".into(), s.mean().into());
    obj.insert("last".into(), s.last.into());
    for &q in quantiles {
        if let Some(v) = w.quantile(q) {
            obj.insert(quantile_name(q), v.into());
        }
    }
    serde_json::Value::Object(obj).to_string()
}

/// 0.5 -> "p50", 0.99 -> "p99", 0.999 -> "p99.9"
fn quantile_name(q: f64) -> String {
    let pct = format!("{:.3}", q * 100.0);
    let pct = pct.trim_end_matches('0').trim_end_matches('.');
    format!("p{pct}")
}

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
mod tests {
    use super::*;

    /// Regression: a device timestamp near `i64::MAX` overflowed the window arithmetic
    /// (a panic in the writer), and one far in the future opened a window that would
    /// stay in memory until then.
    #[test]
    fn extreme_timestamps_neither_overflow_nor_linger() {
        let mut a = Aggregator::new(&[10, 60, 3600], 600);
        let now = 1_700_000_000_000;
        for ts in [
            i64::MAX,
            i64::MIN,
            i64::MAX - 1,
            0,
            -1,
            now + 48 * 3_600_000,
        ] {
            let fold = a.fold("d", "m", ts, 1.0, now, &mut |_| None);
            assert_eq!(fold, Fold::TooLateFor(3), "ts {ts}: too far either way");
        }
        assert_eq!(a.open_windows(), 0);
        assert_eq!(
            a.fold("d", "m", now, 1.0, now, &mut |_| None),
            Fold::Applied
        );
        assert_eq!(window_start(i64::MIN, 10_000), i64::MIN);
        assert_eq!(window_start(-1, 10_000), -10_000);
        assert_eq!(window_start(19_999, 10_000), 10_000);
        let key = a.key("d", "m", 10, i64::MAX - 5);
        assert_eq!(key.end_ms(), i64::MAX);
        let _ = to_json(&key, &WindowState::default(), &[0.5]);
        // Nothing open in the far future: everything is evicted once its time has passed.
        assert_eq!(
            a.evict(now + 3_700_000 + 600_000 + 1).len(),
            0,
            "still unpublished"
        );
        let _ = a.take_publish(&[0.5]);
        assert_eq!(a.evict(now + 3_700_000 + 600_000 + 1).len(), 3);
        assert_eq!(a.open_windows(), 0);
    }

    const NOW: i64 = 1_700_000_000_000;

    fn none(_: &WindowKey) -> Option<WindowState> {
        None
    }

    #[test]
    fn ended_windows_leave_memory_and_come_back_for_late_readings() {
        let mut a = Aggregator::new(&[10], 600);
        let start = NOW - NOW.rem_euclid(10_000);
        a.fold("d", "t", start + 1, 4.0, NOW, &mut none);
        let after_end = start + 10_000 + RESIDENT_AFTER_END_MS + 1;
        assert_eq!(a.spill(after_end), 0, "unpublished and unstored: kept");
        a.take_publish(&[]);
        assert_eq!(a.spill(after_end), 0, "not stored yet: kept");
        let stored: HashMap<WindowKey, Vec<u8>> = a
            .take_persist(false)
            .into_iter()
            .filter_map(|k| a.get(&k).map(|w| (k.clone(), w.to_bytes())))
            .collect();
        assert_eq!(a.spill(after_end - 2), 0, "not ended long enough: kept");
        assert_eq!(a.spill(after_end), 1);
        assert_eq!(a.open_windows(), 0);
        // A late reading finds the stored window, not an empty one.
        let mut asked = 0;
        let mut load = |k: &WindowKey| {
            asked += 1;
            stored.get(k).and_then(|b| WindowState::from_bytes(b))
        };
        let fold = a.fold("d", "t", start + 2, 8.0, after_end, &mut load);
        assert_eq!((fold, asked), (Fold::Applied, 1));
        let w = a.get(&key(10, start)).expect("back in memory");
        assert_eq!(
            (w.summary.count, w.summary.min, w.summary.max),
            (2, 4.0, 8.0)
        );
        assert_eq!(a.take_publish(&[]).len(), 1, "and republished");
        // Past the lateness nothing is loaded.
        let mut never = |_: &WindowKey| -> Option<WindowState> { panic!("loaded") };
        a.take_persist(false);
        a.spill(start + 700_000);
        let late = a.fold("d", "t", start + 3, 1.0, start + 700_000, &mut never);
        assert_eq!(late, Fold::TooLateFor(1));
    }

    fn key(len: u32, start: i64) -> WindowKey {
        WindowKey {
            device: "d".into(),
            metric: "t".into(),
            len_secs: len,
            start_ms: start,
        }
    }

    #[test]
    fn a_window_summarises_its_readings() {
        let mut a = Aggregator::new(&[60], 600);
        let start = NOW - NOW.rem_euclid(60_000);
        for (i, v) in [3.0, 1.0, 2.0].into_iter().enumerate() {
            a.fold("d", "t", start + i as i64, v, NOW, &mut none);
        }
        let w = a.get(&key(60, start)).expect("window");
        assert_eq!(
            (
                w.summary.count,
                w.summary.min,
                w.summary.max,
                w.summary.last
            ),
            (3, 1.0, 3.0, 2.0)
        );
        assert!((w.summary.mean() - 2.0).abs() < 1e-12);
        let p50 = w.quantile(0.5).expect("p50");
        assert!((p50 - 2.0).abs() < 0.05, "{p50}");
        let published = a.take_publish(&[0.5, 0.99]);
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].0, "agg/d/t/60s");
        let json: serde_json::Value = serde_json::from_str(&published[0].1).expect("json");
        assert_eq!(json["count"], 3);
        assert!(json["p99"].is_number());
        assert!(a.take_publish(&[0.5]).is_empty(), "nothing changed since");
    }

    #[test]
    fn a_late_reading_corrects_and_republishes_its_window() {
        let mut a = Aggregator::new(&[10], 600);
        let start = NOW - NOW.rem_euclid(10_000) - 60_000; // a minute-old window
        a.fold("d", "t", start + 1, 5.0, NOW, &mut none);
        a.take_publish(&[]);
        assert_eq!(
            a.fold("d", "t", start + 2, 9.0, NOW, &mut none),
            Fold::Applied
        );
        let published = a.take_publish(&[]);
        assert_eq!(published.len(), 1);
        assert_eq!(a.get(&key(10, start)).expect("window").summary.max, 9.0);
    }

    #[test]
    fn readings_past_the_lateness_are_not_folded() {
        let mut a = Aggregator::new(&[10, 60], 60);
        assert_eq!(
            a.fold("d", "t", NOW - 3_600_000, 1.0, NOW, &mut none),
            Fold::TooLateFor(2)
        );
        assert_eq!(a.open_windows(), 0);
    }

    #[test]
    fn expired_windows_are_evicted_after_publishing() {
        let mut a = Aggregator::new(&[10], 60);
        a.fold("d", "t", NOW, 1.0, NOW, &mut none);
        assert!(a.evict(NOW + 3_600_000).is_empty(), "not yet published");
        a.take_publish(&[]);
        assert_eq!(a.evict(NOW + 3_600_000).len(), 1);
        assert_eq!(a.open_windows(), 0);
    }

    #[test]
    fn window_state_survives_serialization() {
        let mut w = WindowState::default();
        for v in [-4.0, 10.5, 3.25] {
            w.record(0, v);
        }
        let back = WindowState::from_bytes(&w.to_bytes()).expect("decodes");
        assert_eq!(
            (
                back.summary.count,
                back.summary.min,
                back.summary.max,
                back.summary.sum
            ),
            (3, -4.0, 10.5, 9.75)
        );
        assert_eq!(back.quantile(0.5), w.quantile(0.5));
    }

    #[test]
    fn small_windows_report_nearest_rank_quantiles() {
        let mut w = WindowState::default();
        for v in [20.0, 22.5, 27.5] {
            w.record(0, v);
        }
        assert_eq!(w.quantile(0.99), Some(27.5));
        assert_eq!(w.quantile(0.0), Some(20.0));
        let p50 = w.quantile(0.5).expect("p50");
        assert!((p50 - 22.5).abs() < 22.5 * 0.02, "{p50}");
        let mut big = WindowState::default();
        for i in 1..=1000 {
            big.record(0, f64::from(i));
        }
        let p99 = big.quantile(0.99).expect("p99");
        assert!((p99 - 990.0).abs() <= 990.0 * 0.02, "{p99}");
    }

    #[test]
    fn small_windows_are_exact_and_large_ones_sketched() {
        let mut w = WindowState::default();
        for i in 1..=EXACT_MAX {
            w.record(0, i as f64);
        }
        assert!(matches!(w.values, Values::Exact(_)));
        // Exact nearest rank: p95 of 1..=64 is the 61st value.
        assert_eq!(w.quantile(0.95), Some(61.0));
        let exact = WindowState::from_bytes(&w.to_bytes()).expect("decodes");
        assert!(matches!(exact.values, Values::Exact(_)));
        assert_eq!(exact.quantile(0.95), Some(61.0));
        for i in EXACT_MAX + 1..=1000 {
            w.record(0, i as f64);
        }
        assert!(matches!(w.values, Values::Sketch(_)));
        assert_eq!(w.summary.count, 1000);
        let p50 = w.quantile(0.5).expect("p50");
        assert!((p50 - 500.0).abs() <= 500.0 * 0.02, "{p50}");
        let sketched = WindowState::from_bytes(&w.to_bytes()).expect("decodes");
        assert!(matches!(sketched.values, Values::Sketch(_)));
        assert_eq!(sketched.quantile(0.5), w.quantile(0.5));
    }

    #[test]
    fn widely_spread_values_keep_their_upper_quantiles() {
        let mut w = WindowState::default();
        // 0.1 to 100: three orders of magnitude, more than the sketch's bins cover.
        for i in 1..=1000 {
            w.record(0, f64::from(i) / 10.0);
        }
        for (q, want) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)] {
            let got = w.quantile(q).expect("quantile");
            assert!((got - want).abs() <= want * 0.02, "q{q}: {got}");
        }
    }

    #[test]
    fn windows_stored_before_exact_values_still_load() {
        let mut sketch = DDSketch::new(SketchConfig::defaults());
        for v in [1.0, 2.0, 3.0] {
            sketch.add(v);
        }
        // The layout written before exact values, field by field.
        #[derive(Serialize)]
        struct Flat {
            count: u64,
            min: f64,
            max: f64,
            sum: f64,
            last: f64,
            last_ts_ms: i64,
            sketch: Vec<u8>,
        }
        let old = postcard::to_allocvec(&Flat {
            count: 3,
            min: 1.0,
            max: 3.0,
            sum: 6.0,
            last: 3.0,
            last_ts_ms: 7,
            sketch: sketch.to_java_bytes(),
        })
        .expect("encode");
        let w = WindowState::from_bytes(&old).expect("decodes");
        assert_eq!(
            (
                w.summary.count,
                w.summary.min,
                w.summary.max,
                w.summary.last_ts_ms
            ),
            (3, 1.0, 3.0, 7)
        );
        assert_eq!(w.quantile(1.0), Some(3.0));
        // A stored window whose exact values disagree with its count is refused.
        let mut bad = WindowState::default();
        bad.record(0, 1.0);
        bad.summary.count = 2;
        assert!(WindowState::from_bytes(&bad.to_bytes()).is_none());
    }

    #[test]
    fn series_share_one_copy_of_their_names() {
        let mut a = Aggregator::new(&[10, 60, 3600], 60);
        a.fold("dev", "temp", NOW, 1.0, NOW, &mut none);
        a.fold("dev", "temp", NOW + 1, 2.0, NOW, &mut none);
        let keys: Vec<&WindowKey> = a.open.keys().collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.iter().all(|k| Arc::ptr_eq(&k.device, &keys[0].device)));
        assert_eq!(a.names.len(), 2);
        a.take_publish(&[]);
        assert_eq!(a.evict(NOW + 10_000_000).len(), 3);
        a.evict(NOW + 10_000_000);
        assert!(a.names.is_empty(), "names of evicted windows are let go");
    }

    #[test]
    fn quantile_names_read_naturally() {
        assert_eq!(quantile_name(0.5), "p50");
        assert_eq!(quantile_name(0.99), "p99");
        assert_eq!(quantile_name(0.999), "p99.9");
    }
}
