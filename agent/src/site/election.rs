//! The election at run time: a [`fogline_cluster::Driver`] ticked by a monotonic clock,
//! its messages over one MQTT link per peer, the lease and the replica targets it
//! decides, and the leader's announcement of the gateway's acks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogline_cluster::{insync_offset, replica_targets, Driver, DriverError, Message, Node, Role};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::shipping::proto;
use crate::shipping::receiver;
use crate::uplink::Shared;

use super::{
    cluster_topic, node_num, Peer, PeerStatus, ReplicaOrigin, ReplicaStatus, SiteStatus, StateFile,
    Wire,
};

pub(super) struct Election {
    pub(super) me: String,
    pub(super) site: String,
    pub(super) origin: String,
    pub(super) peers: Vec<Peer>,
    pub(super) rf: usize,
    pub(super) tick: Duration,
    pub(super) cfg: fogline_cluster::Config,
    /// `election.json`: the term and vote ([`StateFile`]).
    pub(super) state_path: PathBuf,
    pub(super) lease: watch::Sender<bool>,
    pub(super) targets: HashMap<String, watch::Sender<bool>>,
    pub(super) replicators: Vec<(String, Arc<Shared>)>,
    pub(super) own_gateway: Arc<Shared>,
    pub(super) origins: Arc<Mutex<HashMap<String, ReplicaOrigin>>>,
    pub(super) status: Arc<Mutex<SiteStatus>>,
    pub(super) head: watch::Receiver<u64>,
    pub(super) min_insync: usize,
    /// The local replica writer's queue: the leader tells itself the gateway's acks too.
    pub(super) gateway_acks_to: receiver::QueueTx,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A client to one peer's broker, for election messages and the gateway's acks.
pub(super) struct PeerLink {
    pub(super) client: AsyncClient,
    pub(super) task: JoinHandle<()>,
}

impl PeerLink {
    pub(super) fn open(
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
    pub(super) async fn run(
        self,
        mut inbox: mpsc::Receiver<Wire>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
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
                let peer_ids: Vec<String> = self.peers.iter().map(|p| p.id.clone()).collect();
                let targets = replica_targets(&self.me, &peer_ids, self.rf, leader.as_ref());
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
    pub(super) fn announce_gateway_acks(
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

    pub(super) fn refresh_status(&self, node: &Node, leader: Option<String>, lease: bool) {
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
