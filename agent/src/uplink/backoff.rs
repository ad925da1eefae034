//! Reconnect delays: exponential backoff with "equal jitter" — the n-th consecutive failure
//! waits a random time in `[cap/2, cap]` where `cap = min(max, min · 2ⁿ)`. The jitter keeps
//! a fleet of agents from reconnecting in lockstep after a gateway restart, while the
//! lower half bound keeps every agent from hammering it.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let half = cap / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A connection worked: start again from `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn delays_double_up_to_the_maximum_and_reset() {
        let mut b = Backoff::new(MIN, MAX);
        let caps: Vec<u128> = (0..10)
            .map(|_| {
                let cap = b.cap();
                b.next_delay(1.0);
                cap.as_millis()
            })
            .collect();
        assert_eq!(
            caps,
            vec![100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn every_delay_lies_in_the_upper_half_of_its_cap(
            units in proptest::collection::vec(0.0f64..1.0, 1..50)
        ) {
            let mut b = Backoff::new(MIN, MAX);
            for u in units {
                let cap = b.cap();
                let d = b.next_delay(u);
                prop_assert!(d >= cap / 2 && d <= cap, "{d:?} outside [{:?}, {cap:?}]", cap / 2);
                prop_assert!(d <= MAX);
            }
        }

        #[test]
        fn jitter_spreads_a_fleet(seed in any::<u64>()) {
            // 100 agents failing at the same moment do not all retry at the same moment.
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut delays: Vec<Duration> = (0..100)
                .map(|_| {
                    let mut b = Backoff::new(MIN, MAX);
                    b.next_delay(rng.f64());
                    b.next_delay(rng.f64())
                })
                .collect();
            delays.sort();
            delays.dedup();
            prop_assert!(delays.len() > 50);
        }
    }
}
