//! MQTT packets in and out of bytes: rumqttd's 3.1.1 and 5 codecs, made safe for what
//! a client may send, and the few header reads the front end needs before a packet is
//! whole (its protocol level, its size limit, a PUBLISH's QoS and packet id).

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{DisconnectReasonCode, Packet, Protocol, Publish, PublishProperties};

use super::session::Msg;

/// The codec of one connection, chosen by its CONNECT.
pub enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    /// Decodes the next packet a client sent. rumqttd's decoders are written for both
    /// directions and reach `unreachable!()` on packet types a server never receives
    /// (found by the `mqtt_front` fuzz target: a CONNACK-typed packet to the v5 codec), so
    /// only client-to-server types are handed to them; a panic inside them anyway ends
    /// this connection as malformed instead of its task.
    pub fn read(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Packet, rumqttd::protocol::Error> {
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

    pub fn write(&self, packet: Packet, buf: &mut BytesMut) {
        let r = match self {
            Codec::V4(c) => c.write(packet, buf),
            Codec::V5(c) => c.write(packet, buf),
        };
        if let Err(e) = r {
            tracing::warn!("cannot encode an MQTT packet: {e}");
        }
    }

    pub fn v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    /// Encodes a PUBLISH for the client. rumqttd's `Publish` keeps QoS, DUP and the packet
    /// id private, so its codec writes a QoS 0 packet and the packet id goes in here. With
    /// `alias`, the topic is sent as that topic alias (and only named when new).
    pub fn encode_publish(
        &self,
        msg: &Msg,
        pkid: u16,
        dup: bool,
        now_ms: i64,
        alias: Option<(u16, bool)>,
        out: &mut BytesMut,
    ) {
        let mut props = if self.v5() {
            msg.props.to_publish(msg.expires_at, now_ms)
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
        self.write(Packet::Publish(publish, props), &mut plain);
        if msg.qos == 0 {
            out.extend_from_slice(&plain);
        } else {
            add_packet_id(&plain, msg.qos, pkid, dup, out);
        }
    }
}

/// The protocol level of a CONNECT at the start of `buf`, once enough of it is there.
pub fn connect_level(buf: &[u8]) -> Option<u8> {
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
pub fn packet_limit(buf: &[u8], device: usize, batch: Option<usize>) -> usize {
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
pub fn publish_meta(buf: &[u8]) -> Option<(u8, u16)> {
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
pub fn add_packet_id(plain: &[u8], qos: u8, pkid: u16, dup: bool, out: &mut BytesMut) {
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

/// An MQTT 5 DISCONNECT with `code` and no properties. Written here, not by rumqttd
/// 0.20: its encoder writes one byte more than the remaining length it declares (without
/// properties) or drops the reason code (with empty ones).
pub fn write_disconnect(code: DisconnectReasonCode, out: &mut BytesMut) {
    use DisconnectReasonCode as C;
    // MQTT 5, table 3.14.2.1.
    let byte = match code {
        C::NormalDisconnection => 0x00,
        C::DisconnectWithWillMessage => 0x04,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::ServerShuttingDown => 0x8b,
        C::KeepAliveTimeout => 0x8d,
        C::SessionTakenOver => 0x8e,
        C::TopicFilterInvalid => 0x8f,
        C::TopicNameInvalid => 0x90,
        C::ReceiveMaximumExceeded => 0x93,
        C::TopicAliasInvalid => 0x94,
        C::PacketTooLarge => 0x95,
        C::MessageRateTooHigh => 0x96,
        C::QuotaExceeded => 0x97,
        C::AdministrativeAction => 0x98,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9a,
        C::QoSNotSupported => 0x9b,
        C::UseAnotherServer => 0x9c,
        C::ServerMoved => 0x9d,
        C::SharedSubscriptionNotSupported => 0x9e,
        C::ConnectionRateExceeded => 0x9f,
        C::MaximumConnectTime => 0xa0,
        C::SubscriptionIdentifiersNotSupported => 0xa1,
        C::WildcardSubscriptionsNotSupported => 0xa2,
    };
    // The reason code and an empty property list. The spec lets a server leave the
    // property length out; some clients (rumqttc) cannot read that.
    out.extend_from_slice(&[0xe0, 0x02, byte, 0x00]);
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
}
