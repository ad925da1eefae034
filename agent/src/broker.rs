//! The embedded MQTT broker (rumqttd) and the agent's two in-process links to it: one
//! that receives everything sensors publish, and one that publishes acks and aggregates.
//!
//! rumqttd's `Broker::start` blocks forever and only logs a failed bind, so the broker runs
//! on its own named thread and [`start`] checks the ports itself before and after.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};

use crate::config::{Config, MqttConfig};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
    #[error("broker link: {0}")]
    Link(Box<LinkError>),
    #[error("{0}")]
    Config(String),
}

impl From<LinkError> for BrokerError {
    fn from(e: LinkError) -> Self {
        BrokerError::Link(Box::new(e))
    }
}

/// Publishes retained messages into the broker from a plain thread.
pub struct Publisher {
    tx: LinkTx,
    rt: tokio::runtime::Handle,
    /// The agent's front end, which serves `fogline/ack/…` itself.
    local: Option<Arc<crate::mqtt::Server>>,
}

impl Publisher {
    /// Publishes `payload` on `topic`, retained, at QoS 0 to the router.
    pub fn retained(&mut self, topic: String, payload: String) -> Result<(), BrokerError> {
        let packet = self.packet(topic, payload);
        self.rt.block_on(self.tx.send(packet))?;
        Ok(())
    }

    /// A retained message of the agent's own. Behind the agent's front end it carries a
    /// tag (QoS 1, retained, an id), as client publishes do; rumqttd's own listeners (the
    /// gateway) get it plain.
    fn packet(&self, topic: String, payload: String) -> Packet {
        let props = self.local.as_ref().map(|_| {
            crate::mqtt::topic::Tag {
                retain: true,
                ..crate::mqtt::topic::Tag::internal(crate::now_ms())
            }
            .attach(None)
        });
        Packet::Publish(Publish::new(topic, payload, true), props)
    }

    /// Publishes many retained messages with one wake-up of the router (each
    /// [`Publisher::retained`] wakes it, which at a thousand acks per commit costs more
    /// than the messages).
    pub fn retained_all(&mut self, messages: Vec<(String, String)>) -> Result<(), BrokerError> {
        let mut messages = messages;
        if let Some(server) = &self.local {
            let (local, other): (Vec<_>, Vec<_>) = messages
                .into_iter()
                .partition(|(t, _)| t.starts_with(crate::mqtt::LOCAL_PREFIX));
            let wildcards = server.publish_local(&local);
            messages = other;
            if wildcards {
                messages.extend(local);
            }
        }
        // The writer thread calls this between commits: it waits for the router at most
        // this long per call, then hands over regardless (memory over acks).
        let until = Instant::now() + HANDOVER_WAIT;
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let mut packets: Vec<Packet> = messages
                .by_ref()
                .take(HANDOVER_CHUNK)
                .map(|(topic, payload)| self.packet(topic, payload))
                .collect();
            let Some(last) = packets.pop() else {
                break;
            };
            self.wait_handed_over(until);
            self.tx.buffer().extend(packets);
            self.rt.block_on(self.tx.send(last))?;
        }
        Ok(())
    }

    /// Waits, until `until` at most, for the router to take what the link holds.
    fn wait_handed_over(&self, until: Instant) {
        while !self.tx.buffer().is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Messages are handed to the router at most this many at a time. The link's buffer is a
/// queue of rumqttd packets (hundreds of bytes each) that the router swaps with its own and
/// neither ever shrinks: a second's aggregates of a thousand devices handed over at once
/// kept two 4 MiB queues for the rest of the agent's life.
const HANDOVER_CHUNK: usize = 256;
const HANDOVER_WAIT: Duration = Duration::from_millis(20);

fn settings(name: &str, listen: SocketAddr, mqtt: &MqttConfig) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: mqtt.connect_timeout_ms,
            max_payload_size: mqtt.max_packet_bytes,
            max_inflight_count: mqtt.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// rumqttd keeps an in-memory log per subscription filter. Its sample sizes (100 MB × 10)
/// are absurd for a Pi: every filter gets a small log, and the filters that carry bulk
/// traffic (`bulk_filters`: our own ingest, dashboards) a larger one.
pub fn router_config(mqtt: &MqttConfig, bulk_filters: &[&str]) -> RouterConfig {
    let big = rumqttd::SegmentConfig {
        max_segment_size: 1 << 20,
        max_segment_count: 4,
    };
    let custom: HashMap<String, rumqttd::SegmentConfig> = bulk_filters
        .iter()
        .map(|f| ((*f).to_owned(), big.clone()))
        .collect();
    RouterConfig {
        max_connections: mqtt.max_connections + 8,
        max_outgoing_packet_count: 200,
        max_segment_size: 2 << 10,
        max_segment_count: 2,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Waits until `addr` answers an MQTT CONNECT with a CONNACK, then disconnects politely.
/// A plain TCP probe would make rumqttd log an error, and would not tell our broker from
/// another program on the port.
fn wait_listening(addr: SocketAddr, v5: bool) -> Result<(), BrokerError> {
    let target = loopback_for(addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if probe(target, v5).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}

fn probe(target: SocketAddr, v5: bool) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const ID: &[u8] = b"fogline-probe";
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    // CONNECT: protocol name, level, clean start, keepalive 10 s, [no properties], client id.
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0x02,
        0,
        10,
    ];
    if v5 {
        body.push(0);
    }
    body.extend([0, ID.len() as u8]);
    body.extend(ID);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    stream.write_all(&packet)?;
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    if head[0] != 0x20 {
        return Err(std::io::Error::other("not an MQTT broker"));
    }
    let mut rest = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut rest)?;
    let disconnect: &[u8] = if v5 { &[0xe0, 1, 0] } else { &[0xe0, 0] };
    stream.write_all(disconnect)?;
    Ok(())
}

/// Starts rumqttd on its own thread with the listeners of `mqtt` and returns one local
/// link per `(name, filters)` in `links`, once every listener answers MQTT.
///
/// Each link subscribes to its filters before any listener opens: a client that connects
/// the moment the port opens must not publish into a broker that nobody inside listens to
/// yet (its PUBACK would promise a delivery that never happens).
pub fn embed(
    mqtt: &MqttConfig,
    bulk_filters: &[&str],
    links: &[(&str, &[&str])],
) -> Result<Vec<(LinkTx, LinkRx)>, BrokerError> {
    let v5 = mqtt
        .listen_v5_addr()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let listeners: Vec<SocketAddr> = std::iter::once(mqtt.listen).chain(v5).collect();
    // rumqttd only logs a failed bind, so find out first.
    for &addr in &listeners {
        TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    }
    let mut broker_config = rumqttd::Config {
        router: router_config(mqtt, bulk_filters),
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            settings("v4", mqtt.listen, mqtt),
        )])),
        ..Default::default()
    };
    if let Some(addr) = v5 {
        broker_config.v5 = Some(HashMap::from([(
            "v5".to_owned(),
            settings("v5", addr, mqtt),
        )]));
    }
    let mut broker = rumqttd::Broker::new(broker_config);
    let mut made = Vec::with_capacity(links.len());
    for (name, filters) in links {
        let (mut tx, rx) = broker.link(name)?;
        for filter in *filters {
            tx.subscribe(*filter)?;
        }
        made.push((tx, rx));
    }
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(format!("cannot start the broker thread: {e}")))?;
    wait_listening(mqtt.listen, false)?;
    if let Some(addr) = v5 {
        wait_listening(addr, true)?;
    }
    for &addr in &listeners {
        match crate::nodelay::on_listeners(addr) {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                tracing::warn!(%addr, "could not find the broker's listener to turn Nagle off; acks may be delayed by ~40 ms")
            }
            Err(e) => {
                tracing::warn!(%addr, "could not turn Nagle off on the broker's listener ({e}); acks may be delayed by ~40 ms")
            }
        }
    }
    Ok(made)
}

/// Receives the publishes a link subscribed to and hands each to `on_publish` until `stop`
/// is set, the link closes, or `on_publish` returns false. Answers rumqttd's
/// `Unschedule` (sent after `max_outgoing_packet_count` forwards), without which
/// delivery stops.
pub fn receive(mut rx: LinkRx, stop: &AtomicBool, mut on_publish: impl FnMut(Publish) -> bool) {
    while !stop.load(Ordering::SeqCst) {
        let notification = match rx.recv_deadline(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => continue,
            Err(e) => {
                tracing::error!("a broker link closed: {e}");
                return;
            }
        };
        let keep_going = match notification {
            Notification::Forward(forward) => on_publish(forward.publish),
            Notification::Unschedule => match rx.ready() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("a broker link closed: {e}");
                    false
                }
            },
            _ => true,
        };
        if !keep_going {
            return;
        }
    }
}

/// A background thread that runs until [`Worker::stop`].
pub struct Worker {
    handle: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    pub fn spawn(
        name: &str,
        f: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&flag))?;
        Ok(Worker {
            handle: Some(handle),
            stop,
        })
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Publisher {
    pub fn new(tx: LinkTx) -> Publisher {
        Publisher {
            tx,
            rt: tokio::runtime::Handle::current(),
            local: None,
        }
    }
}

/// Both ends of an in-process link to the broker.
pub type Link = (LinkTx, LinkRx);

/// The agent's MQTT side, running: stop it to close ingest and save the sessions.
pub struct Front {
    server: Arc<crate::mqtt::Server>,
    stop: tokio::sync::watch::Sender<bool>,
    persist: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Takes no more readings (the writer drains its queue and ends) and writes the
    /// sessions a last time.
    pub async fn stop(self) {
        self.server.ingest.close();
        let _ = self.stop.send(true);
        let _ = self.persist.await;
    }
}

/// Starts the agent's MQTT side: rumqttd's router, the front end on every listener
/// (`mqtt.listen`, `mqtt.listen_v5`, `cluster.listen`), the agent's publishing link and
/// one link per entry of `extra` (name, filters), returned in that order. Readings go
/// from the front end to `queue`.
pub async fn start(
    config: &Config,
    queue: flume::Sender<crate::ingest::Queued>,
    metrics: Arc<Metrics>,
    extra: &[(&str, &[&str])],
) -> Result<(Front, Publisher, Vec<Link>), BrokerError> {
    use crate::mqtt::{self, Ingest, Server, Settings};
    let mqtt_cfg = &config.mqtt;
    let v5 = mqtt_cfg
        .listen_v5_addr()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    // Bind everything first: a taken port is an error now, not a log line later.
    let mut device_listeners = Vec::new();
    for addr in std::iter::once(mqtt_cfg.listen).chain(v5) {
        let l = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
        device_listeners.push(l);
    }
    let node = node_listener(config)?;

    let mut bulk: Vec<&str> = vec!["agg/#"];
    bulk.extend(extra.iter().flat_map(|(_, f)| f.iter().copied()));
    let make_link = mqtt::start_router(mqtt::router_config(mqtt_cfg.max_connections, &bulk));
    let mut links = Vec::with_capacity(extra.len());
    let (publish_tx, _publish_rx) = make_link("fogline-publish").map_err(BrokerError::Link)?;
    for (name, filters) in extra {
        let (mut tx, rx) = make_link(name).map_err(BrokerError::Link)?;
        for filter in *filters {
            tx.subscribe(*filter)?;
        }
        links.push((tx, rx));
    }

    let cluster_on = !config.cluster.peers.is_empty();
    let settings = Settings {
        max_packet: mqtt_cfg.max_packet_bytes,
        // Replication batches are larger than readings; only peers get to send them.
        max_batch_packet: if cluster_on {
            mqtt_cfg
                .max_packet_bytes
                .max(config.cluster.max_batch_bytes + 1024)
        } else {
            mqtt_cfg.max_packet_bytes
        },
        topic_alias_max: mqtt_cfg.topic_alias_max,
        max_keep_alive_secs: mqtt_cfg.max_keep_alive_secs,
        max_inflight: mqtt_cfg.max_inflight,
        max_queued: mqtt_cfg.max_queued_messages,
        session_expiry_max_secs: mqtt_cfg.session_expiry_max_secs,
        connect_timeout: Duration::from_millis(u64::from(mqtt_cfg.connect_timeout_ms)),
        max_connections: mqtt_cfg.max_connections,
        site_private: cluster_on && !config.cluster.listen.is_empty(),
    };
    let ingest = Arc::new(Ingest::new(
        queue,
        config.limits.clone(),
        Duration::from_millis(config.ingest.reject_log_interval_ms),
        metrics.clone(),
        config.ingest.max_payload_bytes,
    ));
    metrics
        .front
        .set_log_every(Duration::from_millis(config.ingest.reject_log_interval_ms));
    let server = Server::new(
        make_link,
        &config.buffer.data_dir,
        ingest,
        settings,
        metrics.clone(),
    )
    .map_err(BrokerError::Config)?;
    let restored = server.restore().await.map_err(BrokerError::Config)?;
    if restored > 0 {
        tracing::info!(sessions = restored, "MQTT sessions restored");
    }

    let guard = device_guard(config)?;
    for listener in device_listeners {
        server
            .listen(listener, guard.clone(), mqtt_cfg.max_connections)
            .map_err(|e| BrokerError::Config(format!("cannot start the MQTT listener: {e}")))?;
    }
    if let Some((listener, guard)) = node {
        let max = 4 * (config.cluster.peers.len() + 1);
        server
            .listen(listener, guard, max)
            .map_err(|e| BrokerError::Config(format!("cannot start the node listener: {e}")))?;
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let persist = tokio::spawn(mqtt::persist_loop(server.clone(), stop_rx));
    Ok((
        Front {
            server: server.clone(),
            stop,
            persist,
        },
        Publisher {
            local: Some(server.clone()),
            ..Publisher::new(publish_tx)
        },
        links,
    ))
}

/// With `cluster.listen`: the site's own listener; over TLS with a client certificate
/// from the site CA when `[tls]` is set.
fn node_listener(
    config: &Config,
) -> Result<Option<(TcpListener, crate::mqtt::Guard)>, BrokerError> {
    use crate::mqtt::Guard;
    let c = &config.cluster;
    if c.listen.is_empty() || c.peers.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = c
        .listen
        .parse()
        .map_err(|e| BrokerError::Config(format!("cluster.listen: {e}")))?;
    let guard = if config.tls.enabled() {
        let identity = crate::tls::NodeIdentity::load(&config.tls)
            .map_err(|e| BrokerError::Config(format!("tls: {e}")))?;
        let server = identity
            .server_config()
            .map_err(|e| BrokerError::Config(format!("tls: {e}")))?;
        tracing::info!(listen = %addr, "site links need a client certificate signed by the site CA");
        Guard::Tls(tokio_rustls::TlsAcceptor::from(server))
    } else {
        tracing::warn!(listen = %addr, "tls is off: any node can join this site; set [tls] outside a lab");
        Guard::Node
    };
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    Ok(Some((listener, guard)))
}

/// `auth.mode = "credentials"`: devices log in and publish under their own topics.
/// `open`: anyone, with a warning.
fn device_guard(config: &Config) -> Result<crate::mqtt::Guard, BrokerError> {
    use crate::auth::{AuthMode, Authenticator};
    if config.auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = \"open\": any client can connect and publish readings for any device; \
             set auth.mode = \"credentials\" outside a lab"
        );
        return Ok(crate::mqtt::Guard::Open);
    }
    let auth = Arc::new(Authenticator::new(&config.auth));
    tracing::info!(
        devices = auth.device_count(),
        "device authentication on: each device publishes only under sensors/<its id>/"
    );
    Ok(crate::mqtt::Guard::Devices(auth))
}
