//! Store-and-forward to the gateway over MQTT (rumqttc).
//!
//! The uplink reads the origin log from the buffer (never from memory), sends it in
//! batches from the gateway's last durable ack, keeps at most `max_inflight_readings`
//! readings unacknowledged, and on every reconnect rewinds to the gateway's ack, so
//! nothing is lost whatever dies in between; the gateway stores each offset once. It never
//! blocks ingest: it only reads committed blocks. After an outage the site's aggregates
//! (the live view dashboards watch) go first, then the backlog drains oldest-first at
//! `drain_rate` readings/s. The buffer deletes nothing the gateway has not acked, and
//! keeps acked readings `retention_secs` longer. With several gateways listed it fails
//! over between them ([`destinations`]).
//!
//! Pure cores: [`backoff::Backoff`] (reconnect delays), [`destinations::Destinations`]
//! (which gateway next) and [`pace::Pacer`] (drain rate).

pub mod backoff;
pub mod config;
pub mod destinations;
pub mod pace;
mod send;
mod status;
pub mod window;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

pub use config::{Gateways, UplinkConfig};
use destinations::Destinations;
pub use send::{fill, Link, LinkFull, Outbox, Sent, Source};
pub use status::{AggRelay, Metrics, Shared, UplinkStatus};
use window::{AckVerdict, Window, WindowConfig};

use crate::addr::HostPort;
use crate::shipping::proto;

/// Everything an uplink task needs. One task ships one origin's log to one destination at
/// a time.
pub struct Uplink {
    pub config: UplinkConfig,
    /// `HOST:PORT` of the destination brokers, tried in order: the gateways of
    /// `uplink.gateway`, or the one peer agent.
    pub destinations: Vec<String>,
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
        let parsed: Result<Vec<HostPort>, _> = self
            .destinations
            .iter()
            .map(|d| d.parse::<HostPort>())
            .collect();
        let list = match parsed {
            Ok(list) => list,
            Err(e) => {
                tracing::error!("uplink off: {e}");
                return;
            }
        };
        let backoff = backoff::Backoff::new(
            Duration::from_millis(self.config.backoff_min_ms),
            Duration::from_millis(self.config.backoff_max_ms),
        );
        let Some(mut dest) = Destinations::new(list, backoff) else {
            tracing::error!(origin = %self.origin, "uplink off: no destination");
            return;
        };
        self.shared.update(|s| {
            s.gateway = dest.current().to_string();
            s.gateways = dest.list().iter().map(HostPort::to_string).collect();
            s.link = "connecting";
        });
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
            let result = self.session(&mut dest, &mut shutdown).await;
            match result {
                Ok(End::Shutdown) => return,
                Ok(End::Inactive) => {
                    tracing::info!(destination = %dest.current(), origin = %self.origin, "no longer the site leader: uplink stopped");
                }
                Err(e) => {
                    let retry = dest.on_error(fastrand::f64());
                    let from = dest
                        .get(retry.from)
                        .map_or_else(String::new, HostPort::to_string);
                    let to = dest.current().to_string();
                    let retry_in_ms = u64::try_from(retry.delay.as_millis()).unwrap_or(u64::MAX);
                    if retry.switched() {
                        tracing::warn!(
                            %from,
                            %to,
                            origin = %self.origin,
                            retry_in_ms,
                            "link down: {e}; failing over to the next destination"
                        );
                    } else {
                        tracing::warn!(
                            destination = %to,
                            origin = %self.origin,
                            retry_in_ms,
                            "link down: {e}"
                        );
                    }
                    let failovers = dest.failovers();
                    self.shared.update(|s| {
                        s.link = "backoff";
                        s.last_error = Some(e.to_string());
                        s.gateway = to;
                        s.failovers = failovers;
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(retry.delay) => {}
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
        dest: &mut Destinations<HostPort>,
        shutdown: &mut crate::shutdown::Shutdown,
    ) -> anyhow::Result<End> {
        let destination = dest.current().clone();
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
        let mut options = MqttOptions::new(client_id, &destination.host, destination.port);
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
        let mut outbox = Outbox::default();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            // Biased: shutdown and leadership first, then the connection (acks in, queued
            // publishes out) before anything that would queue more.
            tokio::select! {
                biased;
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
                event = eventloop.poll() => {
                    match event? {
                        Event::Incoming(Packet::ConnAck(_)) => {
                            connected = true;
                            window.on_connected(now_ms());
                            dest.on_connected();
                            self.shared.update(|s| { s.link = "connected"; s.connects += 1; s.last_error = None; });
                            tracing::info!(%destination, origin = %self.origin, "{} connected", self.scheme.name());
                            client.try_subscribe(topics.ack.clone(), QoS::AtLeastOnce)?;
                            client.try_publish(self.scheme.sync_topic(&self.site, &self.origin), QoS::AtLeastOnce, false, Vec::new())?;
                            // Live view first: every aggregate, before any backlog.
                            for (topic, json) in self.shared.relay.all() {
                                self.relay_one(&client, &topic, json);
                            }
                        }
                        Event::Incoming(Packet::Publish(p)) if p.topic == topics.ack => {
                            self.on_ack(&mut window, &destination, &p.payload, now_ms());
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
                &mut outbox,
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
    fn on_ack(&self, window: &mut Window, destination: &HostPort, payload: &[u8], now_ms: u64) {
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
                    %destination,
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
                    %destination,
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
