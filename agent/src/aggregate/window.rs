//! One window: its summary ([`Summary`], also what downsampling keeps), the values behind
//! its quantiles (exact while few, then a DDSketch), its stored form and its JSON.

use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use super::WindowKey;

/// A window keeps its values exactly up to this many readings, then moves them into a
/// sketch. A DDSketch allocates its bins 128 at a time (1 KiB or more), while most windows
/// of a slow sensor hold a handful of readings: a thousand sensors reporting every few
/// seconds would otherwise spend megabytes on nearly empty sketches.
pub(crate) const EXACT_MAX: usize = 64;

/// The values behind a window's quantiles.
#[derive(Clone)]
pub(crate) enum Values {
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
    pub(crate) values: Values,
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
pub(crate) fn quantile_name(q: f64) -> String {
    let pct = format!("{:.3}", q * 100.0);
    let pct = pct.trim_end_matches('0').trim_end_matches('.');
    format!("p{pct}")
}
