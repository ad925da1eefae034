//! The connection protocol in tables: packets in, what the client reads out (decoded by
//! rumqttc, a client's codec, not ours), no socket and no clock.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Filter, PubAck, PubAckReason, PubRel, PubRelReason, Publish, PublishProperties, QoS,
    RetainForwardRule, Subscribe,
};

use super::*;
use crate::mqtt::session::{InFlight, Msg, Props};

const LIMITS: Limits = Limits {
    max_packet: 4096,
    max_batch_packet: 65536,
    max_inflight: 4,
    topic_alias_max: 8,
    session_expiry_max_secs: 3600,
    site_private: false,
};

fn proto(v5: bool, rights: Rights) -> Protocol {
    let codec = if v5 { Codec::V5(V5) } else { Codec::V4(V4) };
    Protocol::new(codec, LIMITS, rights, "c1".into(), 0, BytesMut::new())
}

fn state() -> State {
    let mut st = State::default();
    st.receive_max = 10;
    st
}

/// What the client reads from the protocol's output, one line per packet.
fn seen(p: &mut Protocol) -> Vec<String> {
    let v5 = p.v5();
    let out = p.output();
    let mut lines = Vec::new();
    while !out.is_empty() {
        let line = if v5 {
            use rumqttc::v5::mqttbytes::v5::Packet as P;
            match P::read(out, None) {
                Ok(P::PubAck(a)) => format!("PUBACK {} {:?}", a.pkid, a.reason),
                Ok(P::PubRec(a)) => format!("PUBREC {} {:?}", a.pkid, a.reason),
                Ok(P::PubComp(a)) => format!("PUBCOMP {}", a.pkid),
                Ok(P::PubRel(a)) => format!("PUBREL {}", a.pkid),
                Ok(P::Disconnect(d)) => format!("DISCONNECT {:?}", d.reason_code),
                Ok(P::SubAck(s)) => format!("SUBACK {} {:?}", s.pkid, s.return_codes),
                Ok(P::Publish(p)) => format!(
                    "PUBLISH {:?} {:?} {} dup={} alias={:?}",
                    String::from_utf8_lossy(&p.topic),
                    p.qos,
                    p.pkid,
                    p.dup,
                    p.properties.and_then(|p| p.topic_alias)
                ),
                Ok(other) => format!("{other:?}"),
                Err(e) => {
                    lines.push(format!("undecodable: {e:?}"));
                    break;
                }
            }
        } else {
            use rumqttc::mqttbytes::v4::Packet as P;
            match P::read(out, 1 << 20) {
                Ok(P::PubAck(a)) => format!("PUBACK {}", a.pkid),
                Ok(P::PubRec(a)) => format!("PUBREC {}", a.pkid),
                Ok(P::PubComp(a)) => format!("PUBCOMP {}", a.pkid),
                Ok(P::PubRel(a)) => format!("PUBREL {}", a.pkid),
                Ok(P::SubAck(s)) => format!("SUBACK {} {:?}", s.pkid, s.return_codes),
                Ok(P::Publish(p)) => {
                    format!("PUBLISH {:?} {:?} {} dup={}", p.topic, p.qos, p.pkid, p.dup)
                }
                Ok(other) => format!("{other:?}"),
                Err(e) => {
                    lines.push(format!("undecodable: {e:?}"));
                    break;
                }
            }
        };
        lines.push(line);
    }
    lines
}

fn publish(topic: &str) -> Packet {
    Packet::Publish(
        Publish::new(
            Bytes::from(topic.to_owned()),
            Bytes::from_static(b"{\"v\":1}"),
            false,
        ),
        None,
    )
}

fn aliased(topic: &str, alias: u16) -> Packet {
    let props = PublishProperties {
        topic_alias: Some(alias),
        ..PublishProperties::default()
    };
    Packet::Publish(
        Publish::new(Bytes::from(topic.to_owned()), Bytes::new(), false),
        Some(props),
    )
}

/// Hands a QoS 1/2 reading to the protocol the way the shell does: admitted, offered
/// (token), its ack owed. Returns the token.
fn reading(p: &mut Protocol, st: &mut State, qos: u8, pkid: u16) -> u64 {
    match p.step(publish("sensors/d1/t"), Some((qos, pkid)), st) {
        Step::Publish {
            deliver: Deliver::Reading,
            ..
        } => {}
        other => panic!("not a reading: {other:?}"),
    }
    let token = p.next_token();
    p.owe_ack(qos, pkid, Some(token), None);
    token
}

fn msg(topic: &str, qos: u8) -> Msg {
    Msg {
        topic: topic.as_bytes().to_vec(),
        payload: b"x".to_vec(),
        qos,
        retain: false,
        expires_at: None,
        props: Props::default(),
        sent: false,
    }
}

#[test]
fn acks_go_out_in_arrival_order_once_their_readings_are_committed() {
    let mut p = proto(false, Rights::Open);
    let mut st = state();
    let t1 = reading(&mut p, &mut st, 1, 1);
    // A routed QoS 1 publish between two readings waits for the reading before it.
    assert!(matches!(
        p.step(publish("cmd/x"), Some((1, 2)), &mut st),
        Step::Publish {
            deliver: Deliver::Route,
            ..
        }
    ));
    p.owe_ack(1, 2, None, None);
    let t3 = reading(&mut p, &mut st, 1, 3);
    // (committed token, what the client reads)
    let table: [(u64, &[&str]); 4] = [
        (0, &[]),
        (t1, &["PUBACK 1", "PUBACK 2"]),
        (t1, &[]),
        (t3, &["PUBACK 3"]),
    ];
    for (committed, want) in table {
        p.flush_acks(committed, |_| None, &mut st)
            .expect("nothing refused");
        assert_eq!(seen(&mut p), want, "committed {committed}");
    }
}

#[test]
fn mqtt5_clients_hear_why_a_reading_was_not_stored() {
    // (refused before the writer, refused by the writer, reason the client reads)
    let table = [
        (Some(Reject::RateLimited), None, "PUBACK 1 QuotaExceeded"),
        (
            Some(Reject::MalformedPayload),
            None,
            "PUBACK 1 PayloadFormatInvalid",
        ),
        (Some(Reject::InvalidId), None, "PUBACK 1 TopicNameInvalid"),
        (None, Some(Reject::TooManyGaps), "PUBACK 1 QuotaExceeded"),
        (
            None,
            Some(Reject::SeqJump),
            "PUBACK 1 ImplementationSpecificError",
        ),
        (None, None, "PUBACK 1 Success"),
    ];
    for (before, by_writer, want) in table {
        let mut p = proto(true, Rights::Open);
        let mut st = state();
        p.step(publish("sensors/d1/t"), Some((1, 1)), &mut st);
        let token = before.is_none().then(|| p.next_token());
        p.owe_ack(1, 1, token, before);
        assert!(!p.closing(), "MQTT 5 can say it: the connection goes on");
        p.flush_acks(1, |_| by_writer, &mut st)
            .expect("MQTT 5 never needs a close");
        assert_eq!(seen(&mut p), [want]);
    }
    // QoS 2 the same way: a PUBREC with the reason, and the id is not remembered.
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    p.step(publish("sensors/d1/t"), Some((2, 9)), &mut st);
    p.owe_ack(2, 9, None, Some(Reject::TooManyDevices));
    p.flush_acks(0, |_| None, &mut st).expect("flush");
    assert_eq!(seen(&mut p), ["PUBREC 9 QuotaExceeded"]);
    assert!(st.rec.incoming_qos2.is_empty());
}

#[test]
fn a_3_1_1_client_is_closed_not_acked_when_a_refusal_may_pass() {
    let mut p = proto(false, Rights::Open);
    let mut st = state();
    let t1 = reading(&mut p, &mut st, 1, 1);
    p.step(publish("sensors/d1/t"), Some((1, 2)), &mut st);
    p.owe_ack(1, 2, None, Some(Reject::RateLimited));
    assert!(p.closing());
    // Nothing after the refused reading is read.
    let mut rbuf = BytesMut::new();
    Codec::V4(V4).write(publish("sensors/d1/t"), &mut rbuf);
    assert_eq!(p.read(&mut rbuf), Ok(None));
    // The ack owed before it goes out, then the close.
    assert_eq!(
        p.flush_acks(t1, |_| None, &mut st),
        Err(Reject::RateLimited)
    );
    assert_eq!(seen(&mut p), ["PUBACK 1"]);

    // Refused by the writer for a reason that may pass (too many gaps): the same.
    let mut p = proto(false, Rights::Open);
    let t = reading(&mut p, &mut st, 1, 5);
    assert_eq!(
        p.flush_acks(t, |_| Some(Reject::TooManyGaps), &mut st),
        Err(Reject::TooManyGaps)
    );
    assert_eq!(seen(&mut p), Vec::<String>::new());

    // Refused for good (it will never be stored, sending it again cannot help): acked,
    // and the connection goes on.
    let mut p = proto(false, Rights::Open);
    p.step(publish("sensors/d1/t"), Some((1, 6)), &mut st);
    p.owe_ack(1, 6, None, Some(Reject::MalformedPayload));
    assert!(!p.closing());
    p.flush_acks(0, |_| None, &mut st).expect("flush");
    assert_eq!(seen(&mut p), ["PUBACK 6"]);
}

#[test]
fn a_qos2_id_is_remembered_only_once_its_pubrec_goes_out() {
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    let token = reading(&mut p, &mut st, 2, 7);
    assert!(
        st.rec.incoming_qos2.is_empty(),
        "not stored yet: a re-send after a restart must be taken again"
    );
    // A re-send while its commit is pending: not delivered again, one PUBREC answers both.
    assert!(matches!(
        p.step(publish("sensors/d1/t"), Some((2, 7)), &mut st),
        Step::Done
    ));
    p.flush_acks(token, |_| None, &mut st).expect("flush");
    assert_eq!(seen(&mut p), ["PUBREC 7 Success"]);
    assert_eq!(st.rec.incoming_qos2, [7]);
    // A re-send after the PUBREC: acknowledged again, not delivered.
    assert!(matches!(
        p.step(publish("sensors/d1/t"), Some((2, 7)), &mut st),
        Step::Done
    ));
    p.flush_acks(token, |_| None, &mut st).expect("flush");
    assert_eq!(seen(&mut p), ["PUBREC 7 Success"]);
    // PUBREL completes it and frees the id.
    let rel = Packet::PubRel(
        PubRel {
            pkid: 7,
            reason: PubRelReason::Success,
        },
        None,
    );
    assert!(matches!(p.step(rel, None, &mut st), Step::Done));
    p.flush_acks(token, |_| None, &mut st).expect("flush");
    assert_eq!(seen(&mut p), ["PUBCOMP 7"]);
    assert!(st.rec.incoming_qos2.is_empty());
    assert!(matches!(
        p.step(publish("sensors/d1/t"), Some((2, 7)), &mut st),
        Step::Publish { .. }
    ));
}

#[test]
fn more_than_the_receive_maximum_ends_an_mqtt5_connection() {
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    for pkid in 1..=4 {
        reading(&mut p, &mut st, 1, pkid);
    }
    match p.step(publish("sensors/d1/t"), Some((1, 5)), &mut st) {
        Step::End(End::Abnormal, Some(v)) => assert_eq!(v.reason, "receive_maximum"),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(&mut p), ["DISCONNECT ReceiveMaximumExceeded"]);
    // Once acked, there is room again; QoS 0 never counts.
    let mut p = proto(true, Rights::Open);
    let mut last = 0;
    for pkid in 1..=4 {
        last = reading(&mut p, &mut st, 1, pkid);
    }
    assert!(matches!(
        p.step(publish("sensors/d1/t"), Some((0, 0)), &mut st),
        Step::Publish { .. }
    ));
    p.flush_acks(last, |_| None, &mut st).expect("flush");
    seen(&mut p);
    reading(&mut p, &mut st, 1, 5);
    // 3.1.1 offers no Receive Maximum: nothing to exceed.
    let mut p = proto(false, Rights::Open);
    for pkid in 1..=20 {
        reading(&mut p, &mut st, 1, pkid);
    }
}

#[test]
fn client_topic_aliases_are_resolved_here_and_misuse_ends_the_connection() {
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    // (packet, topic delivered or the DISCONNECT the client reads)
    let table = [
        (aliased("cmd/a", 1), Ok("cmd/a")),
        (aliased("", 1), Ok("cmd/a")),
        (aliased("cmd/b", 1), Ok("cmd/b")),
        (aliased("", 1), Ok("cmd/b")),
        (aliased("", 2), Err("DISCONNECT ProtocolError")),
        (aliased("cmd/a", 0), Err("DISCONNECT ProtocolError")),
        (aliased("cmd/a", 9), Err("DISCONNECT TopicAliasInvalid")),
    ];
    for (packet, want) in table {
        let got = match p.step(packet, Some((0, 0)), &mut st) {
            Step::Publish { publish, props, .. } => {
                assert_eq!(props.and_then(|p| p.topic_alias), None, "routed without");
                Ok(String::from_utf8_lossy(&publish.topic).into_owned())
            }
            Step::End(End::Abnormal, _) => Err(seen(&mut p).join(",")),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, want.map(str::to_owned).map_err(str::to_owned));
    }
    // 3.1.1 has no aliases.
    let mut p = proto(false, Rights::Open);
    assert!(matches!(
        p.step(aliased("cmd/a", 1), Some((0, 0)), &mut st),
        Step::End(End::Abnormal, None)
    ));
}

#[test]
fn devices_publish_and_subscribe_only_their_own_topics() {
    let mut st = state();
    let mut p = proto(true, Rights::Device("d1".into()));
    assert!(matches!(
        p.step(publish("sensors/d1/t"), Some((0, 0)), &mut st),
        Step::Publish {
            deliver: Deliver::Reading,
            ..
        }
    ));
    match p.step(publish("sensors/d2/t"), Some((0, 0)), &mut st) {
        Step::End(End::Abnormal, Some(v)) => assert_eq!(v.reason, "foreign_topic"),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(&mut p), ["DISCONNECT NotAuthorized"]);

    let filter = |path: &str| Filter {
        path: path.into(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    let sub = Packet::Subscribe(
        Subscribe {
            pkid: 3,
            filters: vec![
                filter("fogline/ack/d1"),
                filter("sensors/#"),
                filter("$share/g/agg/#"),
            ],
        },
        None,
    );
    match p.step(sub, None, &mut st) {
        Step::Subscribed(s) => {
            assert_eq!(s.added, ["fogline/ack/d1"]);
            assert_eq!(s.refused, ["sensors/#"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        seen(&mut p),
        ["SUBACK 3 [Success(AtLeastOnce), NotAuthorized, SharedSubscriptionsNotSupported]"]
    );
    assert_eq!(st.rec.subs.len(), 1);
}

#[test]
fn publishes_on_the_agents_topics_are_acked_but_never_delivered() {
    let mut p = proto(false, Rights::Open);
    let mut st = state();
    for (topic, want) in [
        ("fogline/ack/d1", Deliver::Drop(Dropped::AgentTopic)),
        ("$SYS/x", Deliver::Drop(Dropped::Dollar)),
        ("agg/d1/t/10s", Deliver::Route),
    ] {
        match p.step(publish(topic), Some((1, 1)), &mut st) {
            Step::Publish { deliver, .. } => assert_eq!(deliver, want, "{topic}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_client_gets_at_most_its_receive_maximum_in_flight() {
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    st.receive_max = 2;
    for _ in 0..3 {
        st.rec.outbox.push_back(msg("agg/d1/t/10s", 1));
    }
    st.rec.outbox.push_back(msg("agg/d1/t/60s", 0));
    let mut dropped = Vec::new();
    p.pump(&mut st, 0, |d| dropped.push(d));
    assert_eq!(
        seen(&mut p),
        [
            "PUBLISH \"agg/d1/t/10s\" AtLeastOnce 1 dup=false alias=None",
            "PUBLISH \"agg/d1/t/10s\" AtLeastOnce 2 dup=false alias=None",
        ]
    );
    // Each PUBACK frees one place; messages keep their order (a QoS 0 one waits too).
    let ack = |pkid| {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    };
    p.step(ack(1), None, &mut st);
    p.pump(&mut st, 0, |d| dropped.push(d));
    assert_eq!(
        seen(&mut p),
        ["PUBLISH \"agg/d1/t/10s\" AtLeastOnce 3 dup=false alias=None"]
    );
    assert_eq!(st.rec.inflight.keys().copied().collect::<Vec<_>>(), [2, 3]);
    // A PUBACK for an id not in flight changes nothing.
    p.step(ack(9), None, &mut st);
    p.pump(&mut st, 0, |d| dropped.push(d));
    assert!(seen(&mut p).is_empty());
    p.step(ack(2), None, &mut st);
    p.pump(&mut st, 0, |d| dropped.push(d));
    assert_eq!(
        seen(&mut p),
        ["PUBLISH \"agg/d1/t/60s\" AtMostOnce 0 dup=false alias=None"]
    );
    assert!(dropped.is_empty());
}

#[test]
fn expired_and_oversized_messages_are_dropped_not_sent() {
    let mut p = proto(true, Rights::Open);
    let mut st = state();
    st.max_packet = Some(64);
    let mut expired = msg("a", 1);
    expired.expires_at = Some(1_000);
    let mut big = msg("b", 1);
    big.payload = vec![0; 100];
    st.rec.outbox.extend([expired, big, msg("c", 1)]);
    let mut dropped = Vec::new();
    p.pump(&mut st, 1_000, |d| dropped.push(d));
    assert_eq!(dropped, [Dropped::Expired, Dropped::TooLarge]);
    assert_eq!(
        seen(&mut p),
        ["PUBLISH \"c\" AtLeastOnce 2 dup=false alias=None"]
    );
    assert_eq!(st.rec.inflight.keys().copied().collect::<Vec<_>>(), [2]);
}

#[test]
fn topic_aliases_to_the_client_stay_within_its_maximum() {
    let codec = Codec::V5(V5);
    let mut p = Protocol::new(codec, LIMITS, Rights::Open, "c1".into(), 1, BytesMut::new());
    let mut st = state();
    st.rec
        .outbox
        .extend([msg("agg/a", 0), msg("agg/a", 0), msg("agg/b", 0)]);
    p.pump(&mut st, 0, |_| {});
    assert_eq!(
        seen(&mut p),
        [
            "PUBLISH \"agg/a\" AtMostOnce 0 dup=false alias=Some(1)",
            "PUBLISH \"\" AtMostOnce 0 dup=false alias=Some(1)",
            "PUBLISH \"agg/b\" AtMostOnce 0 dup=false alias=None",
        ]
    );
}

#[test]
fn a_resumed_session_resends_what_was_not_acknowledged() {
    let mut p = proto(false, Rights::Open);
    let mut st = state();
    let mut sent = msg("agg/a", 1);
    sent.sent = true;
    st.rec.inflight.insert(
        4,
        InFlight {
            msg: sent.clone(),
            released: false,
        },
    );
    st.rec.inflight.insert(
        5,
        InFlight {
            msg: sent,
            released: true,
        },
    );
    p.resend_inflight(&st, 0);
    assert_eq!(
        seen(&mut p),
        ["PUBLISH \"agg/a\" AtLeastOnce 4 dup=true", "PUBREL 5"]
    );
}

#[test]
fn oversized_and_malformed_packets_end_the_connection_with_a_reason() {
    let mut p = proto(true, Rights::Open);
    let mut rbuf = BytesMut::new();
    Codec::V5(V5).write(
        Packet::Publish(
            Publish::new(
                Bytes::from_static(b"sensors/d1/t"),
                Bytes::from(vec![0u8; 5000]),
                false,
            ),
            None,
        ),
        &mut rbuf,
    );
    match p.read(&mut rbuf) {
        Err(ReadError(v)) => assert_eq!(v.reason, "oversized_packet"),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(&mut p), ["DISCONNECT PacketTooLarge"]);
    // A partial packet waits for more.
    let mut p = proto(true, Rights::Open);
    let mut rbuf = BytesMut::from(&[0x30u8, 0x10, 0x00][..]);
    assert_eq!(p.read(&mut rbuf), Ok(None));
    let mut rbuf = BytesMut::from(&[0x30u8, 0x02, 0xff, 0xff][..]);
    assert!(p.read(&mut rbuf).is_err());
}
