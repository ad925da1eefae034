//! The fault lab: power cuts on a filesystem that really loses unsynced writes
//! ([`crate::powercut`]), real network partitions in namespaces ([`crate::netlab`]), and
//! a long soak mixing both. The trials live here so that the end-to-end tests
//! (`tests/tests/faultlab.rs`, a few of each) and the `faultlab` program (hundreds, and
//! the soak) run the same code.

pub mod partitions;
pub mod powercut_trials;
pub mod soak;

use std::collections::HashMap;
use std::io::Write;

use crate::ExportedReading;

/// For a test that needs root (namespaces, FUSE mounts): `true` when it can run.
/// Otherwise under `CI=true` it panics (CI runs as root: a test that cannot run there
/// is a broken CI, not a skip); elsewhere it prints a `SKIPPED` line on stderr and
/// appends it to `target/faultlab-skipped.txt`, where `tests/run.sh` shows it again at
/// the end, and returns `false`.
pub fn can_run(test: &str, available: anyhow::Result<()>) -> bool {
    let Err(why) = available else {
        return true;
    };
    let needs = "needs root (FUSE mounts, network namespaces, nftables)";
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test} cannot run: {needs}: {why:#} — under CI=true every fault-lab test must run");
    }
    let line = format!("SKIPPED: {test}: {needs}: {why:#}");
    eprintln!("{line}");
    if let Some(path) = skip_file() {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    false
}

/// `target/faultlab-skipped.txt` next to the running test binary's profile directory.
fn skip_file() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let target = exe.ancestors().find(|d| d.ends_with("target"))?;
    Some(target.join("faultlab-skipped.txt"))
}

/// Readings promised (acknowledged) and what the store shows of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Readings acknowledged: the sum over devices of the ack watermark.
    pub acked: u64,
    /// Acknowledged readings missing from the store.
    pub lost: u64,
    /// Extra copies of readings in the store.
    pub duplicated: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.acked += o.acked;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
    }
}

/// Counts, for every `(device, boot, upto)`, the readings `1..=upto` missing from
/// `readings`, and every extra copy of any `(device, boot, seq)` in `readings`.
pub fn tally(readings: &[ExportedReading], promised: &[(String, u32, u32)]) -> Tally {
    let mut seen: HashMap<(&str, u32, u32), u64> = HashMap::new();
    for r in readings {
        if let Some(seq) = r.seq {
            *seen.entry((r.device.as_str(), r.boot, seq)).or_insert(0) += 1;
        }
    }
    let mut t = Tally {
        duplicated: seen.values().map(|n| n.saturating_sub(1)).sum(),
        ..Tally::default()
    };
    for (device, boot, upto) in promised {
        t.acked += u64::from(*upto);
        t.lost += (1..=*upto)
            .filter(|seq| !seen.contains_key(&(device.as_str(), *boot, *seq)))
            .count() as u64;
    }
    t
}

/// The gateway's readings as the agent's export type, for [`tally`].
pub fn as_exported(stored: &[crate::GatewayReading]) -> Vec<ExportedReading> {
    stored
        .iter()
        .map(|r| ExportedReading {
            offset: r.offset,
            device: r.device.clone(),
            metric: r.metric.clone(),
            boot: r.boot,
            seq: r.seq,
            value: r.value,
            ts: r.ts,
        })
        .collect()
}

/// Offsets of one origin in a store: are they `0..next` exactly once each?
/// Returns `(next, holes, repeats)`.
pub fn offsets_of(stored: &[crate::GatewayReading], origin_prefix: &str) -> (u64, u64, u64) {
    let mut offsets: Vec<u64> = stored
        .iter()
        .filter(|r| r.origin.starts_with(origin_prefix))
        .map(|r| r.offset)
        .collect();
    offsets.sort_unstable();
    let repeats = offsets.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    offsets.dedup();
    let next = offsets.last().map_or(0, |l| l + 1);
    let holes = next - offsets.len() as u64;
    (next, holes, repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(device: &str, seq: u32) -> ExportedReading {
        ExportedReading {
            offset: 0,
            device: device.into(),
            metric: "m".into(),
            boot: 1,
            seq: Some(seq),
            value: 0.0,
            ts: 0,
        }
    }

    #[test]
    fn tally_counts_missing_and_repeated_readings() {
        let readings = vec![r("d", 1), r("d", 2), r("d", 2), r("d", 4), r("e", 1)];
        let t = tally(&readings, &[("d".into(), 1, 4), ("e".into(), 1, 1)]);
        assert_eq!(
            t,
            Tally {
                acked: 5,
                lost: 1,
                duplicated: 1
            }
        );
    }
}
