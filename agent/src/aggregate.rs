//! Tumbling-window aggregates per (device, metric): count, min, max, mean, last and
//! quantiles from a DDSketch (relative error 1 %).
//!
//! Pure: the caller feeds committed records and the current time and takes what must be
//! published or persisted. Windows stay open for late readings until `end + lateness`;
//! a late reading corrects its window, which is then republished.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

/// Identifies one window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub device: String,
    pub metric: String,
    pub len_secs: u32,
    pub start_ms: i64,
}

impl WindowKey {
    pub fn end_ms(&self) -> i64 {
        self.start_ms + i64::from(self.len_secs) * 1000
    }

    /// `agg/<device>/<metric>/<len>s`
    pub fn topic(&self) -> String {
        format!("agg/{}/{}/{}s", self.device, self.metric, self.len_secs)
    }
}

/// Running summary of one window.
#[derive(Clone)]
pub struct WindowState {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    pub last_ts_ms: i64,
    sketch: DDSketch,
}

impl Default for WindowState {
    fn default() -> Self {
        WindowState {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            last: 0.0,
            last_ts_ms: i64::MIN,
            sketch: DDSketch::new(SketchConfig::defaults()),
        }
    }
}

impl WindowState {
    pub fn record(&mut self, ts_ms: i64, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        if ts_ms >= self.last_ts_ms {
            self.last = value;
            self.last_ts_ms = ts_ms;
        }
        self.sketch.add(value);
    }

    #[allow(clippy::cast_precision_loss)]
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// The nearest-rank quantile (the smallest value with at least `q` of the readings at
    /// or below it), from the sketch, clamped to the exact min and max. DDSketch itself
    /// rounds the rank down, which for small windows reports p99 of {20, 22.5, 27.5} as
    /// 22.5; nearest-rank says 27.5, which is what a dashboard reader expects.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let n = self.count as f64;
        let rank = ((q.clamp(0.0, 1.0) * n).ceil() - 1.0).max(0.0);
        let adjusted = if self.count > 1 {
            rank / (n - 1.0)
        } else {
            0.0
        };
        let v = self
            .sketch
            .quantile(adjusted.clamp(0.0, 1.0))
            .ok()
            .flatten()?;
        Some(v.clamp(self.min, self.max))
    }

    /// Compact persistent form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let head = Persisted {
            count: self.count,
            min: self.min,
            max: self.max,
            sum: self.sum,
            last: self.last,
            last_ts_ms: self.last_ts_ms,
            sketch: self.sketch.to_java_bytes(),
        };
        postcard::to_allocvec(&head).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<WindowState> {
        let p: Persisted = postcard::from_bytes(bytes).ok()?;
        let sketch = DDSketch::from_java_bytes(&p.sketch).ok()?;
        Some(WindowState {
            count: p.count,
            min: p.min,
            max: p.max,
            sum: p.sum,
            last: p.last,
            last_ts_ms: p.last_ts_ms,
            sketch,
        })
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Persisted {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
    last_ts_ms: i64,
    sketch: Vec<u8>,
}

/// The published JSON of a window.
pub fn to_json(key: &WindowKey, w: &WindowState, quantiles: &[f64]) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("device".into(), key.device.clone().into());
    obj.insert("metric".into(), key.metric.clone().into());
    obj.insert("window_secs".into(), key.len_secs.into());
    obj.insert("start_ms".into(), key.start_ms.into());
    obj.insert("end_ms".into(), key.end_ms().into());
    obj.insert("count".into(), w.count.into());
    obj.insert("min".into(), w.min.into());
    obj.insert("max".into(), w.max.into());
    obj.insert("mean".into(), w.mean().into());
    obj.insert("last".into(), w.last.into());
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

/// All open windows.
pub struct Aggregator {
    windows_secs: Vec<u32>,
    lateness_ms: i64,
    open: HashMap<WindowKey, WindowState>,
    to_publish: HashSet<WindowKey>,
    to_persist: HashSet<WindowKey>,
    newest_ms: i64,
}

impl Aggregator {
    pub fn new(windows_secs: &[u32], lateness_secs: u32) -> Self {
        Aggregator {
            windows_secs: windows_secs.to_vec(),
            lateness_ms: i64::from(lateness_secs) * 1000,
            open: HashMap::new(),
            to_publish: HashSet::new(),
            to_persist: HashSet::new(),
            newest_ms: i64::MIN,
        }
    }

    /// Restores a persisted window (at start-up).
    pub fn restore(&mut self, key: WindowKey, state: WindowState) {
        self.open.insert(key, state);
    }

    /// Folds one committed reading into each of its windows. `now_ms` is the agent's
    /// clock; a window is closed for good once `now_ms > end + lateness`.
    pub fn fold(
        &mut self,
        device: &str,
        metric: &str,
        ts_ms: i64,
        value: f64,
        now_ms: i64,
    ) -> Fold {
        self.newest_ms = self.newest_ms.max(now_ms);
        let mut late = 0;
        for i in 0..self.windows_secs.len() {
            let len_secs = self.windows_secs[i];
            let len_ms = i64::from(len_secs) * 1000;
            let key = WindowKey {
                device: device.to_owned(),
                metric: metric.to_owned(),
                len_secs,
                start_ms: ts_ms.div_euclid(len_ms) * len_ms,
            };
            if key.end_ms().saturating_add(self.lateness_ms) < now_ms
                && !self.open.contains_key(&key)
            {
                late += 1;
                continue;
            }
            self.open
                .entry(key.clone())
                .or_default()
                .record(ts_ms, value);
            self.to_publish.insert(key.clone());
            self.to_persist.insert(key);
        }
        if late == 0 {
            Fold::Applied
        } else {
            Fold::TooLateFor(late)
        }
    }

    /// Windows changed since the last call, with their JSON.
    pub fn take_publish(&mut self, quantiles: &[f64]) -> Vec<(String, String)> {
        let mut keys: Vec<WindowKey> = self.to_publish.drain().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| {
                self.open
                    .get(&k)
                    .map(|w| (k.topic(), to_json(&k, w, quantiles)))
            })
            .collect()
    }

    /// Windows changed since the last checkpoint, serialized.
    pub fn take_persist(&mut self) -> Vec<(WindowKey, Vec<u8>)> {
        self.to_persist
            .drain()
            .filter_map(|k| self.open.get(&k).map(|w| (k.clone(), w.to_bytes())))
            .collect()
    }

    /// Every open window, serialized (after a failed checkpoint lost track of changes).
    pub fn persist_all(&mut self) -> Vec<(WindowKey, Vec<u8>)> {
        self.to_persist.clear();
        self.open
            .iter()
            .map(|(k, w)| (k.clone(), w.to_bytes()))
            .collect()
    }

    /// Forgets windows past their lateness (after they were published), returning their
    /// keys so the caller can delete them from storage.
    pub fn evict(&mut self, now_ms: i64) -> Vec<WindowKey> {
        let lateness = self.lateness_ms;
        let expired: Vec<WindowKey> = self
            .open
            .keys()
            .filter(|k| {
                k.end_ms().saturating_add(lateness) < now_ms && !self.to_publish.contains(*k)
            })
            .cloned()
            .collect();
        for k in &expired {
            self.open.remove(k);
            self.to_persist.remove(k);
        }
        expired
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    pub fn get(&self, key: &WindowKey) -> Option<&WindowState> {
        self.open.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

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
            a.fold("d", "t", start + i as i64, v, NOW);
        }
        let w = a.get(&key(60, start)).expect("window");
        assert_eq!((w.count, w.min, w.max, w.last), (3, 1.0, 3.0, 2.0));
        assert!((w.mean() - 2.0).abs() < 1e-12);
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
        a.fold("d", "t", start + 1, 5.0, NOW);
        a.take_publish(&[]);
        assert_eq!(a.fold("d", "t", start + 2, 9.0, NOW), Fold::Applied);
        let published = a.take_publish(&[]);
        assert_eq!(published.len(), 1);
        assert_eq!(a.get(&key(10, start)).expect("window").max, 9.0);
    }

    #[test]
    fn readings_past_the_lateness_are_not_folded() {
        let mut a = Aggregator::new(&[10, 60], 60);
        assert_eq!(
            a.fold("d", "t", NOW - 3_600_000, 1.0, NOW),
            Fold::TooLateFor(2)
        );
        assert_eq!(a.open_windows(), 0);
    }

    #[test]
    fn expired_windows_are_evicted_after_publishing() {
        let mut a = Aggregator::new(&[10], 60);
        a.fold("d", "t", NOW, 1.0, NOW);
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
            (back.count, back.min, back.max, back.sum),
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
    fn quantile_names_read_naturally() {
        assert_eq!(quantile_name(0.5), "p50");
        assert_eq!(quantile_name(0.99), "p99");
        assert_eq!(quantile_name(0.999), "p99.9");
    }
}
