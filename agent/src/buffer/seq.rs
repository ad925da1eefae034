//! Per-device bookkeeping that makes the end-to-end ack honest: which sequence numbers of
//! each boot are durable (to drop re-sent duplicates and to compute the contiguous
//! watermark), and when the boot started (to re-base timestamps from devices whose clock
//! was never set).

use serde::{Deserialize, Serialize};

/// Separate ranges kept above the watermark at most. A reading that would open one more
/// gap is refused for now ([`Insert::TooManyGaps`]): the device keeps it and sends it
/// again, by which time the gaps below have usually filled. The firmware numbers readings
/// without holes, so gaps are readings in flight, never readings lost for good; the
/// watermark never moves over one.
pub const MAX_RANGES: usize = 1024;
/// How far above the highest sequence number already stored for a boot a new one may be.
/// Farther is refused ([`Insert::TooFarAhead`]): no device gets 16 million readings ahead
/// of this agent, but a forged publish in `auth.mode = "open"` could claim any number.
pub const MAX_AHEAD: u32 = 1 << 24;
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
    /// Not taken: it would open more than [`MAX_RANGES`] gaps. Never acknowledged.
    TooManyGaps,
    /// Not taken: more than [`MAX_AHEAD`] above the highest stored. Never acknowledged.
    TooFarAhead,
}

impl SeqTracker {
    pub fn watermark(&self) -> u32 {
        self.watermark
    }

    pub fn contains(&self, seq: u32) -> bool {
        if seq <= self.watermark {
            return true;
        }
        let i = self.above.partition_point(|&(_, b)| b < seq);
        self.above.get(i).is_some_and(|&(a, _)| a <= seq)
    }

    /// The highest sequence number stored.
    pub fn highest(&self) -> u32 {
        self.above.last().map_or(self.watermark, |&(_, b)| b)
    }

    pub fn insert(&mut self, seq: u32) -> Insert {
        if self.contains(seq) {
            return Insert::Duplicate;
        }
        let highest = self.highest();
        if seq > highest && seq - highest > MAX_AHEAD {
            return Insert::TooFarAhead;
        }
        let i = self.above.partition_point(|&(_, b)| b < seq);
        let joins_left = if i == 0 {
            self.watermark.checked_add(1) == Some(seq)
        } else {
            self.above[i - 1].1.checked_add(1) == Some(seq)
        };
        let joins_right = self
            .above
            .get(i)
            .is_some_and(|&(a, _)| seq.checked_add(1) == Some(a));
        if !joins_left && !joins_right && self.above.len() >= MAX_RANGES {
            return Insert::TooManyGaps;
        }
        match (joins_left, joins_right) {
            (true, true) if i == 0 => {
                self.watermark = self.above[0].1;
                self.above.remove(0);
            }
            (true, true) => {
                self.above[i - 1].1 = self.above[i].1;
                self.above.remove(i);
            }
            (true, false) if i == 0 => self.watermark = seq,
            (true, false) => self.above[i - 1].1 = seq,
            (false, true) => self.above[i].0 = seq,
            (false, false) => self.above.insert(i, (seq, seq)),
        }
        Insert::New
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

    /// Regression: with more than 1,024 gaps the tracker used to give up the oldest gap
    /// and move the watermark over readings that never arrived, acking them.
    #[test]
    fn the_watermark_never_covers_a_reading_that_never_arrived() {
        let mut t = SeqTracker::default();
        for i in 0..MAX_RANGES as u32 {
            assert_eq!(t.insert(10 + 2 * i), Insert::New);
        }
        assert_eq!(t.watermark(), 0);
        // One more gap would need more memory than a device is given: refused for now
        // (the device re-sends it), and the watermark stays where the data is.
        assert_ne!(t.insert(100_000), Insert::New);
        assert_eq!(t.watermark(), 0, "1..=9 never arrived");
        assert!(!t.contains(100_000));
        // A reading that fills a gap is always taken, and the watermark follows the data.
        for seq in 1..=9 {
            assert_eq!(t.insert(seq), Insert::New);
        }
        assert_eq!(t.watermark(), 10);
        assert_eq!(t.insert(100_000), Insert::New, "room again");
    }

    /// Regression: one publish of a huge sequence number was believed.
    #[test]
    fn an_absurd_jump_is_refused_and_real_readings_go_on() {
        let mut t = SeqTracker::default();
        for seq in 1..=100 {
            t.insert(seq);
        }
        assert_ne!(t.insert(u32::MAX), Insert::New);
        assert_ne!(t.insert(100 + MAX_AHEAD + 1), Insert::New);
        assert!(!t.contains(u32::MAX));
        assert_eq!(t.insert(100 + MAX_AHEAD), Insert::New, "within reach");
        assert_eq!(t.insert(101), Insert::New);
        assert_eq!(t.watermark(), 101);
    }

    #[test]
    fn the_top_of_the_sequence_space_does_not_overflow() {
        let mut t = SeqTracker {
            watermark: u32::MAX - 2,
            above: Vec::new(),
        };
        assert_eq!(t.insert(u32::MAX), Insert::New);
        assert_eq!(t.insert(u32::MAX - 1), Insert::New);
        assert_eq!(t.watermark(), u32::MAX);
        assert_eq!(t.insert(u32::MAX), Insert::Duplicate);
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
