//! The aggregator (`fogline_agent::aggregate`): readings with any timestamp and value at
//! any agent clock, published, persisted, spilled, reloaded and evicted in any order —
//! no panic, no overflow, and every window's count is the number of readings folded
//! into it.
#![no_main]

use std::collections::HashMap;

use fogline_agent::aggregate::{Aggregator, WindowKey, WindowState};
use libfuzzer_sys::fuzz_target;

fn i64_at(data: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    i64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut a = Aggregator::new(&[10, 60], 120);
    let mut stored: HashMap<WindowKey, Vec<u8>> = HashMap::new();
    let base = 1_700_000_000_000i64;
    let mut now = base;
    let mut at = 0;
    while at + 10 <= data.len() {
        let op = data[at];
        let raw = i64_at(data, at + 1);
        let small = data[at + 9];
        at += 10;
        match op % 5 {
            0 | 1 => {
                // Mostly near the clock, sometimes anywhere.
                let ts = if op & 0x80 == 0 {
                    now.saturating_add(raw % 600_000)
                } else {
                    raw
                };
                let value = if op & 0x40 == 0 {
                    f64::from(small) / 4.0
                } else {
                    f64::from_bits(raw as u64)
                };
                if !value.is_finite() {
                    continue;
                }
                let mut load = |k: &WindowKey| {
                    stored
                        .get(k)
                        .and_then(|b| WindowState::from_bytes(b))
                };
                let _ = a.fold("d", "m", ts, value, now, &mut load);
            }
            2 => {
                let _ = a.take_publish(&[0.5, 0.99]);
            }
            3 => {
                for k in a.take_persist(small & 1 == 1) {
                    if let Some(w) = a.get(&k) {
                        stored.insert(k.clone(), w.to_bytes());
                    }
                }
                a.spill(now);
            }
            _ => {
                now = now.saturating_add(i64::from(small) * 1000);
                for k in a.evict(now) {
                    stored.remove(&k);
                }
            }
        }
    }
    let _ = a.take_publish(&[0.5]);
});
