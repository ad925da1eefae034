//! Front ends that own the public MQTT sockets and relay to rumqttd on a loopback-only
//! listener, because rumqttd 0.20 cannot do two things we need:
//!
//! - **Devices** ([`Guard::Devices`], `auth.mode = "credentials"`): rumqttd authenticates
//!   at CONNECT but has no per-topic authorization, and a local link's `Forward` does not
//!   say who published. So the front end reads the client's MQTT packets: CONNECT must
//!   carry a known device's username and password and a client id equal to it (refused
//!   with a CONNACK "bad user name or password" / "not authorized" otherwise); after
//!   that the connection may publish only under `sensors/<id>/…` and subscribe only to
//!   its own ack and aggregate topics — anything else closes it. Packets from the broker
//!   are copied through untouched.
//! - **Nodes** ([`Guard::Tls`]): TLS with a client certificate signed by the site CA
//!   (rustls). rumqttd's own TLS needs its `verify-client-cert` feature, a second rustls
//!   and x509 stack, and only logs a refused handshake; here each refusal is logged with
//!   its reason and the peer address and counted.
//!
//! Both count connections against `max_connections` (refused beyond it, counted) and
//! log refusals at most once per reason per interval.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::{Authenticator, Refusal};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub reason: &'static str,
}

/// Every reason a front end refuses a connection, exported from the start.
pub const REFUSALS: [&str; 15] = [
    "no_credentials",
    "unknown_device",
    "bad_password",
    "client_id_mismatch",
    "foreign_will",
    "foreign_topic",
    "foreign_subscription",
    "not_connect",
    "malformed_packet",
    "oversized_packet",
    "max_connections",
    "no_certificate",
    "unknown_ca",
    "bad_certificate",
    "tls_handshake",
];

/// Shared by the front ends of one process; register `refused` on `/metrics`.
#[derive(Default)]
pub struct FrontMetrics {
    pub refused: Family<RefusedLabel, Counter>,
    log: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
    log_every: Mutex<Duration>,
}

impl FrontMetrics {
    pub fn new(log_every: Duration) -> Arc<FrontMetrics> {
        let m = FrontMetrics {
            log_every: Mutex::new(log_every),
            ..Default::default()
        };
        for reason in REFUSALS {
            let _ = m.refused.get_or_create(&RefusedLabel { reason });
        }
        Arc::new(m)
    }

    /// At most one log line per reason per this interval.
    pub fn set_log_every(&self, every: Duration) {
        if let Ok(mut e) = self.log_every.lock() {
            *e = every;
        }
    }

    pub fn refused_total(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&RefusedLabel { reason }).get()
    }

    /// Counts a refusal and logs it, at most once per reason per interval.
    pub(crate) fn refuse(&self, reason: &'static str, peer: SocketAddr, detail: &str) {
        self.refused.get_or_create(&RefusedLabel { reason }).inc();
        let every = self.log_every.lock().map_or(Duration::ZERO, |d| *d);
        let Ok(mut log) = self.log.lock() else {
            return;
        };
        let now = Instant::now();
        let entry = log.entry(reason).or_insert((None, 0));
        if entry.0.is_some_and(|at| now.duration_since(at) < every) {
            entry.1 += 1;
            return;
        }
        tracing::warn!(
            reason,
            %peer,
            suppressed = entry.1,
            "refused a connection: {reason}{}{detail}",
            if detail.is_empty() { "" } else { ": " }
        );
        *entry = (Some(now), 0);
    }
}

/// What a front end checks before relaying.
#[derive(Clone)]
pub enum Guard {
    /// MQTT CONNECT credentials and per-device topics.
    Devices(Arc<Authenticator>),
    /// TLS with a client certificate signed by the site CA.
    Tls(tokio_rustls::TlsAcceptor),
    /// Nothing: a plain relay (the site's node listener in a lab without TLS).
    Plain,
}

/// A public listener and where it relays to.
pub struct Front {
    pub listener: StdListener,
    pub backend: SocketAddr,
    pub guard: Guard,
    pub max_connections: usize,
    /// Largest MQTT packet read from a device (`mqtt.max_packet_bytes`).
    pub max_packet: usize,
    pub connect_timeout: Duration,
    pub metrics: Arc<FrontMetrics>,
}

/// A free loopback address for rumqttd to listen on behind a front end. (Bound and
/// released: the broker binds it again a moment later.)
pub fn internal_addr() -> std::io::Result<SocketAddr> {
    StdListener::bind("127.0.0.1:0")?.local_addr()
}

impl Front {
    /// Accepts connections until the runtime stops.
    pub fn spawn(self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        self.listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(self.listener)?;
        // Argon2 takes ~19 MiB and tens of ms per check: bound the checks running at once,
        // so a flood of bad CONNECTs costs a queue, not the Pi's memory.
        let hashing = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let shared = Arc::new(Shared {
            hashing: tokio::sync::Semaphore::new(hashing),
            backend: self.backend,
            guard: self.guard,
            max_packet: self.max_packet,
            connect_timeout: self.connect_timeout,
            metrics: self.metrics,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let max = self.max_connections;
        Ok(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning.
                        tracing::warn!("front end accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if open.load(Ordering::SeqCst) >= max {
                    shared.metrics.refuse(
                        "max_connections",
                        peer,
                        &format!("{max} connections open (mqtt.max_connections)"),
                    );
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                open.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    shared.serve(stream, peer).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }))
    }
}

struct Shared {
    hashing: tokio::sync::Semaphore,
    backend: SocketAddr,
    guard: Guard,
    max_packet: usize,
    connect_timeout: Duration,
    metrics: Arc<FrontMetrics>,
}

impl Shared {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        match &self.guard {
            Guard::Tls(acceptor) => self.serve_tls(acceptor, stream, peer).await,
            Guard::Devices(auth) => {
                if let Err(Refused(reason, detail)) = self.serve_device(auth, stream, peer).await {
                    self.metrics.refuse(reason, peer, &detail);
                }
            }
            Guard::Plain => {
                let mut stream = stream;
                if let Some(mut backend) = self.backend().await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut backend).await;
                }
            }
        }
    }

    async fn backend(&self) -> Option<TcpStream> {
        match TcpStream::connect(self.backend).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                Some(s)
            }
            Err(e) => {
                tracing::error!(backend = %self.backend, "front end cannot reach the broker: {e}");
                None
            }
        }
    }

    async fn serve_tls(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let accepted = tokio::time::timeout(self.connect_timeout, acceptor.accept(stream)).await;
        let mut tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let (reason, detail) = classify_tls(&e);
                self.metrics.refuse(reason, peer, &detail);
                return;
            }
            Err(_) => {
                self.metrics
                    .refuse("tls_handshake", peer, "no handshake in time");
                return;
            }
        };
        let node = crate::tls::peer_name(tls.get_ref().1.peer_certificates());
        tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), "node link authenticated");
        let Some(mut backend) = self.backend().await else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
    }

    async fn serve_device(
        &self,
        auth: &Arc<Authenticator>,
        stream: TcpStream,
        _peer: SocketAddr,
    ) -> Result<(), Refused> {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::with_capacity(4096, read);
        let first = tokio::time::timeout(
            self.connect_timeout,
            read_packet(&mut read, self.max_packet),
        )
        .await
        .map_err(|_| Refused("not_connect", "no CONNECT in time".into()))?
        .map_err(|e| e.refused())?;
        if first.kind() != 1 {
            return Err(Refused(
                "not_connect",
                "the first packet must be CONNECT".into(),
            ));
        }
        let connect = parse_connect(first.body())
            .map_err(|e| Refused("malformed_packet", format!("CONNECT: {e}")))?;
        let v5 = connect.level == 5;
        let checker = auth.clone();
        let (client_id, user, password) = (
            connect.client_id.clone(),
            connect.username.clone(),
            connect.password.clone(),
        );
        let permit = self.hashing.acquire().await;
        let mut verdict = tokio::task::spawn_blocking(move || {
            checker.check(&client_id, user.as_deref(), password.as_deref())
        })
        .await
        .unwrap_or(Err(Refusal::BadPassword));
        drop(permit);
        let device = connect.username.clone().unwrap_or_default();
        if verdict.is_ok() {
            if let Some(topic) = &connect.will_topic {
                if !own_topic(&device, topic, v5) {
                    verdict = Err(Refusal::ForeignWill);
                }
            }
        }
        if let Err(refusal) = verdict {
            let code = match (refusal, v5) {
                (Refusal::NoCredentials | Refusal::UnknownDevice | Refusal::BadPassword, false) => {
                    4
                }
                (_, false) => 5,
                (Refusal::NoCredentials | Refusal::UnknownDevice | Refusal::BadPassword, true) => {
                    0x86
                }
                (_, true) => 0x87,
            };
            let connack: &[u8] = if v5 {
                &[0x20, 3, 0, code, 0]
            } else {
                &[0x20, 2, 0, code]
            };
            let _ = write.write_all(connack).await;
            let _ = write.shutdown().await;
            let who = printable(&connect.client_id);
            let user = printable(connect.username.as_deref().unwrap_or(""));
            return Err(Refused(
                refusal.as_str(),
                format!("client id {who:?}, user {user:?}"),
            ));
        }
        tracing::debug!(device = %device, "device authenticated");
        let Some(backend) = self.backend().await else {
            return Ok(());
        };
        let (mut from_broker, mut to_broker) = backend.into_split();
        if to_broker.write_all(first.bytes()).await.is_err() {
            return Ok(());
        }
        let down = async {
            let _ = tokio::io::copy(&mut from_broker, &mut write).await;
            let _ = write.shutdown().await;
        };
        let max_packet = self.max_packet;
        let up = async {
            loop {
                let packet = match read_packet(&mut read, max_packet).await {
                    Ok(p) => p,
                    Err(PacketError::Closed) => return Ok(()),
                    Err(e) => return Err(e.refused()),
                };
                check_packet(&device, v5, &packet)?;
                if to_broker.write_all(packet.bytes()).await.is_err() {
                    return Ok(());
                }
            }
        };
        // Whichever side ends first ends the relay: a refused packet closes the device's
        // connection (dropping both halves), which is all MQTT 3.1.1 allows a server.
        tokio::select! {
            () = down => Ok(()),
            r = up => r,
        }
    }
}

/// A refusal: the metric label and a detail for the log.
#[derive(Debug)]
struct Refused(&'static str, String);

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

pub(crate) fn classify_tls(e: &std::io::Error) -> (&'static str, String) {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => (
            "no_certificate",
            "the node presented no client certificate".into(),
        ),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => (
            "unknown_ca",
            "the client certificate is not signed by this site's CA".into(),
        ),
        Some(rustls::Error::InvalidCertificate(e)) => (
            "bad_certificate",
            format!("the client certificate is not acceptable: {e}"),
        ),
        Some(other) => ("tls_handshake", other.to_string()),
        None => ("tls_handshake", e.to_string()),
    }
}

/// May `device` publish on (or leave a will on) `topic`? Only its own readings. An empty
/// MQTT 5 topic refers to a topic alias, which an earlier, checked publish set.
pub(crate) fn own_topic(device: &str, topic: &[u8], v5: bool) -> bool {
    if topic.is_empty() {
        return v5;
    }
    topic
        .strip_prefix(crate::ingest::SENSOR_PREFIX.as_bytes())
        .and_then(|rest| rest.strip_prefix(device.as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&b'/'))
}

/// May `device` subscribe to `filter`? Its own ack topic and its own aggregates.
pub(crate) fn own_filter(device: &str, filter: &[u8]) -> bool {
    let Ok(filter) = std::str::from_utf8(filter) else {
        return false;
    };
    filter == format!("fogline/ack/{device}")
        || filter
            .strip_prefix("agg/")
            .and_then(|r| r.strip_prefix(device))
            .is_some_and(|r| r.starts_with('/'))
}

/// Checks one packet from an authenticated device.
fn check_packet(device: &str, v5: bool, packet: &Packet) -> Result<(), Refused> {
    match packet.kind() {
        3 => {
            let topic = publish_topic(packet.body())
                .ok_or_else(|| Refused("malformed_packet", "PUBLISH".into()))?;
            if !own_topic(device, topic, v5) {
                return Err(Refused(
                    "foreign_topic",
                    format!(
                        "device {device:?} published on {:?}",
                        printable(&String::from_utf8_lossy(topic))
                    ),
                ));
            }
        }
        8 => {
            let filters = subscribe_filters(packet.body(), v5)
                .ok_or_else(|| Refused("malformed_packet", "SUBSCRIBE".into()))?;
            if let Some(f) = filters.iter().find(|f| !own_filter(device, f)) {
                return Err(Refused(
                    "foreign_subscription",
                    format!(
                        "device {device:?} subscribed to {:?}",
                        printable(&String::from_utf8_lossy(f))
                    ),
                ));
            }
        }
        1 => return Err(Refused("malformed_packet", "a second CONNECT".into())),
        _ => {}
    }
    Ok(())
}

/// One MQTT control packet as read: fixed header and body.
#[derive(Debug)]
pub struct Packet {
    bytes: Vec<u8>,
    body_at: usize,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.bytes.first().map_or(0, |b| b >> 4)
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[self.body_at..]
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[derive(Debug)]
enum PacketError {
    Closed,
    Malformed,
    Oversized(usize),
}

impl PacketError {
    fn refused(self) -> Refused {
        match self {
            PacketError::Closed => Refused("not_connect", "closed before CONNECT".into()),
            PacketError::Malformed => Refused("malformed_packet", "bad remaining length".into()),
            PacketError::Oversized(n) => Refused(
                "oversized_packet",
                format!("a {n}-byte packet is larger than mqtt.max_packet_bytes"),
            ),
        }
    }
}

async fn read_packet<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Packet, PacketError> {
    let mut bytes = Vec::with_capacity(64);
    let first = r.read_u8().await.map_err(|_| PacketError::Closed)?;
    bytes.push(first);
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await.map_err(|_| PacketError::Closed)?;
        bytes.push(b);
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(PacketError::Malformed);
        }
    }
    if len > max {
        return Err(PacketError::Oversized(len));
    }
    let body_at = bytes.len();
    bytes.resize(body_at + len, 0);
    r.read_exact(&mut bytes[body_at..])
        .await
        .map_err(|_| PacketError::Closed)?;
    Ok(Packet { bytes, body_at })
}

/// What the front end needs from a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub level: u8,
    pub client_id: String,
    pub will_topic: Option<Vec<u8>>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

/// A cursor over a packet body; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }

    fn varint(&mut self) -> Option<usize> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// Skips MQTT 5 properties.
    fn properties(&mut self) -> Option<()> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }
}

/// Parses a CONNECT body (MQTT 3.1, 3.1.1 and 5).
pub fn parse_connect(body: &[u8]) -> Result<Connect, &'static str> {
    let mut c = Cursor { buf: body, at: 0 };
    let name = c.bytes().ok_or("truncated protocol name")?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return Err("not MQTT");
    }
    let level = c.u8().ok_or("truncated")?;
    if !matches!(level, 3..=5) {
        return Err("unsupported protocol level");
    }
    let flags = c.u8().ok_or("truncated")?;
    c.u16().ok_or("truncated keepalive")?;
    if level == 5 {
        c.properties().ok_or("truncated properties")?;
    }
    let client_id = std::str::from_utf8(c.bytes().ok_or("truncated client id")?)
        .map_err(|_| "client id is not UTF-8")?
        .to_owned();
    let will_topic = if flags & 0x04 != 0 {
        if level == 5 {
            c.properties().ok_or("truncated will properties")?;
        }
        let topic = c.bytes().ok_or("truncated will topic")?.to_vec();
        c.bytes().ok_or("truncated will payload")?;
        Some(topic)
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(
            std::str::from_utf8(c.bytes().ok_or("truncated username")?)
                .map_err(|_| "username is not UTF-8")?
                .to_owned(),
        )
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(c.bytes().ok_or("truncated password")?.to_vec())
    } else {
        None
    };
    Ok(Connect {
        level,
        client_id,
        will_topic,
        username,
        password,
    })
}

/// The topic of a PUBLISH body.
pub fn publish_topic(body: &[u8]) -> Option<&[u8]> {
    Cursor { buf: body, at: 0 }.bytes()
}

/// The filters of a SUBSCRIBE body.
pub fn subscribe_filters(body: &[u8], v5: bool) -> Option<Vec<&[u8]>> {
    let mut c = Cursor { buf: body, at: 0 };
    c.u16()?;
    if v5 {
        c.properties()?;
    }
    let mut out = Vec::new();
    while c.at < body.len() {
        out.push(c.bytes()?);
        c.u8()?;
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(
        client: &str,
        user: Option<&str>,
        pass: Option<&str>,
        will: Option<&str>,
    ) -> Vec<u8> {
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
        let mut flags = 0x02u8;
        if will.is_some() {
            flags |= 0x04;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if pass.is_some() {
            flags |= 0x40;
        }
        b.push(flags);
        b.extend([0, 30]);
        let s = |b: &mut Vec<u8>, v: &[u8]| {
            b.extend((v.len() as u16).to_be_bytes());
            b.extend(v);
        };
        s(&mut b, client.as_bytes());
        if let Some(w) = will {
            s(&mut b, w.as_bytes());
            s(&mut b, b"bye");
        }
        if let Some(u) = user {
            s(&mut b, u.as_bytes());
        }
        if let Some(p) = pass {
            s(&mut b, p.as_bytes());
        }
        b
    }

    #[test]
    fn connect_fields_are_read_in_order() {
        let c = parse_connect(&connect_v4(
            "d1",
            Some("d1"),
            Some("pw"),
            Some("sensors/d1/lwt"),
        ))
        .expect("parse");
        assert_eq!(c.client_id, "d1");
        assert_eq!(c.username.as_deref(), Some("d1"));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        assert_eq!(c.will_topic.as_deref(), Some(&b"sensors/d1/lwt"[..]));
        let body = connect_v4("d1", None, None, None);
        for cut in 0..body.len() {
            assert!(parse_connect(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_device_may_publish_only_under_its_own_prefix() {
        assert!(own_topic("d1", b"sensors/d1/temp", false));
        assert!(!own_topic("d1", b"sensors/d10/temp", false));
        assert!(!own_topic("d1", b"sensors/d1", false));
        assert!(!own_topic("d1", b"fogline/ack/d1", false));
        assert!(!own_topic("d1", b"", false));
        assert!(own_topic("d1", b"", true));
        assert!(own_filter("d1", b"fogline/ack/d1"));
        assert!(own_filter("d1", b"agg/d1/#"));
        assert!(!own_filter("d1", b"fogline/ack/#"));
        assert!(!own_filter("d1", b"sensors/#"));
        assert!(!own_filter("d1", b"agg/#"));
    }

    #[tokio::test]
    async fn packets_are_framed_and_bounded() {
        let mut data: &[u8] = &[0x30, 0x05, 0, 1, b'a', b'x', b'y', 0xc0, 0x00];
        let p = read_packet(&mut data, 100).await.expect("publish");
        assert_eq!(p.kind(), 3);
        assert_eq!(publish_topic(p.body()), Some(&b"a"[..]));
        let p = read_packet(&mut data, 100).await.expect("pingreq");
        assert_eq!(p.kind(), 12);
        let mut big: &[u8] = &[0x30, 0xff, 0x7f];
        assert!(matches!(
            read_packet(&mut big, 100).await,
            Err(PacketError::Oversized(_))
        ));
        let mut bad: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(matches!(
            read_packet(&mut bad, usize::MAX).await,
            Err(PacketError::Malformed)
        ));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_counted() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = FrontMetrics::new(Duration::from_secs(10));
        let auth = Arc::new(Authenticator::new(&crate::auth::AuthConfig::default()));
        let front = Front {
            listener,
            backend: backend.local_addr().expect("addr"),
            guard: Guard::Devices(auth),
            max_connections: 1,
            max_packet: 1024,
            connect_timeout: Duration::from_secs(5),
            metrics: metrics.clone(),
        };
        let task = front.spawn().expect("spawn");
        // The first connection holds the only slot while it waits for its CONNECT.
        let _first = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the second connection is closed");
        assert_eq!(metrics.refused_total("max_connections"), 1);
        task.abort();
    }
}
