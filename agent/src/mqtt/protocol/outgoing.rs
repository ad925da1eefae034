//! Messages to the client: at most its Receive Maximum in flight, in order; expired and
//! oversized ones dropped; topic aliases within its maximum; and on a resumed session what
//! was sent and not acknowledged, again with DUP.

use bytes::BytesMut;

use super::Protocol;
use crate::mqtt::session::{Dropped, InFlight, State};

impl Protocol {
    /// On a resumed session: what was sent and not acknowledged goes again (DUP), and
    /// PUBRELs whose PUBCOMP did not come.
    pub fn resend_inflight(&mut self, st: &State, now_ms: i64) {
        for (&pkid, f) in &st.rec.inflight {
            if f.released {
                self.write_pubrel(pkid);
            } else {
                self.codec
                    .encode_publish(&f.msg, pkid, true, now_ms, None, &mut self.out);
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

    /// Moves queued messages to the client while its receive window has room; calls
    /// `dropped` for each message that is not sent (expired, too large for the client).
    pub fn pump(&mut self, st: &mut State, now_ms: i64, mut dropped: impl FnMut(Dropped)) {
        let mut scratch = BytesMut::new();
        while st.rec.inflight.len() < st.receive_max {
            let Some(mut msg) = st.rec.outbox.pop_front() else {
                return;
            };
            st.dirty = true;
            if msg.expires_at.is_some_and(|at| at <= now_ms) {
                dropped(Dropped::Expired);
                continue;
            }
            let pkid = if msg.qos > 0 { st.next_pkid() } else { 0 };
            scratch.clear();
            let alias = self.alias_for(&msg.topic);
            self.codec
                .encode_publish(&msg, pkid, false, now_ms, alias, &mut scratch);
            if st.max_packet.is_some_and(|m| scratch.len() > m as usize) {
                dropped(Dropped::TooLarge);
                continue;
            }
            if let Some((a, true)) = alias {
                // Only once the client is told it.
                self.aliases_out.insert(msg.topic.clone(), a);
            }
            self.out.extend_from_slice(&scratch);
            if msg.qos > 0 {
                msg.sent = true;
                st.rec.inflight.insert(
                    pkid,
                    InFlight {
                        msg,
                        released: false,
                    },
                );
            }
        }
    }
}
