//! Per-device bookkeeping that makes the end-to-end ack honest: which sequence numbers of
//! each boot are durable (to drop re-sent duplicates and to compute the contiguous
//! watermark), and when the boot started (to re-base timestamps from devices whose clock
//! was never set).

use serde::{Deserialize, Serialize};

/// Gaps above the watermark kept at most; past that the oldest gap is given up (counted),
/// so a device that lost readings for good cannot pin memory or the watermark forever.
pub const MAX_RANGES: usize = 1024;
/// Boots remembered per device.
pub const MAX_BOOTS: usize = 4;

/// Which sequence numbers of one boot are stored.
///
/// Every `seq <= watermark` is stored; above it, `above` holds sorted, disjoint,
/// non-adjacent inclusive ranges, all starting above `watermark + 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqTracker {
    watermark: u32,
    above: Vec<(u32, u32)>,
}

/// What [`SeqTracker::insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// New, and the tracker had to give up this many never-seen sequence numbers.
    NewAfterSkipping(u64),
}

impl SeqTracker {
    pub fn watermark(&self) -> u32 {
        self.watermark
    }

    pub fn contains(&self, seq: u32) -> bool {
        seq <= self.watermark || self.above.iter().any(|&(a, b)| a <= seq && seq <= b)
    }

    pub fn insert(&mut self, seq: u32) -> Insert {
        if self.contains(seq) {
            return Insert::Duplicate;
        }
        let i = self.above.partition_point(|&(_, b)| b < seq);
        self.above.insert(i, (seq, seq));
        // Merge with the right neighbour, then the left one.
        if i + 1 < self.above.len() && self.above[i + 1].0 == seq + 1 {
            self.above[i].1 = self.above[i + 1].1;
            self.above.remove(i + 1);
        }
        if i > 0 && self.above[i - 1].1 + 1 == seq {
            self.above[i - 1].1 = self.above[i].1;
            self.above.remove(i);
        }
        let mut skipped = 0u64;
        if self.above.len() > MAX_RANGES {
            let (a, _) = self.above[0];
            skipped = u64::from(a - self.watermark - 1);
            self.watermark = a - 1;
        }
        if let Some(&(a, b)) = self.above.first() {
            if a == self.watermark + 1 {
                self.watermark = b;
                self.above.remove(0);
            }
        }
        if skipped > 0 {
            Insert::NewAfterSkipping(skipped)
        } else {
            Insert::New
        }
    }
}

/// One boot of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    pub boot: u32,
    pub seqs: SeqTracker,
    /// Best estimate of the boot's start in Unix ms: the smallest (arrival - uptime) seen.
    pub epoch_ms: Option<i64>,
    /// Agent time the boot was last heard from; picks which boots to forget.
    pub last_seen_ms: i64,
}

/// Everything remembered about one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub boots: Vec<BootState>,
}

impl DeviceState {
    /// The state of `boot`, created if new; the least recently heard boot is forgotten
    /// beyond [`MAX_BOOTS`].
    pub fn boot_mut(&mut self, boot: u32, now_ms: i64) -> &mut BootState {
        let i = match self.boots.iter().position(|b| b.boot == boot) {
            Some(i) => i,
            None => {
                if self.boots.len() >= MAX_BOOTS {
                    if let Some(oldest) = self
                        .boots
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, b)| b.last_seen_ms)
                        .map(|(i, _)| i)
                    {
                        self.boots.remove(oldest);
                    }
                }
                self.boots.push(BootState {
                    boot,
                    seqs: SeqTracker::default(),
                    epoch_ms: None,
                    last_seen_ms: now_ms,
                });
                self.boots.len() - 1
            }
        };
        let state = &mut self.boots[i];
        state.last_seen_ms = state.last_seen_ms.max(now_ms);
        state
    }

    pub fn boot(&self, boot: u32) -> Option<&BootState> {
        self.boots.iter().find(|b| b.boot == boot)
    }
}

impl BootState {
    /// Unix ms for a reading taken `uptime_ms` after boot and received at `received_ms`.
    /// Network and queueing delay only make (arrival - uptime) later than the true boot
    /// time, so the minimum over all readings is the best estimate.
    pub fn rebase(&mut self, uptime_ms: u64, received_ms: i64) -> i64 {
        let up = i64::try_from(uptime_ms).unwrap_or(i64::MAX);
        let candidate = received_ms.saturating_sub(up);
        let epoch = self.epoch_ms.map_or(candidate, |e| e.min(candidate));
        self.epoch_ms = Some(epoch);
        epoch.saturating_add(up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_watermark_covers_only_a_contiguous_prefix() {
        let mut t = SeqTracker::default();
        assert_eq!(t.insert(2), Insert::New);
        assert_eq!(t.watermark(), 0, "1 is missing");
        assert_eq!(t.insert(1), Insert::New);
        assert_eq!(t.watermark(), 2);
        assert_eq!(t.insert(2), Insert::Duplicate);
        assert_eq!(t.insert(5), Insert::New);
        assert_eq!(t.insert(4), Insert::New);
        assert_eq!(t.watermark(), 2);
        assert_eq!(t.insert(3), Insert::New);
        assert_eq!(t.watermark(), 5);
    }

    #[test]
    fn too_many_gaps_give_up_the_oldest_and_say_so() {
        let mut t = SeqTracker::default();
        for i in 0..MAX_RANGES as u32 {
            assert_eq!(t.insert(10 + 2 * i), Insert::New);
        }
        assert_eq!(t.watermark(), 0);
        // One more gap: the oldest (1..=9) is given up.
        assert_eq!(t.insert(100_000), Insert::NewAfterSkipping(9));
        assert_eq!(t.watermark(), 10);
    }

    #[test]
    fn rebasing_takes_the_earliest_boot_estimate() {
        let mut d = DeviceState::default();
        let b = d.boot_mut(1, 0);
        assert_eq!(b.rebase(1_000, 10_500), 10_500);
        // A reading that waited in a queue for 2 s does not move the epoch later...
        assert_eq!(b.rebase(2_000, 13_500), 11_500);
        // ...a faster one moves it earlier.
        assert_eq!(b.rebase(3_000, 12_100), 12_100);
        assert_eq!(b.epoch_ms, Some(9_100));
    }

    #[test]
    fn old_boots_are_forgotten_least_recent_first() {
        let mut d = DeviceState::default();
        for boot in 0..(MAX_BOOTS as u32 + 2) {
            d.boot_mut(boot, i64::from(boot));
        }
        assert_eq!(d.boots.len(), MAX_BOOTS);
        assert!(d.boot(0).is_none() && d.boot(1).is_none());
        assert!(d.boot(MAX_BOOTS as u32 + 1).is_some());
    }

    proptest! {
        #[test]
        fn tracker_matches_a_set_model(seqs in proptest::collection::vec(1u32..300, 0..400)) {
            let mut t = SeqTracker::default();
            let mut model = BTreeSet::new();
            for s in seqs {
                let fresh = model.insert(s);
                prop_assert_eq!(t.insert(s) == Insert::New, fresh);
                let mut w = 0;
                while model.contains(&(w + 1)) { w += 1; }
                prop_assert_eq!(t.watermark(), w);
                for (a, b) in &t.above {
                    prop_assert!(a <= b && *a > t.watermark() + 1);
                }
            }
            for s in 1..300 {
                prop_assert_eq!(t.contains(s), model.contains(&s));
            }
        }
    }
}
