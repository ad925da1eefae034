//! The site cluster at run time: the election ([`fogline_cluster::Node`]) driven by a
//! monotonic tick and by messages exchanged over the peers' embedded brokers, replication
//! of this agent's log to its peers, the replicas it keeps of theirs, and the leader's
//! uplinks for every origin of the site.
//!
//! | topic (on the receiving agent's broker) | from | payload |
//! |---|---|---|
//! | `fogline/cluster/<site>/<to>` | any member, QoS 0 | election message, JSON ([`Wire`]) |
//! | `fogline/repl/<site>/<origin>/log`, `/sync`, `/agg/…` | the origin, QoS 1 | as the uplink ([`proto`]) |
//! | `fogline/repl/<site>/<origin>/ack` | the receiver, retained | `{"next":N}`: its replica is complete below N |
//! | `fogline/repl/<site>/<origin>/gwack` | the leader, QoS 1 | `{"next":N}`: the gateway has `origin` below N |
//!
//! Every agent connects one MQTT client to each peer for election messages and one per
//! replication target; nothing flows on a link the agent did not open itself, so cutting
//! a link cuts both directions of what it carries.

pub mod config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fogline_cluster::{Driver, DriverError, HardState, Message, MessageKind, Node, Role};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::buffer::BufferConfig;
use crate::buffer::Log;
use crate::mqtt::Publisher;
use crate::router::{self, LinkRx, LinkTx, Worker};
use crate::shipping::proto;
use crate::shipping::receiver::{self, AggOut, Counters, Hooks, Receiver};
use crate::shipping::store::{Store, StoreReader};
use crate::uplink::UplinkConfig;
use crate::uplink::{self, Shared, Source, Uplink};
pub use config::{AckAfter, ClusterConfig, Peer};

/// The number the election state machine knows a node by: FNV-1a of its id.
pub fn node_num(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The topic a member receives election messages on.
pub fn cluster_topic(site: &str, to: &str) -> String {
    format!("fogline/cluster/{site}/{to}")
}

/// An election message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub from: String,
    pub to: String,
    pub term: u64,
    #[serde(flatten)]
    pub kind: WireKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireKind {
    PreVote,
    PreVoteResponse { granted: bool },
    Vote,
    VoteResponse { granted: bool },
    Heartbeat { round: u64 },
    HeartbeatResponse { round: u64 },
}

impl From<MessageKind> for WireKind {
    fn from(k: MessageKind) -> Self {
        match k {
            MessageKind::PreVote => WireKind::PreVote,
            MessageKind::PreVoteResponse { granted } => WireKind::PreVoteResponse { granted },
            MessageKind::Vote => WireKind::Vote,
            MessageKind::VoteResponse { granted } => WireKind::VoteResponse { granted },
            MessageKind::Heartbeat { round } => WireKind::Heartbeat { round },
            MessageKind::HeartbeatResponse { round } => WireKind::HeartbeatResponse { round },
        }
    }
}

impl From<WireKind> for MessageKind {
    fn from(k: WireKind) -> Self {
        match k {
            WireKind::PreVote => MessageKind::PreVote,
            WireKind::PreVoteResponse { granted } => MessageKind::PreVoteResponse { granted },
            WireKind::Vote => MessageKind::Vote,
            WireKind::VoteResponse { granted } => MessageKind::VoteResponse { granted },
            WireKind::Heartbeat { round } => MessageKind::Heartbeat { round },
            WireKind::HeartbeatResponse { round } => MessageKind::HeartbeatResponse { round },
        }
    }
}

/// The election's durable state, in a small file replaced atomically. Votes are kept by
/// node id (`ids` maps the state machine's numbers to them).
struct StateFile {
    path: PathBuf,
    ids: HashMap<u64, String>,
}

impl fogline_cluster::Storage for StateFile {
    type Error = anyhow::Error;

    fn load(&self) -> anyhow::Result<HardState> {
        StateFile::load(self, &self.ids)
    }

    fn save(&mut self, state: &HardState) -> anyhow::Result<()> {
        StateFile::save(self, state, &self.ids)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[derive(Serialize, Deserialize)]
struct StoredState {
    term: u64,
    voted_for: Option<String>,
}

impl StateFile {
    fn load(&self, ids: &HashMap<u64, String>) -> anyhow::Result<HardState> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HardState::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let s: StoredState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid election state", self.path.display()))?;
        let voted_for = s.voted_for.map(|id| node_num(&id));
        if let Some(v) = voted_for {
            if !ids.contains_key(&v) {
                tracing::warn!("voted for a node no longer in the site; keeping the vote");
            }
        }
        Ok(HardState {
            term: s.term,
            voted_for,
        })
    }

    /// Writes a temporary file, syncs it, renames it over the old one, syncs the directory.
    fn save(&self, hs: &HardState, ids: &HashMap<u64, String>) -> std::io::Result<()> {
        use std::io::Write;
        let state = StoredState {
            term: hs.term,
            voted_for: hs
                .voted_for
                .map(|v| ids.get(&v).cloned().unwrap_or_default()),
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(&state).unwrap_or_default().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// One peer as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub id: String,
    pub addr: String,
    /// Whether this agent currently replicates its log there.
    pub replica_target: bool,
    /// The peer holds this agent's log below this offset.
    pub acked: u64,
    pub lag: u64,
    pub link: &'static str,
}

/// The site as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SiteStatus {
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<String>,
    /// Whether this agent holds the lease (and with it the uplink).
    pub lease: bool,
    pub peers: Vec<PeerStatus>,
    /// Replicas of other origins held here: (origin, next offset, gateway acked).
    pub replicas: Vec<ReplicaStatus>,
    /// This agent's log is durable on `min_insync` agents below this offset.
    pub insync: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub origin: String,
    pub next: u64,
    pub gateway_acked: u64,
    pub uplink: Option<uplink::UplinkStatus>,
}

/// What the rest of the agent uses of the site.
pub struct SiteHandle {
    pub status: Arc<Mutex<SiteStatus>>,
    /// Replication to peers: aggregates are offered to these too.
    pub replicators: Vec<Arc<Shared>>,
    /// True while this agent is the leader and holds its lease.
    pub lease: watch::Receiver<bool>,
    min_insync: usize,
    tasks: Vec<JoinHandle<()>>,
    uplinks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    workers: Vec<Worker>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl SiteHandle {
    /// This agent's log below the returned offset is durable on `min_insync` agents
    /// (itself included), given that it has committed everything below `head`.
    pub fn insync(&self, head: u64) -> u64 {
        insync_offset(
            head,
            self.replicators
                .iter()
                .map(|s| s.acked.load(Ordering::SeqCst)),
            self.min_insync,
        )
    }

    /// For the writer's replicated-ack gate: given the local head, the offset below which
    /// this agent's log is durable on `min_insync` agents.
    pub fn insync_gauge(&self) -> Box<dyn Fn(u64) -> u64 + Send> {
        let replicators = self.replicators.clone();
        let min_insync = self.min_insync;
        Box::new(move |head| {
            insync_offset(
                head,
                replicators.iter().map(|r| r.acked.load(Ordering::SeqCst)),
                min_insync,
            )
        })
    }

    /// Stops every task and thread of the site; call after the shutdown signal was sent.
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let uplinks: Vec<JoinHandle<()>> = self
            .uplinks
            .lock()
            .map(|mut u| u.drain(..).collect())
            .unwrap_or_default();
        for t in uplinks {
            let _ = t.await;
        }
        let mut workers = std::mem::take(&mut self.workers);
        let writer = self.writer.take();
        let _ = tokio::task::spawn_blocking(move || {
            for w in &mut workers {
                w.stop();
            }
            if let Some(w) = writer {
                if w.join().is_err() {
                    tracing::error!("the replica writer panicked");
                }
            }
        })
        .await;
    }
}

/// The `min_insync`-th highest of the origin's head and its peers' acks.
pub fn insync_offset(head: u64, acks: impl Iterator<Item = u64>, min_insync: usize) -> u64 {
    let mut copies: Vec<u64> = acks.map(|a| a.min(head)).collect();
    copies.push(head);
    copies.sort_unstable_by(|a, b| b.cmp(a));
    copies.get(min_insync.max(1) - 1).copied().unwrap_or(0)
}

/// The replica targets of `me`'s log: its `rf - 1` successors in id order (every peer
/// when `rf` is 0), plus the leader, which forwards every log.
pub fn replica_targets(me: &str, peers: &[Peer], rf: usize, leader: Option<&str>) -> Vec<String> {
    let mut members: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
    members.push(me);
    members.sort_unstable();
    let mut out: Vec<String> = if rf == 0 {
        peers.iter().map(|p| p.id.clone()).collect()
    } else {
        let at = members.iter().position(|m| *m == me).unwrap_or(0);
        (1..rf.min(members.len()))
            .map(|i| members[(at + i) % members.len()].to_owned())
            .collect()
    };
    if let Some(l) = leader.filter(|l| *l != me && !out.iter().any(|o| o == l)) {
        out.push(l.to_owned());
    }
    out
}

/// Starts the leader's uplink of a replicated origin: (origin, its head, its status).
type SpawnUplink = Arc<dyn Fn(String, watch::Receiver<u64>, Arc<Shared>) + Send + Sync>;

/// Per origin replicated here: its head and, at the leader, its uplink.
struct ReplicaOrigin {
    head: watch::Sender<u64>,
    gateway: Arc<Shared>,
}

/// Links the replica store's writer to the rest of the site.
struct ReplicaHooks {
    site: String,
    own_origin: String,
    own_gateway: Arc<Shared>,
    origins: Arc<Mutex<HashMap<String, ReplicaOrigin>>>,
    spawn_uplink: SpawnUplink,
}

impl Hooks for ReplicaHooks {
    fn committed(&mut self, store: &Store) {
        let Ok(mut origins) = self.origins.lock() else {
            return;
        };
        for ((site, origin), state) in store.origins() {
            if *site != self.site || *origin == self.own_origin {
                continue;
            }
            match origins.get(origin) {
                Some(o) => {
                    o.head.send_if_modified(|h| {
                        let changed = *h < state.next;
                        *h = (*h).max(state.next);
                        changed
                    });
                }
                None => {
                    let (head, head_rx) = watch::channel(state.next);
                    let gateway = Arc::new(Shared::default());
                    (self.spawn_uplink)(origin.clone(), head_rx, gateway.clone());
                    origins.insert(origin.clone(), ReplicaOrigin { head, gateway });
                }
            }
        }
    }

    fn aggregate(&mut self, origin: &str, topic: &str, json: &str) {
        if let Ok(origins) = self.origins.lock() {
            if let Some(o) = origins.get(origin) {
                o.gateway.relay.offer(topic, json);
            }
        }
    }

    fn gateway_ack(&mut self, store: &mut Store, site: &str, origin: &str, next: u64) {
        if site != self.site {
            return;
        }
        if origin == self.own_origin {
            // The writer deletes its own log after the retention period.
            self.own_gateway.acked.fetch_max(next, Ordering::SeqCst);
            return;
        }
        if let Ok(origins) = self.origins.lock() {
            if let Some(o) = origins.get(origin) {
                o.gateway.acked.fetch_max(next, Ordering::SeqCst);
            }
        }
        match store.delete_below(site, origin, next) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(origin, readings = n, "deleted replicas the gateway has"),
            Err(e) => tracing::warn!(origin, "cannot delete replicas the gateway has: {e}"),
        }
    }
}

/// The replica source of one origin, for the leader's uplink.
struct ReplicaSource {
    reader: StoreReader,
    site: String,
    origin: String,
}

impl Source for ReplicaSource {
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<crate::buffer::StoredBlock>> {
        Ok(self
            .reader
            .blocks_from(&self.site, &self.origin, from, max_readings, head)?)
    }
}

/// What the site is told by the configuration.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub node_id: String,
    pub site: String,
    pub cluster: ClusterConfig,
    /// The uplink to the gateway (the leader's), and the shape of replication links.
    pub uplink: UplinkConfig,
    /// The replica store's place, cache and budget, and its downsampling window.
    pub buffer: BufferConfig,
}

/// Everything [`start`] needs from the agent.
pub struct SiteParts {
    pub config: SiteConfig,
    pub origin: String,
    pub log: Log,
    pub head: watch::Receiver<u64>,
    /// The own origin's gateway uplink status (its `acked` is also fed by the leader).
    pub own_gateway: Arc<Shared>,
    pub cluster_link: (LinkTx, LinkRx),
    pub repl_link: (LinkTx, LinkRx),
    pub repl_out: LinkTx,
    pub counters: Arc<Counters>,
    /// This node's TLS client identity (`[tls]`), for the uplinks to the gateway and the
    /// links to peers.
    pub gateway_tls: Option<Arc<rustls::ClientConfig>>,
    pub shutdown: crate::shutdown::Shutdown,
}

/// Starts the site: replica store and its writer, replication to peers, the election,
/// and (at the leader, with a gateway configured) the uplinks of the peers' origins.
pub fn start(parts: SiteParts) -> anyhow::Result<SiteHandle> {
    let SiteParts {
        config,
        origin,
        log,
        head,
        own_gateway,
        cluster_link,
        repl_link,
        repl_out,
        counters,
        gateway_tls,
        shutdown,
    } = parts;
    let site = config.site.clone();
    let me = config.node_id.clone();
    let peers = config.cluster.peers().map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Handle::current();
    let peer_tls = gateway_tls.clone();

    // Replicas of the peers' logs.
    let store = Store::open(
        &replica_path(&config.buffer.data_dir),
        config.buffer.cache_bytes,
    )
    .context("opening the replica store")?;
    let reader = store.reader();
    let origins: Arc<Mutex<HashMap<String, ReplicaOrigin>>> = Arc::default();
    let uplinks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let (lease_tx, lease_rx) = watch::channel(false);
    let spawn_uplink: SpawnUplink = {
        let config = config.clone();
        let site = site.clone();
        let uplinks = uplinks.clone();
        let lease_rx = lease_rx.clone();
        let shutdown = shutdown.clone();
        let rt = rt.clone();
        Arc::new(
            move |origin: String, head: watch::Receiver<u64>, shared: Arc<Shared>| {
                if config.uplink.gateway.is_empty() {
                    return;
                }
                let up = Uplink {
                    config: config.uplink.clone(),
                    destination: config.uplink.gateway.clone(),
                    scheme: proto::UPLINK,
                    site: site.clone(),
                    origin: origin.clone(),
                    source: Arc::new(ReplicaSource {
                        reader: reader.clone(),
                        site: site.clone(),
                        origin,
                    }),
                    head,
                    shared,
                    active: Some(lease_rx.clone()),
                    tls: gateway_tls.clone(),
                    // The gateway may hold more of a peer's log than this replica.
                    own_log: false,
                };
                let task = rt.spawn(up.run(shutdown.clone()));
                if let Ok(mut u) = uplinks.lock() {
                    u.push(task);
                }
            },
        )
    };
    // Batches from every peer, at most 16 of the largest a peer may send.
    let (queue_tx, queue_rx) = receiver::queue(1024, 16 * config.cluster.max_batch_bytes);
    let repl_reader =
        receiver::spawn_reader("repl-in", repl_link, queue_tx.clone(), counters.clone())
            .context("starting the replica receiver")?;
    let writer = Receiver {
        store,
        publisher: Publisher::new(repl_out),
        scheme: proto::REPLICATION,
        counters,
        agg_out: AggOut::Local,
        batch_max: 256,
        batch_delay: Duration::from_millis(config.buffer.batch_max_delay_ms),
        // Each peer's log gets as much room here as the peer gives it itself.
        budget: Some(config.buffer.max_bytes),
        downsample_window_secs: config.buffer.downsample_window_secs,
        max_batch_bytes: Some(config.cluster.max_batch_bytes),
        hooks: ReplicaHooks {
            site: site.clone(),
            own_origin: origin.clone(),
            own_gateway: own_gateway.clone(),
            origins: origins.clone(),
            spawn_uplink,
        },
    };
    let writer = std::thread::Builder::new()
        .name("replica-writer".into())
        .spawn(move || writer.run(queue_rx))
        .context("starting the replica writer")?;

    // Replication of our log: one uplink per peer, active while the peer is a target.
    let mut tasks = Vec::new();
    let mut replicators = Vec::new();
    let mut targets_tx = HashMap::new();
    // Peers are near: retry them sooner than a gateway across the internet.
    let mut repl_config = config.uplink.clone();
    repl_config.backoff_max_ms = repl_config.backoff_max_ms.min(5_000);
    for peer in &peers {
        let shared = Arc::new(Shared::default());
        let (active_tx, active_rx) = watch::channel(config.cluster.replication_factor == 0);
        targets_tx.insert(peer.id.clone(), active_tx);
        let up = Uplink {
            config: repl_config.clone(),
            destination: peer.addr.clone(),
            scheme: proto::REPLICATION,
            site: site.clone(),
            origin: origin.clone(),
            source: Arc::new(log.clone()),
            head: head.clone(),
            shared: shared.clone(),
            active: Some(active_rx),
            tls: peer_tls.clone(),
            own_log: true,
        };
        tasks.push(tokio::spawn(up.run(shutdown.clone())));
        replicators.push(shared);
    }

    // The election.
    let (msg_tx, msg_rx) = mpsc::channel::<Wire>(1024);
    let cluster_reader = {
        let (tx, rx) = cluster_link;
        Worker::spawn("cluster-in", move |stop| {
            let _keep = tx;
            router::receive(rx, stop, |p| {
                match serde_json::from_slice::<Wire>(&p.payload) {
                    Ok(w) => {
                        let _ = msg_tx.try_send(w);
                    }
                    Err(e) => tracing::warn!("malformed election message: {e}"),
                }
                true
            });
        })
        .context("starting the election receiver")?
    };
    let status = Arc::new(Mutex::new(SiteStatus::default()));
    let election = Election {
        me: me.clone(),
        site: site.clone(),
        origin: origin.clone(),
        peers: peers.clone(),
        rf: config.cluster.replication_factor,
        tick: Duration::from_millis(config.cluster.tick_ms),
        cfg: fogline_cluster::Config {
            id: node_num(&me),
            peers: peers.iter().map(|p| node_num(&p.id)).collect(),
            election_timeout_min: config.cluster.election_timeout_min_ticks,
            election_timeout_max: config.cluster.election_timeout_max_ticks,
            heartbeat_interval: config.cluster.heartbeat_ticks,
            lease: config.cluster.lease_ticks,
            check_quorum: true,
            pre_vote: true,
        },
        state_path: config.buffer.data_dir.join("election.json"),
        lease: lease_tx,
        targets: targets_tx,
        replicators: peers
            .iter()
            .map(|p| p.id.clone())
            .zip(replicators.clone())
            .collect(),
        own_gateway,
        origins,
        status: status.clone(),
        head,
        min_insync: config.cluster.min_insync,
        gateway_acks_to: queue_tx,
        tls: peer_tls,
    };
    tasks.push(tokio::spawn(election.run(msg_rx, shutdown)));
    Ok(SiteHandle {
        status,
        replicators,
        lease: lease_rx,
        min_insync: config.cluster.min_insync,
        tasks,
        uplinks,
        workers: vec![repl_reader, cluster_reader],
        writer: Some(writer),
    })
}

/// Where the replicas live.
pub fn replica_path(data_dir: &Path) -> PathBuf {
    data_dir.join("replicas.redb")
}

struct Election {
    me: String,
    site: String,
    origin: String,
    peers: Vec<Peer>,
    rf: usize,
    tick: Duration,
    cfg: fogline_cluster::Config,
    /// `election.json`: the term and vote ([`StateFile`]).
    state_path: PathBuf,
    lease: watch::Sender<bool>,
    targets: HashMap<String, watch::Sender<bool>>,
    replicators: Vec<(String, Arc<Shared>)>,
    own_gateway: Arc<Shared>,
    origins: Arc<Mutex<HashMap<String, ReplicaOrigin>>>,
    status: Arc<Mutex<SiteStatus>>,
    head: watch::Receiver<u64>,
    min_insync: usize,
    /// The local replica writer's queue: the leader tells itself the gateway's acks too.
    gateway_acks_to: receiver::QueueTx,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A client to one peer's broker, for election messages and the gateway's acks.
struct PeerLink {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl PeerLink {
    fn open(
        me: &str,
        site: &str,
        peer: &Peer,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Option<PeerLink> {
        let addr: crate::addr::HostPort = peer.addr.parse().ok()?;
        let mut options =
            MqttOptions::new(format!("fogline-peer-{site}-{me}"), addr.host, addr.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true);
        if let Some(tls) = tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(2);
        eventloop.set_network_options(net);
        let task = tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Some(PeerLink { client, task })
    }
}

impl Election {
    async fn run(self, mut inbox: mpsc::Receiver<Wire>, mut shutdown: crate::shutdown::Shutdown) {
        let mut ids: HashMap<u64, String> = self
            .peers
            .iter()
            .map(|p| (node_num(&p.id), p.id.clone()))
            .collect();
        ids.insert(node_num(&self.me), self.me.clone());
        let storage = StateFile {
            path: self.state_path.clone(),
            ids: ids.clone(),
        };
        let mut node = match Driver::new(self.cfg.clone(), storage, fastrand::u64(..)) {
            Ok(n) => n,
            Err(DriverError::Storage(e)) => {
                tracing::error!("{e:#}; this agent will not take part in elections");
                return;
            }
            Err(DriverError::Config(e)) => {
                tracing::error!("cluster config: {e}; this agent will not take part in elections");
                return;
            }
        };
        let links: HashMap<u64, PeerLink> = self
            .peers
            .iter()
            .filter_map(|p| {
                Some((
                    node_num(&p.id),
                    PeerLink::open(&self.me, &self.site, p, self.tls.as_ref())?,
                ))
            })
            .collect();
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_role = Role::Follower;
        let mut last_leader = None;
        let mut announced: HashMap<String, u64> = HashMap::new();
        let mut ticks: u64 = 0;
        let mut save_failed_logged = false;
        loop {
            tokio::select! {
                _ = tick.tick() => { node.tick(); ticks += 1; }
                Some(w) = inbox.recv() => {
                    if w.to != self.me {
                        tracing::warn!(to = %w.to, "election message for another agent");
                    } else if !ids.contains_key(&node_num(&w.from)) {
                        tracing::warn!(from = %w.from, "election message from an unknown agent refused");
                    } else {
                        let m = Message { from: node_num(&w.from), to: node_num(&w.to), term: w.term, kind: w.kind.into() };
                        if let Err(e) = node.step(m) {
                            tracing::warn!("election message refused: {e}");
                        }
                    }
                }
                () = shutdown.fired() => break,
            }
            match node.ready() {
                Ok(messages) => {
                    for m in &messages {
                        let (Some(link), Some(to)) = (links.get(&m.to), ids.get(&m.to)) else {
                            continue;
                        };
                        let wire = Wire {
                            from: self.me.clone(),
                            to: to.clone(),
                            term: m.term,
                            kind: m.kind.into(),
                        };
                        if let Ok(payload) = serde_json::to_vec(&wire) {
                            let _ = link.client.try_publish(
                                cluster_topic(&self.site, to),
                                QoS::AtMostOnce,
                                false,
                                payload,
                            );
                        }
                    }
                }
                Err(e) => {
                    // Nothing goes out, and the agent does not lead, until it is saved.
                    if !save_failed_logged {
                        tracing::error!(
                            "cannot save the election state: {e:#}; not voting or leading \
                             until it can be saved"
                        );
                        save_failed_logged = true;
                    }
                }
            }
            if !node.unsaved() && save_failed_logged {
                tracing::info!("the election state is saved again");
                save_failed_logged = false;
            }
            let leading = node.leading();
            self.lease
                .send_if_modified(|l| std::mem::replace(l, leading) != leading);
            let state = node.node();
            let leader = state.leader().and_then(|l| ids.get(&l).cloned());
            if state.role() != last_role || leader != last_leader {
                tracing::info!(role = %state.role(), term = state.term(), leader = ?leader, "site role");
                last_role = state.role();
                last_leader = leader.clone();
            }
            if self.rf != 0 {
                let targets = replica_targets(&self.me, &self.peers, self.rf, leader.as_deref());
                for (id, tx) in &self.targets {
                    let on = targets.contains(id);
                    tx.send_if_modified(|a| std::mem::replace(a, on) != on);
                }
            }
            if leading {
                self.announce_gateway_acks(&links, &mut announced, ticks % 50 == 0);
            }
            self.refresh_status(node.node(), leader, leading);
        }
        self.lease.send_replace(false);
        for (_, link) in links {
            link.task.abort();
        }
    }

    /// The leader tells every member (itself included) how far the gateway has each log.
    fn announce_gateway_acks(
        &self,
        links: &HashMap<u64, PeerLink>,
        announced: &mut HashMap<String, u64>,
        again: bool,
    ) {
        let mut acks = vec![(
            self.origin.clone(),
            self.own_gateway.acked.load(Ordering::SeqCst),
        )];
        if let Ok(origins) = self.origins.lock() {
            acks.extend(
                origins
                    .iter()
                    .map(|(o, r)| (o.clone(), r.gateway.acked.load(Ordering::SeqCst))),
            );
        }
        for (origin, next) in acks {
            if next == 0 || (!again && announced.get(&origin) == Some(&next)) {
                continue;
            }
            announced.insert(origin.clone(), next);
            let topic = proto::REPLICATION.gateway_ack_topic(&self.site, &origin);
            let payload = proto::UplinkAck { next }.encode();
            for link in links.values() {
                let _ = link.client.try_publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                );
            }
            let _ = self.gateway_acks_to.try_send(receiver::Message {
                topic,
                payload: payload.into_bytes(),
            });
        }
    }

    fn refresh_status(&self, node: &Node, leader: Option<String>, lease: bool) {
        let head = *self.head.borrow();
        let peers: Vec<PeerStatus> = self
            .peers
            .iter()
            .zip(&self.replicators)
            .map(|(p, (_, shared))| {
                let s = shared.snapshot();
                let acked = shared.acked.load(Ordering::SeqCst);
                PeerStatus {
                    id: p.id.clone(),
                    addr: p.addr.clone(),
                    replica_target: self.targets.get(&p.id).is_some_and(|t| *t.borrow()),
                    acked,
                    lag: head.saturating_sub(acked),
                    link: s.link,
                }
            })
            .collect();
        let replicas = self.origins.lock().map_or_else(
            |_| Vec::new(),
            |o| {
                let mut v: Vec<ReplicaStatus> = o
                    .iter()
                    .map(|(origin, r)| ReplicaStatus {
                        origin: origin.clone(),
                        next: *r.head.borrow(),
                        gateway_acked: r.gateway.acked.load(Ordering::SeqCst),
                        uplink: lease.then(|| r.gateway.snapshot()),
                    })
                    .collect();
                v.sort_by(|a, b| a.origin.cmp(&b.origin));
                v
            },
        );
        let insync = insync_offset(
            head,
            self.replicators
                .iter()
                .map(|(_, s)| s.acked.load(Ordering::SeqCst)),
            self.min_insync,
        );
        if let Ok(mut s) = self.status.lock() {
            *s = SiteStatus {
                role: node.role().as_str(),
                term: node.term(),
                leader,
                lease,
                peers,
                replicas,
                insync,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(ids: &[&str]) -> Vec<Peer> {
        ids.iter()
            .map(|id| Peer {
                id: (*id).to_owned(),
                addr: "127.0.0.1:1".into(),
            })
            .collect()
    }

    #[test]
    fn insync_is_the_kth_highest_copy() {
        assert_eq!(insync_offset(100, [40, 70].into_iter(), 1), 100);
        assert_eq!(insync_offset(100, [40, 70].into_iter(), 2), 70);
        assert_eq!(insync_offset(100, [40, 70].into_iter(), 3), 40);
        assert_eq!(insync_offset(100, [40, 70].into_iter(), 4), 0);
        // A peer cannot hold more than the origin wrote.
        assert_eq!(insync_offset(50, [90].into_iter(), 2), 50);
    }

    #[test]
    fn replica_targets_follow_the_ring_and_include_the_leader() {
        let p = peers(&["b", "c", "d"]);
        assert_eq!(replica_targets("a", &p, 0, None), vec!["b", "c", "d"]);
        assert_eq!(replica_targets("a", &p, 2, None), vec!["b"]);
        assert_eq!(
            replica_targets("c", &peers(&["a", "b", "d"]), 3, None),
            vec!["d", "a"]
        );
        assert_eq!(replica_targets("a", &p, 2, Some("d")), vec!["b", "d"]);
        assert_eq!(replica_targets("a", &p, 2, Some("a")), vec!["b"]);
        assert_eq!(replica_targets("a", &p, 1, Some("c")), vec!["c"]);
    }

    #[test]
    fn election_messages_round_trip_as_json() {
        let w = Wire {
            from: "a".into(),
            to: "b".into(),
            term: 3,
            kind: WireKind::VoteResponse { granted: true },
        };
        let json = serde_json::to_string(&w).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"from":"a","to":"b","term":3,"kind":"vote_response","granted":true}"#
        );
        assert_eq!(serde_json::from_str::<Wire>(&json).ok(), Some(w));
        for k in [
            MessageKind::PreVote,
            MessageKind::Heartbeat { round: 9 },
            MessageKind::HeartbeatResponse { round: 9 },
            MessageKind::PreVoteResponse { granted: false },
        ] {
            assert_eq!(MessageKind::from(WireKind::from(k)), k);
        }
    }

    #[test]
    fn election_state_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile {
            path: dir.path().join("election.json"),
            ids: HashMap::new(),
        };
        let ids: HashMap<u64, String> = [(node_num("b"), "b".to_owned())].into();
        assert_eq!(f.load(&ids).expect("load"), HardState::default());
        let hs = HardState {
            term: 7,
            voted_for: Some(node_num("b")),
        };
        f.save(&hs, &ids).expect("save");
        assert_eq!(f.load(&ids).expect("load"), hs);
        std::fs::write(&f.path, "garbage").expect("write");
        assert!(
            f.load(&ids).is_err(),
            "a corrupt state file is an error, not a fresh vote"
        );
    }
}
