//! The node loop: sample on a schedule, keep every reading until the agent says it is
//! durable, publish, and re-send after a reconnect — so that each reading reaches the
//! agent's buffer exactly once however often the link or the agent goes down.
//!
//! [`Node`] is a sans-io state machine: it never reads a clock, never touches a socket and
//! never sleeps. The caller passes the time ([`Now`]), a [`Sensor`] to sample and a
//! [`Publisher`] to publish through, and reports connection changes and ack payloads. That
//! is what lets the same code run on a microcontroller, in the fleet simulator and in unit
//! tests.
//!
//! # How delivery works
//!
//! - Each reading is stamped when sampled: its metric, its value and a [`Timestamp`] —
//!   wall time if the device's clock looks set, otherwise milliseconds since boot, which
//!   the agent re-bases (a board without an RTC starts in 1970).
//! - Readings wait in a fixed-capacity ring (caller-owned storage, see [`Slot`]) until the
//!   agent's ack watermark covers them. The agent acks `{"boot":B,"seq":W}` on
//!   `fogline/ack/<device>`: every reading of boot B with `seq <= W` is on its disk.
//! - A reading gets its sequence number when it is first published, not when it is
//!   sampled. Sequence numbers are contiguous from 1 per boot and the watermark is
//!   contiguous too, so a number that was never delivered would hold the watermark back
//!   for good. Numbering at first publish means a reading dropped from a full ring never
//!   had a number, and the numbers the agent sees have no holes.
//! - When the ring is full the oldest reading *not yet published* is dropped (fresh data
//!   matters more than stale); published-but-unacked readings are never dropped. At most
//!   `max_in_flight` readings are published and unacked at once, which keeps room in the
//!   ring for new readings during an outage. Every drop is counted.
//! - After a reconnect everything above the watermark is published again, oldest first.
//!   The agent stores a (device, boot, seq) once, so re-sends are harmless. If no ack
//!   progress is seen for `resend_after_ms` while readings are in flight, they are
//!   re-sent too (a publish the broker accepted but lost).

use crate::sensor::{Measurement, Sensor};
use crate::wire::{self, Ack, Reading, Timestamp, Topic, CLOCK_SET_AFTER_MS, MAX_FRAME_LEN};

/// What time it is, as the device knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds since boot, from a monotonic clock.
    pub uptime_ms: u64,
    /// Unix milliseconds from the device's wall clock, if it has one at all.
    pub wall_ms: Option<u64>,
}

impl Now {
    /// The timestamp a reading sampled now carries: wall time when the clock looks set,
    /// otherwise time since boot. A clock that reads 1970 (no RTC, no NTP yet) is not
    /// sent as a date: the agent turns uptime into wall time with its own clock.
    pub fn timestamp(&self) -> Timestamp {
        match self.wall_ms {
            Some(ms) if ms >= CLOCK_SET_AFTER_MS => Timestamp::WallMs(ms),
            _ => Timestamp::BootMs(self.uptime_ms),
        }
    }
}

/// Where readings go: usually an MQTT client publishing at QoS 1.
pub trait Publisher {
    /// Why a publish did not happen (e.g. the client's queue is full). The node stops the
    /// current flush and tries the same reading again at the next one.
    type Error;

    /// Hands one frame to the transport. `Ok` means queued or sent, not durable: only the
    /// agent's ack means durable.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Self::Error>;
}

/// Settings of a [`Node`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig<'a> {
    /// Device id: 1..=32 bytes of `[A-Za-z0-9_.-]`.
    pub device: &'a str,
    /// Boot id: must change on every boot (a random number or a counter kept in flash),
    /// because sequence numbers start at 1 again.
    pub boot: u32,
    /// Time between samples.
    pub sample_period_ms: u64,
    /// Most readings published and not yet acked; keep it below the ring's capacity so an
    /// outage still leaves room for new readings.
    pub max_in_flight: usize,
    /// Re-send everything in flight when the watermark has not moved for this long.
    pub resend_after_ms: u64,
    /// How many missed samples to take back-to-back after a stall; 0 means skip them (a
    /// real sensor would read the same value), a load generator wants to catch up.
    pub max_catch_up: u32,
}

impl<'a> NodeConfig<'a> {
    /// Defaults for a slow sensor: a sample every 10 s, 64 readings in flight, re-send
    /// after 10 s without progress, no catch-up.
    pub const fn new(device: &'a str, boot: u32) -> NodeConfig<'a> {
        NodeConfig {
            device,
            boot,
            sample_period_ms: 10_000,
            max_in_flight: 64,
            resend_after_ms: 10_000,
            max_catch_up: 0,
        }
    }
}

/// Why a [`NodeConfig`] or ring was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The device id is empty, too long or uses characters outside `[A-Za-z0-9_.-]`.
    InvalidDevice,
    /// The ring has no slots.
    EmptyRing,
    /// `max_in_flight` is 0: nothing could ever be published.
    ZeroInFlight,
    /// `sample_period_ms` is 0.
    ZeroPeriod,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::InvalidDevice => "device id must be 1-32 characters of [A-Za-z0-9_.-]",
            ConfigError::EmptyRing => "the ring needs at least one slot",
            ConfigError::ZeroInFlight => "max_in_flight must be at least 1",
            ConfigError::ZeroPeriod => "sample_period_ms must be at least 1",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}

/// A reading waiting for its ack.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    metric: &'static str,
    time: Timestamp,
    value: f64,
}

/// One place in the ring. The caller owns the storage — `[Slot::EMPTY; N]` on a
/// microcontroller, a `Vec<Slot>` on a host — so the library needs no allocator and the
/// capacity can be chosen at run time where there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot(Option<Pending>);

impl Slot {
    /// An unused slot.
    pub const EMPTY: Slot = Slot(None);
}

// What a ring costs on a 32-bit microcontroller (the README quotes it): metric 8 bytes,
// timestamp 16, value 8. Checked by the thumbv7em build in CI.
#[cfg(target_pointer_width = "32")]
const _: () = assert!(core::mem::size_of::<Slot>() == 32);

/// A FIFO over caller-owned slots that can also remove from the middle (to drop the oldest
/// unpublished reading behind the published ones).
struct Ring<B> {
    slots: B,
    head: usize,
    len: usize,
}

impl<B: AsRef<[Slot]> + AsMut<[Slot]>> Ring<B> {
    fn capacity(&self) -> usize {
        self.slots.as_ref().len()
    }

    fn index(&self, i: usize) -> usize {
        (self.head + i) % self.capacity()
    }

    fn get(&self, i: usize) -> Option<Pending> {
        if i >= self.len {
            return None;
        }
        self.slots.as_ref().get(self.index(i)).and_then(|s| s.0)
    }

    fn push_back(&mut self, p: Pending) -> bool {
        if self.len >= self.capacity() {
            return false;
        }
        let at = self.index(self.len);
        match self.slots.as_mut().get_mut(at) {
            Some(slot) => {
                *slot = Slot(Some(p));
                self.len += 1;
                true
            }
            None => false,
        }
    }

    fn pop_front(&mut self) -> Option<Pending> {
        if self.len == 0 {
            return None;
        }
        let at = self.head;
        let taken = self.slots.as_mut().get_mut(at).and_then(|s| s.0.take());
        self.head = (self.head + 1) % self.capacity();
        self.len -= 1;
        taken
    }

    /// Removes element `i`, shifting the later ones forward (O(len), only on overflow).
    fn remove(&mut self, i: usize) -> Option<Pending> {
        let removed = self.get(i)?;
        for j in i..self.len - 1 {
            let (to, from) = (self.index(j), self.index(j + 1));
            let next = self
                .slots
                .as_ref()
                .get(from)
                .copied()
                .unwrap_or(Slot::EMPTY);
            if let Some(slot) = self.slots.as_mut().get_mut(to) {
                *slot = next;
            }
        }
        let last = self.index(self.len - 1);
        if let Some(slot) = self.slots.as_mut().get_mut(last) {
            *slot = Slot::EMPTY;
        }
        self.len -= 1;
        Some(removed)
    }
}

/// Counters a device can report (all monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Readings taken (valid metric, finite value), kept or not. At any moment
    /// `sampled - dropped` = readings acked + readings held in the ring.
    pub sampled: u64,
    /// Publishes handed to the [`Publisher`], re-sends included.
    pub published: u64,
    /// Publishes of a reading that had been published before.
    pub resent: u64,
    /// Readings lost because the ring was full.
    pub dropped: u64,
    /// Samplings that failed in the sensor.
    pub sensor_errors: u64,
    /// Readings refused: non-finite value or invalid metric name.
    pub invalid: u64,
    /// Scheduled samples skipped because the loop ran late.
    pub skipped_samples: u64,
    /// Connections reported through [`Node::on_connected`].
    pub connects: u64,
    /// Times the in-flight readings were re-sent because no ack came.
    pub resend_timeouts: u64,
    /// Ack payloads that did not parse, or acked more than this boot ever published.
    pub bad_acks: u64,
}

/// What an ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The watermark moved up and freed this many readings.
    Advanced(usize),
    /// At or below the watermark already known (a retained or reordered ack).
    Stale,
    /// For another boot of this device (e.g. the retained ack of the previous boot).
    OtherBoot,
    /// Above everything this boot published: the agent already holds readings under this
    /// boot id, so the boot id was reused (a board without a random source or a persisted
    /// counter). Numbering continues above the agent's watermark so that new readings are
    /// not discarded as duplicates; everything not yet acked is published again under new
    /// numbers.
    Renumbered,
}

/// One sensor node's delivery state. `B` is the ring's storage, e.g. `[Slot; 128]` or
/// `Vec<Slot>`.
pub struct Node<B> {
    device: heapless::String<{ wire::MAX_ID_LEN }>,
    ack_topic: Topic,
    boot: u32,
    period_ms: u64,
    max_in_flight: usize,
    resend_after_ms: u64,
    max_catch_up: u32,
    next_sample_ms: Option<u64>,
    ring: Ring<B>,
    /// Watermark of this boot: `1..=acked` are durable and gone from the ring.
    acked: u32,
    /// Highest sequence number given out. The ring holds `acked+1..=last_seq` first (in
    /// flight), then the readings without a number yet.
    last_seq: u32,
    /// Highest sequence number published on the current connection.
    sent_upto: u32,
    /// Highest sequence number ever published (to count re-sends).
    max_published: u32,
    connected: bool,
    /// When the in-flight window last made progress (uptime ms).
    progress_ms: u64,
    stats: Stats,
}

impl<B: AsRef<[Slot]> + AsMut<[Slot]>> Node<B> {
    /// A node for `config` keeping unacked readings in `slots` (whose contents are ignored).
    pub fn new(config: NodeConfig<'_>, slots: B) -> Result<Self, ConfigError> {
        let mut device = heapless::String::new();
        if !wire::valid_id(config.device) || device.push_str(config.device).is_err() {
            return Err(ConfigError::InvalidDevice);
        }
        let ack_topic = wire::ack_topic(config.device).map_err(|_| ConfigError::InvalidDevice)?;
        if slots.as_ref().is_empty() {
            return Err(ConfigError::EmptyRing);
        }
        if config.max_in_flight == 0 {
            return Err(ConfigError::ZeroInFlight);
        }
        if config.sample_period_ms == 0 {
            return Err(ConfigError::ZeroPeriod);
        }
        Ok(Node {
            device,
            ack_topic,
            boot: config.boot,
            period_ms: config.sample_period_ms,
            max_in_flight: config.max_in_flight,
            resend_after_ms: config.resend_after_ms,
            max_catch_up: config.max_catch_up,
            next_sample_ms: None,
            ring: Ring {
                slots,
                head: 0,
                len: 0,
            },
            acked: 0,
            last_seq: 0,
            sent_upto: 0,
            max_published: 0,
            connected: false,
            progress_ms: 0,
            stats: Stats::default(),
        })
    }

    /// The device id.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The boot id.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// `fogline/ack/<device>`: subscribe to it (QoS 1) after every connect and pass what
    /// arrives to [`Node::on_ack_payload`].
    pub fn ack_topic(&self) -> &str {
        &self.ack_topic
    }

    /// The agent's watermark for this boot.
    pub fn acked(&self) -> u32 {
        self.acked
    }

    /// The highest sequence number given out so far (0 before the first publish).
    pub fn last_seq(&self) -> u32 {
        self.last_seq
    }

    /// Readings held: in flight plus not yet published.
    pub fn pending(&self) -> usize {
        self.ring.len
    }

    /// Readings published and not yet acked.
    pub fn in_flight(&self) -> usize {
        (self.last_seq - self.acked) as usize
    }

    /// Ring capacity.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// True when every reading taken so far is durable at the agent.
    pub fn is_drained(&self) -> bool {
        self.ring.len == 0
    }

    /// True between [`Node::on_connected`] and [`Node::on_disconnected`].
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Uptime at which the next sample is due; `None` before the first one (due at once).
    pub fn next_sample_at(&self) -> Option<u64> {
        self.next_sample_ms
    }

    /// True when a sample is due at `uptime_ms`.
    pub fn sample_due(&self, uptime_ms: u64) -> bool {
        self.next_sample_ms.is_none_or(|at| uptime_ms >= at)
    }

    /// Uptime at which in-flight readings will be re-sent if no ack arrives, if any are.
    pub fn resend_at(&self) -> Option<u64> {
        (self.connected && self.sent_upto > self.acked)
            .then(|| self.progress_ms.saturating_add(self.resend_after_ms))
    }

    /// True when [`Node::flush`] would publish something now.
    pub fn wants_flush(&self) -> bool {
        self.connected
            && (self.sent_upto < self.last_seq
                || (self.ring.len > self.in_flight() && self.in_flight() < self.max_in_flight))
    }

    /// Samples `sensor` if a sample is due, and keeps what it returned. Returns how many
    /// readings were kept (0 when nothing was due). A sensor error is counted and returned;
    /// the schedule moves on either way, so a broken sensor is not hammered.
    pub fn sample_if_due<S, D>(
        &mut self,
        now: Now,
        sensor: &mut S,
        delay: &mut D,
    ) -> Result<usize, S::Error>
    where
        S: Sensor<D>,
        D: embedded_hal::delay::DelayNs,
    {
        if !self.sample_due(now.uptime_ms) {
            return Ok(0);
        }
        self.advance_schedule(now.uptime_ms);
        match sensor.sample(delay) {
            Ok(sample) => Ok(self.record(now, &sample)),
            Err(e) => {
                self.stats.sensor_errors += 1;
                Err(e)
            }
        }
    }

    fn advance_schedule(&mut self, uptime_ms: u64) {
        let next = match self.next_sample_ms {
            None => uptime_ms.saturating_add(self.period_ms),
            Some(slot) => {
                let next = slot.saturating_add(self.period_ms);
                let allowed = self.period_ms.saturating_mul(u64::from(self.max_catch_up));
                if uptime_ms >= next.saturating_add(allowed) {
                    // More slots are overdue than we may catch up on: skip them all.
                    self.stats.skipped_samples += (uptime_ms - next) / self.period_ms + 1;
                    uptime_ms.saturating_add(self.period_ms)
                } else {
                    next
                }
            }
        };
        self.next_sample_ms = Some(next);
    }

    /// Keeps readings sampled at `now`, whatever the schedule (for callers that sample by
    /// themselves). Returns how many were kept; invalid ones are counted and skipped.
    pub fn record(&mut self, now: Now, measurements: &[Measurement]) -> usize {
        let time = now.timestamp();
        let mut kept = 0;
        for m in measurements {
            if !wire::valid_id(m.metric) || !m.value.is_finite() {
                self.stats.invalid += 1;
                continue;
            }
            self.stats.sampled += 1;
            if self.ring.len >= self.ring.capacity() {
                // Full: drop the oldest reading that has no sequence number yet. If every
                // held reading is in flight, the new one cannot be kept.
                self.stats.dropped += 1;
                let in_flight = self.in_flight();
                if self.ring.len <= in_flight || self.ring.remove(in_flight).is_none() {
                    continue;
                }
            }
            let pending = Pending {
                metric: m.metric,
                time,
                value: m.value,
            };
            if self.ring.push_back(pending) {
                kept += 1;
            } else {
                self.stats.dropped += 1;
            }
        }
        kept
    }

    /// The transport connected (or reconnected): everything above the watermark is
    /// published again at the next [`Node::flush`]. Subscribe to [`Node::ack_topic`] too.
    pub fn on_connected(&mut self, uptime_ms: u64) {
        self.connected = true;
        self.sent_upto = self.acked;
        self.progress_ms = uptime_ms;
        self.stats.connects += 1;
    }

    /// The transport lost its connection: stop publishing until the next connect.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// Parses an ack payload from [`Node::ack_topic`] and applies it. A payload that does
    /// not parse is counted and changes nothing.
    pub fn on_ack_payload(
        &mut self,
        payload: &[u8],
        uptime_ms: u64,
    ) -> Result<AckOutcome, wire::Error> {
        match Ack::parse(payload) {
            Ok(ack) => Ok(self.on_ack(ack, uptime_ms)),
            Err(e) => {
                self.stats.bad_acks += 1;
                Err(e)
            }
        }
    }

    /// Applies the agent's watermark: readings it covers are durable and leave the ring.
    pub fn on_ack(&mut self, ack: Ack, uptime_ms: u64) -> AckOutcome {
        if ack.boot != self.boot {
            return AckOutcome::OtherBoot;
        }
        if ack.seq <= self.acked {
            return AckOutcome::Stale;
        }
        if ack.seq > self.last_seq {
            // See `AckOutcome::Renumbered`: what is in flight was taken for duplicates of
            // an earlier boot's readings, so it gets new numbers above the watermark.
            self.stats.bad_acks += 1;
            self.acked = ack.seq;
            self.last_seq = ack.seq;
            self.sent_upto = ack.seq;
            self.max_published = ack.seq;
            self.progress_ms = uptime_ms;
            return AckOutcome::Renumbered;
        }
        let freed = (ack.seq - self.acked) as usize;
        for _ in 0..freed {
            self.ring.pop_front();
        }
        self.acked = ack.seq;
        self.sent_upto = self.sent_upto.max(self.acked);
        self.progress_ms = uptime_ms;
        AckOutcome::Advanced(freed)
    }

    /// Publishes what is due: re-sends after a reconnect or an ack timeout, then new
    /// readings while fewer than `max_in_flight` are unacked. Returns how many were
    /// published; stops at the first publisher error and returns it (the same reading is
    /// tried again at the next flush).
    pub fn flush<P: Publisher>(
        &mut self,
        uptime_ms: u64,
        publisher: &mut P,
    ) -> Result<usize, P::Error> {
        if !self.connected {
            return Ok(0);
        }
        if self.sent_upto > self.acked
            && uptime_ms.saturating_sub(self.progress_ms) >= self.resend_after_ms
        {
            self.stats.resend_timeouts += 1;
            self.sent_upto = self.acked;
            self.progress_ms = uptime_ms;
        }
        let mut published = 0;
        while let Some(seq) = self.sent_upto.checked_add(1) {
            if seq > self.last_seq {
                // A new reading gets the next number, if there is one and room in flight.
                let unnumbered = self.ring.len > self.in_flight();
                if !unnumbered || self.in_flight() >= self.max_in_flight {
                    break;
                }
                self.last_seq = seq;
            }
            let Some(pending) = self.ring.get((seq - self.acked - 1) as usize) else {
                break;
            };
            if self.sent_upto == self.acked {
                // The window starts moving: time the ack from here.
                self.progress_ms = uptime_ms;
            }
            let reading = Reading {
                device: &self.device,
                metric: pending.metric,
                seq,
                boot: self.boot,
                time: pending.time,
                value: pending.value,
            };
            let mut frame = [0u8; MAX_FRAME_LEN];
            match (
                wire::reading_topic(&self.device, pending.metric),
                wire::encode(&reading, &mut frame),
            ) {
                (Ok(topic), Ok(payload)) => publisher.publish(&topic, payload)?,
                // Unreachable: device, metric and value were validated when the reading
                // was kept. Counted rather than retried forever.
                _ => self.stats.invalid += 1,
            }
            self.sent_upto = seq;
            self.stats.published += 1;
            if seq <= self.max_published {
                self.stats.resent += 1;
            } else {
                self.max_published = seq;
            }
            published += 1;
        }
        Ok(published)
    }
}

#[cfg(test)]
mod tests;
