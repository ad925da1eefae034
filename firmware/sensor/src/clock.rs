//! Device clocks on a host: a monotonic uptime, and a wall clock that is either the
//! system's or one that starts in 1970 when the device boots, like a board without an RTC
//! before NTP has run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogline_firmware::node::Now;

/// What a device's wall clock reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WallClock {
    /// The host's clock (assumed set, e.g. by NTP).
    System,
    /// Starts at 1970-01-01T00:00:00Z when the device boots and runs from there.
    Unset,
}

impl WallClock {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            WallClock::System => "system",
            WallClock::Unset => "unset",
        }
    }
}

/// A device's clock: uptime from a monotonic clock, wall time per [`WallClock`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceClock {
    started: Instant,
    uptime_at_start_ms: u64,
    wall: WallClock,
}

impl DeviceClock {
    /// A clock for a device that booted `uptime_at_start_ms` before now.
    pub fn new(wall: WallClock, uptime_at_start_ms: u64) -> DeviceClock {
        DeviceClock {
            started: Instant::now(),
            uptime_at_start_ms,
            wall,
        }
    }

    /// Milliseconds since the device booted.
    pub fn uptime_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.uptime_at_start_ms.saturating_add(elapsed)
    }

    /// What the device's clocks read now.
    pub fn now(&self) -> Now {
        let uptime_ms = self.uptime_ms();
        let wall_ms = match self.wall {
            WallClock::System => Some(system_ms()),
            WallClock::Unset => Some(uptime_ms),
        };
        Now { uptime_ms, wall_ms }
    }

    /// Which wall clock this is.
    pub fn wall(&self) -> WallClock {
        self.wall
    }
}

/// The host's wall clock in Unix milliseconds (0 if it reads before 1970).
pub fn system_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogline_firmware::wire::Timestamp;

    #[test]
    fn an_unset_clock_reads_1970_and_stamps_uptime() {
        let clock = DeviceClock::new(WallClock::Unset, 3_600_000);
        let now = clock.now();
        assert!(now.uptime_ms >= 3_600_000);
        assert_eq!(
            now.wall_ms,
            Some(now.uptime_ms),
            "the RTC started with the board"
        );
        assert_eq!(now.timestamp(), Timestamp::BootMs(now.uptime_ms));
    }

    #[test]
    fn the_system_clock_stamps_wall_time() {
        let clock = DeviceClock::new(WallClock::System, 0);
        match clock.now().timestamp() {
            Timestamp::WallMs(ms) => assert!(ms.abs_diff(system_ms()) < 60_000),
            other => panic!("expected wall time, got {other:?}"),
        }
    }
}
