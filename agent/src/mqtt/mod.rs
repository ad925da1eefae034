//! The agent's MQTT front end: it owns every client connection and session and uses
//! rumqttd's router, through in-process links, only to route messages between them.
//!
//! rumqttd 0.20 as a network broker refuses keepalive 0, delivers at the subscription's
//! QoS instead of min(publish, granted), forgets sessions, ignores message expiry, No
//! Local and the client's Maximum Packet Size, cannot refuse a single subscription, and
//! sends PUBACK before anything is stored. Here:
//!
//! - connections are read and written with rumqttd's own packet codecs (3.1.1 and 5 on
//!   the same port, told apart by the CONNECT);
//! - a reading (`sensors/<device>/<metric>`) goes straight to the buffer's writer, and its
//!   PUBACK (PUBREC for QoS 2) is sent once the batch holding it is committed — and
//!   replicated, when `cluster.ack_after = "replicated"` — in the order the publishes came;
//! - any other publish goes to the router, tagged with what the publisher sent
//!   ([`topic::Tag`]): a session receives it through its own router link and delivers it
//!   at min(publish QoS, granted QoS), with its retain flag, expiry and No Local applied;
//! - sessions ([`session`]) outlive their connection when asked to, and are kept in
//!   `sessions.redb`, written every 100 ms, so they outlive a restart too;
//! - `$` topics are the front end's own (`$SYS/broker/…`), never matched by `#` or `+`.
//!
//! docs/agent.md has the alternatives this replaced and why.

mod codec;
pub mod config;
mod conn;
mod connect;
pub mod metrics;
pub mod protocol;
mod publisher;
pub mod refusals;
mod rights;
pub mod session;
mod start;
pub mod topic;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, Publish, PublishProperties};
use rumqttd::Notification;

use tokio::net::TcpListener;

use crate::ingest::Ingest;
use crate::router::MakeLink;
use crate::security::auth::Authenticator;
use refusals::FrontMetrics;
use session::{Dropped, Msg, Props, Record, Session, Store};
use topic::Tag;

pub use codec::decode_any;
pub use metrics::Metrics;
pub use publisher::Publisher;
pub use rights::Rights;
pub use start::{start, Front, FrontConfig, SiteListener, StartMetrics};

/// How often changed sessions are written to `sessions.redb`.
const PERSIST_EVERY: Duration = Duration::from_millis(100);

/// The front end's settings, from `[mqtt]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest packet from a client (`mqtt.max_packet_bytes`).
    pub max_packet: usize,
    /// Largest log batch a node of the site may ship (`cluster.max_batch_bytes` with
    /// room for its header); only connections that may ship batches get it.
    pub max_batch_packet: usize,
    /// Topic aliases a client may set (MQTT 5 Topic Alias Maximum); 0: none.
    pub topic_alias_max: u16,
    /// Longest keep alive a client may ask for, and what a client asking for none gets
    /// (MQTT 5 Server Keep Alive; a 3.1.1 client asking for more is refused); 0: any.
    pub max_keep_alive_secs: u16,
    pub max_inflight: usize,
    pub max_queued: usize,
    pub session_expiry_max_secs: u32,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Topics under `fogline/cluster/` and `fogline/repl/` are closed to the device
    /// port (the site has its own listener).
    pub site_private: bool,
}

impl Settings {
    /// What one connection's protocol is bound by.
    pub fn limits(&self) -> protocol::Limits {
        protocol::Limits {
            max_packet: self.max_packet,
            max_batch_packet: self.max_batch_packet,
            max_inflight: self.max_inflight,
            topic_alias_max: self.topic_alias_max,
            session_expiry_max_secs: self.session_expiry_max_secs,
            site_private: self.site_private,
        }
    }
}

/// The router and every session; shared by all connections.
pub struct Server {
    make_link: Box<MakeLink>,
    /// Where client publishes enter the router.
    publish: tokio::sync::Mutex<LinkTx>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Router link of each session with subscriptions.
    links: Mutex<HashMap<String, SessionLink>>,
    /// Client ids of sessions to delete from the store.
    deleted: Mutex<Vec<String>>,
    store: Option<Store>,
    generation: AtomicU64,
    /// Subscriptions that could match a reading's topic: readings go to the router too.
    reading_subs: AtomicUsize,
    /// The agent's own `fogline/ack/…` messages, served without the router.
    local: Mutex<LocalTopics>,
    /// Wildcard subscriptions that may match a `fogline/ack/…` topic: those messages go
    /// to the router too.
    local_wildcards: AtomicUsize,
    /// `$SYS/…` messages, retained.
    sys: Vec<(String, Bytes)>,
    pub ingest: Arc<Ingest>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub front: Arc<FrontMetrics>,
    /// Argon2 checks running at once.
    hashing: tokio::sync::Semaphore,
    open: AtomicUsize,
}

struct SessionLink {
    tx: LinkTx,
    task: tokio::task::AbortHandle,
}

impl Server {
    pub fn new(
        make_link: Box<MakeLink>,
        data_dir: &Path,
        ingest: Arc<Ingest>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Server>, String> {
        let (publish, publish_rx) = make_link("fogline-front").map_err(|e| e.to_string())?;
        let store = Store::open(&data_dir.join("sessions.redb")).map_err(|e| e.to_string())?;
        let hashing = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let front = metrics.front.clone();
        let server = Arc::new(Server {
            make_link,
            publish: tokio::sync::Mutex::new(publish),
            sessions: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            deleted: Mutex::new(Vec::new()),
            store: Some(store),
            generation: AtomicU64::new(0),
            reading_subs: AtomicUsize::new(0),
            local: Mutex::new(LocalTopics::default()),
            local_wildcards: AtomicUsize::new(0),
            sys: vec![
                (
                    "$SYS/broker/version".into(),
                    Bytes::from(format!("fogline-agent {}", env!("CARGO_PKG_VERSION"))),
                ),
                (
                    "$SYS/broker/fogline/started".into(),
                    Bytes::from(crate::now_ms().to_string()),
                ),
            ],
            ingest,
            settings,
            metrics,
            front,
            hashing: tokio::sync::Semaphore::new(hashing),
            open: AtomicUsize::new(0),
        });
        tokio::spawn(watch_front_link(Arc::downgrade(&server), publish_rx));
        Ok(server)
    }

    /// Loads the sessions kept in `sessions.redb` and subscribes them again.
    pub async fn restore(self: &Arc<Self>) -> Result<usize, String> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let records = store.load().map_err(|e| e.to_string())?;
        let now = crate::now_ms();
        let mut kept = 0;
        for (client, mut rec) in records {
            let since = *rec.disconnected_at.get_or_insert(now);
            let expires = since.saturating_add(i64::from(rec.expiry_secs) * 1000);
            if rec.expiry_secs == 0 || expires <= now {
                self.forget(&client);
                continue;
            }
            let filters: Vec<String> = rec.subs.iter().map(|s| s.filter.clone()).collect();
            let session = Session::new(client.clone(), rec);
            session.lock().stored = true;
            self.lock_sessions().insert(client.clone(), session.clone());
            for f in filters {
                self.subscribed(&session, &f).await;
            }
            kept += 1;
        }
        self.metrics
            .sessions
            .set(i64::try_from(self.lock_sessions().len()).unwrap_or(0));
        Ok(kept)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Takes the session of `client` for a new connection: a fresh one when `clean` or
    /// when none exists. Returns it and whether an old one was resumed. The connection
    /// that held it before is told to go.
    pub async fn attach(
        self: &Arc<Self>,
        client: &str,
        clean: bool,
        rec: Record,
        generation: u64,
    ) -> (Arc<Session>, bool) {
        let old = self.lock_sessions().get(client).cloned();
        if let Some(old) = &old {
            // Whoever held it goes first (session takeover).
            old.lock().conn = 0;
            old.kick.notify_waiters();
        }
        let resumed = match old {
            Some(old) if !clean => {
                {
                    let mut st = old.lock();
                    st.rec.v5 = rec.v5;
                    st.rec.expiry_secs = rec.expiry_secs;
                    st.rec.disconnected_at = None;
                    st.conn = generation;
                    st.dirty = true;
                }
                return (old, true);
            }
            Some(_) => {
                self.remove(client).await;
                false
            }
            None => false,
        };
        let session = Session::new(client.to_owned(), rec);
        session.lock().conn = generation;
        let mut sessions = self.lock_sessions();
        sessions.insert(client.to_owned(), session.clone());
        self.metrics
            .sessions
            .set(i64::try_from(sessions.len()).unwrap_or(0));
        (session, resumed)
    }

    /// Ends a session: its subscriptions, its router link, its record.
    pub async fn remove(&self, client: &str) {
        let session = {
            let mut sessions = self.lock_sessions();
            let s = sessions.remove(client);
            self.metrics
                .sessions
                .set(i64::try_from(sessions.len()).unwrap_or(0));
            s
        };
        let mut stored = false;
        if let Some(session) = session {
            let subs = {
                let mut st = session.lock();
                stored = st.stored;
                std::mem::take(&mut st.rec.subs)
            };
            for s in subs {
                self.untrack(&session, &s.filter);
            }
        }
        let link = self.lock_links().remove(client);
        if let Some(mut link) = link {
            link.task.abort();
            let bye = Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = link.tx.send(bye).await;
        }
        // Clean sessions never reach the store: nothing to delete (and no transaction).
        if stored {
            self.forget(client);
        }
    }

    fn forget(&self, client: &str) {
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client.to_owned());
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, LocalTopics> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts what a subscription to `filter` asks of the router; true when it is served
    /// here instead (an exact `fogline/ack/…` topic).
    fn track(&self, session: &Arc<Session>, filter: &str) -> bool {
        if topic::may_match_readings(filter) {
            self.reading_subs.fetch_add(1, Ordering::SeqCst);
        }
        if is_local_exact(filter) {
            let mut local = self.lock_local();
            local
                .exact
                .entry(filter.to_owned())
                .or_default()
                .push(Arc::downgrade(session));
            return true;
        }
        if topic::may_match_local(filter) {
            self.local_wildcards.fetch_add(1, Ordering::SeqCst);
        }
        false
    }

    /// Undoes [`Server::track`].
    fn untrack(&self, session: &Session, filter: &str) {
        let dec = |n: &AtomicUsize| {
            let _ = n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        };
        if topic::may_match_readings(filter) {
            dec(&self.reading_subs);
        }
        if is_local_exact(filter) {
            let mut local = self.lock_local();
            if let Some(list) = local.exact.get_mut(filter) {
                list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), session));
                if list.is_empty() {
                    local.exact.remove(filter);
                }
            }
        } else if topic::may_match_local(filter) {
            dec(&self.local_wildcards);
        }
    }

    /// The agent's own messages on `fogline/ack/…` (retained): kept here and delivered to
    /// exact subscribers directly, and to the router only when a wildcard subscription
    /// could want them.
    pub fn publish_local(&self, messages: &[(String, String)]) -> bool {
        let now = crate::now_ms();
        for (topic, payload) in messages {
            let payload = Bytes::from(payload.clone());
            let subscribers: Vec<Arc<Session>> = {
                let mut local = self.lock_local();
                local.retained.insert(topic.clone(), payload.clone());
                local
                    .exact
                    .get(topic)
                    .map(|l| l.iter().filter_map(std::sync::Weak::upgrade).collect())
                    .unwrap_or_default()
            };
            for session in subscribers {
                let publish = Publish::new(Bytes::from(topic.clone()), payload.clone(), false);
                self.offer_at(&session, publish, None, Tag::internal(now), now);
            }
        }
        self.local_wildcards.load(Ordering::SeqCst) > 0
    }

    /// Does anyone subscribe to something that matches readings?
    pub fn readings_wanted(&self) -> bool {
        self.reading_subs.load(Ordering::SeqCst) > 0
    }

    /// After a session added `filter`: subscribe its router link (made on first use).
    /// `$` filters are served from [`Server::sys`] instead.
    pub async fn subscribed(self: &Arc<Self>, session: &Arc<Session>, filter: &str) {
        if self.track(session, filter) {
            let retained = self.lock_local().retained.get(filter).cloned();
            if let Some(payload) = retained {
                let publish = Publish::new(Bytes::from(filter.to_owned()), payload, true);
                let now = crate::now_ms();
                self.offer_at(session, publish, None, Tag::internal(now), now);
            }
            return;
        }
        if filter.starts_with('$') {
            self.offer_sys(session, filter);
            return;
        }
        let client = session.client_id.clone();
        let has_link = self.lock_links().contains_key(&client);
        if !has_link {
            let name = format!("fl{}-{}", self.next_generation(), client);
            let server = self.clone();
            let made = tokio::task::spawn_blocking(move || (server.make_link)(&name)).await;
            let (tx, rx) = match made {
                Ok(Ok(link)) => link,
                Ok(Err(e)) => {
                    tracing::error!(client = %client, "no router link for a session: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!(client = %client, "no router link for a session: {e}");
                    return;
                }
            };
            let task = tokio::spawn(drain(self.clone(), Arc::downgrade(session), rx));
            self.lock_links().insert(
                client.clone(),
                SessionLink {
                    tx,
                    task: task.abort_handle(),
                },
            );
        }
        // rumqttd forwards retained messages on every SUBSCRIBE of a local link, whatever
        // its retain rule; Retain Handling is applied in `offer`.
        if let Some(link) = self.lock_links().get_mut(&client) {
            if let Err(e) = link.tx.subscribe(filter) {
                tracing::error!(client = %client, "router subscribe failed: {e}");
            }
        }
    }

    /// After a session dropped `filter`.
    pub fn unsubscribed(&self, session: &Session, filter: &str) {
        self.untrack(session, filter);
        if filter.starts_with('$') || is_local_exact(filter) {
            return;
        }
        if let Some(link) = self.lock_links().get_mut(&session.client_id) {
            let _ = link.tx.unsubscribe(filter);
        }
    }

    /// Hands a client's (or a will's) publish to the router.
    pub async fn route(
        &self,
        topic: Bytes,
        payload: Bytes,
        props: Option<PublishProperties>,
        tag: &Tag,
    ) {
        let publish = Publish::new(topic, payload, tag.retain);
        let props = tag.attach(props);
        let mut link = self.publish.lock().await;
        if let Err(e) = link.send(Packet::Publish(publish, Some(props))).await {
            tracing::error!("the router is gone: {e}");
        }
    }

    /// A message from the router for `session`: delivered per its subscriptions, once
    /// (the router forwards it once per matching filter).
    fn offer(&self, session: &Session, publish: Publish, mut props: Option<PublishProperties>) {
        let now = crate::now_ms();
        let tagged = Tag::detach(&mut props);
        // The router marks retained messages it sends right after a SUBSCRIBE: those
        // come through the new filter only.
        if let (Some((_, id)), false) = (&tagged, publish.retain) {
            let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                return;
            };
            if session.lock().repeated(*id, topic) {
                return;
            }
        }
        let tag = tagged.map_or_else(|| Tag::internal(now), |(t, _)| t);
        self.offer_at(session, publish, props, tag, now);
    }

    fn offer_at(
        &self,
        session: &Session,
        publish: Publish,
        props: Option<PublishProperties>,
        tag: Tag,
        now: i64,
    ) {
        // The router marks retained messages it sends right after a SUBSCRIBE.
        let retained_delivery = publish.retain;
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let expires_at = props
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| tag.at_ms.saturating_add(i64::from(s) * 1000));
        let mut st = session.lock();
        let v5 = st.rec.v5;
        let mut granted: Option<u8> = None;
        let (mut rap, mut retained_ok, mut ids) = (false, false, Vec::new());
        for s in st.matching(topic) {
            if s.no_local && !tag.from.is_empty() && tag.from == session.client_id {
                continue;
            }
            granted = Some(granted.map_or(s.qos, |g| g.max(s.qos)));
            rap |= s.retain_as_published;
            retained_ok |= s.retained_ok;
            ids.extend(s.id);
        }
        let Some(granted) = granted else {
            return;
        };
        if retained_delivery && !retained_ok {
            return;
        }
        if expires_at.is_some_and(|at| at <= now) {
            self.dropped(Dropped::Expired);
            return;
        }
        let mut p = Props::from_publish(props);
        if v5 {
            p.subscription_ids = ids;
        }
        let msg = Msg {
            topic: publish.topic.to_vec(),
            payload: publish.payload.to_vec(),
            qos: tag.qos.min(granted),
            retain: retained_delivery || (v5 && rap && tag.retain),
            expires_at,
            props: p,
            sent: false,
        };
        let queued = st.queue(msg, self.settings.max_queued);
        drop(st);
        if let Err(d) = queued {
            self.dropped(d);
        }
        session.wake.notify_one();
    }

    /// The `$SYS` messages matching `filter`, as retained messages.
    fn offer_sys(&self, session: &Session, filter: &str) {
        let mut st = session.lock();
        for (topic, payload) in &self.sys {
            if !topic::matches(filter, topic) {
                continue;
            }
            let msg = Msg {
                topic: topic.as_bytes().to_vec(),
                payload: payload.to_vec(),
                qos: 0,
                retain: true,
                expires_at: None,
                props: Props::default(),
                sent: false,
            };
            let _ = st.queue(msg, self.settings.max_queued);
        }
        drop(st);
        session.wake.notify_one();
    }

    pub fn dropped(&self, why: Dropped) {
        self.metrics
            .dropped
            .get_or_create(&crate::labels::Reason {
                reason: why.as_str(),
            })
            .inc();
    }

    /// Writes changed persistent sessions and deletes ended ones; drops sessions whose
    /// expiry passed.
    pub async fn persist(self: &Arc<Self>) {
        let now = crate::now_ms();
        // Deletes first, taken before the records are read: a session removed after this
        // point is deleted in the next round, one created again is written after its
        // old record went.
        let delete: Vec<String> =
            std::mem::take(&mut *self.deleted.lock().unwrap_or_else(|e| e.into_inner()));
        let sessions: Vec<Arc<Session>> = self.lock_sessions().values().cloned().collect();
        let mut put = Vec::new();
        let mut expired = Vec::new();
        for s in sessions {
            let mut st = s.lock();
            if st.conn == 0 {
                if let Some(at) = st.rec.disconnected_at {
                    if at.saturating_add(i64::from(st.rec.expiry_secs) * 1000) <= now {
                        expired.push(s.client_id.clone());
                        continue;
                    }
                }
            }
            if st.dirty && st.rec.expiry_secs > 0 {
                st.dirty = false;
                st.stored = true;
                match postcard::to_allocvec(&st.rec) {
                    Ok(bytes) => put.push((s.client_id.clone(), bytes)),
                    Err(e) => {
                        tracing::error!(client = %s.client_id, "cannot encode a session: {e}")
                    }
                }
            }
        }
        for client in expired {
            tracing::debug!(client = %client, "session expired");
            self.remove(&client).await;
        }
        if put.is_empty() && delete.is_empty() {
            return;
        }
        let server = self.clone();
        let written = tokio::task::spawn_blocking(move || match &server.store {
            Some(store) => store.write(&put, &delete).map_err(|e| e.to_string()),
            None => Ok(()),
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("could not save sessions: {e}"),
            Err(e) => tracing::error!("could not save sessions: {e}"),
        }
    }

    /// Accepts connections on `listener` until the runtime stops.
    pub fn listen(
        self: &Arc<Self>,
        listener: StdListener,
        guard: Guard,
        max_connections: usize,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let server = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("MQTT accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if server.open.load(Ordering::SeqCst) >= max_connections {
                    server.front.refuse(
                        "max_connections",
                        peer,
                        &format!("{max_connections} connections open (mqtt.max_connections)"),
                    );
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                server.open.fetch_add(1, Ordering::SeqCst);
                server
                    .metrics
                    .connections
                    .set(i64::try_from(server.open.load(Ordering::SeqCst)).unwrap_or(0));
                let server = server.clone();
                let guard = guard.clone();
                tokio::spawn(async move {
                    match guard {
                        Guard::Open => conn::serve(&server, stream, peer, Rights::Open).await,
                        Guard::Devices(auth) => {
                            conn::serve(&server, stream, peer, Rights::Authenticate(auth)).await
                        }
                        Guard::Node => conn::serve(&server, stream, peer, Rights::All).await,
                        Guard::Tls(acceptor) => {
                            // Boxed: a TLS stream is large, and inline it would size
                            // every plain connection's task too.
                            Box::pin(async {
                                if let Some(tls) = server.tls_accept(&acceptor, stream, peer).await
                                {
                                    conn::serve(&server, tls, peer, Rights::All).await;
                                }
                            })
                            .await;
                        }
                    }
                    server.open.fetch_sub(1, Ordering::SeqCst);
                    server
                        .metrics
                        .connections
                        .set(i64::try_from(server.open.load(Ordering::SeqCst)).unwrap_or(0));
                });
            }
        }))
    }

    async fn tls_accept(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let accepted =
            tokio::time::timeout(self.settings.connect_timeout, acceptor.accept(stream)).await;
        match accepted {
            Ok(Ok(tls)) => {
                let node = crate::security::tls::peer_name(tls.get_ref().1.peer_certificates());
                tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), "node link authenticated");
                Some(tls)
            }
            Ok(Err(e)) => {
                let (reason, detail) = crate::security::tls::classify_tls(&e);
                self.front.refuse(reason, peer, &detail);
                None
            }
            Err(_) => {
                self.front
                    .refuse("tls_handshake", peer, "no handshake in time");
                None
            }
        }
    }
}

/// Topics only the agent publishes, served by the front end itself.
pub const LOCAL_PREFIX: &str = "fogline/ack/";

fn is_local_exact(filter: &str) -> bool {
    filter.starts_with(LOCAL_PREFIX) && !filter.contains(['+', '#'])
}

#[derive(Default)]
struct LocalTopics {
    /// The latest message of each topic.
    retained: HashMap<String, Bytes>,
    /// Sessions subscribed to each topic by its exact name.
    exact: HashMap<String, Vec<std::sync::Weak<Session>>>,
}

/// Who may connect on a listener, and with what rights.
#[derive(Clone)]
pub enum Guard {
    /// Anyone (`auth.mode = "open"`).
    Open,
    /// Devices with credentials, each under its own topics.
    Devices(Arc<Authenticator>),
    /// The site's node listener without TLS (a lab).
    Node,
    /// The site's node listener: TLS with a client certificate from the site CA.
    Tls(tokio_rustls::TlsAcceptor),
}

/// Watches the link every client publish enters the router by. The router disconnects a
/// link whose publish it refuses (a topic alias it does not know, say): after that every
/// client's publishes would go nowhere. The front end never passes such a publish on
/// (aliases are resolved per connection); if the router closes the link anyway, a new one
/// takes over.
async fn watch_front_link(server: std::sync::Weak<Server>, mut rx: LinkRx) {
    loop {
        let closed = match rx.next().await {
            Ok(Some(Notification::Disconnect(..))) | Err(_) => true,
            Ok(_) => false,
        };
        if !closed {
            continue;
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        let name = format!("fogline-front-{}", server.next_generation());
        let maker = server.clone();
        let made = tokio::task::spawn_blocking(move || (maker.make_link)(&name)).await;
        match made {
            Ok(Ok((tx, new_rx))) => {
                tracing::error!(
                    "the router closed the link of client publishes; a new one took over"
                );
                *server.publish.lock().await = tx;
                rx = new_rx;
            }
            Ok(Err(e)) => {
                tracing::error!("the router closed the link of client publishes: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("the router closed the link of client publishes: {e}");
                return;
            }
        }
    }
}

/// Reads a session's router link for as long as the session lives.
async fn drain(server: Arc<Server>, session: std::sync::Weak<Session>, mut rx: LinkRx) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(f))) => {
                let Some(session) = session.upgrade() else {
                    return;
                };
                server.offer(&session, f.publish, f.properties);
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Writes sessions every [`PERSIST_EVERY`] until `stop`, then once more.
pub async fn persist_loop(server: Arc<Server>, mut stop: crate::shutdown::Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERSIST_EVERY) => {}
            () = stop.fired() => break,
        }
        server.persist().await;
    }
    server.persist().await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A front end over a real router, with no listener, for unit tests.
    pub(crate) fn server(dir: &Path) -> Arc<Server> {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = flume::bounded(16);
        // Readings are not what these tests are about; the queue stays open.
        std::mem::forget(rx);
        let ingest = Arc::new(Ingest::new(
            tx,
            crate::ingest::limits::LimitsConfig::default(),
            Duration::from_secs(1),
            Arc::new(crate::ingest::Metrics::default()),
            1024,
        ));
        let settings = Settings {
            max_packet: 1 << 16,
            max_batch_packet: 1 << 16,
            topic_alias_max: 8,
            max_keep_alive_secs: 0,
            max_inflight: 10,
            max_queued: 10,
            session_expiry_max_secs: 60,
            connect_timeout: Duration::from_secs(1),
            max_connections: 10,
            site_private: false,
        };
        let make = crate::router::start_router(crate::router::router_config(10, &[]));
        Server::new(make, dir, ingest, settings, metrics).expect("server")
    }

    /// The router disconnects a link whose publish it refuses; the link every client
    /// publishes through is replaced, so routing goes on for everybody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routing_survives_the_router_dropping_the_publishing_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = server(dir.path());
        let (mut sub_tx, mut sub_rx) = (server.make_link)("test-sub").expect("link");
        sub_tx.subscribe("t/#").expect("subscribe");
        // What a client's aliased publish did before the front end resolved aliases.
        let bad = PublishProperties {
            topic_alias: Some(0),
            ..PublishProperties::default()
        };
        let publish = Publish::new(
            Bytes::from_static(b"t/bad"),
            Bytes::from_static(b"x"),
            false,
        );
        let _ = server
            .publish
            .lock()
            .await
            .send(Packet::Publish(publish, Some(bad)))
            .await;
        let tag = Tag::internal(crate::now_ms());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut n = 0u32;
        let delivered = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing routed after the link was dropped"
            );
            n += 1;
            let topic = Bytes::from(format!("t/good{n}"));
            server
                .route(topic, Bytes::from_static(b"ok"), None, &tag)
                .await;
            match tokio::time::timeout(Duration::from_millis(100), sub_rx.next()).await {
                Ok(Ok(Some(Notification::Forward(f)))) => break f,
                Ok(Ok(Some(Notification::Unschedule))) => {
                    let _ = sub_rx.wake().await;
                }
                _ => {}
            }
        };
        assert!(delivered.publish.topic.starts_with(b"t/good"));
    }
}
