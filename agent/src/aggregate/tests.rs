use super::window::{quantile_name, Values, EXACT_MAX};
use super::*;
use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

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
