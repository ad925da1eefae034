//! The receiving end of log shipping, shared by the gateway (uplinks from site leaders)
//! and by every site agent (replicas pushed by its peers).
//!
//! A link of the embedded broker feeds publishes of one [`Scheme`] into a queue; the
//! writer thread ([`Receiver::run`]) applies batches to a [`Store`] with one fsync per
//! group, then publishes each touched origin's watermark back, retained, as the sender's
//! durable ack. Relayed aggregates are republished retained and kept in the store so they
//! are served again after a restart.

use std::sync::mpsc::{Receiver as QueueRx, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::broker::{self, BrokerError, Publisher, Worker};
use crate::logstore::{Applied, Store, Txn};
use crate::uplink::proto::{self, Scheme, Topic};

/// One publish on the scheme's topics.
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// What a receiver counts.
#[derive(Default)]
pub struct Counters {
    batches: Family<ResultLabel, Counter>,
    readings_stored: Counter,
    commits: Counter,
    commit_failures: Counter,
    aggregates_relayed: Counter,
    rejected: Counter,
    dropped: Counter,
    origins: Gauge,
    stored_total: Gauge,
}

impl Counters {
    /// Registers every counter in `registry` (give it the program's prefix).
    pub fn register(&self, registry: &mut Registry) {
        for result in ["stored", "duplicate", "gap", "malformed", "oversized"] {
            let _ = self.batches.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "batches",
            "Shipped batches by outcome",
            self.batches.clone(),
        );
        registry.register(
            "readings_stored",
            "Readings stored since start",
            self.readings_stored.clone(),
        );
        registry.register(
            "commits",
            "Durable commits (one fsync each)",
            self.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Commits that failed (nothing acked; senders re-send)",
            self.commit_failures.clone(),
        );
        registry.register(
            "aggregates_relayed",
            "Relayed aggregates republished",
            self.aggregates_relayed.clone(),
        );
        registry.register(
            "rejected",
            "Publishes with a bad topic or frame",
            self.rejected.clone(),
        );
        registry.register(
            "dropped",
            "Readings dropped to keep an origin within its budget (replicas only)",
            self.dropped.clone(),
        );
        registry.register("origins", "(site, origin) logs known", self.origins.clone());
        registry.register(
            "readings",
            "Readings held in the store",
            self.stored_total.clone(),
        );
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }
}

/// Where relayed aggregates are republished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggOut {
    /// `agg/<site>/<device>/<metric>/<len>s`: the gateway, which serves every site.
    PerSite,
    /// `agg/<device>/<metric>/<len>s`: an agent, which serves its own site.
    Local,
}

/// What the embedding program does around the receiver's work.
pub trait Hooks: Send + 'static {
    /// After every successful commit (and once at start-up).
    fn committed(&mut self, _store: &Store) {}
    /// An aggregate relayed by `origin` was republished on `topic`.
    fn aggregate(&mut self, _origin: &str, _topic: &str, _json: &str) {}
    /// The site leader passed on the gateway's ack of `origin` (replication only).
    fn gateway_ack(&mut self, _store: &mut Store, _site: &str, _origin: &str, _next: u64) {}
}

/// The writer: applies queued publishes to the store.
pub struct Receiver<H: Hooks> {
    pub store: Store,
    pub publisher: Publisher,
    pub scheme: Scheme,
    pub counters: std::sync::Arc<Counters>,
    pub agg_out: AggOut,
    pub batch_max: usize,
    pub batch_delay: Duration,
    /// Most bytes kept per origin (the oldest go first); `None`: no limit.
    pub budget: Option<u64>,
    /// Larger batches are refused and counted (`result="oversized"`); `None`: no limit.
    pub max_batch_bytes: Option<usize>,
    pub hooks: H,
}

/// Starts a thread that moves publishes from a broker link into `queue`.
pub fn spawn_reader(
    name: &str,
    link: (broker::LinkTx, broker::LinkRx),
    queue: SyncSender<Message>,
    counters: std::sync::Arc<Counters>,
) -> Result<Worker, BrokerError> {
    let (tx, rx) = link;
    Worker::spawn(name, move |stop| {
        let _keep = tx;
        broker::receive(rx, stop, |p| {
            let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                counters.rejected();
                return true;
            };
            queue
                .send(Message {
                    topic,
                    payload: p.payload.to_vec(),
                })
                .is_ok()
        });
    })
    .map_err(|e| BrokerError::Config(format!("cannot start the {name} thread: {e}")))
}

impl<H: Hooks> Receiver<H> {
    /// Runs until every sender of `queue` is gone.
    pub fn run(mut self, queue: QueueRx<Message>) {
        // After a restart: serve the aggregates again and tell senders where we are.
        match self.store.aggregates() {
            Ok(aggs) => {
                for (topic, json) in aggs {
                    let _ = self.publisher.retained(topic, json);
                }
            }
            Err(e) => tracing::error!("cannot read stored aggregates: {e}"),
        }
        let known: Vec<(String, String)> = self.store.origins().keys().cloned().collect();
        for (site, origin) in &known {
            self.ack(site, origin);
        }
        self.refresh();
        loop {
            let first = match queue.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let deadline = Instant::now() + self.batch_delay;
            let mut batch = vec![first];
            while batch.len() < self.batch_max {
                let now = Instant::now();
                let next = match queue.try_recv() {
                    Ok(m) => Some(m),
                    Err(_) if now < deadline => queue.recv_timeout(deadline - now).ok(),
                    Err(_) => None,
                };
                match next {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            self.handle(batch);
        }
        tracing::info!(scheme = self.scheme.name(), "store closed cleanly");
    }

    fn handle(&mut self, batch: Vec<Message>) {
        let mut txn = Txn::default();
        let mut acks: Vec<(String, String)> = Vec::new();
        let mut aggs: Vec<(String, String, String)> = Vec::new();
        let mut gateway_acks: Vec<(String, String, u64)> = Vec::new();
        let mut stored = 0;
        for m in &batch {
            match self.scheme.parse_topic(&m.topic) {
                Some(Topic::Log { site, origin })
                    if self
                        .max_batch_bytes
                        .is_some_and(|max| m.payload.len() > max) =>
                {
                    self.counters
                        .batches
                        .get_or_create(&ResultLabel {
                            result: "oversized",
                        })
                        .inc();
                    tracing::warn!(
                        site,
                        origin,
                        bytes = m.payload.len(),
                        max = self.max_batch_bytes,
                        "batch refused: larger than the limit (cluster.max_batch_bytes)"
                    );
                }
                Some(Topic::Log { site, origin }) => {
                    let applied = match proto::decode_batch(&m.payload) {
                        Ok(frame) => self.store.apply(&mut txn, site, origin, &frame),
                        Err(_) => Applied::Malformed,
                    };
                    self.counters
                        .batches
                        .get_or_create(&ResultLabel {
                            result: applied.label(),
                        })
                        .inc();
                    match applied {
                        Applied::Stored(n) => stored += n,
                        Applied::Malformed => {
                            tracing::warn!(site, origin, "malformed batch")
                        }
                        Applied::Gap => {
                            tracing::debug!(site, origin, "batch past the watermark")
                        }
                        Applied::Duplicate => {}
                    }
                    push_unique(&mut acks, site, origin);
                }
                Some(Topic::Sync { site, origin }) => push_unique(&mut acks, site, origin),
                Some(Topic::Agg { site, origin, rest }) => {
                    let Ok(json) = String::from_utf8(m.payload.clone()) else {
                        self.counters.rejected();
                        continue;
                    };
                    let topic = match self.agg_out {
                        AggOut::PerSite => format!("agg/{site}/{rest}"),
                        AggOut::Local => format!("agg/{rest}"),
                    };
                    Store::put_aggregate(&mut txn, topic.clone(), json.clone());
                    aggs.push((origin.to_owned(), topic, json));
                }
                Some(Topic::GatewayAck { site, origin }) => {
                    match serde_json::from_slice::<proto::UplinkAck>(&m.payload) {
                        Ok(ack) => {
                            gateway_acks.push((site.to_owned(), origin.to_owned(), ack.next))
                        }
                        Err(_) => self.counters.rejected(),
                    }
                }
                // Our own acks come back on the filter: nothing to do.
                Some(Topic::Ack { .. }) => {}
                None => self.counters.rejected(),
            }
        }
        match self.store.commit(txn) {
            Ok(()) => {
                self.counters.commits.inc();
                self.counters.readings_stored.inc_by(stored);
            }
            Err(e) => {
                self.counters.commit_failures.inc();
                tracing::error!("store commit failed; nothing acked, senders will re-send: {e}");
                return;
            }
        }
        for (site, origin) in &acks {
            self.ack(site, origin);
        }
        for (origin, topic, json) in aggs {
            self.hooks.aggregate(&origin, &topic, &json);
            if self.publisher.retained(topic, json).is_ok() {
                self.counters.aggregates_relayed.inc();
            }
        }
        for (site, origin, next) in gateway_acks {
            self.hooks
                .gateway_ack(&mut self.store, &site, &origin, next);
        }
        self.refresh();
    }

    fn ack(&mut self, site: &str, origin: &str) {
        let next = self.store.next(&Txn::default(), site, origin);
        let payload = serde_json::json!({ "next": next }).to_string();
        if let Err(e) = self
            .publisher
            .retained(self.scheme.ack_topic(site, origin), payload)
        {
            tracing::warn!(site, origin, "cannot publish the ack: {e}");
        }
    }

    fn refresh(&mut self) {
        let origins = self.store.origins();
        self.counters
            .origins
            .set(i64::try_from(origins.len()).unwrap_or(i64::MAX));
        let total: u64 = origins.values().map(|s| s.stored).sum();
        self.counters
            .stored_total
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        self.hooks.committed(&self.store);
    }
}

fn push_unique(v: &mut Vec<(String, String)>, site: &str, origin: &str) {
    if !v.iter().any(|(s, o)| s == site && o == origin) {
        v.push((site.to_owned(), origin.to_owned()));
    }
}
