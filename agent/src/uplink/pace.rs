//! Drain pacing: a token bucket over logical time (milliseconds supplied by the caller),
//! so the backlog after an outage drains at a configured rate of readings per second
//! and leaves room on the link (and on the gateway) for everyone else.

/// A token bucket. `rate == 0` means unlimited.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_per_sec: u64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl Pacer {
    /// `burst` is how many readings may go at once after an idle period.
    pub fn new(rate_per_sec: u64, burst: u64, now_ms: u64) -> Pacer {
        Pacer {
            rate_per_sec,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.rate_per_sec as f64 / 1000.0).min(self.burst);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Whether anything may be sent now. A batch larger than the bucket may go when the
    /// bucket is full; it then leaves a debt that delays the next one.
    pub fn ready(&mut self, now_ms: u64) -> bool {
        if self.rate_per_sec == 0 {
            return true;
        }
        self.refill(now_ms);
        self.tokens >= 1.0
    }

    /// Accounts for `n` readings sent at `now_ms`.
    pub fn consume(&mut self, now_ms: u64, n: u64) {
        if self.rate_per_sec == 0 {
            return;
        }
        self.refill(now_ms);
        self.tokens -= n as f64;
    }

    /// Milliseconds until [`Pacer::ready`] turns true.
    pub fn wait_ms(&mut self, now_ms: u64) -> u64 {
        if self.rate_per_sec == 0 {
            return 0;
        }
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) * 1000.0 / self.rate_per_sec as f64).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the pacer like the uplink does: send a batch whenever it is ready.
    fn drain(rate: u64, burst: u64, batch: u64, total: u64) -> u64 {
        let mut p = Pacer::new(rate, burst, 0);
        let (mut now, mut sent) = (0u64, 0u64);
        while sent < total {
            now += p.wait_ms(now);
            assert!(p.ready(now));
            p.consume(now, batch);
            sent += batch;
        }
        now
    }

    #[test]
    fn a_backlog_drains_at_the_configured_rate() {
        // 100k readings at 10k/s in batches of 500: about 10 s of logical time.
        let ms = drain(10_000, 1_000, 500, 100_000);
        assert!((9_800..=10_100).contains(&ms), "{ms} ms");
        // Twice the rate, half the time.
        let ms = drain(20_000, 1_000, 500, 100_000);
        assert!((4_900..=5_100).contains(&ms), "{ms} ms");
    }

    #[test]
    fn unlimited_never_waits() {
        let mut p = Pacer::new(0, 1, 0);
        p.consume(0, 1_000_000);
        assert!(p.ready(0));
        assert_eq!(p.wait_ms(0), 0);
    }

    #[test]
    fn idle_time_earns_at_most_one_burst() {
        let mut p = Pacer::new(1_000, 100, 0);
        p.consume(0, 100);
        assert!(!p.ready(0));
        // An hour idle still allows only one burst.
        assert!(p.ready(3_600_000));
        p.consume(3_600_000, 100);
        assert!(!p.ready(3_600_000));
        assert_eq!(p.wait_ms(3_600_000), 1);
    }
}
