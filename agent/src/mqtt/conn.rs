//! One client connection: CONNECT, then packets both ways until it ends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    LastWillProperties, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule,
    SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::session::{Dropped, InFlight, Record, Session, Sub};
use super::topic::{self, Tag};
use super::Server;
use crate::ingest::Offered;
use crate::ingest::{Commits, Done, Reject};
use crate::security::auth::{Authenticator, Refusal};

/// What a connection may do.
#[derive(Clone)]
pub enum Rights {
    /// Anything but the site's private topics when the site has its own listener.
    Open,
    /// Check CONNECT credentials; then a device, under its own topics.
    Authenticate(Arc<Authenticator>),
    /// An authenticated device.
    Device(String),
    /// A node of the site: anything.
    All,
}

const SITE_PREFIXES: [&str; 2] = ["fogline/cluster/", "fogline/repl/"];

impl Rights {
    /// May this connection ship a site's log batches (larger than any reading)?
    fn may_ship(&self, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private,
            Rights::Device(_) | Rights::Authenticate(_) => false,
        }
    }

    fn may_publish(&self, topic: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| topic.starts_with(p)),
            Rights::Device(d) => own_topic(d, topic.as_bytes()),
            Rights::Authenticate(_) => false,
        }
    }

    fn may_subscribe(&self, filter: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| filter.starts_with(p)),
            Rights::Device(d) => own_filter(d, filter.as_bytes()),
            Rights::Authenticate(_) => false,
        }
    }
}

/// May `device` publish on (or leave a will on) `topic`? Only its own readings.
fn own_topic(device: &str, topic: &[u8]) -> bool {
    topic
        .strip_prefix(crate::ingest::SENSOR_PREFIX.as_bytes())
        .and_then(|rest| rest.strip_prefix(device.as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&b'/'))
}

/// May `device` subscribe to `filter`? Its own ack topic and its own aggregates.
fn own_filter(device: &str, filter: &[u8]) -> bool {
    let Ok(filter) = std::str::from_utf8(filter) else {
        return false;
    };
    filter == format!("fogline/ack/{device}")
        || filter
            .strip_prefix("agg/")
            .and_then(|r| r.strip_prefix(device))
            .is_some_and(|r| r.starts_with('/'))
}

enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    /// Decodes the next packet a client sent. rumqttd's decoders are written for both
    /// directions and reach `unreachable!()` on packet types a server never receives
    /// (found by the `mqtt_front` fuzz target: a CONNACK-typed packet to the v5 codec), so
    /// only client-to-server types are handed to them; a panic inside them anyway ends
    /// this connection as malformed instead of its task.
    fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, rumqttd::protocol::Error> {
        if let Some(&b0) = buf.first() {
            // CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE,
            // PINGREQ, DISCONNECT.
            if !matches!(b0 >> 4, 1 | 3..=8 | 10 | 12 | 14) {
                return Err(rumqttd::protocol::Error::InvalidPacketType(b0 >> 4));
            }
        }
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }));
        decoded.unwrap_or(Err(rumqttd::protocol::Error::MalformedPacket))
    }

    fn write(&self, packet: Packet, buf: &mut BytesMut) {
        let r = match self {
            Codec::V4(c) => c.write(packet, buf),
            Codec::V5(c) => c.write(packet, buf),
        };
        if let Err(e) = r {
            tracing::warn!("cannot encode an MQTT packet: {e}");
        }
    }

    fn v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }
}

/// How a connection ended.
enum End {
    /// DISCONNECT from the client: no will (unless it asked for it).
    Normal { will: bool },
    /// Closed, timed out, or refused: the will is published.
    Abnormal,
    /// Another connection took the session: nothing more to do here.
    TakenOver,
}

/// An acknowledgement the client waits for, sent in the order the packets came.
struct PendingAck {
    /// A reading: wait until the writer made it durable (or refused it).
    token: Option<u64>,
    pkid: u16,
    kind: AckKind,
    /// Refused before it reached the writer.
    refused: Option<Reject>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// PUBACK of a QoS 1 publish.
    Ack,
    /// PUBREC of a QoS 2 publish: its packet id is remembered (so a re-send is not
    /// delivered twice) only when the PUBREC goes out, i.e. once the reading is stored.
    Rec,
    /// PUBCOMP after a PUBREL.
    Comp,
}

/// The MQTT 5 reason code for a reading that was not stored.
fn ack_reason(why: Reject) -> PubAckReason {
    match why {
        Reject::MalformedTopic | Reject::InvalidId | Reject::TopicMismatch => {
            PubAckReason::TopicNameInvalid
        }
        Reject::RateLimited | Reject::TooManyDevices | Reject::TooManyGaps => {
            PubAckReason::QuotaExceeded
        }
        Reject::SeqJump => PubAckReason::ImplementationSpecificError,
        Reject::Oversized
        | Reject::MalformedPayload
        | Reject::NonFinite
        | Reject::UnsupportedVersion
        | Reject::SeqWithoutBoot => PubAckReason::PayloadFormatInvalid,
    }
}

fn rec_reason(why: Reject) -> PubRecReason {
    match ack_reason(why) {
        PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::ImplementationSpecificError => PubRecReason::ImplementationSpecificError,
        _ => PubRecReason::PayloadFormatInvalid,
    }
}

struct Conn<'a> {
    server: &'a Arc<Server>,
    session: Arc<Session>,
    generation: u64,
    codec: Codec,
    rights: Rights,
    wbuf: BytesMut,
    acks: VecDeque<PendingAck>,
    commits: Arc<Commits>,
    next_token: u64,
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    /// Topic aliases the client set (MQTT 5), at most `Settings::topic_alias_max`.
    aliases_in: std::collections::HashMap<u16, Bytes>,
    /// Topic aliases this connection gives the client's topics, at most the client's
    /// Topic Alias Maximum.
    aliases_out: std::collections::HashMap<Vec<u8>, u16>,
    alias_out_max: u16,
    /// A reading was refused for a reason that may pass, and this 3.1.1 client has no
    /// way to hear it: no packet is read any more, the acks owed before it go out, then
    /// the connection closes (the client sends it again after reconnecting).
    closing: bool,
}

/// Serves one client connection until it ends.
pub async fn serve<S>(server: &Arc<Server>, stream: S, peer: SocketAddr, rights: Rights)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(512);
    // The CONNECT exchange holds far more state than the rest of a connection's life
    // (decoded packets, properties, credential checks), and a task is as large as its
    // largest state for as long as it lives: boxed, that state is freed once the client
    // is in, and an idle connection stays small.
    let opened = Box::pin(open(
        server,
        &mut reader,
        &mut writer,
        &mut rbuf,
        peer,
        rights,
    ))
    .await;
    let Some((mut conn, keep_alive)) = opened else {
        return;
    };
    conn.resend_inflight();
    let end = conn
        .run(&mut reader, &mut writer, &mut rbuf, keep_alive)
        .await;
    let _ = writer.shutdown().await;
    Box::pin(conn.finish(end)).await;
}

/// The CONNECT exchange: who the client is, which session it gets, and the CONNACK.
/// `None` when the client was refused (the refusal is counted and answered).
async fn open<'a, R, W>(
    server: &'a Arc<Server>,
    reader: &mut R,
    writer: &mut W,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    rights: Rights,
) -> Option<(Conn<'a>, Duration)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(
        server.settings.connect_timeout,
        read_connect(reader, rbuf, server.settings.max_packet),
    )
    .await;
    let (codec, packet) = match first {
        Ok(Ok(p)) => p,
        Ok(Err((reason, detail))) => {
            server.front.refuse(reason, peer, &detail);
            return None;
        }
        Err(_) => {
            server
                .front
                .refuse("not_connect", peer, "no CONNECT in time");
            return None;
        }
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        server
            .front
            .refuse("not_connect", peer, "the first packet must be CONNECT");
        return None;
    };
    let v5 = codec.v5();
    let mut wbuf = BytesMut::with_capacity(256);
    let refuse = |code: ConnectReturnCode, wbuf: &mut BytesMut| {
        codec.write(
            Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code,
                },
                None,
            ),
            wbuf,
        );
    };

    // Who is it?
    let rights = match rights {
        Rights::Authenticate(auth) => {
            let (user, pass) = match &login {
                Some(l) => (
                    Some(l.username.clone()),
                    Some(l.password.clone().into_bytes()),
                ),
                None => (None, None),
            };
            let client_id = connect.client_id.clone();
            let checker = auth.clone();
            let permit = server.hashing.acquire().await;
            let user_for_check = user.clone();
            let mut verdict = tokio::task::spawn_blocking(move || {
                checker.check(&client_id, user_for_check.as_deref(), pass.as_deref())
            })
            .await
            .unwrap_or(Err(Refusal::BadPassword));
            drop(permit);
            let device = user.unwrap_or_default();
            if verdict.is_ok() {
                if let Some(w) = &will {
                    if !own_topic(&device, &w.topic) {
                        verdict = Err(Refusal::ForeignWill);
                    }
                }
            }
            if let Err(refusal) = verdict {
                let code = match refusal {
                    Refusal::NoCredentials | Refusal::UnknownDevice | Refusal::BadPassword => {
                        ConnectReturnCode::BadUserNamePassword
                    }
                    _ => ConnectReturnCode::NotAuthorized,
                };
                refuse(code, &mut wbuf);
                let _ = writer.write_all(&wbuf).await;
                let _ = writer.shutdown().await;
                server.front.refuse(
                    refusal.as_str(),
                    peer,
                    &format!(
                        "client id {:?}, user {:?}",
                        printable(&connect.client_id),
                        printable(&device)
                    ),
                );
                return None;
            }
            Rights::Device(device)
        }
        other => other,
    };

    // Which session?
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session && !v5 {
            refuse(ConnectReturnCode::ClientIdentifierNotValid, &mut wbuf);
            let _ = writer.write_all(&wbuf).await;
            return None;
        }
        client_id = format!("auto-{:016x}", fastrand::u64(..));
        assigned = Some(client_id.clone());
    }
    let max_expiry = server.settings.session_expiry_max_secs;
    let expiry_secs = if v5 {
        props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0)
            .min(max_expiry)
    } else if connect.clean_session {
        0
    } else {
        max_expiry
    };
    let generation = server.next_generation();
    let rec = Record {
        v5,
        expiry_secs,
        ..Record::default()
    };
    let (session, present) = server
        .attach(&client_id, connect.clean_session, rec, generation)
        .await;
    {
        let mut st = session.lock();
        let limit = server.settings.max_inflight.max(1);
        st.receive_max = props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .map_or(limit, |r| usize::from(r).clamp(1, limit));
        st.max_packet = props.as_ref().and_then(|p| p.max_packet_size);
    }
    // A client that asks for no keep alive, or for more than the server allows, gets the
    // server's (MQTT 5: told in the CONNACK; 3.1.1 has no way to say it: refused).
    let max_keep_alive = server.settings.max_keep_alive_secs;
    let keep_alive_secs =
        if max_keep_alive > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_keep_alive) {
            if !v5 {
                refuse(ConnectReturnCode::ClientIdentifierNotValid, &mut wbuf);
                let _ = writer.write_all(&wbuf).await;
                server.front.refuse(
                    "keep_alive",
                    peer,
                    &format!(
                        "keep alive {} s is above mqtt.max_keep_alive_secs ({max_keep_alive})",
                        connect.keep_alive
                    ),
                );
                return None;
            }
            max_keep_alive
        } else {
            connect.keep_alive
        };
    let server_keep_alive = (keep_alive_secs != connect.keep_alive).then_some(keep_alive_secs);
    let connack_props = v5.then(|| ConnAckProperties {
        session_expiry_interval: (expiry_secs
            != props
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0))
        .then_some(expiry_secs),
        receive_max: Some(u16::try_from(server.settings.max_inflight).unwrap_or(u16::MAX)),
        max_qos: None,
        retain_available: Some(1),
        max_packet_size: Some(u32::try_from(server.settings.max_packet).unwrap_or(u32::MAX)),
        assigned_client_identifier: assigned,
        topic_alias_max: (server.settings.topic_alias_max > 0)
            .then_some(server.settings.topic_alias_max),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(0),
        server_keep_alive,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present: present && !connect.clean_session,
                code: ConnectReturnCode::Success,
            },
            connack_props,
        ),
        &mut wbuf,
    );
    tracing::debug!(client = %client_id, %peer, v5, keep_alive = connect.keep_alive, present, "client connected");

    let conn = Conn {
        server,
        session,
        generation,
        codec,
        rights,
        wbuf,
        acks: VecDeque::new(),
        commits: Arc::new(Commits::default()),
        next_token: 0,
        will: will.map(|w| Box::new((w, will_props))),
        aliases_in: std::collections::HashMap::new(),
        aliases_out: std::collections::HashMap::new(),
        alias_out_max: props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0),
        closing: false,
    };
    let keep_alive = Duration::from_millis(u64::from(keep_alive_secs) * 1500);
    Some((conn, keep_alive))
}

/// Reads the CONNECT and picks the codec its protocol level asks for.
async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<(Codec, Packet), (&'static str, String)> {
    loop {
        if let Some(level) = connect_level(rbuf) {
            let mut codec = match level {
                4 => Codec::V4(V4),
                5 => Codec::V5(V5),
                l => {
                    return Err((
                        "malformed_packet",
                        format!("MQTT protocol level {l} is not supported (3.1.1 and 5 are)"),
                    ))
                }
            };
            match codec.read(rbuf, max) {
                Ok(p) => return Ok((codec, p)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n)) => {
                    return Err((
                        "oversized_packet",
                        format!("a {n}-byte CONNECT is larger than mqtt.max_packet_bytes"),
                    ))
                }
                Err(e) => return Err(("malformed_packet", format!("CONNECT: {e}"))),
            }
        } else if rbuf.len() >= 2 && rbuf[0] != 0x10 {
            return Err(("not_connect", "the first packet must be CONNECT".into()));
        } else if rbuf.len() > 16 {
            return Err(("malformed_packet", "CONNECT: no protocol level".into()));
        }
        match reader.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(("not_connect", "closed before CONNECT".into())),
            Ok(_) => {}
        }
    }
}

/// The protocol level of a CONNECT at the start of `buf`, once enough of it is there.
fn connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first() != Some(&0x10) {
        return None;
    }
    // Skip the remaining length (1–4 bytes), the protocol name's length and the name.
    let mut at = 1;
    while *buf.get(at)? & 0x80 != 0 {
        at += 1;
        if at > 4 {
            return Some(0);
        }
    }
    at += 1;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    buf.get(at + 2 + name_len).copied()
}

/// The largest packet the connection may send next: `device` (`mqtt.max_packet_bytes`),
/// except a PUBLISH of a site's log batch (`fogline/repl/…`) on a connection that may
/// ship them (`batch`: `cluster.max_batch_bytes` and room for the header). The topic is
/// read from the packet's first bytes, before the rest is buffered, so a device never
/// gets a byte more than `device` into memory.
fn packet_limit(buf: &[u8], device: usize, batch: Option<usize>) -> usize {
    let Some(batch) = batch else {
        return device;
    };
    let Some(&b0) = buf.first() else {
        return device;
    };
    if b0 >> 4 != 3 {
        return device;
    }
    let mut at = 1;
    let mut remaining = 0usize;
    let mut shift = 0;
    loop {
        let Some(&b) = buf.get(at) else {
            // The length is not all here yet: nothing is decided (or buffered) beyond it.
            return device;
        };
        remaining |= usize::from(b & 0x7f) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return device;
        }
    }
    if remaining <= device {
        return device;
    }
    let (Some(&hi), Some(&lo)) = (buf.get(at), buf.get(at + 1)) else {
        return batch;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    match buf.get(at + 2..at + 2 + len) {
        Some(topic) if topic.starts_with(b"fogline/repl/") => batch,
        Some(_) => device,
        // Wait for the topic (at most 64 KiB): the codec asks for the rest only then.
        None => batch,
    }
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is one and is all there
/// (rumqttd's decoded `Publish` keeps them private).
fn publish_meta(buf: &[u8]) -> Option<(u8, u16)> {
    let b0 = *buf.first()?;
    if b0 >> 4 != 3 {
        return None;
    }
    let qos = (b0 >> 1) & 3;
    let mut at = 1;
    while *buf.get(at)? & 0x80 != 0 {
        at += 1;
        if at > 4 {
            return None;
        }
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let p = at + 2 + topic_len;
    let pkid = if qos > 0 {
        u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])
    } else {
        0
    };
    Some((qos, pkid))
}

/// Turns an encoded QoS 0 PUBLISH into a QoS 1/2 one: flags, a remaining length two
/// bytes longer, and the packet id after the topic.
fn add_packet_id(plain: &[u8], qos: u8, pkid: u16, dup: bool, out: &mut BytesMut) {
    use bytes::BufMut;
    let Some(&b0) = plain.first() else {
        return;
    };
    let (mut remaining, mut at, mut shift) = (0usize, 1usize, 0u32);
    loop {
        let Some(&b) = plain.get(at) else {
            return;
        };
        remaining |= usize::from(b & 0x7f) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return;
        }
    }
    let (Some(&hi), Some(&lo)) = (plain.get(at), plain.get(at + 1)) else {
        return;
    };
    let split = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
    let (Some(topic), Some(rest)) = (plain.get(at..split), plain.get(split..)) else {
        return;
    };
    out.put_u8(b0 | (qos << 1) | (u8::from(dup) << 3));
    let mut len = remaining + 2;
    loop {
        let mut byte = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(topic);
    out.put_u16(pkid);
    out.extend_from_slice(rest);
}

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Conn<'_> {
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        rbuf: &mut BytesMut,
        keep_alive: Duration,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut deadline = tokio::time::Instant::now() + keep_alive;
        let settings = &self.server.settings;
        let may_ship = self.rights.may_ship(settings.site_private);
        loop {
            // Everything already read.
            while !self.closing {
                let meta = publish_meta(rbuf);
                let limit = packet_limit(
                    rbuf,
                    settings.max_packet,
                    may_ship.then_some(settings.max_batch_packet),
                );
                match self.codec.read(rbuf, limit) {
                    Ok(packet) => {
                        deadline = tokio::time::Instant::now() + keep_alive;
                        // Boxed: handling a packet needs a large future (a decoded
                        // PUBLISH and its properties, the ingest queue's send) for a
                        // moment; inline, every idle connection would carry its room.
                        if let Some(end) = Box::pin(self.handle(packet, meta)).await {
                            let _ = writer.write_all(&self.wbuf).await;
                            return end;
                        }
                    }
                    Err(rumqttd::protocol::Error::InsufficientBytes(_)) => break,
                    Err(e) => {
                        let (reason, code) = match e {
                            rumqttd::protocol::Error::PayloadSizeLimitExceeded(_) => {
                                ("oversized_packet", DisconnectReasonCode::PacketTooLarge)
                            }
                            _ => ("malformed_packet", DisconnectReasonCode::MalformedPacket),
                        };
                        self.disconnect(code);
                        let _ = writer.write_all(&self.wbuf).await;
                        self.server.front.refuse(
                            reason,
                            SocketAddr::from(([0, 0, 0, 0], 0)),
                            &format!("client {:?}: {e}", self.session.client_id),
                        );
                        return End::Abnormal;
                    }
                }
            }
            if self.session.lock().conn != self.generation {
                self.disconnect(DisconnectReasonCode::SessionTakenOver);
                let _ = writer.write_all(&self.wbuf).await;
                return End::TakenOver;
            }
            if self.commits.failed() {
                // A batch with one of our readings was not stored: never ack it.
                return End::Abnormal;
            }
            if let Some(end) = self.flush_acks() {
                let _ = writer.write_all(&self.wbuf).await;
                return end;
            }
            self.pump();
            if !self.wbuf.is_empty() {
                if writer.write_all(&self.wbuf).await.is_err() {
                    return End::Abnormal;
                }
                self.wbuf.clear();
            }
            let waiting_for_client = keep_alive.is_zero();
            tokio::select! {
                r = reader.read_buf(rbuf), if !self.closing => match r {
                    Ok(0) | Err(_) => return End::Abnormal,
                    Ok(_) => {}
                },
                () = self.session.wake.notified() => {}
                () = self.session.kick.notified() => {}
                () = self.commits.notify.notified() => {}
                () = tokio::time::sleep_until(deadline), if !waiting_for_client => {
                    tracing::debug!(client = %self.session.client_id, "keep alive expired");
                    return End::Abnormal;
                }
            }
        }
    }

    fn v5(&self) -> bool {
        self.codec.v5()
    }

    fn disconnect(&mut self, code: DisconnectReasonCode) {
        if self.v5() {
            self.codec.write(
                Packet::Disconnect(Disconnect { reason_code: code }, None),
                &mut self.wbuf,
            );
        }
    }

    /// Handles one packet; `Some` ends the connection.
    async fn handle(&mut self, packet: Packet, meta: Option<(u8, u16)>) -> Option<End> {
        match packet {
            Packet::Publish(publish, props) => {
                let (qos, pkid) = meta.unwrap_or((0, 0));
                self.publish(publish, props, qos, pkid).await
            }
            Packet::PubAck(ack, _) => {
                let mut st = self.session.lock();
                if st
                    .rec
                    .inflight
                    .get(&ack.pkid)
                    .is_some_and(|f| f.msg.qos == 1)
                {
                    st.rec.inflight.remove(&ack.pkid);
                    st.dirty = true;
                }
                None
            }
            Packet::PubRec(rec, _) => {
                {
                    let mut st = self.session.lock();
                    if let Some(f) = st.rec.inflight.get_mut(&rec.pkid) {
                        f.released = true;
                        st.dirty = true;
                    }
                }
                self.codec.write(
                    Packet::PubRel(
                        PubRel {
                            pkid: rec.pkid,
                            reason: PubRelReason::Success,
                        },
                        None,
                    ),
                    &mut self.wbuf,
                );
                None
            }
            Packet::PubComp(comp, _) => {
                let mut st = self.session.lock();
                if st.rec.inflight.remove(&comp.pkid).is_some() {
                    st.dirty = true;
                }
                None
            }
            Packet::PubRel(rel, _) => {
                {
                    let mut st = self.session.lock();
                    st.rec.incoming_qos2.retain(|p| *p != rel.pkid);
                    st.dirty = true;
                }
                self.acks.push_back(PendingAck {
                    token: None,
                    pkid: rel.pkid,
                    kind: AckKind::Comp,
                    refused: None,
                });
                None
            }
            Packet::Subscribe(sub, props) => {
                self.subscribe(sub, props).await;
                None
            }
            Packet::Unsubscribe(unsub, _) => {
                let mut reasons = Vec::with_capacity(unsub.filters.len());
                for f in &unsub.filters {
                    let existed = {
                        let mut st = self.session.lock();
                        let before = st.rec.subs.len();
                        st.rec.subs.retain(|s| &s.filter != f);
                        st.dirty = true;
                        st.rec.subs.len() != before
                    };
                    if existed {
                        self.server.unsubscribed(&self.session, f);
                    }
                    reasons.push(if existed {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    });
                }
                self.codec.write(
                    Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsub.pkid,
                            reasons,
                        },
                        None,
                    ),
                    &mut self.wbuf,
                );
                None
            }
            Packet::PingReq(_) => {
                self.codec.write(Packet::PingResp(PingResp), &mut self.wbuf);
                None
            }
            Packet::Disconnect(d, props) => {
                if let Some(secs) = props.and_then(|p| p.session_expiry_interval) {
                    let mut st = self.session.lock();
                    // Zero at CONNECT cannot become non-zero (MQTT-3.14.2-2).
                    if st.rec.expiry_secs > 0 {
                        st.rec.expiry_secs = secs.min(self.server.settings.session_expiry_max_secs);
                        st.dirty = true;
                    }
                }
                Some(End::Normal {
                    will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Connect(..) => {
                self.disconnect(DisconnectReasonCode::ProtocolError);
                Some(End::Abnormal)
            }
            _ => {
                self.disconnect(DisconnectReasonCode::ProtocolError);
                Some(End::Abnormal)
            }
        }
    }

    async fn publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
    ) -> Option<End> {
        if let Some(p) = props.as_mut() {
            if !p.subscription_identifiers.is_empty() {
                // Only a server sets them (MQTT-3.3.4-6).
                self.disconnect(DisconnectReasonCode::ProtocolError);
                return Some(End::Abnormal);
            }
            if let Some(alias) = p.topic_alias.take() {
                if let Err(code) = self.resolve_alias(&mut publish, alias) {
                    self.disconnect(code);
                    return Some(End::Abnormal);
                }
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            self.disconnect(DisconnectReasonCode::TopicNameInvalid);
            return Some(End::Abnormal);
        };
        if !topic::valid_topic(topic) {
            // An empty topic without an alias, or wildcards in a topic name.
            self.disconnect(DisconnectReasonCode::TopicNameInvalid);
            return Some(End::Abnormal);
        }
        if !self
            .rights
            .may_publish(topic, self.server.settings.site_private)
        {
            let who = match &self.rights {
                Rights::Device(d) => format!("device {d:?}"),
                _ => format!("client {:?}", self.session.client_id),
            };
            self.server.front.refuse(
                "foreign_topic",
                SocketAddr::from(([0, 0, 0, 0], 0)),
                &format!("{who} published on {:?}", printable(topic)),
            );
            self.disconnect(DisconnectReasonCode::NotAuthorized);
            return Some(End::Abnormal);
        }
        if qos == 2 {
            if self.session.lock().rec.incoming_qos2.contains(&pkid) {
                // A re-send of a message we have (its PUBREC was sent): acknowledge again,
                // deliver once.
                self.acks.push_back(PendingAck {
                    token: None,
                    pkid,
                    kind: AckKind::Rec,
                    refused: None,
                });
                return None;
            }
            if self
                .acks
                .iter()
                .any(|a| a.pkid == pkid && a.kind == AckKind::Rec)
            {
                // A re-send of one still waiting for its commit: the PUBREC it waits for
                // answers both.
                return None;
            }
        }
        if qos > 0 && self.v5() && self.incoming_in_flight() >= self.server.settings.max_inflight {
            // More than the Receive Maximum we offered (MQTT-3.3.4-9).
            self.disconnect(DisconnectReasonCode::ReceiveMaximumExceeded);
            self.server.front.refuse(
                "receive_maximum",
                SocketAddr::from(([0, 0, 0, 0], 0)),
                &format!(
                    "client {:?} sent more than {} unacknowledged QoS 1/2 publishes",
                    self.session.client_id, self.server.settings.max_inflight
                ),
            );
            return Some(End::Abnormal);
        }
        let mut token = None;
        let mut refused = None;
        if topic.starts_with('$') {
            self.server.dropped(Dropped::Dollar);
        } else if topic.starts_with(super::LOCAL_PREFIX) {
            // Only the agent speaks there: a forged ack would let a device forget readings
            // that are not stored.
            self.server.dropped(Dropped::AgentTopic);
        } else if topic.starts_with(crate::ingest::SENSOR_PREFIX) {
            let done = (qos > 0).then(|| {
                self.next_token += 1;
                Done {
                    commits: self.commits.clone(),
                    token: self.next_token,
                }
            });
            token = done.as_ref().map(|d| d.token);
            match self
                .server
                .ingest
                .offer(&publish.topic, &publish.payload, done)
                .await
            {
                Offered::Queued => {}
                Offered::Rejected(why) => {
                    token = None;
                    refused = Some(why);
                    if why.is_temporary() && !self.v5() && qos > 0 {
                        // Acks owed before it still go out; nothing after it is read.
                        self.closing = true;
                    }
                }
                Offered::Closed => return Some(End::Abnormal),
            }
            if self.server.readings_wanted() {
                Box::pin(self.route(publish, props, qos)).await;
            }
        } else {
            // Routing is boxed: its future is larger than a reading's whole path, and
            // inline it would size the future of every reading a connection waits with.
            Box::pin(self.route(publish, props, qos)).await;
        }
        let kind = match qos {
            0 => return None,
            1 => AckKind::Ack,
            _ => AckKind::Rec,
        };
        self.acks.push_back(PendingAck {
            token,
            pkid,
            kind,
            refused,
        });
        None
    }

    /// MQTT 5 topic aliases from the client (MQTT-3.3.2-8 to -12): a topic with an alias
    /// sets it, an empty topic with an alias uses it. The router never sees an alias: its
    /// one link carries every client's publishes.
    fn resolve_alias(
        &mut self,
        publish: &mut Publish,
        alias: u16,
    ) -> Result<(), DisconnectReasonCode> {
        if !self.v5() || alias == 0 {
            return Err(DisconnectReasonCode::ProtocolError);
        }
        if alias > self.server.settings.topic_alias_max {
            return Err(DisconnectReasonCode::TopicAliasInvalid);
        }
        if publish.topic.is_empty() {
            match self.aliases_in.get(&alias) {
                Some(topic) => publish.topic = topic.clone(),
                None => return Err(DisconnectReasonCode::ProtocolError),
            }
        } else {
            self.aliases_in.insert(alias, publish.topic.clone());
        }
        Ok(())
    }

    /// QoS 1 and 2 publishes from the client not yet completed: PUBACK or PUBREC owed, or
    /// PUBREC sent and PUBCOMP not yet.
    fn incoming_in_flight(&self) -> usize {
        let owed = self.acks.iter().filter(|a| a.kind != AckKind::Comp).count();
        owed + self.session.lock().rec.incoming_qos2.len()
    }

    async fn route(&self, publish: Publish, props: Option<PublishProperties>, qos: u8) {
        let tag = Tag {
            qos,
            retain: publish.retain,
            at_ms: crate::now_ms(),
            from: self.session.client_id.clone(),
        };
        self.server
            .route(publish.topic, publish.payload, props, &tag)
            .await;
    }

    async fn subscribe(
        &mut self,
        sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
    ) {
        let v5 = self.v5();
        let id = props.and_then(|p| p.id);
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut added = Vec::new();
        for f in sub.filters {
            let site_private = self.server.settings.site_private;
            let code = if !topic::valid_filter(&f.path) {
                if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                }
            } else if f.path.starts_with("$share/") {
                if v5 {
                    SubscribeReasonCode::SharedSubscriptionsNotSupported
                } else {
                    SubscribeReasonCode::Failure
                }
            } else if !self.rights.may_subscribe(&f.path, site_private) {
                self.server.front.refuse(
                    "foreign_subscription",
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    &format!(
                        "client {:?} subscribed to {:?}",
                        self.session.client_id,
                        printable(&f.path)
                    ),
                );
                if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                }
            } else {
                let qos = (f.qos as u8).min(2);
                let mut st = self.session.lock();
                let existed = st.rec.subs.iter().position(|s| s.filter == f.path);
                let retained_ok = match f.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => existed.is_none(),
                    RetainForwardRule::Never => false,
                };
                let new = Sub {
                    filter: f.path.clone(),
                    qos,
                    no_local: v5 && f.nolocal,
                    retain_as_published: v5 && f.preserve_retain,
                    id,
                    retained_ok,
                };
                match existed {
                    Some(i) => st.rec.subs[i] = new,
                    None => {
                        st.rec.subs.push(new);
                    }
                }
                st.dirty = true;
                drop(st);
                if existed.is_some() {
                    // Replaced: the router is asked again (and sends retained messages).
                    self.server.unsubscribed(&self.session, &f.path);
                }
                added.push(f.path);
                SubscribeReasonCode::Success(qos_of(qos))
            };
            codes.push(code);
        }
        self.codec.write(
            Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes: codes,
                },
                None,
            ),
            &mut self.wbuf,
        );
        for f in added {
            self.server.subscribed(&self.session, &f).await;
        }
    }

    /// Sends the acks whose turn has come, in the order their packets arrived. A reading
    /// that was not stored is never acknowledged as stored: MQTT 5 clients get a reason
    /// code, a 3.1.1 client (which knows no negative PUBACK) is disconnected when the
    /// refusal may pass, so that it sends the reading again; `Some` ends the connection.
    fn flush_acks(&mut self) -> Option<End> {
        let committed = self.commits.committed();
        while let Some(a) = self.acks.front() {
            if a.token.is_some_and(|t| t > committed) {
                break;
            }
            let Some(a) = self.acks.pop_front() else {
                break;
            };
            let refused = a
                .refused
                .or_else(|| a.token.and_then(|t| self.commits.take_refusal(t)));
            let pkid = a.pkid;
            let packet = match (a.kind, refused) {
                (AckKind::Comp, _) => Packet::PubComp(
                    PubComp {
                        pkid,
                        reason: PubCompReason::Success,
                    },
                    None,
                ),
                (AckKind::Ack, Some(why)) if self.v5() => Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: ack_reason(why),
                    },
                    None,
                ),
                (AckKind::Rec, Some(why)) if self.v5() => Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: rec_reason(why),
                    },
                    None,
                ),
                (_, Some(why)) if why.is_temporary() => {
                    self.server.front.refuse(
                        "reading_not_stored",
                        SocketAddr::from(([0, 0, 0, 0], 0)),
                        &format!(
                            "MQTT 3.1.1 client {:?} disconnected instead of acknowledging a \
                             reading that was not stored ({}); it sends it again",
                            self.session.client_id,
                            why.as_str()
                        ),
                    );
                    return Some(End::Normal { will: false });
                }
                (AckKind::Ack, _) => Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ),
                (AckKind::Rec, _) => {
                    let mut st = self.session.lock();
                    if !st.rec.incoming_qos2.contains(&pkid) {
                        st.rec.incoming_qos2.push(pkid);
                        st.dirty = true;
                    }
                    drop(st);
                    Packet::PubRec(
                        PubRec {
                            pkid,
                            reason: PubRecReason::Success,
                        },
                        None,
                    )
                }
            };
            self.codec.write(packet, &mut self.wbuf);
        }
        None
    }

    /// On a resumed session: what was sent and not acknowledged goes again (DUP).
    fn resend_inflight(&mut self) {
        let now = crate::now_ms();
        let inflight: Vec<(u16, InFlight)> = {
            let st = self.session.lock();
            st.rec
                .inflight
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        };
        for (pkid, f) in inflight {
            if f.released {
                self.codec.write(
                    Packet::PubRel(
                        PubRel {
                            pkid,
                            reason: PubRelReason::Success,
                        },
                        None,
                    ),
                    &mut self.wbuf,
                );
            } else {
                let mut out = BytesMut::new();
                self.encode_publish(&f.msg, pkid, true, now, None, &mut out);
                self.wbuf.extend_from_slice(&out);
            }
        }
    }

    /// The topic alias for a message to this client (MQTT 5, when the client allows
    /// aliases): `(alias, true)` when it is new and the PUBLISH must carry the topic too.
    fn alias_for(&self, topic: &[u8]) -> Option<(u16, bool)> {
        if let Some(&a) = self.aliases_out.get(topic) {
            return Some((a, false));
        }
        let next = u16::try_from(self.aliases_out.len() + 1).ok()?;
        (next <= self.alias_out_max).then_some((next, true))
    }

    /// Encodes a PUBLISH for this client. rumqttd's `Publish` keeps QoS, DUP and the
    /// packet id private, so its codec writes a QoS 0 packet and the packet id goes in here.
    /// With `alias`, the topic is sent as that topic alias (and only named when new).
    fn encode_publish(
        &self,
        msg: &super::session::Msg,
        pkid: u16,
        dup: bool,
        now: i64,
        alias: Option<(u16, bool)>,
        out: &mut BytesMut,
    ) {
        let mut props = if self.v5() {
            msg.props.to_publish(msg.expires_at, now)
        } else {
            None
        };
        let topic = match alias {
            Some((a, new)) => {
                props
                    .get_or_insert_with(PublishProperties::default)
                    .topic_alias = Some(a);
                if new {
                    Bytes::from(msg.topic.clone())
                } else {
                    Bytes::new()
                }
            }
            None => Bytes::from(msg.topic.clone()),
        };
        let publish = Publish::new(topic, Bytes::from(msg.payload.clone()), msg.retain);
        let mut plain = BytesMut::new();
        self.codec
            .write(Packet::Publish(publish, props), &mut plain);
        if msg.qos == 0 {
            out.extend_from_slice(&plain);
        } else {
            add_packet_id(&plain, msg.qos, pkid, dup, out);
        }
    }

    /// Moves queued messages to the client while its receive window has room.
    fn pump(&mut self) {
        let now = crate::now_ms();
        let mut scratch = BytesMut::new();
        loop {
            let (msg, pkid, max_packet) = {
                let mut st = self.session.lock();
                if st.conn != self.generation || st.rec.inflight.len() >= st.receive_max {
                    return;
                }
                let Some(msg) = st.rec.outbox.pop_front() else {
                    return;
                };
                if msg.expires_at.is_some_and(|at| at <= now) {
                    st.dirty = true;
                    drop(st);
                    self.server.dropped(Dropped::Expired);
                    continue;
                }
                let pkid = if msg.qos > 0 { st.next_pkid() } else { 0 };
                (msg, pkid, st.max_packet)
            };
            scratch.clear();
            let alias = self.alias_for(&msg.topic);
            self.encode_publish(&msg, pkid, false, now, alias, &mut scratch);
            if max_packet.is_some_and(|m| scratch.len() > m as usize) {
                self.session.lock().dirty = true;
                self.server.dropped(Dropped::TooLarge);
                continue;
            }
            if let Some((a, true)) = alias {
                // Only once the client is told it.
                self.aliases_out.insert(msg.topic.clone(), a);
            }
            self.wbuf.extend_from_slice(&scratch);
            let mut st = self.session.lock();
            if msg.qos > 0 {
                let mut msg = msg;
                msg.sent = true;
                st.rec.inflight.insert(
                    pkid,
                    InFlight {
                        msg,
                        released: false,
                    },
                );
            }
            st.dirty = true;
        }
    }

    /// After the connection: the will, and the session's fate.
    async fn finish(self, end: End) {
        let client = self.session.client_id.clone();
        let publish_will = match end {
            End::TakenOver => return,
            End::Normal { will } => will,
            End::Abnormal => true,
        };
        let expiry = {
            let mut st = self.session.lock();
            if st.conn != self.generation {
                return;
            }
            st.conn = 0;
            st.rec.disconnected_at = Some(crate::now_ms());
            st.dirty = true;
            st.rec.expiry_secs
        };
        tracing::debug!(client = %client, "client disconnected");
        if publish_will {
            if let Some((will, props)) = self.will.map(|b| *b) {
                let delay = props
                    .as_ref()
                    .and_then(|p| p.delay_interval)
                    .unwrap_or(0)
                    .min(expiry);
                let server = self.server.clone();
                let session = self.session.clone();
                tokio::spawn(async move {
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                        // A client back within the delay keeps its will unsent.
                        if session.lock().conn != 0 {
                            return;
                        }
                    }
                    let props = props.map(|p| PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        topic_alias: None,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                        subscription_identifiers: Vec::new(),
                        content_type: p.content_type,
                    });
                    let tag = Tag {
                        qos: will.qos as u8,
                        retain: will.retain,
                        at_ms: crate::now_ms(),
                        from: session.client_id.clone(),
                    };
                    server.route(will.topic, will.message, props, &tag).await;
                });
            }
        }
        if expiry == 0 {
            self.server.remove(&client).await;
        }
    }
}

/// Runs every decoder the front end applies to client bytes over `data` (for fuzzing:
/// none may panic).
pub fn decode_any(data: &[u8]) {
    let _ = connect_level(data);
    let _ = publish_meta(data);
    for mut codec in [Codec::V4(V4), Codec::V5(V5)] {
        let mut buf = BytesMut::from(data);
        while let Ok(packet) = codec.read(&mut buf, 1 << 16) {
            if let Packet::Publish(p, _) = packet {
                let mut out = BytesMut::new();
                codec.write(Packet::Publish(p, None), &mut out);
                let mut spliced = BytesMut::new();
                add_packet_id(&out, 1, 7, false, &mut spliced);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_level_is_read_from_a_partial_connect() {
        let v4 = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0];
        assert_eq!(connect_level(&v4), Some(4));
        assert_eq!(connect_level(&v4[..8]), None);
        let v5 = [0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(connect_level(&v5), Some(5));
        assert_eq!(connect_level(&[0x30, 0]), None);
        assert_eq!(
            connect_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Some(0)
        );
    }

    #[test]
    fn packet_ids_are_spliced_into_encoded_publishes() {
        for codec in [Codec::V4(V4), Codec::V5(V5)] {
            let mut plain = BytesMut::new();
            let publish = Publish::new(
                Bytes::from_static(b"a/b"),
                Bytes::from(vec![7u8; 200]),
                true,
            );
            codec.write(Packet::Publish(publish, None), &mut plain);
            let mut out = BytesMut::new();
            add_packet_id(&plain, 1, 0x1234, true, &mut out);
            assert_eq!(publish_meta(&out), Some((1, 0x1234)));
            assert_eq!(out[0], 0x30 | 0x01 | 0x02 | 0x08);
            let mut codec = codec;
            match codec.read(&mut out, 1 << 20) {
                Ok(Packet::Publish(p, _)) => {
                    assert_eq!(&p.topic[..], b"a/b");
                    assert_eq!(p.payload.len(), 200);
                    assert!(p.retain);
                }
                other => panic!("not a publish: {other:?}"),
            }
            assert!(out.is_empty());
        }
    }

    /// Every connection is one task holding this future: it must stay small for a Pi with
    /// a thousand sensors.
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = super::super::tests::server(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let fut = serve(&server, stream, addr, Rights::Open);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        assert!(size < 2048, "a connection's future takes {size} bytes");
    }

    #[test]
    fn only_log_batches_from_peers_get_the_batch_size() {
        let publish = |topic: &str, len: usize| {
            let mut plain = BytesMut::new();
            Codec::V4(V4).write(
                Packet::Publish(
                    Publish::new(
                        Bytes::from(topic.to_owned()),
                        Bytes::from(vec![0u8; len]),
                        false,
                    ),
                    None,
                ),
                &mut plain,
            );
            plain
        };
        let (device, batch) = (1000, 100_000);
        let big_reading = publish("sensors/d1/temp", 5000);
        let big_batch = publish("fogline/repl/s/a.00000001/log", 5000);
        assert_eq!(packet_limit(&big_reading, device, Some(batch)), device);
        assert_eq!(packet_limit(&big_batch, device, Some(batch)), batch);
        assert_eq!(packet_limit(&big_batch, device, None), device, "not a peer");
        assert_eq!(
            packet_limit(&publish("fogline/repl/x", 10), device, Some(batch)),
            device,
            "small packets need nothing more"
        );
        // Only the header is there: the device limit holds until the topic shows.
        assert_eq!(packet_limit(&big_batch[..2], device, Some(batch)), device);
        assert_eq!(packet_limit(&big_batch[..5], device, Some(batch)), batch);
        assert_eq!(packet_limit(&big_reading[..5], device, Some(batch)), batch);
        assert_eq!(
            packet_limit(&big_reading[..25], device, Some(batch)),
            device
        );
        assert_eq!(
            packet_limit(&[0x82, 0x80, 0x80, 0x01], device, Some(batch)),
            device
        );
    }

    #[test]
    fn packets_only_a_server_sends_are_refused_not_decoded() {
        // Inputs the fuzzer found: server-to-client packet types made rumqttd's v5
        // decoder panic.
        for input in [
            &[42u8, 1, 47, 0, 100, 48, 147][..],
            &[0x26, 0x01, 0x3a, 0x00, 0x00, 0x00, 0x0e],
            &[0x20, 0x02, 0x00, 0x00],
            &[0x90, 0x03, 0x00, 0x01, 0x00],
            &[0xb0, 0x02, 0x00, 0x01],
            &[0xd0, 0x00],
            &[0xf0, 0x00],
        ] {
            decode_any(input);
            for mut codec in [Codec::V4(V4), Codec::V5(V5)] {
                let mut buf = BytesMut::from(input);
                assert!(codec.read(&mut buf, 1 << 16).is_err(), "{input:?}");
            }
        }
    }

    #[test]
    fn a_device_may_publish_only_under_its_own_prefix() {
        assert!(own_topic("d1", b"sensors/d1/temp"));
        assert!(!own_topic("d1", b"sensors/d10/temp"));
        assert!(!own_topic("d1", b"sensors/d1"));
        assert!(!own_topic("d1", b"fogline/ack/d1"));
        assert!(!own_topic("d1", b""));
        assert!(own_filter("d1", b"fogline/ack/d1"));
        assert!(own_filter("d1", b"agg/d1/#"));
        assert!(!own_filter("d1", b"fogline/ack/#"));
        assert!(!own_filter("d1", b"sensors/#"));
        assert!(!own_filter("d1", b"agg/#"));
    }

    #[test]
    fn rights_follow_the_guard() {
        let device = Rights::Device("d1".into());
        assert!(device.may_publish("sensors/d1/temp", false));
        assert!(!device.may_publish("sensors/d2/temp", false));
        assert!(device.may_subscribe("fogline/ack/d1", false));
        assert!(!device.may_subscribe("sensors/#", false));
        assert!(Rights::Open.may_publish("fogline/repl/x", false));
        assert!(!Rights::Open.may_publish("fogline/repl/x", true));
        assert!(!Rights::Open.may_subscribe("fogline/cluster/#", true));
        assert!(Rights::All.may_publish("fogline/repl/x", true));
    }
}
