//! The device loop: what the image does from boot to power-off, over small traits.
//!
//! ```text
//!            +--------------------- backoff, sampling on ----------------------+
//!            v                                                                 |
//!   connect (Wi-Fi join, DHCP, DNS, TCP, MQTT CONNECT), sampling on ---fails---+
//!            | ok                                                              |
//!   subscribe fogline/ack/<device> (QoS 1), node.on_connected                  |
//!            |                                                                 |
//!   loop: sample if due -> node.flush into the outbox -> publish QoS 1 ---err--+
//!         -> poll until the next sample / re-send / idle tick: acks to the node
//! ```
//!
//! Readings are taken on the node's schedule the whole time — while Wi-Fi is being
//! joined, while waiting out a backoff, while connected — and wait in the node's ring
//! until the agent acks them, so a Wi-Fi outage costs nothing that fits in the ring.
//! The node does all the delivery bookkeeping (sequence numbers, re-sends after a
//! reconnect, the ack watermark); this loop only moves bytes and time.
//!
//! Everything outside is a trait: [`Connector`] (Wi-Fi and TCP and the MQTT client in
//! the image, a scripted broker in the tests), [`Clock`], [`Indicator`] (the LED).

use core::convert::Infallible;

use embassy_futures::select::{select, Either};
use embedded_hal::delay::DelayNs;
use fogline_firmware::node::{Node, Now, Slot};
use fogline_firmware::sensor::Sensor;
use fogline_firmware::wire::Topic;

use crate::backoff::Backoff;
use crate::led::LedState;
use crate::outbox::Outbox;

/// Longest the loop waits without looking at the node again (a guard, not a schedule:
/// the node's own deadlines usually come first).
pub const IDLE_POLL_MS: u64 = 1_000;

/// After subscribing, how long to wait for the agent's retained ack before publishing.
/// With it, a reconnect re-sends only what the agent really lacks rather than the whole
/// in-flight window; a device the agent has never heard of just waits this once.
pub const RETAINED_ACK_WAIT_MS: u64 = 500;

/// Monotonic time since boot and sleeping until a moment of it.
// The image runs one single-threaded executor: the futures need not be Send.
#[allow(async_fn_in_trait)]
pub trait Clock {
    /// Milliseconds since boot.
    fn now_ms(&self) -> u64;
    /// Returns at `at_ms` (at once if that has passed).
    async fn sleep_until(&self, at_ms: u64);
}

/// What a publish attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Handed to the client: it is on its way (and the client will retry it until the
    /// broker's PUBACK, as QoS 1 requires).
    Sent,
    /// The client has no room now (its in-flight window or buffer is full): poll, then
    /// offer the same frame again.
    Busy,
}

/// One live MQTT connection.
#[allow(async_fn_in_trait)]
pub trait MqttConn {
    /// Why the connection is unusable; it is dropped after any error.
    type Error: core::fmt::Debug;

    /// Subscribes to `topic` at QoS 1.
    async fn subscribe_qos1(&mut self, topic: &str) -> Result<(), Self::Error>;

    /// Publishes `payload` on `topic` at QoS 1, not retained.
    async fn publish_qos1(&mut self, topic: &str, payload: &[u8])
        -> Result<Admission, Self::Error>;

    /// Keeps the connection alive and handles what arrives until `deadline_ms`: each
    /// inbound publish is given to `on_message`. May return earlier, after any progress
    /// (e.g. a PUBACK that frees room for [`MqttConn::publish_qos1`]).
    async fn poll_until(
        &mut self,
        deadline_ms: u64,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> Result<(), Self::Error>;
}

/// Makes connections to the agent: on the board, joins Wi-Fi if needed, resolves the
/// agent, opens TCP and sends MQTT CONNECT (a clean session; the node re-sends anything
/// unacked itself).
#[allow(async_fn_in_trait)]
pub trait Connector {
    /// The connection, which may borrow the connector (its buffers, its MQTT session).
    type Conn<'a>: MqttConn
    where
        Self: 'a;
    /// Why no connection was made.
    type Error: core::fmt::Debug;

    /// One attempt.
    async fn connect(&mut self) -> Result<Self::Conn<'_>, Self::Error>;
}

/// Where the device shows its state (the LED).
pub trait Indicator {
    /// The state to show from now on.
    fn show(&mut self, state: LedState);
}

/// Counters of the connection side (the node counts the delivery side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Connection attempts started.
    pub attempts: u64,
    /// Attempts that failed before the connection was up.
    pub connect_failures: u64,
    /// Connections that came up (subscribe included) and later ended.
    pub disconnects: u64,
    /// Publishes the client could not take at once.
    pub busy: u64,
}

/// Settings of the loop besides the node's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// First reconnect delay.
    pub backoff_first_ms: u64,
    /// Longest reconnect delay.
    pub backoff_max_ms: u64,
    /// A connection that lasted this long resets the delay.
    pub stable_after_ms: u64,
}

impl Default for LinkConfig {
    /// 1 s doubling to 60 s; a minute of connection resets it.
    fn default() -> Self {
        LinkConfig {
            backoff_first_ms: 1_000,
            backoff_max_ms: 60_000,
            stable_after_ms: 60_000,
        }
    }
}

/// The node, its sensor and the connection-side state: what [`run`] drives.
pub struct Device<B, S, D, const N: usize> {
    /// The node loop's state.
    pub node: Node<B>,
    /// The sensor it samples.
    pub sensor: S,
    /// The delay the sensor's conversions wait with.
    pub delay: D,
    outbox: Outbox<N>,
    backoff: Backoff,
    sensor_ok: bool,
    stats: LinkStats,
}

impl<B, S, D, const N: usize> Device<B, S, D, N>
where
    B: AsRef<[Slot]> + AsMut<[Slot]>,
    S: Sensor<D>,
    D: DelayNs,
{
    /// A device around `node`.
    pub fn new(node: Node<B>, sensor: S, delay: D, link: LinkConfig) -> Self {
        Device {
            node,
            sensor,
            delay,
            outbox: Outbox::new(),
            backoff: Backoff::new(
                link.backoff_first_ms,
                link.backoff_max_ms,
                link.stable_after_ms,
            ),
            sensor_ok: true,
            stats: LinkStats::default(),
        }
    }

    /// The connection-side counters.
    pub fn link_stats(&self) -> &LinkStats {
        &self.stats
    }

    /// False after the last sampling failed.
    pub fn sensor_ok(&self) -> bool {
        self.sensor_ok
    }

    fn sample(&mut self, now_ms: u64) {
        if !self.node.sample_due(now_ms) {
            return;
        }
        let now = Now {
            uptime_ms: now_ms,
            // The Pico W has no battery-backed clock: readings carry time since boot and
            // the agent dates them with its own clock.
            wall_ms: None,
        };
        self.sensor_ok = self
            .node
            .sample_if_due(now, &mut self.sensor, &mut self.delay)
            .is_ok();
    }

    /// Samples on schedule, forever (raced against connecting and waiting).
    async fn sample_forever<K: Clock>(&mut self, clock: &K) -> Infallible {
        loop {
            let now = clock.now_ms();
            self.sample(now);
            let next = self.node.next_sample_at().unwrap_or(now);
            clock.sleep_until(next).await;
        }
    }

    /// Serves one connection until it fails.
    async fn serve<M: MqttConn, K: Clock, I: Indicator>(
        &mut self,
        conn: &mut M,
        clock: &K,
        indicator: &mut I,
    ) -> M::Error {
        let ack_topic: Topic = match self.node.ack_topic().try_into() {
            Ok(topic) => topic,
            // Cannot happen: the node built it in a Topic.
            Err(()) => Topic::new(),
        };
        if let Err(e) = conn.subscribe_qos1(&ack_topic).await {
            return e;
        }
        let now = clock.now_ms();
        self.node.on_connected(now);
        self.backoff.on_connected(now);
        let settle_until = now + RETAINED_ACK_WAIT_MS;
        let mut got_ack = false;
        while !got_ack && clock.now_ms() < settle_until {
            self.sample(clock.now_ms());
            let deadline = self
                .node
                .next_sample_at()
                .map_or(settle_until, |at| at.min(settle_until));
            let node = &mut self.node;
            let result = conn
                .poll_until(deadline, &mut |topic, payload| {
                    if topic == ack_topic.as_str() {
                        got_ack = true;
                        let _ = node.on_ack_payload(payload, clock.now_ms());
                    }
                })
                .await;
            if let Err(e) = result {
                return e;
            }
        }
        loop {
            let now = clock.now_ms();
            self.sample(now);
            indicator.show(if self.sensor_ok {
                LedState::Online
            } else {
                LedState::SensorFault
            });
            // Publish until the node has nothing more to send or the client is full.
            loop {
                if self.outbox.is_empty() {
                    // A full outbox is the expected way for a flush to stop.
                    let _ = self.node.flush(clock.now_ms(), &mut self.outbox);
                }
                let Some(frame) = self.outbox.front() else {
                    break;
                };
                match conn.publish_qos1(&frame.topic, &frame.payload).await {
                    Ok(Admission::Sent) => {
                        self.outbox.pop_front();
                    }
                    Ok(Admission::Busy) => {
                        self.stats.busy += 1;
                        break;
                    }
                    Err(e) => return e,
                }
            }
            let now = clock.now_ms();
            let mut deadline = self
                .node
                .next_sample_at()
                .unwrap_or(now)
                .min(now + IDLE_POLL_MS);
            if let Some(at) = self.node.resend_at() {
                deadline = deadline.min(at);
            }
            let node = &mut self.node;
            let result = conn
                .poll_until(deadline.max(now), &mut |topic, payload| {
                    if topic == ack_topic.as_str() {
                        // A bad ack is counted by the node and changes nothing.
                        let _ = node.on_ack_payload(payload, clock.now_ms());
                    }
                })
                .await;
            if let Err(e) = result {
                return e;
            }
        }
    }
}

/// Runs the device forever: connect, serve, back off, connect again — sampling all the
/// while. `random` gives jitter for the backoff.
pub async fn run<B, S, D, const N: usize, C, K, I>(
    device: &mut Device<B, S, D, N>,
    connector: &mut C,
    clock: &K,
    indicator: &mut I,
    random: &mut dyn FnMut() -> u32,
) -> Infallible
where
    B: AsRef<[Slot]> + AsMut<[Slot]>,
    S: Sensor<D>,
    D: DelayNs,
    C: Connector,
    K: Clock,
    I: Indicator,
{
    loop {
        device.stats.attempts += 1;
        let attempt = select(connector.connect(), device.sample_forever(clock)).await;
        match attempt {
            Either::First(Ok(mut conn)) => {
                // The error says why the connection ended; the loop only needs to know
                // that it did (the image's logs show it where a probe is attached).
                let _ended = device.serve(&mut conn, clock, indicator).await;
                device.stats.disconnects += 1;
            }
            Either::First(Err(_)) => device.stats.connect_failures += 1,
            Either::Second(never) => match never {},
        }
        let failed_at = clock.now_ms();
        device.node.on_disconnected();
        device.outbox.clear();
        indicator.show(LedState::ConnectingToAgent);
        let delay = device.backoff.on_failure(failed_at, random());
        select(
            clock.sleep_until(failed_at.saturating_add(delay)),
            device.sample_forever(clock),
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
