//! The embedded MQTT broker (rumqttd) and the agent's two in-process links to it: one
//! that receives everything sensors publish, and one that publishes acks and aggregates.
//!
//! rumqttd's `Broker::start` blocks forever and only logs a failed bind, so the broker runs
//! on its own named thread and [`start`] checks the ports itself before and after.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};

use crate::config::{Config, MqttConfig};
use crate::ingest::{self, Incoming, Reject};
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
}

impl Publisher {
    /// Publishes `payload` on `topic`, retained, at QoS 0 to the router.
    pub fn retained(&mut self, topic: String, payload: String) -> Result<(), BrokerError> {
        let publish = Publish::new(topic, payload, true);
        self.rt
            .block_on(self.tx.send(Packet::Publish(publish, None)))?;
        Ok(())
    }
}

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
fn router_config(mqtt: &MqttConfig, bulk_filters: &[&str]) -> RouterConfig {
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
        }
    }
}

/// Starts the agent's broker and the ingest thread that parses every publish on
/// `sensors/#` and queues valid readings on `queue`. Returns once every listener accepts
/// connections. Stopping the returned worker closes the queue.
/// Both ends of an in-process link to the broker.
pub type Link = (LinkTx, LinkRx);

/// Starts the agent's broker with its ingest thread and publishing link, plus one link
/// per entry of `extra` (name, filters), returned in that order.
pub fn start(
    config: &Config,
    queue: SyncSender<Incoming>,
    metrics: Arc<Metrics>,
    extra: &[(&str, &[&str])],
) -> Result<(Worker, Publisher, Vec<Link>), BrokerError> {
    // With device authentication, the public listeners belong to the front end and
    // rumqttd listens on loopback only (see `frontend`).
    let fronts = device_fronts(config, &metrics)?;
    let mut mqtt = config.mqtt.clone();
    if let Some((v4, v5)) = fronts.as_ref().map(|f| f.backends) {
        mqtt.listen = v4;
        mqtt.listen_v5 = v5.map(|a| a.to_string()).unwrap_or_default();
    }
    let mut wanted: Vec<(&str, &[&str])> = vec![
        ("fogline-ingest", &[ingest::SENSOR_FILTER]),
        ("fogline-publish", &[]),
    ];
    wanted.extend_from_slice(extra);
    let mut bulk: Vec<&str> = vec![ingest::SENSOR_FILTER, "agg/#"];
    bulk.extend(extra.iter().flat_map(|(_, f)| f.iter().copied()));
    let node_front = node_front(config, &metrics, mqtt.listen)?;
    if !config.cluster.peers.is_empty() {
        // Replication batches are larger than readings; readings are still held to
        // ingest.max_payload_bytes (and the device front end to mqtt.max_packet_bytes).
        mqtt.max_packet_bytes = mqtt.max_packet_bytes.max(config.cluster.max_batch_bytes);
    }
    let mut links = embed(&mqtt, &bulk, &wanted)?.into_iter();
    let (Some((ingest_tx, ingest_rx)), Some((publish_tx, _))) = (links.next(), links.next()) else {
        return Err(BrokerError::Config("broker links missing".into()));
    };
    if let Some(front) = node_front {
        front
            .spawn()
            .map_err(|e| BrokerError::Config(format!("cannot start the node listener: {e}")))?;
    }
    if let Some(fronts) = fronts {
        for front in fronts.fronts {
            front.spawn().map_err(|e| {
                BrokerError::Config(format!("cannot start the MQTT front end: {e}"))
            })?;
        }
    }
    let max_payload = config.ingest.max_payload_bytes;
    let mut limiter = crate::limits::Limiter::new(config.limits.clone());
    let mut rejects = RejectLog::new(Duration::from_millis(config.ingest.reject_log_interval_ms));
    let worker = Worker::spawn("ingest", move |stop| {
        // Keep the ingest link's sender alive as long as we receive on it.
        let _ingest_tx = ingest_tx;
        receive(ingest_rx, stop, |publish| {
            metrics.received.inc();
            let parsed = ingest::parse(
                &publish.topic,
                &publish.payload,
                max_payload,
                crate::now_ms(),
            )
            .and_then(|r| limiter.admit(&r.device, Instant::now()).map(|()| r));
            match parsed {
                Ok(reading) => enqueue(&queue, reading, &metrics),
                Err(reason) => {
                    metrics.reject(reason);
                    rejects.log(reason, &publish.topic);
                    true
                }
            }
        });
    })
    .map_err(|e| BrokerError::Config(format!("cannot start the ingest thread: {e}")))?;
    Ok((worker, Publisher::new(publish_tx), links.collect()))
}

/// With `cluster.listen`: the site's own listener, relaying to rumqttd at `backend`; over
/// TLS with a client certificate from the site CA when `[tls]` is set.
fn node_front(
    config: &Config,
    metrics: &Metrics,
    backend: SocketAddr,
) -> Result<Option<crate::frontend::Front>, BrokerError> {
    use crate::frontend::{Front, Guard};
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
        Guard::Plain
    };
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    Ok(Some(Front {
        listener,
        backend,
        guard,
        max_connections: 4 * (c.peers.len() + 1),
        max_packet: c.max_batch_bytes + 1024,
        connect_timeout: Duration::from_millis(u64::from(config.mqtt.connect_timeout_ms)),
        metrics: metrics.front.clone(),
    }))
}

struct DeviceFronts {
    fronts: Vec<crate::frontend::Front>,
    /// Where rumqttd listens instead: v4, and v5 if that listener is on.
    backends: (SocketAddr, Option<SocketAddr>),
}

/// In `auth.mode = "credentials"`: binds the public listeners for the front end and picks
/// loopback addresses for rumqttd. In `open` mode: None, and a warning.
fn device_fronts(config: &Config, metrics: &Metrics) -> Result<Option<DeviceFronts>, BrokerError> {
    use crate::auth::{AuthMode, Authenticator};
    use crate::frontend::{internal_addr, Front, Guard};
    if config.auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = \"open\": any client can connect and publish readings for any device; \
             set auth.mode = \"credentials\" outside a lab"
        );
        return Ok(None);
    }
    let auth = Arc::new(Authenticator::new(&config.auth));
    tracing::info!(
        devices = auth.device_count(),
        "device authentication on: each device publishes only under sensors/<its id>/"
    );
    metrics
        .front
        .set_log_every(Duration::from_millis(config.ingest.reject_log_interval_ms));
    let mqtt = &config.mqtt;
    let v5 = mqtt
        .listen_v5_addr()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let internal =
        || internal_addr().map_err(|e| BrokerError::Config(format!("no loopback port: {e}")));
    let backend_v4 = internal()?;
    let backend_v5 = v5.map(|_| internal()).transpose()?;
    let mut fronts = Vec::new();
    for (public, backend) in std::iter::once((mqtt.listen, backend_v4)).chain(v5.zip(backend_v5)) {
        let listener = TcpListener::bind(public).map_err(|source| BrokerError::Bind {
            addr: public,
            source,
        })?;
        fronts.push(Front {
            listener,
            backend,
            guard: Guard::Devices(auth.clone()),
            max_connections: mqtt.max_connections,
            max_packet: mqtt.max_packet_bytes,
            connect_timeout: Duration::from_millis(u64::from(mqtt.connect_timeout_ms)),
            metrics: metrics.front.clone(),
        });
    }
    Ok(Some(DeviceFronts {
        fronts,
        backends: (backend_v4, backend_v5),
    }))
}

/// Queues a reading, waiting if the pipeline is behind. False when the pipeline is gone.
fn enqueue(queue: &SyncSender<Incoming>, reading: Incoming, metrics: &Metrics) -> bool {
    match queue.try_send(reading) {
        Ok(()) => true,
        Err(TrySendError::Full(reading)) => {
            metrics.queue_full.inc();
            queue.send(reading).is_ok()
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

/// At most one log line per reason per interval; the count of the others goes with it.
struct RejectLog {
    every: Duration,
    last: HashMap<Reject, (Option<Instant>, u64)>,
}

impl RejectLog {
    fn new(every: Duration) -> Self {
        RejectLog {
            every,
            last: HashMap::new(),
        }
    }

    fn log(&mut self, reason: Reject, topic: &[u8]) {
        let now = Instant::now();
        let entry = self.last.entry(reason).or_insert((None, 0));
        if entry
            .0
            .is_some_and(|at| now.duration_since(at) < self.every)
        {
            entry.1 += 1;
            return;
        }
        let topic = String::from_utf8_lossy(&topic[..topic.len().min(120)]);
        tracing::warn!(
            reason = reason.as_str(),
            topic = %topic,
            suppressed = entry.1,
            "refused a publish: {reason}"
        );
        *entry = (Some(now), 0);
    }
}
