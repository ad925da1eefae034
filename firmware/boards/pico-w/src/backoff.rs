//! Reconnect delays: exponential with jitter, reset once a connection has proved stable.
//!
//! Sans-io: the caller reports connects and disconnects with the time and passes random
//! bits; nothing here sleeps. A connection that the agent accepts and drops at once (a bad
//! password, a full agent) must not reset the delay, or a fleet would hammer the agent at
//! the first delay forever; so only a connection that lasted [`Backoff::stable_ms`] does.

/// Reconnect delay state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first_ms: u64,
    max_ms: u64,
    stable_ms: u64,
    /// Failed attempts since the last stable connection.
    failures: u32,
    connected_at: Option<u64>,
}

impl Backoff {
    /// Delays start at `first_ms`, double per failure up to `max_ms`; a connection that
    /// stays up `stable_ms` resets them.
    pub const fn new(first_ms: u64, max_ms: u64, stable_ms: u64) -> Backoff {
        Backoff {
            first_ms,
            max_ms,
            stable_ms,
            failures: 0,
            connected_at: None,
        }
    }

    /// How long a connection must last to count as stable.
    pub fn stable_ms(&self) -> u64 {
        self.stable_ms
    }

    /// Failures since the last stable connection.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection was established at `now_ms`.
    pub fn on_connected(&mut self, now_ms: u64) {
        self.connected_at = Some(now_ms);
    }

    /// The attempt failed or the connection ended at `now_ms`: returns how long to wait
    /// before the next attempt. `random` spreads devices that lost the agent together.
    pub fn on_failure(&mut self, now_ms: u64, random: u32) -> u64 {
        if let Some(at) = self.connected_at.take() {
            if now_ms.saturating_sub(at) >= self.stable_ms {
                self.failures = 0;
            }
        }
        let ceiling = self
            .first_ms
            .saturating_mul(1u64 << self.failures.min(32))
            .min(self.max_ms);
        self.failures = self.failures.saturating_add(1);
        // "Equal jitter": half the ceiling for sure, the other half random.
        let half = ceiling / 2;
        half + u64::from(random) % (ceiling - half + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling_with_bounded_jitter() {
        // (failure number, smallest possible, largest possible) for first 1 s, max 60 s.
        let table = [
            (1, 500, 1_000),
            (2, 1_000, 2_000),
            (3, 2_000, 4_000),
            (4, 4_000, 8_000),
            (6, 16_000, 32_000),
            (7, 30_000, 60_000),
            (8, 30_000, 60_000),
            (40, 30_000, 60_000),
        ];
        for (n, low, high) in table {
            let delay_after = |random: u32| {
                let mut b = Backoff::new(1_000, 60_000, 30_000);
                (0..n).map(|_| b.on_failure(0, random)).last().unwrap_or(0)
            };
            assert_eq!(delay_after(0), low, "failure {n}, smallest jitter");
            let ceiling_random = u32::try_from(high - low).unwrap_or(u32::MAX);
            assert_eq!(
                delay_after(ceiling_random),
                high,
                "failure {n}, largest jitter"
            );
            let any = delay_after(0x9E37_79B9);
            assert!((low..=high).contains(&any), "failure {n}: {any}");
        }
    }

    #[test]
    fn jitter_covers_the_upper_half_exactly() {
        let mut seen_low = u64::MAX;
        let mut seen_high = 0;
        for random in 0..=1_000u32 {
            let mut b = Backoff::new(1_000, 60_000, 30_000);
            let d = b.on_failure(0, random);
            seen_low = seen_low.min(d);
            seen_high = seen_high.max(d);
        }
        assert_eq!((seen_low, seen_high), (500, 1_000));
    }

    #[test]
    fn only_a_stable_connection_resets_the_delay() {
        // (how long the connection lasted, failures counted after it ended)
        let table = [(0u64, 4u32), (29_999, 4), (30_000, 1), (3_600_000, 1)];
        for (lasted, want) in table {
            let mut b = Backoff::new(1_000, 60_000, 30_000);
            for _ in 0..3 {
                b.on_failure(0, 0);
            }
            b.on_connected(1_000);
            let delay = b.on_failure(1_000 + lasted, 0);
            assert_eq!(b.failures(), want, "lasted {lasted} ms");
            let ceiling = (1_000u64 << (want - 1)).min(60_000);
            assert_eq!(delay, ceiling / 2, "lasted {lasted} ms");
        }
    }

    #[test]
    fn a_failed_attempt_without_a_connection_never_resets() {
        let mut b = Backoff::new(1_000, 60_000, 30_000);
        b.on_failure(0, 0);
        // Much later, but it never connected in between.
        b.on_failure(10_000_000, 0);
        assert_eq!(b.failures(), 2);
    }
}
