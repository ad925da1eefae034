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
//! The files: `start` (listeners and the persist loop, from `[mqtt]`), `listen` (who
//! may connect where, TLS), `connect` (the CONNECT exchange), `conn` (a connection's I/O
//! shell), [`protocol`] (its decisions, sans-io), `codec` and `rights`, `sessions` (the
//! server's sessions: attach, take over, expire, persist), [`session`] (one session's
//! state and `sessions.redb`), `routing` (subscriptions and deliveries through the
//! router), [`topic`] (filters, tags), `publisher` (the agent's own publishes),
//! [`refusals`] and [`metrics`].
//!
//! docs/agent.md has the alternatives this replaced and why.

mod codec;
pub mod config;
mod conn;
mod connect;
mod listen;
pub mod metrics;
pub mod protocol;
mod publisher;
pub mod refusals;
mod rights;
mod routing;
pub mod session;
mod sessions;
mod start;
pub mod topic;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::LinkTx;

use crate::ingest::Ingest;
use crate::router::MakeLink;
use refusals::FrontMetrics;
use routing::{is_local_exact, watch_front_link, LocalTopics, SessionLink};
use session::{Dropped, Session, Store};

pub use codec::decode_any;
pub use listen::{GatewayDoor, GatewayTls, Guard};
pub use metrics::Metrics;
pub use publisher::Publisher;
pub use rights::{Anonymous, GatewayLogin, Rights};
pub use routing::LOCAL_PREFIX;
pub use sessions::persist_loop;
pub use start::{start, Front, FrontConfig, SiteListener, StartMetrics};

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

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dropped(&self, why: Dropped) {
        self.metrics
            .dropped
            .get_or_create(&crate::labels::Reason {
                reason: why.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rumqttd::protocol::{Packet, Publish, PublishProperties};
    use rumqttd::Notification;

    use super::topic::Tag;
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
