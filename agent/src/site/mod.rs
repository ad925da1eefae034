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
mod election;
mod replicas;
mod state_file;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fogline_cluster::insync_offset;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::buffer::{BufferConfig, Log};
use crate::mqtt::Publisher;
use crate::router::{self, LinkRx, LinkTx, Worker};
use crate::shipping::proto;
use crate::shipping::receiver::{self, AggOut, Counters, Receiver};
use crate::shipping::store::Store;
use crate::uplink::{self, Shared, Uplink, UplinkConfig};
use election::Election;
use replicas::{ReplicaHooks, ReplicaOrigin, ReplicaSource, SpawnUplink};
use state_file::StateFile;

pub use config::{AckAfter, ClusterConfig, Peer};
pub use replicas::replica_path;
pub use wire::{cluster_topic, node_num, Wire, WireKind};

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
                    destinations: config.uplink.gateway.as_slice().to_vec(),
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
            destinations: vec![peer.addr.clone()],
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
