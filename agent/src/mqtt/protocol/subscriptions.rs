//! SUBSCRIBE and UNSUBSCRIBE: the session's subscriptions, checked against the
//! connection's rights, and the SUBACK / UNSUBACK with a code per filter.

use rumqttd::protocol::{
    Packet, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe,
};

use super::{Protocol, Subscribed};
use crate::mqtt::session::{State, Sub};
use crate::mqtt::topic;

impl Protocol {
    /// A SUBSCRIBE: the session's subscriptions change, the SUBACK is written.
    pub(super) fn subscribe(
        &mut self,
        sub: Subscribe,
        props: Option<SubscribeProperties>,
        st: &mut State,
    ) -> Subscribed {
        let v5 = self.v5();
        let id = props.and_then(|p| p.id);
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut done = Subscribed::default();
        for f in sub.filters {
            let refuse = |v5_code| {
                if v5 {
                    v5_code
                } else {
                    SubscribeReasonCode::Failure
                }
            };
            let code = if !topic::valid_filter(&f.path) {
                refuse(SubscribeReasonCode::TopicFilterInvalid)
            } else if f.path.starts_with("$share/") {
                refuse(SubscribeReasonCode::SharedSubscriptionsNotSupported)
            } else if !self.rights.may_subscribe(&f.path, self.limits.site_private) {
                done.refused.push(f.path.clone());
                refuse(SubscribeReasonCode::NotAuthorized)
            } else {
                let qos = (f.qos as u8).min(2);
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
                    Some(i) => {
                        st.rec.subs[i] = new;
                        done.replaced.push(f.path.clone());
                    }
                    None => st.rec.subs.push(new),
                }
                st.dirty = true;
                done.added.push(f.path);
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
            &mut self.out,
        );
        done
    }

    /// An UNSUBSCRIBE: the filters the session had, now gone; the UNSUBACK is written.
    pub(super) fn unsubscribe(&mut self, unsub: Unsubscribe, st: &mut State) -> Vec<String> {
        let mut reasons = Vec::with_capacity(unsub.filters.len());
        let mut removed = Vec::new();
        for f in unsub.filters {
            let before = st.rec.subs.len();
            st.rec.subs.retain(|s| s.filter != f);
            st.dirty = true;
            if st.rec.subs.len() != before {
                reasons.push(UnsubAckReason::Success);
                removed.push(f);
            } else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
            }
        }
        self.codec.write(
            Packet::UnsubAck(
                UnsubAck {
                    pkid: unsub.pkid,
                    reasons,
                },
                None,
            ),
            &mut self.out,
        );
        removed
    }
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
