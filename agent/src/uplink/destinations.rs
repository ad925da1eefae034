//! Which destination the uplink tries next, sans-io: `uplink.gateway` lists one or more
//! gateways (a peer's replication link lists one peer). The uplink starts at the first;
//! a session that ends with an error (refused, timed out, lost) moves it to the next, in a
//! ring. Every failure takes its delay from one [`Backoff`], reset by a CONNACK: the first
//! switch after a healthy connection drops waits about `backoff_min_ms`, and a round in
//! which every gateway is down backs off towards `backoff_max_ms`.
//!
//! Nothing else changes with the destination: each session still starts from the ack of
//! the gateway it reached. The gateways of one list share one store, so their acks agree.

use std::time::Duration;

use super::backoff::Backoff;

/// The destinations, the current one, and the backoff between attempts.
#[derive(Debug, Clone)]
pub struct Destinations<T> {
    list: Vec<T>,
    current: usize,
    backoff: Backoff,
    failovers: u64,
}

/// What to do after a session failed: wait `delay`, then try `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub delay: Duration,
    /// Index of the destination that failed.
    pub from: usize,
    /// Index of the one to try next (`from` again when the list has one entry).
    pub to: usize,
}

impl Retry {
    /// Whether the next attempt goes to another destination.
    pub fn switched(&self) -> bool {
        self.from != self.to
    }
}

impl<T> Destinations<T> {
    /// None when `list` is empty.
    pub fn new(list: Vec<T>, backoff: Backoff) -> Option<Destinations<T>> {
        if list.is_empty() {
            return None;
        }
        Some(Destinations {
            list,
            current: 0,
            backoff,
            failovers: 0,
        })
    }

    /// The destination to connect to now.
    pub fn current(&self) -> &T {
        // `current` is always an index into the non-empty list.
        &self.list[self.current]
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.list.get(index)
    }

    pub fn list(&self) -> &[T] {
        &self.list
    }

    /// Moves to another destination so far.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The current destination accepted the connection (CONNACK): the next failure
    /// starts the backoff from its minimum again.
    pub fn on_connected(&mut self) {
        self.backoff.reset();
    }

    /// The session with the current destination ended with an error: move on to the next
    /// one. `unit` is a random number in `[0, 1)` for the backoff's jitter.
    pub fn on_error(&mut self, unit: f64) -> Retry {
        let from = self.current;
        self.current = (self.current + 1) % self.list.len();
        if self.current != from {
            self.failovers += 1;
        }
        Retry {
            delay: self.backoff.next_delay(unit),
            from,
            to: self.current,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_millis(2000);

    fn three() -> Destinations<&'static str> {
        Destinations::new(vec!["a", "b", "c"], Backoff::new(MIN, MAX)).expect("non-empty")
    }

    /// Fails the current destination with the largest jitter; (delay in ms, next).
    fn fail(d: &mut Destinations<&'static str>) -> (u128, &'static str) {
        let r = d.on_error(1.0);
        (r.delay.as_millis(), *d.current())
    }

    #[test]
    fn an_empty_list_is_no_destination() {
        assert!(Destinations::<&str>::new(Vec::new(), Backoff::new(MIN, MAX)).is_none());
    }

    #[test]
    fn the_uplink_starts_at_the_first_and_fails_over_in_order_round_the_ring() {
        let mut d = three();
        assert_eq!(*d.current(), "a");
        let r = d.on_error(0.0);
        assert_eq!((r.from, r.to, r.switched()), (0, 1, true));
        assert_eq!(*d.current(), "b");
        assert_eq!(fail(&mut d).1, "c");
        assert_eq!(fail(&mut d).1, "a");
        assert_eq!(d.failovers(), 3);
    }

    #[test]
    fn a_round_with_every_gateway_down_backs_off_up_to_the_maximum() {
        let mut d = three();
        let delays: Vec<u128> = (0..6).map(|_| fail(&mut d).0).collect();
        assert_eq!(delays, vec![500, 1000, 2000, 2000, 2000, 2000]);
    }

    #[test]
    fn the_first_switch_after_a_healthy_connection_is_quick() {
        let mut d = three();
        for _ in 0..5 {
            fail(&mut d);
        }
        // c accepted the connection, then dropped it.
        assert_eq!(*d.current(), "c");
        d.on_connected();
        assert_eq!(fail(&mut d), (500, "a"));
        assert_eq!(fail(&mut d), (1000, "b"));
    }

    #[test]
    fn a_single_destination_is_retried_with_backoff_and_never_counts_a_failover() {
        let mut d = Destinations::new(vec!["peer"], Backoff::new(MIN, MAX)).expect("one");
        let r = d.on_error(1.0);
        assert_eq!((r.from, r.to, r.switched()), (0, 0, false));
        assert_eq!(fail(&mut d), (1000, "peer"));
        assert_eq!(d.failovers(), 0);
    }

    #[test]
    fn delays_keep_their_jitter() {
        let mut d = three();
        let low = d.on_error(0.0).delay;
        assert_eq!(low, MIN / 2);
    }
}
