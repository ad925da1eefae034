//! Simulated sensors: one MQTT connection per device, QoS 1, sequenced readings, a bounded
//! window of readings not yet acked end-to-end, and a re-send of everything above the
//! latest ack after every reconnect — what the firmware does.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Notify;

/// Makes the topic and payload of reading `seq` of a device: `(device, boot, seq)`.
pub type PayloadFn = Arc<dyn Fn(&str, u32, u32) -> (String, Vec<u8>) + Send + Sync>;

/// What a device takes as "this reading is acknowledged".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckSource {
    /// fogline's end-to-end ack: the retained `fogline/ack/<device>` watermark, published
    /// after the reading is on disk.
    #[default]
    Watermark,
    /// The broker's PUBACK (what a plain MQTT broker promises). A broker acknowledges the
    /// QoS 1 publishes of one connection in order, so the n-th PUBACK of a connection
    /// belongs to the n-th reading published on it. Not exact across a reconnect: a
    /// publish queued in rumqttc after the connection failed goes out on the next one
    /// untracked and its PUBACK is credited to the oldest tracked reading. Crash tests
    /// that count PUBACKs use [`crate::puback::PubackDevice`] (packet ids from sequence
    /// numbers) instead.
    PubAck,
}

/// What one simulated device does.
#[derive(Clone)]
pub struct DeviceSpec {
    /// Device id.
    pub device: String,
    /// Boot id sent with every reading.
    pub boot: u32,
    /// Most readings sent but not yet acked end-to-end.
    pub window: u32,
    /// Stop making new readings after this sequence number.
    pub max_seq: u32,
    /// Time between new readings; `None` sends as fast as the window allows.
    pub interval: Option<Duration>,
    /// Topic and payload of each reading.
    pub payload: PayloadFn,
    /// Keep publish-to-ack latencies (see [`Fleet::set_measuring`]); off for long runs,
    /// as every latency is kept in memory.
    pub record_latency: bool,
    /// Longest wait between two connection attempts (the wait doubles from 20 ms).
    pub max_backoff: Duration,
    /// What counts as acknowledged.
    pub ack: AckSource,
}

impl DeviceSpec {
    /// A device sending `{"value":..,"seq":..,"boot":..}` on `sensors/<device>/<metric>`.
    pub fn json(device: impl Into<String>, metric: &str, boot: u32) -> DeviceSpec {
        let metric = metric.to_string();
        DeviceSpec {
            device: device.into(),
            boot,
            window: 500,
            max_seq: u32::MAX - 1,
            interval: None,
            payload: Arc::new(move |device, boot, seq| {
                let value = f64::from(seq % 1000) / 10.0;
                (
                    format!("sensors/{device}/{metric}"),
                    crate::json_payload(value, Some(seq), Some(boot), None),
                )
            }),
            record_latency: false,
            max_backoff: Duration::from_millis(500),
            ack: AckSource::Watermark,
        }
    }
}

/// A copy of one device's counters.
#[derive(Debug, Clone, Default)]
pub struct DeviceSnapshot {
    /// Device id.
    pub device: String,
    /// Boot id.
    pub boot: u32,
    /// Highest sequence number sent at least once.
    pub sent: u32,
    /// Highest end-to-end ack watermark received for this boot.
    pub acked: u32,
    /// Acks received that were lower than one received before.
    pub ack_regressions: u32,
    /// Lowest watermark seen in a regression, if any.
    pub lowest_regressed_ack: Option<u32>,
    /// Connections made (the first one included).
    pub connects: u32,
    /// Connection attempts that failed and connections that broke.
    pub connection_errors: u32,
    /// Readings sent again after a reconnect.
    pub resent: u64,
    /// The last range of sequence numbers sent again after a reconnect.
    pub last_resend: Option<(u32, u32)>,
    /// True while connected.
    pub connected: bool,
    /// The last connection error.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    snap: DeviceSnapshot,
    generation: u64,
    send_times: VecDeque<(u32, Instant)>,
    latencies_us: Vec<u32>,
    /// [`AckSource::PubAck`]: readings published on this connection and not yet PUBACKed,
    /// oldest first, and PUBACKed ones above a gap in the watermark.
    awaiting_puback: VecDeque<u32>,
    pubacked_above: std::collections::BTreeSet<u32>,
}

impl State {
    /// Every reading up to `seq` is acknowledged: move the watermark and take latencies.
    fn acked_up_to(&mut self, seq: u32, now: Instant, measuring: bool) {
        if seq < self.snap.acked {
            self.snap.ack_regressions += 1;
            let low = self.snap.lowest_regressed_ack.map_or(seq, |l| l.min(seq));
            self.snap.lowest_regressed_ack = Some(low);
            return;
        }
        self.snap.acked = seq;
        while let Some(&(sent, at)) = self.send_times.front() {
            if sent > seq {
                break;
            }
            self.send_times.pop_front();
            if measuring {
                let us = now.duration_since(at).as_micros();
                self.latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
            }
        }
    }

    /// The broker acknowledged the oldest reading published on this connection.
    fn puback(&mut self, now: Instant, measuring: bool) {
        let Some(seq) = self.awaiting_puback.pop_front() else {
            return;
        };
        if seq <= self.snap.acked {
            return;
        }
        self.pubacked_above.insert(seq);
        let mut upto = self.snap.acked;
        while self.pubacked_above.remove(&(upto + 1)) {
            upto += 1;
        }
        if upto > self.snap.acked {
            self.acked_up_to(upto, now, measuring);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    stop_new: AtomicBool,
    measuring: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to one simulated device.
#[derive(Clone)]
pub struct Device {
    shared: Arc<Shared>,
}

impl Device {
    /// A copy of its counters.
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.shared.lock().snap.clone()
    }

    /// Takes the publish-to-ack latencies (microseconds) recorded so far.
    pub fn take_latencies_us(&self) -> Vec<u32> {
        std::mem::take(&mut self.shared.lock().latencies_us)
    }
}

/// A set of simulated devices running on their own tokio runtime.
pub struct Fleet {
    rt: Option<tokio::runtime::Runtime>,
    broker: SocketAddr,
    devices: Vec<Device>,
    measuring: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl Fleet {
    /// A fleet whose devices connect to the MQTT broker at `broker`.
    pub fn new(broker: SocketAddr) -> anyhow::Result<Fleet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fleet")
            .build()
            .context("building the fleet's tokio runtime")?;
        Ok(Fleet {
            rt: Some(rt),
            broker,
            devices: Vec::new(),
            measuring: Arc::new(AtomicBool::new(true)),
            paused: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts one device.
    pub fn add(&mut self, spec: DeviceSpec) -> anyhow::Result<Device> {
        let rt = self.rt.as_ref().context("fleet was shut down")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                snap: DeviceSnapshot {
                    device: spec.device.clone(),
                    boot: spec.boot,
                    ..DeviceSnapshot::default()
                },
                ..State::default()
            }),
            notify: Notify::new(),
            stop_new: AtomicBool::new(false),
            measuring: self.measuring.clone(),
            paused: self.paused.clone(),
        });
        let client_id = format!("sim-{}-{:08x}", spec.device, fastrand::u32(..));
        let mut opts =
            MqttOptions::new(client_id, self.broker.ip().to_string(), self.broker.port());
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_inflight(100)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Without TCP_NODELAY a client's small publishes wait for the broker's delayed
        // TCP ACK (~40 ms) whenever one is outstanding.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let ack_topic = format!("fogline/ack/{}", spec.device);
        rt.spawn(poll_loop(
            eventloop,
            shared.clone(),
            ack_topic.clone(),
            spec.boot,
            spec.max_backoff,
            spec.ack,
        ));
        rt.spawn(publish_loop(client, shared.clone(), ack_topic, spec));
        let device = Device { shared };
        self.devices.push(device.clone());
        Ok(device)
    }

    /// A plain MQTT client for publishing arbitrary topics and payloads (QoS 1).
    pub fn raw_publisher(&self, name: &str) -> anyhow::Result<RawPublisher> {
        let rt = self.rt.as_ref().context("fleet was shut down")?;
        let client_id = format!("raw-{name}-{:08x}", fastrand::u32(..));
        let mut opts =
            MqttOptions::new(client_id, self.broker.ip().to_string(), self.broker.port());
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let counters = Arc::new(RawCounters::default());
        let c = counters.clone();
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.connects.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        c.pubacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        c.errors.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(RawPublisher { client, counters })
    }

    /// The devices, in the order they were added.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Snapshots of every device.
    pub fn snapshots(&self) -> Vec<DeviceSnapshot> {
        self.devices.iter().map(Device::snapshot).collect()
    }

    /// Publish-to-ack latencies are kept only for acks that arrive while measuring is on.
    pub fn set_measuring(&self, on: bool) {
        self.measuring.store(on, Ordering::SeqCst);
    }

    /// While paused, devices connect but make no new readings (e.g. until all are connected).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        for d in &self.devices {
            d.shared.notify.notify_one();
        }
    }

    /// Devices stop making new readings (they still re-send unacked ones after a reconnect).
    pub fn stop_publishing(&self) {
        for d in &self.devices {
            // Under the device's lock: a reading being started either finished counting
            // itself as sent or sees the flag.
            let _st = d.shared.lock();
            d.shared.stop_new.store(true, Ordering::SeqCst);
            d.shared.notify.notify_one();
        }
    }

    /// Sum of `sent` and of `acked` over all devices.
    pub fn totals(&self) -> (u64, u64) {
        self.snapshots().iter().fold((0, 0), |(s, a), d| {
            (s + u64::from(d.sent), a + u64::from(d.acked))
        })
    }

    /// Number of devices currently connected.
    pub fn connected(&self) -> usize {
        self.snapshots().iter().filter(|d| d.connected).count()
    }

    /// Waits until every device's ack covers everything it sent.
    pub fn wait_all_acked(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let snaps = self.snapshots();
            let behind: Vec<&DeviceSnapshot> = snaps.iter().filter(|d| d.acked < d.sent).collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = behind
                    .iter()
                    .take(10)
                    .map(|d| {
                        format!(
                            "{}: sent {} acked {} connected {} connects {} last re-send {:?} \
                             last error {:?}",
                            d.device,
                            d.sent,
                            d.acked,
                            d.connected,
                            d.connects,
                            d.last_resend,
                            d.last_error
                        )
                    })
                    .collect();
                bail!(
                    "{} of {} devices not fully acked within {timeout:?}:\n  {}",
                    behind.len(),
                    snaps.len(),
                    shown.join("\n  ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every device is connected.
    pub fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.connected();
            if n == self.devices.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {n} of {} devices connected within {timeout:?}",
                    self.devices.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every device and its connection.
    pub fn shutdown(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Default)]
struct RawCounters {
    connects: AtomicU64,
    pubacks: AtomicU64,
    errors: AtomicU64,
}

/// A plain QoS 1 MQTT publisher (see [`Fleet::raw_publisher`]).
pub struct RawPublisher {
    client: AsyncClient,
    counters: Arc<RawCounters>,
}

impl RawPublisher {
    /// Queues one QoS 1 publish.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.into())
            .with_context(|| format!("queueing a publish to {topic}"))
    }

    /// Waits until the broker has acknowledged `n` publishes in all.
    pub fn wait_pubacks(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.counters.pubacks.load(Ordering::SeqCst);
            if got >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {got} of {n} publishes acknowledged by the broker within {timeout:?} \
                     ({} connects, {} connection errors)",
                    self.counters.connects.load(Ordering::SeqCst),
                    self.counters.errors.load(Ordering::SeqCst)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections made so far.
    pub fn connects(&self) -> u64 {
        self.counters.connects.load(Ordering::SeqCst)
    }
}

async fn poll_loop(
    mut eventloop: rumqttc::EventLoop,
    shared: Arc<Shared>,
    ack_topic: String,
    boot: u32,
    max_backoff: Duration,
    ack_source: AckSource,
) {
    let first_backoff = Duration::from_millis(20).min(max_backoff);
    let mut backoff = first_backoff;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = first_backoff;
                let mut st = shared.lock();
                st.snap.connected = true;
                st.snap.connects += 1;
                st.generation += 1;
                drop(st);
                shared.notify.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                let Ok(ack) = serde_json::from_slice::<fogline_firmware::wire::Ack>(&p.payload)
                else {
                    continue;
                };
                if ack.boot != boot {
                    continue;
                }
                let measuring = shared.measuring.load(Ordering::Relaxed);
                shared
                    .lock()
                    .acked_up_to(ack.seq, Instant::now(), measuring);
                shared.notify.notify_one();
            }
            Ok(Event::Incoming(Packet::PubAck(_))) if ack_source == AckSource::PubAck => {
                let measuring = shared.measuring.load(Ordering::Relaxed);
                shared.lock().puback(Instant::now(), measuring);
                shared.notify.notify_one();
            }
            Ok(_) => {}
            Err(e) => {
                {
                    let mut st = shared.lock();
                    st.snap.connected = false;
                    // A clean session forgets what was in flight: it is published again.
                    st.awaiting_puback.clear();
                    st.pubacked_above.clear();
                    st.snap.connection_errors += 1;
                    st.snap.last_error = Some(e.to_string());
                }
                shared.notify.notify_one();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

async fn publish_loop(
    client: AsyncClient,
    shared: Arc<Shared>,
    ack_topic: String,
    spec: DeviceSpec,
) {
    let mut my_generation = 0;
    let mut next_at = tokio::time::Instant::now();
    loop {
        let (connected, generation, sent, acked) = {
            let st = shared.lock();
            (
                st.snap.connected,
                st.generation,
                st.snap.sent,
                st.snap.acked,
            )
        };
        if !connected {
            wait(&shared, Duration::from_millis(50)).await;
            continue;
        }
        if generation != my_generation {
            // A new connection (clean session): subscribe to our ack again, then re-send
            // everything the agent has not acked yet, oldest first.
            my_generation = generation;
            if spec.ack == AckSource::Watermark
                && client
                    .subscribe(&ack_topic, QoS::AtLeastOnce)
                    .await
                    .is_err()
            {
                return;
            }
            let mut resent = 0;
            for seq in acked.saturating_add(1)..=sent {
                if shared.lock().generation != my_generation {
                    break;
                }
                let (topic, payload) = (spec.payload)(&spec.device, spec.boot, seq);
                if spec.ack == AckSource::PubAck {
                    shared.lock().awaiting_puback.push_back(seq);
                }
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
                resent += 1;
            }
            let mut st = shared.lock();
            st.snap.resent += resent;
            if resent > 0 {
                st.snap.last_resend = Some((acked + 1, acked + u32::try_from(resent).unwrap_or(0)));
            }
            drop(st);
            continue;
        }
        let stopped =
            shared.stop_new.load(Ordering::SeqCst) || shared.paused.load(Ordering::SeqCst);
        if stopped || sent >= spec.max_seq || sent.saturating_sub(acked) >= spec.window {
            wait(&shared, Duration::from_millis(100)).await;
            continue;
        }
        if let Some(interval) = spec.interval {
            let now = tokio::time::Instant::now();
            if next_at > now {
                tokio::time::sleep_until(next_at).await;
            }
            // After a stall, do not burst to catch up: at most one reading is "owed".
            next_at = next_at.max(now.checked_sub(interval).unwrap_or(now)) + interval;
        }
        let seq = sent + 1;
        {
            let mut st = shared.lock();
            // Checked again under the lock that `stop_publishing` takes: once it returned,
            // no new reading starts (the interval sleep above may have outlasted it).
            if shared.stop_new.load(Ordering::SeqCst) || shared.paused.load(Ordering::SeqCst) {
                continue;
            }
            st.snap.sent = seq;
            if spec.record_latency {
                st.send_times.push_back((seq, Instant::now()));
            }
            if spec.ack == AckSource::PubAck {
                st.awaiting_puback.push_back(seq);
            }
        }
        let (topic, payload) = (spec.payload)(&spec.device, spec.boot, seq);
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn wait(shared: &Shared, at_most: Duration) {
    let _ = tokio::time::timeout(at_most, shared.notify.notified()).await;
}
