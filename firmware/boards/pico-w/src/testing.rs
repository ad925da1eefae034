//! Fakes for the host tests: a logical clock with a tiny executor that jumps time to the
//! next timer, a scripted MQTT broker that stores and acks like the agent, a sensor.
//! No sleeps: a test of an hour of device life runs in milliseconds, the same way every
//! time.

use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};
use std::collections::{BTreeMap, VecDeque};
use std::string::{String, ToString};
use std::vec::Vec;

use fogline_firmware::sensor::{metric, sample_of, Measurement, Sample, Sensor};
use fogline_firmware::wire;

use crate::led::LedState;
use crate::session::{Admission, Clock, Connector, Indicator, MqttConn};

/// Logical milliseconds; `sleep_until` is pending until [`drive`] moves time on.
#[derive(Default)]
pub struct FakeClock {
    now: Cell<u64>,
    /// The earliest deadline a pending sleep registered during the current poll.
    next_timer: Cell<Option<u64>>,
}

impl FakeClock {
    fn register(&self, at: u64) {
        let next = self.next_timer.get().map_or(at, |t| t.min(at));
        self.next_timer.set(Some(next));
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }

    async fn sleep_until(&self, at_ms: u64) {
        core::future::poll_fn(|_| {
            if self.now.get() >= at_ms {
                Poll::Ready(())
            } else {
                self.register(at_ms);
                Poll::Pending
            }
        })
        .await
    }
}

/// Polls `fut`, and whenever it waits, moves the clock to the earliest timer it waits
/// for, until `until_ms`. Returns the output if it finished.
pub fn drive<F: Future>(fut: F, clock: &FakeClock, until_ms: u64) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        clock.next_timer.set(None);
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        match clock.next_timer.get() {
            Some(at) if at <= until_ms => clock.now.set(clock.now.get().max(at)),
            _ => {
                clock.now.set(until_ms);
                return None;
            }
        }
    }
}

/// What the fake broker does and has seen. The test scripts it and reads it afterwards.
#[derive(Default)]
pub struct Broker {
    /// Attempts to fail before connections succeed again (each failed one is counted).
    pub fail_connects: u32,
    /// How long (logical ms) each connection attempt takes, like a Wi-Fi join.
    pub connect_takes_ms: u64,
    /// Each connection breaks after this many publishes.
    pub drop_after_publishes: Option<u32>,
    /// Publishes the client may have waiting for a PUBACK before it answers Busy.
    pub puback_window: Option<usize>,
    /// Whether the agent acks (on the ack topic) what it stored.
    pub acking: bool,
    /// When each connection attempt started.
    pub attempt_times: Vec<u64>,
    /// Successful connections.
    pub connections: u32,
    /// Topics subscribed, in order, over all connections.
    pub subscriptions: Vec<String>,
    /// Every publish received: (topic, boot, seq), duplicates included.
    pub received: Vec<(String, u32, u32)>,
    /// What the agent stores: each (boot, seq) once, with its value.
    pub stored: BTreeMap<(u32, u32), f64>,
    /// Re-sends of a (boot, seq) that carried a different value than the first time
    /// (must stay 0: a sequence number names one reading for good).
    pub conflicting_resends: u32,
    /// Publishes seen before the connection's subscribe (must stay 0).
    pub publishes_before_subscribe: u32,
    /// The retained ack of the device, as the agent keeps it.
    pub retained_ack: Option<(String, Vec<u8>)>,
}

impl Broker {
    /// A broker that acks everything it stores.
    pub fn acking() -> Broker {
        Broker {
            acking: true,
            ..Broker::default()
        }
    }

    /// The contiguous watermark of `boot`, as the agent computes it.
    pub fn watermark(&self, boot: u32) -> u32 {
        let mut w = 0;
        while self.stored.contains_key(&(boot, w + 1)) {
            w += 1;
        }
        w
    }
}

/// Connects to the fake broker.
pub struct FakeConnector<'t> {
    pub broker: &'t RefCell<Broker>,
    pub clock: &'t FakeClock,
}

/// One connection to the fake broker.
pub struct FakeConn<'t> {
    broker: &'t RefCell<Broker>,
    clock: &'t FakeClock,
    subscribed: bool,
    publishes_left: Option<u32>,
    awaiting_puback: usize,
    inbound: VecDeque<(String, Vec<u8>)>,
}

/// The fake connection broke (scripted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

impl Connector for FakeConnector<'_> {
    type Conn<'a>
        = FakeConn<'a>
    where
        Self: 'a;
    type Error = Broken;

    async fn connect(&mut self) -> Result<FakeConn<'_>, Broken> {
        let takes = {
            let mut b = self.broker.borrow_mut();
            b.attempt_times.push(self.clock.now_ms());
            b.connect_takes_ms
        };
        self.clock.sleep_until(self.clock.now_ms() + takes).await;
        let mut b = self.broker.borrow_mut();
        if b.fail_connects > 0 {
            b.fail_connects -= 1;
            return Err(Broken);
        }
        b.connections += 1;
        Ok(FakeConn {
            broker: self.broker,
            clock: self.clock,
            subscribed: false,
            publishes_left: b.drop_after_publishes,
            awaiting_puback: 0,
            inbound: VecDeque::new(),
        })
    }
}

impl MqttConn for FakeConn<'_> {
    type Error = Broken;

    async fn subscribe_qos1(&mut self, topic: &str) -> Result<(), Broken> {
        let mut b = self.broker.borrow_mut();
        b.subscriptions.push(topic.to_string());
        self.subscribed = true;
        if let Some((t, payload)) = b.retained_ack.clone() {
            if t == topic {
                self.inbound.push_back((t, payload));
            }
        }
        Ok(())
    }

    async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> Result<Admission, Broken> {
        if self.publishes_left == Some(0) {
            return Err(Broken);
        }
        let mut b = self.broker.borrow_mut();
        if b.puback_window.is_some_and(|w| self.awaiting_puback >= w) {
            return Ok(Admission::Busy);
        }
        if !self.subscribed {
            b.publishes_before_subscribe += 1;
        }
        self.publishes_left = self.publishes_left.map(|n| n - 1);
        self.awaiting_puback += 1;
        let reading = wire::decode(payload).map_err(|_| Broken)?;
        let expected_topic =
            wire::reading_topic(reading.device, reading.metric).map_err(|_| Broken)?;
        assert_eq!(topic, expected_topic.as_str(), "topic matches the frame");
        b.received
            .push((topic.to_string(), reading.boot, reading.seq));
        let first = *b
            .stored
            .entry((reading.boot, reading.seq))
            .or_insert(reading.value);
        if first != reading.value {
            b.conflicting_resends += 1;
        }
        if b.acking {
            let ack_topic = wire::ack_topic(reading.device).map_err(|_| Broken)?;
            let ack = std::format!(
                "{{\"boot\":{},\"seq\":{}}}",
                reading.boot,
                b.watermark(reading.boot)
            );
            b.retained_ack = Some((ack_topic.to_string(), ack.clone().into_bytes()));
            self.inbound
                .push_back((ack_topic.to_string(), ack.into_bytes()));
        }
        Ok(Admission::Sent)
    }

    async fn poll_until(
        &mut self,
        deadline_ms: u64,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> Result<(), Broken> {
        if self.awaiting_puback > 0 {
            // The PUBACKs arrive: progress, return at once.
            self.awaiting_puback = 0;
            return Ok(());
        }
        if let Some((topic, payload)) = self.inbound.pop_front() {
            on_message(&topic, &payload);
            return Ok(());
        }
        if self.publishes_left == Some(0) {
            return Err(Broken);
        }
        self.clock.sleep_until(deadline_ms).await;
        Ok(())
    }
}

/// Remembers what the LED was told to show.
#[derive(Default)]
pub struct RecordingLed {
    pub shown: Vec<LedState>,
}

impl Indicator for RecordingLed {
    fn show(&mut self, state: LedState) {
        if self.shown.last() != Some(&state) {
            self.shown.push(state);
        }
    }
}

/// A sensor giving a temperature that counts up; it fails during `fails_ms` (logical
/// time of `clock`).
pub struct FakeSensor<'t> {
    pub clock: &'t FakeClock,
    pub fails_ms: core::ops::Range<u64>,
    pub taken: u32,
}

/// A delay that does not wait.
pub struct NoDelay;

impl embedded_hal::delay::DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

impl Sensor<NoDelay> for FakeSensor<'_> {
    type Error = Broken;

    fn sample(&mut self, _delay: &mut NoDelay) -> Result<Sample, Broken> {
        if self.fails_ms.contains(&self.clock.now_ms()) {
            return Err(Broken);
        }
        self.taken += 1;
        Ok(sample_of([Measurement::new(
            metric::TEMPERATURE,
            f64::from(self.taken),
        )]))
    }
}
