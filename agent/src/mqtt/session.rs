//! MQTT sessions: subscriptions, the messages waiting for a client, and what is in
//! flight to it. A session outlives its connection when the client asked for that (clean
//! session 0 in 3.1.1, a Session Expiry Interval in 5) and is kept in `sessions.redb`, so
//! it also outlives a restart of the agent.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use rumqttd::protocol::PublishProperties;
use serde::{Deserialize, Serialize};

use super::topic;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sub {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<usize>,
    /// Are retained messages sent for this subscription (Retain Handling)? Only the
    /// messages the router sends right after SUBSCRIBE are retained deliveries.
    #[serde(skip)]
    pub retained_ok: bool,
}

/// A message for a client, as it will be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    pub topic: Vec<u8>,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Unix ms after which it is not delivered (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<i64>,
    pub props: Props,
    /// Set once it was sent: a re-send carries DUP.
    pub sent: bool,
}

/// The MQTT 5 properties a message keeps on its way to a subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Props {
    pub payload_format: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    pub user: Vec<(String, String)>,
    pub subscription_ids: Vec<usize>,
}

impl Props {
    pub fn from_publish(p: Option<PublishProperties>) -> Props {
        let Some(p) = p else {
            return Props::default();
        };
        Props {
            payload_format: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation: p.correlation_data.map(|b| b.to_vec()),
            user: p.user_properties,
            subscription_ids: Vec::new(),
        }
    }

    /// The properties of the PUBLISH sent to a client at `now_ms`.
    pub fn to_publish(&self, expires_at: Option<i64>, now_ms: i64) -> Option<PublishProperties> {
        let expiry = expires_at.map(|at| {
            let left = (at - now_ms).max(1);
            u32::try_from((left + 999) / 1000).unwrap_or(u32::MAX)
        });
        if *self == Props::default() && expiry.is_none() {
            return None;
        }
        Some(PublishProperties {
            payload_format_indicator: self.payload_format,
            message_expiry_interval: expiry,
            topic_alias: None,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation.clone().map(Bytes::from),
            user_properties: self.user.clone(),
            subscription_identifiers: self.subscription_ids.clone(),
            content_type: self.content_type.clone(),
        })
    }
}

/// A message sent to the client and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub msg: Msg,
    /// QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP.
    pub released: bool,
}

/// What is written to `sessions.redb` per client id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub v5: bool,
    /// Seconds the session is kept after its connection ends.
    pub expiry_secs: u32,
    pub subs: Vec<Sub>,
    pub inflight: BTreeMap<u16, InFlight>,
    pub outbox: VecDeque<Msg>,
    pub next_pkid: u16,
    /// QoS 2 packet ids received and not yet released (PUBREL).
    pub incoming_qos2: Vec<u16>,
    /// Unix ms when the last connection ended; `None` while connected.
    pub disconnected_at: Option<i64>,
}

/// The session's state; the connection and the router link both change it.
#[derive(Debug, Default)]
pub struct State {
    pub rec: Record,
    /// Generation of the connection that owns the session now (0: none).
    pub conn: u64,
    /// Changed since it was last written?
    pub dirty: bool,
    /// Is there a record of it in `sessions.redb` (to delete when it ends)?
    pub stored: bool,
    /// Receive Maximum of the current connection.
    pub receive_max: usize,
    /// Maximum Packet Size of the current connection.
    pub max_packet: Option<u32>,
    /// Messages delivered that more filters of this session match: their id and how
    /// many more copies the router will forward (one per matching filter).
    repeats: VecDeque<(u64, usize)>,
}

/// Messages whose further copies a session waits for, at most (overlapping
/// subscriptions are rare; an entry whose copies never come is pushed out).
const MAX_REPEATS: usize = 64;

/// Why a message for a session was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    QueueFull,
    Expired,
    Offline,
    TooLarge,
    Dollar,
    AgentTopic,
}

impl Dropped {
    pub const ALL: [Dropped; 6] = [
        Dropped::QueueFull,
        Dropped::Expired,
        Dropped::Offline,
        Dropped::TooLarge,
        Dropped::Dollar,
        Dropped::AgentTopic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "session_queue_full",
            Dropped::Expired => "message_expired",
            Dropped::Offline => "qos0_while_offline",
            Dropped::TooLarge => "larger_than_client_maximum",
            Dropped::Dollar => "publish_to_dollar_topic",
            Dropped::AgentTopic => "publish_to_agent_topic",
        }
    }
}

pub struct Session {
    pub client_id: String,
    state: Mutex<State>,
    /// Woken when there is something to send.
    pub wake: tokio::sync::Notify,
    /// Woken to end the current connection (session taken over, expired).
    pub kick: tokio::sync::Notify,
}

impl Session {
    pub fn new(client_id: String, rec: Record) -> Arc<Session> {
        Arc::new(Session {
            client_id,
            state: Mutex::new(State {
                rec,
                receive_max: 1,
                ..State::default()
            }),
            wake: tokio::sync::Notify::new(),
            kick: tokio::sync::Notify::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn persistent(&self) -> bool {
        self.lock().rec.expiry_secs > 0
    }
}

impl State {
    /// Is message `id` on `topic` a further copy of one delivered already? The router
    /// forwards a message once per matching filter of the session's link; the session
    /// delivers it once, at the highest QoS granted, with every subscription identifier
    /// (MQTT-3.3.4-2, -3). `$` and exact `fogline/ack/…` filters are not the router's.
    pub fn repeated(&mut self, id: u64, topic: &str) -> bool {
        if let Some(i) = self.repeats.iter().position(|&(x, _)| x == id) {
            self.repeats[i].1 -= 1;
            if self.repeats[i].1 == 0 {
                self.repeats.remove(i);
            }
            return true;
        }
        let copies = self
            .matching(topic)
            .filter(|s| !s.filter.starts_with('$') && !super::is_local_exact(&s.filter))
            .count();
        if copies > 1 {
            if self.repeats.len() >= MAX_REPEATS {
                self.repeats.pop_front();
            }
            self.repeats.push_back((id, copies - 1));
        }
        false
    }

    /// The subscriptions that match `topic`.
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Sub> + 'a {
        self.rec
            .subs
            .iter()
            .filter(move |s| topic::matches(&s.filter, topic))
    }

    /// Queues `msg`; QoS 0 only while connected. The oldest go first when full.
    pub fn queue(&mut self, msg: Msg, max_queued: usize) -> Result<(), Dropped> {
        if self.conn == 0 && msg.qos == 0 {
            return Err(Dropped::Offline);
        }
        let mut result = Ok(());
        if self.rec.outbox.len() >= max_queued {
            self.rec.outbox.pop_front();
            result = Err(Dropped::QueueFull);
        }
        if msg.qos > 0 {
            self.dirty = true;
        }
        self.rec.outbox.push_back(msg);
        result
    }

    /// A free packet id for an outgoing QoS 1/2 message.
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.rec.next_pkid = self.rec.next_pkid.wrapping_add(1).max(1);
            if !self.rec.inflight.contains_key(&self.rec.next_pkid) {
                return self.rec.next_pkid;
            }
        }
    }
}

/// `sessions.redb`: the persistent sessions, written in the background.
pub struct Store {
    db: redb::Database,
}

#[derive(Debug, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Database::create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(SESSIONS).map_err(err)?;
        tx.commit().map_err(err)?;
        crate::fsync::sync_dir_of(path).map_err(err)?;
        Ok(Store { db })
    }

    pub fn load(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(SESSIONS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match postcard::from_bytes::<Record>(v.value()) {
                Ok(rec) => out.push((k.value().to_owned(), rec)),
                Err(e) => tracing::warn!(client = k.value(), "dropping an unreadable session: {e}"),
            }
        }
        Ok(out)
    }

    /// Deletes, then writes, in one transaction (one fsync).
    pub fn write(&self, put: &[(String, Vec<u8>)], delete: &[String]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(SESSIONS).map_err(err)?;
            for k in delete {
                table.remove(k.as_str()).map_err(err)?;
            }
            for (k, v) in put {
                table.insert(k.as_str(), v.as_slice()).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(qos: u8) -> Msg {
        Msg {
            topic: b"t".to_vec(),
            payload: b"p".to_vec(),
            qos,
            retain: false,
            expires_at: None,
            props: Props::default(),
            sent: false,
        }
    }

    #[test]
    fn offline_sessions_keep_qos1_and_drop_the_oldest_when_full() {
        let mut s = State::default();
        assert_eq!(s.queue(msg(0), 2), Err(Dropped::Offline));
        assert_eq!(s.queue(msg(1), 2), Ok(()));
        assert_eq!(s.queue(msg(1), 2), Ok(()));
        assert_eq!(s.queue(msg(2), 2), Err(Dropped::QueueFull));
        assert_eq!(s.rec.outbox.len(), 2);
        assert_eq!(s.rec.outbox.back().map(|m| m.qos), Some(2));
        assert!(s.dirty);
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut s = State::default();
        s.rec.next_pkid = u16::MAX;
        s.rec.inflight.insert(
            1,
            InFlight {
                msg: msg(1),
                released: false,
            },
        );
        assert_eq!(s.next_pkid(), 2);
    }

    #[test]
    fn records_survive_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.redb");
        let mut rec = Record {
            v5: true,
            expiry_secs: 300,
            ..Record::default()
        };
        rec.outbox.push_back(msg(1));
        rec.subs.push(Sub {
            filter: "a/#".into(),
            qos: 1,
            no_local: true,
            retain_as_published: false,
            id: Some(7),
            retained_ok: true,
        });
        {
            let store = Store::open(&path).expect("open");
            let bytes = postcard::to_allocvec(&rec).expect("encode");
            store.write(&[("c1".into(), bytes)], &[]).expect("write");
        }
        let store = Store::open(&path).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].0, "c1");
        assert_eq!(loaded[0].1.outbox, rec.outbox);
        assert_eq!(loaded[0].1.subs[0].filter, "a/#");
        store.write(&[], &["c1".into()]).expect("delete");
        assert!(store.load().expect("load").is_empty());
        // A client id deleted and written in one round comes back (deletes go first).
        let bytes = postcard::to_allocvec(&rec).expect("encode");
        store
            .write(&[("c1".into(), bytes)], &["c1".into()])
            .expect("write");
        assert_eq!(store.load().expect("load").len(), 1);
    }
}
