//! The CONNECT exchange: who the client is (credentials, or the listener's rights),
//! which session it gets, its keep alive, and the CONNACK with what the server allows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, LastWill, LastWillProperties, Packet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{connect_level, Codec};
use super::protocol::{printable, Protocol};
use super::rights::{Anonymous, GatewayLogin, Rights};
use super::session::{Record, Session};
use super::Server;
use crate::security::auth::Refusal;

/// A client that is in: its protocol, its session, its will.
pub struct Opened {
    pub proto: Protocol,
    pub session: Arc<Session>,
    /// This connection's generation: the session is this connection's while its `conn`
    /// is this.
    pub generation: u64,
    pub will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    /// Silence longer than this (1.5 × the keep alive) ends the connection; 0: none.
    pub keep_alive: Duration,
}

/// The CONNECT exchange: who the client is, which session it gets, and the CONNACK.
/// `None` when the client was refused (the refusal is counted and answered).
pub async fn open<R, W>(
    server: &Arc<Server>,
    reader: &mut R,
    writer: &mut W,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    rights: Rights,
) -> Option<Opened>
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
    let user = login.as_ref().map(|l| l.username.clone());
    let password = login.as_ref().map(|l| l.password.clone().into_bytes());
    let verdict = match rights {
        Rights::Authenticate(auth) => {
            let client_id = connect.client_id.clone();
            let checked = user.clone();
            let permit = server.hashing.acquire().await;
            let verdict = tokio::task::spawn_blocking(move || {
                auth.check(&client_id, checked.as_deref(), password.as_deref())
            })
            .await
            .unwrap_or(Err(Refusal::BadPassword));
            drop(permit);
            verdict.map(|()| Rights::Device(user.clone().unwrap_or_default()))
        }
        Rights::GatewayLogin(door) => gateway_login(server, door, user.clone(), password).await,
        other => Ok(other),
    };
    // A will is published like any other message: only where the client may publish.
    let verdict = verdict.and_then(|rights| match &will {
        Some(w)
            if !std::str::from_utf8(&w.topic)
                .is_ok_and(|t| rights.may_publish(t, server.settings.site_private)) =>
        {
            Err(Refusal::ForeignWill)
        }
        _ => Ok(rights),
    });
    let rights = match verdict {
        Ok(rights) => rights,
        Err(refusal) => {
            let code = match refusal {
                Refusal::NoCredentials | Refusal::UnknownDevice | Refusal::BadPassword => {
                    ConnectReturnCode::BadUserNamePassword
                }
                _ => ConnectReturnCode::NotAuthorized,
            };
            refuse(code, &mut wbuf);
            let _ = super::conn::write_out(writer, &wbuf).await;
            let _ = writer.shutdown().await;
            server.front.refuse(
                refusal.as_str(),
                peer,
                &format!(
                    "client id {:?}, user {:?}",
                    printable(&connect.client_id),
                    printable(user.as_deref().unwrap_or_default())
                ),
            );
            return None;
        }
    };

    // Which session?
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session && !v5 {
            refuse(ConnectReturnCode::ClientIdentifierNotValid, &mut wbuf);
            let _ = super::conn::write_out(writer, &wbuf).await;
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
                let _ = super::conn::write_out(writer, &wbuf).await;
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

    let limits = server.settings.limits();
    let alias_out_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    Some(Opened {
        proto: Protocol::new(codec, limits, rights, client_id, alias_out_max, wbuf),
        session,
        generation,
        will: will.map(|w| Box::new((w, will_props))),
        keep_alive: Duration::from_millis(u64::from(keep_alive_secs) * 1500),
    })
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

/// At the gateway, a client without a certificate: a dashboard with credentials, or
/// whatever `access.anonymous` makes a client without any.
async fn gateway_login(
    server: &Server,
    door: Arc<GatewayLogin>,
    user: Option<String>,
    password: Option<Vec<u8>>,
) -> Result<Rights, Refusal> {
    if user.is_none() && password.is_none() {
        return match door.anonymous {
            Anonymous::Refuse => Err(Refusal::NoCredentials),
            Anonymous::Read => Ok(Rights::Reader),
            Anonymous::Node => Ok(Rights::Uplink(None)),
        };
    }
    if door.readers.is_none() {
        return Err(Refusal::UnknownDevice);
    }
    let permit = server.hashing.acquire().await;
    let verdict = tokio::task::spawn_blocking(move || {
        door.readers
            .as_ref()
            .map_or(Err(Refusal::UnknownDevice), |r| {
                r.check_login(user.as_deref(), password.as_deref())
                    .map(|_| ())
            })
    })
    .await
    .unwrap_or(Err(Refusal::BadPassword));
    drop(permit);
    verdict.map(|()| Rights::Reader)
}
