//! Store-and-forward to the gateway over MQTT (rumqttc).
//!
//! The uplink reads the origin log from the buffer (never from memory), sends it in
//! batches from the gateway's last durable ack, keeps at most `max_inflight_readings`
//! readings unacknowledged, and on every reconnect rewinds to the gateway's ack, so
//! nothing is lost whatever dies in between; the gateway stores each offset once. It never
//! blocks ingest: it only reads committed blocks. After an outage the site's aggregates
//! (the live view dashboards watch) go first, then the backlog drains oldest-first at
//! `drain_rate` readings/s. The buffer deletes nothing the gateway has not acked, and
//! keeps acked readings `retention_secs` longer.
//!
//! Pure cores: [`backoff::Backoff`] (reconnect delays) and [`pace::Pacer`] (drain rate).

pub mod backoff;
pub mod config;
pub mod pace;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::buffer::{Log, StoredBlock};
use crate::shipping::proto;
pub use config::UplinkConfig;
use window::{AckVerdict, Window, WindowConfig};

/// Where an uplink reads the log it ships: the agent's own buffer, or a replica of a
/// peer's log that this agent holds.
pub trait Source: Send + Sync + 'static {
    /// Blocks holding offsets from `from` on, oldest first, until about `max_readings`
    /// readings or `head` (the first offset not yet stored).
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<StoredBlock>>;
}

impl Source for Log {
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<StoredBlock>> {
        Ok(Log::blocks_from(self, from, max_readings, head)?)
    }
}

/// Aggregates waiting to be relayed to the gateway: the newest JSON per topic.
#[derive(Default)]
pub struct AggRelay {
    state: Mutex<RelayState>,
    changed: Notify,
}

#[derive(Default)]
struct RelayState {
    latest: HashMap<String, String>,
    dirty: VecDeque<String>,
}

impl AggRelay {
    /// Called by the writer for every aggregate it publishes locally.
    pub fn offer(&self, topic: &str, json: &str) {
        if let Ok(mut s) = self.state.lock() {
            if s.latest.insert(topic.to_owned(), json.to_owned()).is_none()
                || !s.dirty.iter().any(|t| t == topic)
            {
                s.dirty.push_back(topic.to_owned());
            }
        }
        self.changed.notify_one();
    }

    /// Every aggregate, for a fresh connection (the gateway may have missed some).
    fn all(&self) -> Vec<(String, String)> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |mut s| {
                s.dirty.clear();
                s.latest
                    .iter()
                    .map(|(t, j)| (t.clone(), j.clone()))
                    .collect()
            },
        )
    }

    fn take_dirty(&self, max: usize) -> Vec<(String, String)> {
        let Ok(mut s) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(topic) = s.dirty.pop_front() else {
                break;
            };
            if let Some(json) = s.latest.get(&topic) {
                out.push((topic, json.clone()));
            }
        }
        out
    }
}

/// The uplink's figures on `/metrics` (`fogline_uplink_*`), copied from its status.
#[derive(Default)]
pub struct Metrics {
    connected: Gauge,
    acked: Gauge,
    sent: Gauge,
    backlog: Gauge,
    in_flight: Gauge,
    connects: Gauge,
    batches: Gauge,
    bytes: Gauge,
    acks_refused: Gauge,
    acks_backwards: Gauge,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        for (name, help, g) in [
            (
                "uplink_connected",
                "1 while the uplink to the gateway is connected",
                &self.connected,
            ),
            (
                "uplink_acked_offset",
                "The gateway has every reading below this offset",
                &self.acked,
            ),
            (
                "uplink_sent_offset",
                "Readings below this offset were sent",
                &self.sent,
            ),
            (
                "uplink_backlog_readings",
                "Readings the gateway does not have yet",
                &self.backlog,
            ),
            (
                "uplink_in_flight_readings",
                "Readings sent but not yet acked",
                &self.in_flight,
            ),
            (
                "uplink_connects",
                "Successful uplink connections since start",
                &self.connects,
            ),
            (
                "uplink_batches_sent",
                "Batches sent upstream since start",
                &self.batches,
            ),
            (
                "uplink_bytes_sent",
                "Batch bytes sent upstream since start",
                &self.bytes,
            ),
            (
                "uplink_acks_refused",
                "Gateway acks refused since start: not an ack, or beyond everything this log holds",
                &self.acks_refused,
            ),
            (
                "uplink_acks_backwards",
                "Gateway acks below an earlier ack since start (ignored)",
                &self.acks_backwards,
            ),
        ] {
            r.register(name, help, g.clone());
        }
    }

    /// Copies the uplink's state into its gauges.
    pub fn set(&self, u: &UplinkStatus) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.connected.set(i64::from(u.link == "connected"));
        self.acked.set(g(u.acked));
        self.sent.set(g(u.sent));
        self.backlog.set(g(u.backlog()));
        self.in_flight.set(g(u.in_flight()));
        self.connects.set(g(u.connects));
        self.batches.set(g(u.batches_sent));
        self.bytes.set(g(u.bytes_sent));
        self.acks_refused.set(g(u.acks_refused));
        self.acks_backwards.set(g(u.acks_backwards));
    }
}

/// The uplink's state, for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct UplinkStatus {
    pub gateway: String,
    /// "off", "connecting", "connected" or "backoff".
    pub link: &'static str,
    /// The gateway has every reading below this offset.
    pub acked: u64,
    /// Sent up to here (not yet acked above `acked`).
    pub sent: u64,
    /// First offset not yet committed locally.
    pub head: u64,
    pub connects: u64,
    pub batches_sent: u64,
    pub bytes_sent: u64,
    /// Acks refused: impossible (beyond this log) or not an ack at all.
    pub acks_refused: u64,
    /// Acks below what the destination acked before (ignored).
    pub acks_backwards: u64,
    pub last_error: Option<String>,
}

impl UplinkStatus {
    pub fn backlog(&self) -> u64 {
        self.head.saturating_sub(self.acked)
    }

    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.acked)
    }
}

/// Shared between the uplink task, the writer (which deletes what the gateway acked) and
/// the HTTP handlers.
#[derive(Default)]
pub struct Shared {
    pub status: Mutex<UplinkStatus>,
    /// The gateway's durable ack, for the writer.
    pub acked: AtomicU64,
    pub relay: AggRelay,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    pub fn snapshot(&self) -> UplinkStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Everything an uplink task needs. One task ships one origin's log to one destination.
pub struct Uplink {
    pub config: UplinkConfig,
    /// `HOST:PORT` of the destination broker (the gateway, or a peer agent).
    pub destination: String,
    /// Uplink to the gateway, or replication to a peer.
    pub scheme: proto::Scheme,
    pub site: String,
    pub origin: String,
    pub source: Arc<dyn Source>,
    /// The first offset not yet stored, updated by whoever writes the log.
    pub head: watch::Receiver<u64>,
    pub shared: Arc<Shared>,
    /// When set, the uplink only connects while this holds (the site leader's lease).
    pub active: Option<watch::Receiver<bool>>,
    /// TLS with this node's client certificate (`[tls]`); None: plain MQTT.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The log is this agent's own (not a replica): no ack can be beyond its head.
    pub own_log: bool,
}

/// A running uplink task.
pub struct UplinkHandle {
    task: tokio::task::JoinHandle<()>,
}

impl UplinkHandle {
    /// Waits for the task to end (after the shutdown fired).
    pub async fn stop(self) {
        let _ = self.task.await;
    }
}

/// Starts `uplink` on the runtime; it runs until `shutdown` fires.
pub fn spawn(uplink: Uplink, shutdown: crate::shutdown::Shutdown) -> UplinkHandle {
    UplinkHandle {
        task: tokio::spawn(uplink.run(shutdown)),
    }
}

/// Why a session ended without an error.
enum End {
    Shutdown,
    Inactive,
}

impl Uplink {
    /// Runs until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: crate::shutdown::Shutdown) {
        let (host, port) = match self.destination.parse::<crate::addr::HostPort>() {
            Ok(hp) => (hp.host, hp.port),
            Err(e) => {
                tracing::error!("uplink off: {e}");
                return;
            }
        };
        self.shared.update(|s| {
            s.gateway = self.destination.clone();
            s.link = "connecting";
        });
        let mut backoff = backoff::Backoff::new(
            Duration::from_millis(self.config.backoff_min_ms),
            Duration::from_millis(self.config.backoff_max_ms),
        );
        loop {
            if shutdown.is_fired() {
                return;
            }
            if let Some(active) = self.active.as_mut() {
                self.shared.update(|s| s.link = "standby");
                tokio::select! {
                    r = active.wait_for(|a| *a) => if r.is_err() { return },
                    () = shutdown.fired() => return,
                }
            }
            self.shared.update(|s| s.link = "connecting");
            let result = self.session(&host, port, &mut backoff, &mut shutdown).await;
            match result {
                Ok(End::Shutdown) => return,
                Ok(End::Inactive) => {
                    tracing::info!(destination = %self.destination, origin = %self.origin, "no longer the site leader: uplink stopped");
                }
                Err(e) => {
                    let delay = backoff.next_delay(fastrand::f64());
                    tracing::warn!(
                        destination = %self.destination,
                        origin = %self.origin,
                        retry_in_ms = delay.as_millis() as u64,
                        "link down: {e}"
                    );
                    self.shared.update(|s| {
                        s.link = "backoff";
                        s.last_error = Some(e.to_string());
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        () = shutdown.fired() => return,
                    }
                }
            }
        }
    }

    /// One connection, from CONNECT until an error (returned) or shutdown (`Ok`). The
    /// protocol's decisions are the window's ([`window::Window`]); this drives it with
    /// rumqttc's events, the time and the log.
    async fn session(
        &mut self,
        host: &str,
        port: u16,
        backoff: &mut backoff::Backoff,
        shutdown: &mut crate::shutdown::Shutdown,
    ) -> anyhow::Result<End> {
        // Unique per connection: whichever agent forwards an origin's log after a
        // failover must not take over the old leader's connection (possibly half-open)
        // by its client id — the broker may drop the new one's routes with the old one.
        let client_id = format!(
            "fogline-{}-{}-{}-{:08x}",
            self.scheme.name(),
            self.site,
            self.origin,
            fastrand::u32(..)
        );
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(self.config.keepalive_secs.max(5)))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 8 << 20)
            .set_inflight(self.config.max_inflight_batches.clamp(1, 1000));
        if let Some(tls) = &self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);

        let topics = Topics {
            ack: self.scheme.ack_topic(&self.site, &self.origin),
            log: self.scheme.log_topic(&self.site, &self.origin),
        };
        let mut active = self.active.clone();
        let mut connected = false;
        let started = Instant::now();
        let now_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut window = Window::new(self.window_config(), now_ms());
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                event = eventloop.poll() => {
                    match event? {
                        Event::Incoming(Packet::ConnAck(_)) => {
                            connected = true;
                            window.on_connected(now_ms());
                            backoff.reset();
                            self.shared.update(|s| { s.link = "connected"; s.connects += 1; s.last_error = None; });
                            tracing::info!(destination = %self.destination, origin = %self.origin, "{} connected", self.scheme.name());
                            client.try_subscribe(topics.ack.clone(), QoS::AtLeastOnce)?;
                            client.try_publish(self.scheme.sync_topic(&self.site, &self.origin), QoS::AtLeastOnce, false, Vec::new())?;
                            // Live view first: every aggregate, before any backlog.
                            for (topic, json) in self.shared.relay.all() {
                                self.relay_one(&client, &topic, json);
                            }
                        }
                        Event::Incoming(Packet::Publish(p)) if p.topic == topics.ack => {
                            self.on_ack(&mut window, &p.payload, now_ms());
                        }
                        _ => {}
                    }
                }
                // Not while connecting: rumqttc's poll() is not cancel-safe until the
                // CONNACK (TCP, CONNECT and CONNACK happen inside it), and these fire every
                // few ms under ingest, so a slow CONNACK would be cut off again and again.
                _ = self.head.changed(), if connected => {}
                _ = self.shared.relay.changed.notified(), if connected => {}
                _ = tick.tick(), if connected => {}
                () = shutdown.fired() => return Ok(End::Shutdown),
                Some(()) = async {
                    match active.as_mut() {
                        Some(a) => a.changed().await.ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if active.as_ref().is_some_and(|a| !*a.borrow()) {
                        return Ok(End::Inactive);
                    }
                }
            }
            if !connected {
                continue;
            }
            for (topic, json) in self.shared.relay.take_dirty(256) {
                self.relay_one(&client, &topic, json);
            }
            let now = now_ms();
            if window.on_tick(now) {
                // The destination has not moved for a while although batches are out: it
                // refused one (a hole) or lost it.
                tracing::warn!(
                    acked = window.acked(),
                    "no {} ack progress; re-sending from the ack",
                    self.scheme.name()
                );
            }
            let head = *self.head.borrow();
            self.shared.update(|s| s.head = head);
            let sent = fill(
                &mut window,
                self.source.as_ref(),
                &client,
                &topics.log,
                head,
                now,
            )?;
            self.shared.update(|s| {
                s.sent = window.sent();
                s.batches_sent += sent.batches;
                s.bytes_sent += sent.bytes;
            });
        }
    }

    fn window_config(&self) -> WindowConfig {
        WindowConfig {
            max_inflight: self.config.max_inflight_readings,
            batch: self.config.batch_readings.max(1),
            ack_timeout_ms: self.config.ack_timeout_ms.max(100),
            drain_rate: self.config.drain_rate,
        }
    }

    /// The destination's ack: believed only if it is possible.
    fn on_ack(&self, window: &mut Window, payload: &[u8], now_ms: u64) {
        let ack = match proto::UplinkAck::decode(payload) {
            Ok(ack) => ack,
            Err(e) => {
                self.shared.update(|s| s.acks_refused += 1);
                tracing::warn!(origin = %self.origin, "{} ack is not JSON {{\"next\":N}}: {e}", self.scheme.name());
                return;
            }
        };
        // A destination cannot have more of this agent's own log than it ever wrote; of
        // a replica, a destination may hold more than this agent does.
        let bound = if self.own_log {
            *self.head.borrow()
        } else {
            u64::MAX
        };
        match window.on_ack(ack.next, bound, now_ms) {
            AckVerdict::Moved => {
                if let Some(a) = window.acked() {
                    self.shared.acked.fetch_max(a, Ordering::SeqCst);
                    self.shared.update(|s| {
                        s.acked = s.acked.max(a);
                        s.sent = window.sent();
                    });
                }
            }
            AckVerdict::Same => {}
            AckVerdict::Backwards { acked } => {
                self.shared.update(|s| s.acks_backwards += 1);
                tracing::warn!(
                    origin = %self.origin,
                    destination = %self.destination,
                    acked,
                    got = ack.next,
                    "the {} ack went backwards: ignored (was its store reset?)",
                    self.scheme.name()
                );
            }
            AckVerdict::Impossible { head } => {
                self.shared.update(|s| s.acks_refused += 1);
                tracing::error!(
                    origin = %self.origin,
                    destination = %self.destination,
                    head,
                    got = ack.next,
                    "refused an impossible {} ack beyond everything this log holds: \
                     nothing is deleted for it",
                    self.scheme.name()
                );
            }
        }
    }

    fn relay_one(&self, client: &AsyncClient, topic: &str, json: String) {
        if let Some(up) = self.scheme.agg_relay_topic(&self.site, &self.origin, topic) {
            // QoS 0: a newer value supersedes a lost one, and the full set goes again on
            // every reconnect.
            let _ = client.try_publish(up, QoS::AtMostOnce, false, json);
        }
    }
}

/// The topics of one origin's log at one destination.
struct Topics {
    ack: String,
    log: String,
}

/// What the uplink needs of an MQTT client: queue a QoS 1 publish, or say it is full.
pub trait Link {
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull>;
}

/// The client's queue is full: the rest goes next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFull;

impl Link for AsyncClient {
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull> {
        self.try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|_| LinkFull)
    }
}

/// What one [`fill`] sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub batches: u64,
    pub bytes: u64,
}

/// Sends what the window asks for, block by block, from `source` through `link`, until
/// the window, the pace, the log or the link's queue says stop.
pub fn fill(
    window: &mut Window,
    source: &dyn Source,
    link: &impl Link,
    topic: &str,
    head: u64,
    now_ms: u64,
) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    while let Some(want) = window.poll_send(head, now_ms) {
        let blocks = source.blocks_from(want.from, want.max_readings, head)?;
        if blocks.is_empty() {
            break;
        }
        for block in blocks {
            let frame = proto::BatchFrame {
                start: window.sent(),
                first_offset: block.first_offset,
                block: &block.bytes,
            }
            .encode();
            let bytes = frame.len() as u64;
            if link.publish(topic, frame).is_err() {
                return Ok(sent);
            }
            window.sent_block(block.first_offset, block.end_offset, now_ms);
            sent.batches += 1;
            sent.bytes += bytes;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A log of blocks `first..end` (holes allowed), each block's bytes its range.
    struct FakeLog(Vec<(u64, u64)>);

    impl Source for FakeLog {
        fn blocks_from(&self, from: u64, max: u64, head: u64) -> anyhow::Result<Vec<StoredBlock>> {
            let mut out = Vec::new();
            let mut n = 0;
            for &(first, end) in &self.0 {
                if end <= from || end > head || n >= max {
                    continue;
                }
                n += end - first;
                out.push(StoredBlock {
                    first_offset: first,
                    end_offset: end,
                    bytes: format!("{first}..{end}").into_bytes(),
                });
            }
            Ok(out)
        }
    }

    /// A link that takes `room` publishes, then is full.
    struct FakeLink {
        room: RefCell<usize>,
        frames: RefCell<Vec<(u64, u64, String)>>,
    }

    impl FakeLink {
        fn with_room(room: usize) -> FakeLink {
            FakeLink {
                room: RefCell::new(room),
                frames: RefCell::new(Vec::new()),
            }
        }

        /// (start, first_offset, block) of every frame sent, and forgets them.
        fn take(&self) -> Vec<(u64, u64, String)> {
            std::mem::take(&mut *self.frames.borrow_mut())
        }
    }

    impl Link for FakeLink {
        fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull> {
            assert_eq!(topic, "log");
            let mut room = self.room.borrow_mut();
            if *room == 0 {
                return Err(LinkFull);
            }
            *room -= 1;
            let f = proto::decode_batch(&payload).map_err(|_| LinkFull)?;
            let block = String::from_utf8_lossy(f.block).into_owned();
            self.frames
                .borrow_mut()
                .push((f.start, f.first_offset, block));
            Ok(())
        }
    }

    const CFG: WindowConfig = WindowConfig {
        max_inflight: 1000,
        batch: 100,
        ack_timeout_ms: 1000,
        drain_rate: 0,
    };

    #[test]
    fn fill_sends_the_log_from_the_ack_and_announces_holes() {
        // 30..40 were dropped at the edge.
        let log = FakeLog(vec![(0, 10), (10, 30), (40, 50), (50, 60)]);
        let link = FakeLink::with_room(100);
        let mut w = Window::new(CFG, 0);
        w.on_ack(10, 60, 0);
        let sent = fill(&mut w, &log, &link, "log", 60, 0).expect("fill");
        assert_eq!(sent.batches, 3);
        assert_eq!(
            link.take(),
            vec![
                (10, 10, "10..30".to_owned()),
                (30, 40, "40..50".to_owned()),
                (50, 50, "50..60".to_owned()),
            ]
        );
        assert_eq!(w.sent(), 60);
        // Nothing more until the log grows.
        assert_eq!(
            fill(&mut w, &log, &link, "log", 60, 1).expect("fill"),
            Sent::default()
        );
    }

    #[test]
    fn fill_stops_when_the_link_is_full_and_goes_on_from_there() {
        let log = FakeLog(vec![(0, 10), (10, 20), (20, 30)]);
        let link = FakeLink::with_room(1);
        let mut w = Window::new(CFG, 0);
        w.on_ack(0, 30, 0);
        let sent = fill(&mut w, &log, &link, "log", 30, 0).expect("fill");
        assert_eq!(sent.batches, 1);
        assert_eq!(w.sent(), 10, "only what the link took counts as sent");
        *link.room.borrow_mut() = 10;
        fill(&mut w, &log, &link, "log", 30, 1).expect("fill");
        let starts: Vec<u64> = link.take().iter().map(|f| f.0).collect();
        assert_eq!(starts, vec![0, 10, 20]);
    }

    #[test]
    fn fill_sends_nothing_beyond_the_window_or_before_the_first_ack() {
        let log = FakeLog((0..50).map(|i| (i * 10, i * 10 + 10)).collect());
        let link = FakeLink::with_room(1000);
        let mut w = Window::new(
            WindowConfig {
                max_inflight: 35,
                batch: 10,
                ..CFG
            },
            0,
        );
        assert_eq!(
            fill(&mut w, &log, &link, "log", 500, 0).expect("fill"),
            Sent::default()
        );
        w.on_ack(100, 500, 0);
        fill(&mut w, &log, &link, "log", 500, 0).expect("fill");
        // 100..140 out: the fourth block started with 30 in flight, within the window.
        assert_eq!(w.sent(), 140);
        assert_eq!(link.take().len(), 4);
        w.on_ack(120, 500, 1);
        fill(&mut w, &log, &link, "log", 500, 1).expect("fill");
        assert_eq!(w.sent(), 160);
    }

    #[test]
    fn the_relay_keeps_the_newest_value_per_topic_once() {
        let r = AggRelay::default();
        r.offer("agg/d/t/10s", "1");
        r.offer("agg/d/t/10s", "2");
        r.offer("agg/d/t/60s", "3");
        let dirty = r.take_dirty(10);
        assert_eq!(
            dirty,
            vec![
                ("agg/d/t/10s".to_owned(), "2".to_owned()),
                ("agg/d/t/60s".to_owned(), "3".to_owned())
            ]
        );
        assert!(r.take_dirty(10).is_empty());
        assert_eq!(r.all().len(), 2);
    }
}
