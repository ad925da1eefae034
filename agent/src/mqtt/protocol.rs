//! One connection's MQTT protocol after CONNECT, sans-io: packets in, decisions and
//! encoded packets out. No socket, no clock, no router: the shell (`super::conn`) reads
//! bytes into [`Protocol::read`], hands each packet to [`Protocol::step`] with the
//! session's state, does what the step asks (offer a reading to the writer, route a
//! message, tell the router about subscriptions) and writes [`Protocol::output`] to the
//! client.
//!
//! The decisions it owns:
//!
//! - **Ordered acks.** Every QoS 1/2 publish owes an ack; acks go out in the order the
//!   publishes came. A reading's ack waits until the writer committed the batch holding
//!   it ([`Protocol::flush_acks`] with the committed token).
//! - **Acks promise storage.** A reading that was not stored is never acked as stored:
//!   MQTT 5 gets a reason code; a 3.1.1 client (no negative PUBACK) whose reading was
//!   refused for a reason that may pass gets the acks owed before it, then the
//!   connection closes, and it sends the reading again.
//! - **QoS 2 exactly once.** A packet id is remembered (in the session, so it outlives a
//!   restart) only when its PUBREC goes out, i.e. once the reading is stored; a re-send
//!   while the PUBREC is owed is answered by that PUBREC; a re-send after it, again.
//! - **Receive Maximum** (MQTT 5): more unacknowledged QoS 1/2 publishes than offered
//!   ends the connection (0x93).
//! - **Topic aliases**, both ways: the client's resolved here (the router never sees
//!   one); the client's own maximum bounds the ones this side assigns.
//! - **In flight to the client**: at most its Receive Maximum, expired messages dropped,
//!   messages larger than its Maximum Packet Size dropped, and on a resumed session what
//!   was sent and not acknowledged goes again with DUP.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    DisconnectProperties, DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
};

use super::codec::{packet_limit, publish_meta, Codec};
use super::rights::Rights;
use super::session::{Dropped, State};
use super::topic;
use crate::ingest::Reject;

/// The server's limits for one connection, from `[mqtt]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest packet from a client.
    pub max_packet: usize,
    /// Largest log batch a connection that may ship them may send.
    pub max_batch_packet: usize,
    /// The Receive Maximum offered to MQTT 5 clients.
    pub max_inflight: usize,
    /// Topic aliases a client may set.
    pub topic_alias_max: u16,
    pub session_expiry_max_secs: u32,
    /// The site has its own listener: its topics are closed to this port.
    pub site_private: bool,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// DISCONNECT from the client (or a close the protocol asks for): no will, unless
    /// the client asked for it.
    Normal { will: bool },
    /// Closed, timed out, or refused: the will is published.
    Abnormal,
    /// Another connection took the session: nothing more to do here.
    TakenOver,
}

/// A client broke a rule: what to count and log (`fogline_mqtt_refused_total{reason}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub reason: &'static str,
    pub detail: String,
}

/// Where an admitted PUBLISH goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// A reading (`sensors/…`): to the writer, then (if anyone subscribed) the router.
    Reading,
    /// Anything else: to the router.
    Route,
    /// Not delivered (a `$` topic, or one only the agent speaks on).
    Drop(Dropped),
}

/// What the shell does after [`Protocol::step`].
#[derive(Debug)]
pub enum Step {
    /// Handled; anything to send is in the output.
    Done,
    /// A publish to deliver; then [`Protocol::owe_ack`] (QoS 1/2).
    Publish {
        publish: Publish,
        props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        deliver: Deliver,
    },
    /// SUBACK written; the router is told.
    Subscribed(Subscribed),
    /// UNSUBACK written; the router forgets these filters.
    Unsubscribed(Vec<String>),
    /// The connection ends (a DISCONNECT, if any, is in the output).
    End(End, Option<Violation>),
}

/// What a SUBSCRIBE changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// Filters now subscribed, in order (the router is asked for each).
    pub added: Vec<String>,
    /// Of those, filters that replaced a subscription (the router drops it first).
    pub replaced: Vec<String>,
    /// Filters refused for want of rights.
    pub refused: Vec<String>,
}

/// An acknowledgement the client waits for, sent in the order the packets came.
#[derive(Debug, Clone, Copy)]
struct PendingAck {
    /// A reading: wait until the writer made it durable (or refused it).
    token: Option<u64>,
    pkid: u16,
    kind: AckKind,
    /// Refused before it reached the writer.
    refused: Option<Reject>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// PUBACK of a QoS 1 publish.
    Ack,
    /// PUBREC of a QoS 2 publish.
    Rec,
    /// PUBCOMP after a PUBREL.
    Comp,
}

/// The MQTT 5 reason code for a reading that was not stored.
pub fn ack_reason(why: Reject) -> PubAckReason {
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

/// A PUBLISH's QoS and packet id, read from its bytes (rumqttd's decoded `Publish`
/// keeps them private); `None` for other packets.
pub type Meta = Option<(u8, u16)>;

/// A packet could not be read: the DISCONNECT is in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError(pub Violation);

/// One connection's protocol state.
pub struct Protocol {
    codec: Codec,
    limits: Limits,
    rights: Rights,
    /// Who it is, for what is logged.
    client: String,
    out: BytesMut,
    acks: VecDeque<PendingAck>,
    next_token: u64,
    /// Topic aliases the client set, at most `Limits::topic_alias_max`.
    aliases_in: HashMap<u16, Bytes>,
    /// Topic aliases given to the client's topics, at most its Topic Alias Maximum.
    aliases_out: HashMap<Vec<u8>, u16>,
    alias_out_max: u16,
    /// A reading was refused for a reason that may pass, and this 3.1.1 client has no
    /// way to hear it: no packet is read any more, the acks owed before it go out, then
    /// the connection closes.
    closing: bool,
}

impl Protocol {
    /// After a CONNACK written with `codec` into `out`; `alias_out_max` is the client's
    /// Topic Alias Maximum (MQTT 5; 0: none).
    pub fn new(
        codec: Codec,
        limits: Limits,
        rights: Rights,
        client: String,
        alias_out_max: u16,
        out: BytesMut,
    ) -> Protocol {
        Protocol {
            codec,
            limits,
            rights,
            client,
            out,
            acks: VecDeque::new(),
            next_token: 0,
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            alias_out_max,
            closing: false,
        }
    }

    pub fn v5(&self) -> bool {
        self.codec.v5()
    }

    /// Bytes for the client; the shell writes and clears them.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// No packet is read any more (see [`Protocol`]); the owed acks still go out.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The next whole packet in `rbuf` (with a PUBLISH's QoS and packet id), `None` when
    /// more bytes are needed or the connection is closing.
    pub fn read(&mut self, rbuf: &mut BytesMut) -> Result<Option<(Packet, Meta)>, ReadError> {
        if self.closing {
            return Ok(None);
        }
        let meta = publish_meta(rbuf);
        let may_ship = self.rights.may_ship(self.limits.site_private);
        let limit = packet_limit(
            rbuf,
            self.limits.max_packet,
            may_ship.then_some(self.limits.max_batch_packet),
        );
        match self.codec.read(rbuf, limit) {
            Ok(packet) => Ok(Some((packet, meta))),
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => {
                let (reason, code) = match e {
                    rumqttd::protocol::Error::PayloadSizeLimitExceeded(_) => {
                        ("oversized_packet", DisconnectReasonCode::PacketTooLarge)
                    }
                    _ => ("malformed_packet", DisconnectReasonCode::MalformedPacket),
                };
                self.disconnect(code);
                Err(ReadError(Violation {
                    reason,
                    detail: format!("client {:?}: {e}", self.client),
                }))
            }
        }
    }

    /// Writes a DISCONNECT with `code` (MQTT 5; a 3.1.1 server just closes).
    pub fn disconnect(&mut self, code: DisconnectReasonCode) {
        if self.v5() {
            super::codec::write_disconnect(code, &mut self.out);
        }
    }

    fn end(&mut self, code: DisconnectReasonCode, why: Option<Violation>) -> Step {
        self.disconnect(code);
        Step::End(End::Abnormal, why)
    }

    /// Handles one packet from the client with its session's state.
    pub fn step(&mut self, packet: Packet, meta: Meta, st: &mut State) -> Step {
        match packet {
            Packet::Publish(publish, props) => {
                let (qos, pkid) = meta.unwrap_or((0, 0));
                self.admit(publish, props, qos, pkid, st)
            }
            Packet::PubAck(ack, _) => {
                if st
                    .rec
                    .inflight
                    .get(&ack.pkid)
                    .is_some_and(|f| f.msg.qos == 1)
                {
                    st.rec.inflight.remove(&ack.pkid);
                    st.dirty = true;
                }
                Step::Done
            }
            Packet::PubRec(rec, _) => {
                if let Some(f) = st.rec.inflight.get_mut(&rec.pkid) {
                    f.released = true;
                    st.dirty = true;
                }
                self.write_pubrel(rec.pkid);
                Step::Done
            }
            Packet::PubComp(comp, _) => {
                if st.rec.inflight.remove(&comp.pkid).is_some() {
                    st.dirty = true;
                }
                Step::Done
            }
            Packet::PubRel(rel, _) => {
                st.rec.incoming_qos2.retain(|p| *p != rel.pkid);
                st.dirty = true;
                self.acks.push_back(PendingAck {
                    token: None,
                    pkid: rel.pkid,
                    kind: AckKind::Comp,
                    refused: None,
                });
                Step::Done
            }
            Packet::Subscribe(sub, props) => Step::Subscribed(self.subscribe(sub, props, st)),
            Packet::Unsubscribe(unsub, _) => Step::Unsubscribed(self.unsubscribe(unsub, st)),
            Packet::PingReq(_) => {
                self.codec.write(Packet::PingResp(PingResp), &mut self.out);
                Step::Done
            }
            Packet::Disconnect(d, props) => {
                self.on_disconnect(props, st);
                Step::End(
                    End::Normal {
                        will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                    },
                    None,
                )
            }
            // A second CONNECT, or a packet only a server sends.
            _ => self.end(DisconnectReasonCode::ProtocolError, None),
        }
    }

    fn on_disconnect(&self, props: Option<DisconnectProperties>, st: &mut State) {
        if let Some(secs) = props.and_then(|p| p.session_expiry_interval) {
            // Zero at CONNECT cannot become non-zero (MQTT-3.14.2-2).
            if st.rec.expiry_secs > 0 {
                st.rec.expiry_secs = secs.min(self.limits.session_expiry_max_secs);
                st.dirty = true;
            }
        }
    }

    /// A PUBLISH from the client: checked, and either delivered, recognised as a QoS 2
    /// re-send, or the end of the connection.
    fn admit(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        st: &State,
    ) -> Step {
        if let Some(p) = props.as_mut() {
            if !p.subscription_identifiers.is_empty() {
                // Only a server sets them (MQTT-3.3.4-6).
                return self.end(DisconnectReasonCode::ProtocolError, None);
            }
            if let Some(alias) = p.topic_alias.take() {
                if let Err(code) = self.resolve_alias(&mut publish, alias) {
                    return self.end(code, None);
                }
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return self.end(DisconnectReasonCode::TopicNameInvalid, None);
        };
        if !topic::valid_topic(topic) {
            // An empty topic without an alias, or wildcards in a topic name.
            return self.end(DisconnectReasonCode::TopicNameInvalid, None);
        }
        if !self.rights.may_publish(topic, self.limits.site_private) {
            let who = self.rights.describe(&self.client);
            let why = Violation {
                reason: "foreign_topic",
                detail: format!("{who} published on {:?}", printable(topic)),
            };
            return self.end(DisconnectReasonCode::NotAuthorized, Some(why));
        }
        let deliver = if topic.starts_with('$') {
            Deliver::Drop(Dropped::Dollar)
        } else if topic.starts_with(super::LOCAL_PREFIX) {
            // Only the agent speaks there: a forged ack would let a device forget readings
            // that are not stored.
            Deliver::Drop(Dropped::AgentTopic)
        } else if topic.starts_with(crate::ingest::SENSOR_PREFIX) {
            Deliver::Reading
        } else {
            Deliver::Route
        };
        if qos == 2 {
            if st.rec.incoming_qos2.contains(&pkid) {
                // A re-send of a message stored and PUBREC'd: acknowledge again, deliver
                // once.
                self.acks.push_back(PendingAck {
                    token: None,
                    pkid,
                    kind: AckKind::Rec,
                    refused: None,
                });
                return Step::Done;
            }
            if self
                .acks
                .iter()
                .any(|a| a.pkid == pkid && a.kind == AckKind::Rec)
            {
                // A re-send of one still waiting for its commit: the PUBREC it waits for
                // answers both.
                return Step::Done;
            }
        }
        if qos > 0 && self.v5() && self.incoming_in_flight(st) >= self.limits.max_inflight {
            // More than the Receive Maximum offered (MQTT-3.3.4-9).
            let why = Violation {
                reason: "receive_maximum",
                detail: format!(
                    "client {:?} sent more than {} unacknowledged QoS 1/2 publishes",
                    self.client, self.limits.max_inflight
                ),
            };
            return self.end(DisconnectReasonCode::ReceiveMaximumExceeded, Some(why));
        }
        Step::Publish {
            publish,
            props,
            qos,
            pkid,
            deliver,
        }
    }

    /// MQTT 5 topic aliases from the client (MQTT-3.3.2-8 to -12): a topic with an alias
    /// sets it, an empty topic with an alias uses it.
    fn resolve_alias(
        &mut self,
        publish: &mut Publish,
        alias: u16,
    ) -> Result<(), DisconnectReasonCode> {
        if !self.v5() || alias == 0 {
            return Err(DisconnectReasonCode::ProtocolError);
        }
        if alias > self.limits.topic_alias_max {
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
    fn incoming_in_flight(&self, st: &State) -> usize {
        let owed = self.acks.iter().filter(|a| a.kind != AckKind::Comp).count();
        owed + st.rec.incoming_qos2.len()
    }

    /// A token for a reading offered to the writer; its ack waits until the writer's
    /// committed token reaches it.
    pub fn next_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// The ack a delivered QoS 1/2 publish owes: after the commit of `token` (a reading),
    /// or refused before it reached the writer.
    pub fn owe_ack(&mut self, qos: u8, pkid: u16, token: Option<u64>, refused: Option<Reject>) {
        let kind = match qos {
            0 => return,
            1 => AckKind::Ack,
            _ => AckKind::Rec,
        };
        if refused.is_some_and(Reject::is_temporary) && !self.v5() {
            // Acks owed before it still go out; nothing after it is read.
            self.closing = true;
        }
        self.acks.push_back(PendingAck {
            token,
            pkid,
            kind,
            refused,
        });
    }

    /// Writes the acks whose turn has come, in the order their packets arrived, given the
    /// writer's `committed` token and the refusals it made (`refusal_of`). `Err`: a 3.1.1
    /// client's reading was refused for a reason that may pass; the connection closes
    /// (normally: no will) before anything after it is acknowledged.
    pub fn flush_acks(
        &mut self,
        committed: u64,
        mut refusal_of: impl FnMut(u64) -> Option<Reject>,
        st: &mut State,
    ) -> Result<(), Reject> {
        while let Some(a) = self.acks.front().copied() {
            if a.token.is_some_and(|t| t > committed) {
                break;
            }
            self.acks.pop_front();
            let refused = a.refused.or_else(|| a.token.and_then(&mut refusal_of));
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
                    self.acks.clear();
                    return Err(why);
                }
                (AckKind::Ack, _) => Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ),
                (AckKind::Rec, _) => {
                    // Stored (or refused for good): a re-send must not be delivered again.
                    if !st.rec.incoming_qos2.contains(&pkid) {
                        st.rec.incoming_qos2.push(pkid);
                        st.dirty = true;
                    }
                    Packet::PubRec(
                        PubRec {
                            pkid,
                            reason: PubRecReason::Success,
                        },
                        None,
                    )
                }
            };
            self.codec.write(packet, &mut self.out);
        }
        Ok(())
    }

    fn write_pubrel(&mut self, pkid: u16) {
        self.codec.write(
            Packet::PubRel(
                PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                },
                None,
            ),
            &mut self.out,
        );
    }
}

pub fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

mod outgoing;
mod subscriptions;
#[cfg(test)]
mod tests;
