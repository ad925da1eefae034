//! The uplink's window, sans-io: what is acked and sent of one origin's log on one
//! connection, what to send next, and when to send again. No clock, no socket: the shell
//! (`super::Uplink`) passes the time in milliseconds, the acks it receives and the blocks
//! it sent, and asks what to read next.
//!
//! - On a new connection nothing is known: the first ack (the destination's retained
//!   watermark) says where to start, whatever was sent before.
//! - An ack only moves forward. One below what is acked is a destination gone backwards
//!   (reported, ignored); one beyond everything this log ever held is impossible (a forged
//!   or broken ack: refused, it must delete nothing).
//! - At most `max_inflight` readings are sent and not acked; the backlog drains at
//!   `drain_rate` readings per second (0: as fast as the window allows).
//! - Without ack progress for `ack_timeout_ms` while readings are out, the window rewinds
//!   to the ack: the destination refused a batch (a hole) or lost it.
//! - A block that starts after `sent` (the log has a hole: readings dropped at the edge)
//!   goes with `start = sent`, announcing that the offsets in between are gone.

use super::pace::Pacer;

/// The window's settings, from `[uplink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub max_inflight: u64,
    /// Readings per batch, about.
    pub batch: u64,
    pub ack_timeout_ms: u64,
    /// Readings per second while draining; 0: no limit.
    pub drain_rate: u64,
}

/// What an ack did to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckVerdict {
    /// The ack moved forward (or was the first of this connection).
    Moved,
    /// The same ack again.
    Same,
    /// Below what the destination acked before: ignored.
    Backwards { acked: u64 },
    /// Beyond every offset this log ever held: refused.
    Impossible { head: u64 },
}

/// What to read and send next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// The first offset not yet sent.
    pub from: u64,
    /// Readings there is room for.
    pub max_readings: u64,
}

#[derive(Debug, Clone)]
pub struct Window {
    cfg: WindowConfig,
    /// The destination's watermark on this connection; `None` until its first ack.
    acked: Option<u64>,
    /// Everything below it was sent on this connection.
    sent: u64,
    /// When the ack last moved (or nothing was out).
    progress_ms: u64,
    pacer: Pacer,
}

impl Window {
    pub fn new(cfg: WindowConfig, now_ms: u64) -> Window {
        Window {
            cfg,
            acked: None,
            sent: 0,
            progress_ms: now_ms,
            pacer: Pacer::new(cfg.drain_rate, cfg.batch.max(1), now_ms),
        }
    }

    /// A new connection: nothing sent on it yet, and where the destination stands is
    /// unknown until its first ack.
    pub fn on_connected(&mut self, now_ms: u64) {
        *self = Window::new(self.cfg, now_ms);
    }

    /// The destination's ack `next` (every reading below it is durable there); `head` is
    /// the end of this log (the first offset never written).
    pub fn on_ack(&mut self, next: u64, head: u64, now_ms: u64) -> AckVerdict {
        if next > head {
            return AckVerdict::Impossible { head };
        }
        match self.acked {
            None => {
                // Start (again) where the destination is.
                self.acked = Some(next);
                self.sent = next;
                self.progress_ms = now_ms;
                AckVerdict::Moved
            }
            Some(a) if next > a => {
                self.acked = Some(next);
                self.sent = self.sent.max(next);
                self.progress_ms = now_ms;
                AckVerdict::Moved
            }
            Some(a) if next == a => AckVerdict::Same,
            Some(a) => AckVerdict::Backwards { acked: a },
        }
    }

    /// Time passes: without ack progress for `ack_timeout_ms` while readings are out, the
    /// window rewinds to the ack. True when it did.
    pub fn on_tick(&mut self, now_ms: u64) -> bool {
        let Some(acked) = self.acked else {
            return false;
        };
        if self.sent == acked {
            self.progress_ms = now_ms;
            return false;
        }
        if now_ms.saturating_sub(self.progress_ms) > self.cfg.ack_timeout_ms {
            self.sent = acked;
            self.progress_ms = now_ms;
            return true;
        }
        false
    }

    /// What to send next, if the window and the pace allow anything; `head` is the first
    /// offset not yet committed.
    pub fn poll_send(&mut self, head: u64, now_ms: u64) -> Option<Want> {
        let acked = self.acked?;
        let out = self.sent - acked;
        if self.sent >= head || out >= self.cfg.max_inflight || !self.pacer.ready(now_ms) {
            return None;
        }
        Some(Want {
            from: self.sent,
            max_readings: self.cfg.batch.min(self.cfg.max_inflight - out).max(1),
        })
    }

    /// A block `first..end` was handed to the link; returns the batch's `start` (the
    /// offsets in `start..first` do not exist any more).
    pub fn sent_block(&mut self, first: u64, end: u64, now_ms: u64) -> u64 {
        let start = self.sent;
        self.pacer
            .consume(now_ms, end.saturating_sub(self.sent.max(first)));
        self.sent = self.sent.max(end);
        start
    }

    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: WindowConfig = WindowConfig {
        max_inflight: 100,
        batch: 40,
        ack_timeout_ms: 1000,
        drain_rate: 0,
    };

    /// A connected window whose destination acked `at`.
    fn at(acked: u64) -> Window {
        let mut w = Window::new(CFG, 0);
        w.on_connected(0);
        assert_eq!(w.on_ack(acked, 1_000_000, 0), AckVerdict::Moved);
        w
    }

    #[test]
    fn nothing_is_sent_before_the_destination_says_where_it_is() {
        let mut w = Window::new(CFG, 0);
        w.on_connected(0);
        assert_eq!(w.poll_send(500, 0), None);
        assert_eq!(w.on_ack(120, 500, 0), AckVerdict::Moved);
        assert_eq!(
            w.poll_send(500, 0),
            Some(Want {
                from: 120,
                max_readings: 40
            })
        );
    }

    #[test]
    fn the_window_holds_at_most_max_inflight_unacknowledged() {
        let mut w = at(0);
        // (block sent, what the window wants next)
        let steps: [(u64, u64, Option<Want>); 4] = [
            (
                0,
                40,
                Some(Want {
                    from: 40,
                    max_readings: 40,
                }),
            ),
            (
                40,
                80,
                Some(Want {
                    from: 80,
                    max_readings: 20,
                }),
            ),
            (80, 100, None),
            (100, 100, None),
        ];
        assert_eq!(
            w.poll_send(1000, 0),
            Some(Want {
                from: 0,
                max_readings: 40
            })
        );
        for (first, end, want) in steps {
            if first < end {
                w.sent_block(first, end, 0);
            }
            assert_eq!(w.poll_send(1000, 0), want, "after {first}..{end}");
        }
        assert_eq!(w.on_ack(60, 1000, 5), AckVerdict::Moved);
        assert_eq!(
            w.poll_send(1000, 5),
            Some(Want {
                from: 100,
                max_readings: 40
            })
        );
        // Nothing beyond the head.
        let mut w = at(0);
        w.sent_block(0, 30, 0);
        assert_eq!(w.poll_send(30, 0), None);
    }

    #[test]
    fn a_reconnect_rewinds_to_the_destinations_ack() {
        let mut w = at(0);
        w.sent_block(0, 40, 0);
        w.sent_block(40, 80, 0);
        w.on_ack(40, 1000, 10);
        // The link drops: what was sent after 40 may never have arrived.
        w.on_connected(20);
        assert_eq!(w.acked(), None);
        assert_eq!(w.poll_send(1000, 20), None, "waits for the ack");
        w.on_ack(55, 1000, 25);
        assert_eq!(w.sent(), 55);
        assert_eq!(
            w.poll_send(1000, 25),
            Some(Want {
                from: 55,
                max_readings: 40
            })
        );
    }

    #[test]
    fn without_ack_progress_the_window_rewinds_after_the_timeout() {
        let mut w = at(10);
        w.sent_block(10, 50, 0);
        // (time, rewound?, sent after)
        for (now, rewound, sent) in [(500, false, 50), (1000, false, 50), (1001, true, 10)] {
            assert_eq!(w.on_tick(now), rewound, "at {now} ms");
            assert_eq!(w.sent(), sent, "at {now} ms");
        }
        // Progress keeps the window: each ack restarts the timer.
        w.sent_block(10, 50, 1001);
        w.on_ack(30, 1000, 1900);
        assert!(!w.on_tick(2800));
        assert!(w.on_tick(2901));
        assert_eq!(w.sent(), 30);
        // Nothing out: never a rewind, however long.
        let mut idle = at(7);
        assert!(!idle.on_tick(1_000_000));
    }

    #[test]
    fn acks_that_go_backwards_are_ignored_and_impossible_ones_refused() {
        let mut w = at(50);
        w.sent_block(50, 90, 0);
        // (ack, head, verdict, acked after)
        let table = [
            (70, 200, AckVerdict::Moved, 70),
            (70, 200, AckVerdict::Same, 70),
            (60, 200, AckVerdict::Backwards { acked: 70 }, 70),
            (1_000_000_000, 200, AckVerdict::Impossible { head: 200 }, 70),
            (201, 200, AckVerdict::Impossible { head: 200 }, 70),
            (90, 200, AckVerdict::Moved, 90),
        ];
        for (ack, head, verdict, acked) in table {
            assert_eq!(w.on_ack(ack, head, 1), verdict, "ack {ack}");
            assert_eq!(w.acked(), Some(acked), "after ack {ack}");
        }
        // The first ack of a connection is checked against the head too.
        let mut fresh = Window::new(CFG, 0);
        assert_eq!(
            fresh.on_ack(5_000, 100, 0),
            AckVerdict::Impossible { head: 100 }
        );
        assert_eq!(fresh.acked(), None);
    }

    #[test]
    fn a_block_after_a_hole_announces_the_hole() {
        let mut w = at(100);
        // The log's next block starts at 130: 100..130 were dropped at the edge.
        assert_eq!(w.sent_block(130, 160, 0), 100, "start = sent");
        assert_eq!(w.sent(), 160);
        assert_eq!(w.sent_block(160, 170, 0), 160);
        // A block holding `sent` somewhere inside it (a partly acked block) is sent whole.
        let mut w = at(105);
        assert_eq!(w.sent_block(100, 140, 0), 105);
        assert_eq!(w.sent(), 140);
    }

    #[test]
    fn the_backlog_drains_at_the_configured_pace() {
        let cfg = WindowConfig {
            drain_rate: 100,
            ..CFG
        };
        let mut w = Window::new(cfg, 0);
        w.on_ack(0, 10_000, 0);
        // A full bucket (one batch of 40) goes at once; this block of 100 leaves a debt
        // of 60 readings, paid at 100/s: the next batch may go 610 ms later.
        assert!(w.poll_send(10_000, 0).is_some());
        w.sent_block(0, 100, 0);
        w.on_ack(100, 10_000, 0);
        assert_eq!(w.poll_send(10_000, 300), None);
        assert_eq!(w.poll_send(10_000, 605), None);
        assert!(w.poll_send(10_000, 611).is_some());
    }
}
