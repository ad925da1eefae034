//! One device on a host: the firmware's [`Node`] with a sensor and an MQTT connection.
//!
//! Two tasks per device. The connection task owns rumqttc's event loop (which must be
//! polled all the time to make progress) and turns what matters into [`NetEvent`]s:
//! connected, disconnected, ack payload. The device task owns the node; it samples on the
//! node's schedule, feeds it the events, and flushes through [`MqttPublisher`], which uses
//! `try_publish` so a full client queue means "later", never a blocked device. The node
//! does all the delivery logic; this file is only plumbing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use embedded_hal::delay::DelayNs;
use fogline_firmware::node::{Node, NodeConfig, Publisher, Slot};
use fogline_firmware::sensor::Sensor;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::clock::DeviceClock;

/// How long the device task sleeps at most when nothing is due.
const IDLE_WAKE_MS: u64 = 250;
/// Retry delay when the MQTT client's queue was full.
const BLOCKED_RETRY_MS: u64 = 5;
/// Most overdue samples taken in one wake-up, so one device cannot hog a worker.
const MAX_SAMPLES_PER_WAKE: usize = 1000;
/// Reconnect backoff: first delay and ceiling (with ±50 % jitter).
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Requests the client queues before `try_publish` says "full".
    pub queue: usize,
}

impl MqttSettings {
    /// Splits `host:port` (port 1883 when omitted; IPv6 as `[::1]:1883`).
    pub fn parse_broker(broker: &str) -> anyhow::Result<(String, u16)> {
        let (host, port) = match broker.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                let port = port
                    .parse()
                    .with_context(|| format!("bad port in broker address {broker:?}"))?;
                (host.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (broker, 1883),
        };
        if host.is_empty() {
            anyhow::bail!("broker address {broker:?} has no host");
        }
        Ok((host.to_string(), port))
    }
}

/// Everything one device needs besides its sensor and clock.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device id.
    pub device: String,
    /// Boot id (random per run of this program: the ring lives in memory).
    pub boot: u32,
    /// Ring capacity in readings.
    pub ring: usize,
    /// Sampling period.
    pub sample_period_ms: u64,
    /// Most readings in flight.
    pub max_in_flight: usize,
    /// Re-send in-flight readings after this long without ack progress.
    pub resend_after_ms: u64,
    /// Missed samples taken back-to-back after a stall.
    pub max_catch_up: u32,
    /// Sampling blocks the thread (real I2C): run it with `block_in_place`.
    pub blocking_sensor: bool,
    /// Log connects and disconnects at info level (one device) rather than debug (fleets).
    pub log_connections: bool,
    /// Broker connection.
    pub mqtt: MqttSettings,
}

/// What the rest of the program may ask a running device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sample and deliver.
    Run,
    /// Stop sampling; finish when everything held is acked.
    Drain,
    /// Stop now.
    Stop,
}

/// A device's counters, shared with whoever prints progress or writes the report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DeviceReport {
    /// Device id.
    pub device: String,
    /// Boot id.
    pub boot: u32,
    /// `system` or `unset` (starts in 1970).
    pub clock: String,
    /// Highest sequence number published: readings 1..=last_seq went out at least once.
    pub last_seq: u32,
    /// The agent's watermark: readings 1..=acked are durable.
    pub acked: u32,
    /// Readings held (in flight or not yet published).
    pub pending: usize,
    /// Readings taken.
    pub sampled: u64,
    /// Publishes, re-sends included.
    pub published: u64,
    /// Publishes of readings published before.
    pub resent: u64,
    /// Readings lost to a full ring.
    pub dropped: u64,
    /// Failed samplings.
    pub sensor_errors: u64,
    /// Missed schedule slots.
    pub skipped_samples: u64,
    /// Connections made.
    pub connects: u64,
    /// Re-sends caused by missing acks.
    pub resend_timeouts: u64,
    /// Unparsable or impossible acks.
    pub bad_acks: u64,
    /// Connected right now.
    pub connected: bool,
    /// Drained: everything it took is acked (or dropped and counted).
    pub finished: bool,
    /// The last connection error.
    pub last_error: Option<String>,
}

/// What the connection task tells the device task.
#[derive(Debug)]
pub enum NetEvent {
    /// CONNACK received (a clean session).
    Connected,
    /// The connection failed or broke.
    Disconnected(String),
    /// A payload on the device's ack topic.
    Ack(Vec<u8>),
}

/// [`Publisher`] over rumqttc: QoS 1, never waits.
pub struct MqttPublisher<'a> {
    client: &'a AsyncClient,
}

impl Publisher for MqttPublisher<'_> {
    type Error = rumqttc::ClientError;

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Self::Error> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64())
}

/// Polls the event loop for the life of the device; ends when the device task is gone.
async fn connection_task(
    mut eventloop: EventLoop,
    client: AsyncClient,
    ack_topic: String,
    tx: mpsc::Sender<NetEvent>,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut need_subscribe = false;
    loop {
        let event: Result<Event, ConnectionError> = tokio::select! {
            e = eventloop.poll() => e,
            () = tx.closed() => return,
        };
        let forward = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_FIRST;
                need_subscribe = true;
                Some(NetEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                Some(NetEvent::Ack(p.payload.to_vec()))
            }
            Ok(_) => None,
            Err(e) => {
                need_subscribe = false;
                Some(NetEvent::Disconnected(e.to_string()))
            }
        };
        // A clean session forgets subscriptions: ask for the ack topic again (the agent
        // keeps it retained, so the current watermark arrives at once). Retried after
        // every event while the client's queue is full.
        if need_subscribe && client.try_subscribe(&ack_topic, QoS::AtLeastOnce).is_ok() {
            need_subscribe = false;
        }
        let failed = matches!(forward, Some(NetEvent::Disconnected(_)));
        if let Some(ev) = forward {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if failed {
            tokio::select! {
                () = tokio::time::sleep(jittered(backoff)) => {}
                () = tx.closed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn mqtt_options(spec: &DeviceSpec) -> MqttOptions {
    let client_id = format!("fogline-{}-{:08x}", spec.device, fastrand::u32(..));
    let mut opts = MqttOptions::new(client_id, spec.mqtt.host.clone(), spec.mqtt.port);
    opts.set_keep_alive(spec.mqtt.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, 64 * 1024)
        .set_request_channel_capacity(spec.mqtt.queue.max(1));
    if let Some((user, pass)) = &spec.mqtt.credentials {
        opts.set_credentials(user.clone(), pass.clone());
    }
    opts
}

/// Runs one device until `phase` says stop, or says drain and everything is acked.
/// Returns `true` when it finished drained.
pub async fn run_device<S, D>(
    spec: DeviceSpec,
    mut sensor: S,
    mut delay: D,
    clock: DeviceClock,
    mut phase: watch::Receiver<Phase>,
    report: Arc<Mutex<DeviceReport>>,
) -> anyhow::Result<bool>
where
    S: Sensor<D> + Send,
    S::Error: std::fmt::Debug,
    D: DelayNs + Send,
{
    let config = NodeConfig {
        sample_period_ms: spec.sample_period_ms.max(1),
        max_in_flight: spec.max_in_flight,
        resend_after_ms: spec.resend_after_ms,
        max_catch_up: spec.max_catch_up,
        ..NodeConfig::new(&spec.device, spec.boot)
    };
    let mut node = Node::new(config, vec![Slot::EMPTY; spec.ring])
        .map_err(|e| anyhow::anyhow!("device {}: {e}", spec.device))?;
    {
        let mut r = lock(&report);
        r.device = spec.device.clone();
        r.boot = spec.boot;
        r.clock = clock.wall().name().to_string();
    }

    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&spec), spec.mqtt.queue.max(1));
    let mut net = rumqttc::NetworkOptions::new();
    // Small publishes and small acks: do not let Nagle hold them back.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, mut rx) = mpsc::channel(64);
    let connection = tokio::spawn(connection_task(
        eventloop,
        client.clone(),
        node.ack_topic().to_string(),
        tx,
    ));

    let mut last_error: Option<String> = None;
    let mut sensor_error_logged = false;
    let finished = loop {
        let current = *phase.borrow_and_update();
        if current == Phase::Stop {
            break false;
        }
        let now = clock.now();
        if current == Phase::Run {
            let mut taken = 0;
            while node.sample_due(now.uptime_ms) && taken < MAX_SAMPLES_PER_WAKE {
                let result = if spec.blocking_sensor {
                    tokio::task::block_in_place(|| node.sample_if_due(now, &mut sensor, &mut delay))
                } else {
                    node.sample_if_due(now, &mut sensor, &mut delay)
                };
                match result {
                    Ok(_) => sensor_error_logged = false,
                    Err(e) if !sensor_error_logged => {
                        tracing::warn!(device = %spec.device, "sensor error: {e:?}");
                        sensor_error_logged = true;
                    }
                    Err(_) => {}
                }
                taken += 1;
            }
        }
        let blocked = node
            .flush(now.uptime_ms, &mut MqttPublisher { client: &client })
            .is_err();
        update_report(&report, &node, &last_error, false);
        if current == Phase::Drain && node.is_drained() {
            break true;
        }

        let mut wake = now.uptime_ms + IDLE_WAKE_MS;
        if current == Phase::Run {
            wake = wake.min(node.next_sample_at().unwrap_or(now.uptime_ms));
        }
        if let Some(at) = node.resend_at() {
            wake = wake.min(at);
        }
        if blocked {
            wake = wake.min(now.uptime_ms + BLOCKED_RETRY_MS);
        }
        let sleep = Duration::from_millis(wake.saturating_sub(clock.uptime_ms()));
        tokio::select! {
            ev = rx.recv() => {
                let uptime = clock.uptime_ms();
                match ev {
                    Some(NetEvent::Connected) => {
                        if spec.log_connections {
                            tracing::info!(device = %spec.device, "connected");
                        } else {
                            tracing::debug!(device = %spec.device, "connected");
                        }
                        node.on_connected(uptime);
                    }
                    Some(NetEvent::Disconnected(e)) => {
                        if node.is_connected() {
                            if spec.log_connections {
                                tracing::warn!(device = %spec.device, "disconnected: {e}");
                            } else {
                                tracing::debug!(device = %spec.device, "disconnected: {e}");
                            }
                        }
                        node.on_disconnected();
                        last_error = Some(e);
                    }
                    Some(NetEvent::Ack(payload)) => {
                        if let Err(e) = node.on_ack_payload(&payload, uptime) {
                            tracing::warn!(device = %spec.device, "unreadable ack: {e}");
                        }
                    }
                    None => break false,
                }
            }
            () = tokio::time::sleep(sleep) => {}
            changed = phase.changed() => {
                if changed.is_err() {
                    break false;
                }
            }
        }
    };
    update_report(&report, &node, &last_error, finished);
    // Leave politely if we can; the connection task ends when `rx` is dropped.
    let _ = client.try_disconnect();
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
    Ok(finished)
}

fn lock(report: &Mutex<DeviceReport>) -> std::sync::MutexGuard<'_, DeviceReport> {
    report.lock().unwrap_or_else(|e| e.into_inner())
}

fn update_report(
    report: &Mutex<DeviceReport>,
    node: &Node<Vec<Slot>>,
    last_error: &Option<String>,
    finished: bool,
) {
    let s = node.stats();
    let mut r = lock(report);
    r.last_seq = node.last_seq();
    r.acked = node.acked();
    r.pending = node.pending();
    r.sampled = s.sampled;
    r.published = s.published;
    r.resent = s.resent;
    r.dropped = s.dropped;
    r.sensor_errors = s.sensor_errors;
    r.skipped_samples = s.skipped_samples;
    r.connects = s.connects;
    r.resend_timeouts = s.resend_timeouts;
    r.bad_acks = s.bad_acks;
    r.connected = node.is_connected();
    r.finished = finished;
    r.last_error.clone_from(last_error);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_with_and_without_port() {
        let parse = |s| MqttSettings::parse_broker(s).expect("valid");
        assert_eq!(parse("127.0.0.1:1884"), ("127.0.0.1".to_string(), 1884));
        assert_eq!(parse("agent.local"), ("agent.local".to_string(), 1883));
        assert_eq!(parse("[::1]:1885"), ("::1".to_string(), 1885));
        assert!(MqttSettings::parse_broker("host:notaport").is_err());
        assert!(MqttSettings::parse_broker(":1883").is_err());
    }
}
