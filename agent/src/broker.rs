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

use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};

use crate::config::Config;
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
    Link(#[from] LinkError),
    #[error("{0}")]
    Config(String),
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

/// A running broker and the ingest thread that feeds the pipeline.
pub struct Running {
    ingest: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Running {
    /// Stops taking readings from the broker; the pipeline's queue closes when this
    /// returns, so the pipeline drains and finishes.
    pub fn stop_ingest(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.ingest.take() {
            let _ = handle.join();
        }
    }
}

fn settings(name: &str, listen: SocketAddr, config: &Config) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: config.mqtt.connect_timeout_ms,
            max_payload_size: config.mqtt.max_packet_bytes,
            max_inflight_count: config.mqtt.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// rumqttd keeps an in-memory log per subscription filter. Its sample sizes (100 MB × 10)
/// are absurd for a Pi: every filter gets a small log, and the filters that carry bulk
/// traffic (the agent's own ingest, dashboards) a larger one.
fn router_config(config: &Config) -> RouterConfig {
    let big = rumqttd::SegmentConfig {
        max_segment_size: 1 << 20,
        max_segment_count: 4,
    };
    let custom: HashMap<String, rumqttd::SegmentConfig> = [ingest::SENSOR_FILTER, "agg/#"]
        .into_iter()
        .map(|f| (f.to_owned(), big.clone()))
        .collect();
    RouterConfig {
        max_connections: config.mqtt.max_connections + 4,
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
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }, 0x02, 0, 10];
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

/// Starts the broker and the ingest thread that parses every publish on `sensors/#` and
/// queues valid readings on `queue`. Returns once every listener accepts connections.
pub fn start(
    config: &Config,
    queue: SyncSender<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<(Running, Publisher), BrokerError> {
    let v5 = config
        .listen_v5()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let listeners: Vec<SocketAddr> = std::iter::once(config.mqtt.listen).chain(v5).collect();
    // rumqttd only logs a failed bind, so find out first.
    for &addr in &listeners {
        TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    }
    let mut broker_config = rumqttd::Config {
        router: router_config(config),
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            settings("v4", config.mqtt.listen, config),
        )])),
        ..Default::default()
    };
    if let Some(addr) = v5 {
        broker_config.v5 = Some(HashMap::from([("v5".to_owned(), settings("v5", addr, config))]));
    }
    let mut broker = rumqttd::Broker::new(broker_config);
    let (mut ingest_tx, ingest_rx) = broker.link("fogline-ingest")?;
    let (publish_tx, _publish_rx) = broker.link("fogline-publish")?;
    ingest_tx.subscribe(ingest::SENSOR_FILTER)?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(format!("cannot start the broker thread: {e}")))?;
    wait_listening(config.mqtt.listen, false)?;
    if let Some(addr) = v5 {
        wait_listening(addr, true)?;
    }
    for &addr in &listeners {
        match crate::nodelay::on_listeners(addr) {
            Ok(n) if n > 0 => {}
            Ok(_) => tracing::warn!(%addr, "could not find the broker's listener to turn Nagle off; acks may be delayed by ~40 ms"),
            Err(e) => tracing::warn!(%addr, "could not turn Nagle off on the broker's listener ({e}); acks may be delayed by ~40 ms"),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let max_payload = config.ingest.max_payload_bytes;
    let log_every = Duration::from_millis(config.ingest.reject_log_interval_ms);
    let thread_stop = stop.clone();
    let ingest = std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            // Keep the ingest link's sender alive as long as we receive on it.
            let _ingest_tx = ingest_tx;
            let mut rejects = RejectLog::new(log_every);
            ingest_loop(ingest_rx, &queue, &metrics, max_payload, &thread_stop, &mut rejects);
        })
        .map_err(|e| BrokerError::Config(format!("cannot start the ingest thread: {e}")))?;
    let publisher = Publisher {
        tx: publish_tx,
        rt: tokio::runtime::Handle::current(),
    };
    Ok((
        Running {
            ingest: Some(ingest),
            stop,
        },
        publisher,
    ))
}

fn ingest_loop(
    mut rx: LinkRx,
    queue: &SyncSender<Incoming>,
    metrics: &Metrics,
    max_payload: usize,
    stop: &AtomicBool,
    rejects: &mut RejectLog,
) {
    while !stop.load(Ordering::SeqCst) {
        let notification = match rx.recv_deadline(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => continue,
            Err(e) => {
                tracing::error!("the broker's ingest link closed: {e}");
                return;
            }
        };
        match notification {
            Notification::Forward(forward) => {
                metrics.received.inc();
                let publish = forward.publish;
                match ingest::parse(&publish.topic, &publish.payload, max_payload, crate::now_ms()) {
                    Ok(reading) => {
                        if !enqueue(queue, reading, metrics) {
                            return;
                        }
                    }
                    Err(reason) => {
                        metrics.reject(reason);
                        rejects.log(reason, &publish.topic);
                    }
                }
            }
            // After max_outgoing_packet_count forwards the router waits for us to say
            // we are ready again; without this, delivery stops.
            Notification::Unschedule => {
                if let Err(e) = rx.ready() {
                    tracing::error!("the broker's ingest link closed: {e}");
                    return;
                }
            }
            _ => {}
        }
    }
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
        if entry.0.is_some_and(|at| now.duration_since(at) < self.every) {
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
