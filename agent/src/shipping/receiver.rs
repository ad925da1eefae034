//! The receiving end of log shipping, shared by the gateway (uplinks from site leaders)
//! and by every site agent (replicas pushed by its peers).
//!
//! A link of the embedded broker feeds publishes of one [`Scheme`] into a queue; the
//! writer thread ([`Receiver::run`]) applies batches to a [`Store`] with one fsync per
//! group, then publishes each touched origin's watermark back, retained, as the sender's
//! durable ack. Relayed aggregates are republished retained and kept in the store so they
//! are served again after a restart.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::buffer::block;
use crate::mqtt::Publisher;
use crate::router::{self, BrokerError, Worker};
use crate::shipping::proto::{self, Scheme, Topic};
use crate::shipping::store::{Applied, LogStore, Store};

pub use super::queue::{queue, Message, QueueRx, QueueTx};

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
    downsampled: Counter,
    origins: Gauge,
    stored_total: Gauge,
    /// When an implausible batch was last logged (at most one line a minute).
    implausible_logged: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Counters {
    /// Registers every counter in `registry` (give it the program's prefix).
    pub fn register(&self, registry: &mut Registry) {
        for result in [
            "stored",
            "duplicate",
            "gap",
            "malformed",
            "oversized",
            "implausible",
        ] {
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
        registry.register(
            "downsampled",
            "Readings folded into summaries to keep an origin within its budget (replicas \
             only); the summaries ship upstream in their place",
            self.downsampled.clone(),
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

    /// Logs an implausible batch (`result="implausible"`), at most once a minute.
    fn implausible(&self, site: &str, origin: &str) {
        let Ok(mut last) = self.implausible_logged.lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        tracing::warn!(
            site,
            origin,
            "refused a batch claiming offsets beyond 2^48, which no honest log reaches: \
             a forgery (counted as fogline_*_batches_total{{result=\"implausible\"}})"
        );
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
pub trait Hooks<S: LogStore = Store>: Send + 'static {
    /// After every successful commit (and once at start-up).
    fn committed(&mut self, _store: &S) {}
    /// An aggregate relayed by `origin` was republished on `topic`.
    fn aggregate(&mut self, _origin: &str, _topic: &str, _json: &str) {}
    /// The site leader passed on the gateway's ack of `origin` (replication only).
    fn gateway_ack(&mut self, _store: &mut S, _site: &str, _origin: &str, _next: u64) {}
}

/// The writer: applies queued publishes to the store.
pub struct Receiver<S: LogStore, H: Hooks<S>> {
    pub store: S,
    pub publisher: Publisher,
    pub scheme: Scheme,
    pub counters: std::sync::Arc<Counters>,
    pub agg_out: AggOut,
    pub batch_max: usize,
    pub batch_delay: Duration,
    /// Most bytes kept per origin: above it the oldest are downsampled per
    /// `downsample_window_secs`, then dropped; `None`: no limit.
    pub budget: Option<u64>,
    pub downsample_window_secs: u32,
    /// Larger batches are refused and counted (`result="oversized"`); `None`: no limit.
    pub max_batch_bytes: Option<usize>,
    pub hooks: H,
}

/// Starts a thread that moves publishes from a broker link into `queue`.
pub fn spawn_reader(
    name: &str,
    link: (router::LinkTx, router::LinkRx),
    queue: QueueTx,
    counters: std::sync::Arc<Counters>,
) -> Result<Worker, BrokerError> {
    let (tx, rx) = link;
    Worker::spawn(name, move |stop| {
        let _keep = tx;
        router::receive(rx, stop, |p| {
            let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                counters.rejected();
                return true;
            };
            queue.send(Message {
                topic,
                payload: p.payload.to_vec(),
            })
        });
    })
    .map_err(|e| BrokerError::Config(format!("cannot start the {name} thread: {e}")))
}

impl<S: LogStore, H: Hooks<S>> Receiver<S, H> {
    /// Runs until every sender of `queue` is gone.
    pub fn run(mut self, mut queue: QueueRx) {
        if self.budget.is_some() {
            if let Err(e) = self.store.track_sizes() {
                tracing::error!("cannot measure the store; its budget is not kept: {e}");
                self.budget = None;
            }
        }
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
            let first = match queue.recv(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let batch = crate::batch::collect(first, self.batch_max, self.batch_delay, &mut queue);
            let bytes: usize = batch.iter().map(|m| m.payload.len()).sum();
            self.handle(batch);
            queue.handled(bytes);
        }
        tracing::info!(scheme = self.scheme.name(), "store closed cleanly");
    }

    fn handle(&mut self, batch: Vec<Message>) {
        let mut txn = S::Txn::default();
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
                        Ok(frame) => {
                            let applied = self.store.apply(&mut txn, site, origin, &frame);
                            // At the gateway (an agent's site view is live already).
                            if matches!(applied, Applied::Stored(_))
                                && self.agg_out == AggOut::PerSite
                                && block::is_summaries(frame.block)
                            {
                                self.summaries_as_aggregates(
                                    &mut txn,
                                    site,
                                    origin,
                                    frame.block,
                                    &mut aggs,
                                );
                            }
                            applied
                        }
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
                        Applied::Implausible => self.counters.implausible(site, origin),
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
                    S::put_aggregate(&mut txn, topic.clone(), json.clone());
                    aggs.push((origin.to_owned(), topic, json));
                }
                Some(Topic::GatewayAck { site, origin }) => {
                    match proto::UplinkAck::decode(&m.payload) {
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
        self.keep_budget();
        self.refresh();
    }

    /// Keeps every origin within the budget (the oldest downsampled, then dropped).
    fn keep_budget(&mut self) {
        let Some(budget) = self.budget else {
            return;
        };
        match self.store.trim(budget, self.downsample_window_secs) {
            Ok(trimmed) => {
                for t in trimmed {
                    self.counters.downsampled.inc_by(t.downsampled);
                    self.counters.dropped.inc_by(t.dropped);
                    tracing::warn!(
                        site = t.key.0,
                        origin = t.key.1,
                        downsampled = t.downsampled,
                        dropped = t.dropped,
                        budget,
                        "a peer's log outgrew its room in the replica store (buffer.max_bytes)"
                    );
                }
            }
            Err(e) => tracing::error!("cannot keep the replica store within its budget: {e}"),
        }
    }

    /// Summaries of readings downsampled at the edge are republished as aggregates of
    /// their window (`"downsampled": true`) where no newer one is kept, so a window whose
    /// readings were summarised before they could be sent still shows.
    fn summaries_as_aggregates(
        &self,
        txn: &mut S::Txn,
        site: &str,
        origin: &str,
        bytes: &[u8],
        aggs: &mut Vec<(String, String, String)>,
    ) {
        let Ok(block::Entry::Summaries(s)) = block::decode_entry(bytes) else {
            return;
        };
        for row in s.rows {
            let topic = format!("agg/{site}/{}/{}/{}s", row.device, row.metric, row.len_secs);
            let newer_kept = S::pending_aggregate(txn, &topic)
                .map(str::to_owned)
                .or_else(|| self.store.aggregate(&topic).ok().flatten())
                .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
                .and_then(|v| v["start_ms"].as_i64())
                .is_some_and(|start| start >= row.start_ms);
            if newer_kept {
                continue;
            }
            let mut json = row.to_json(None);
            if let Some(o) = json.as_object_mut() {
                o.remove("kind");
            }
            let json = json.to_string();
            S::put_aggregate(txn, topic.clone(), json.clone());
            aggs.push((origin.to_owned(), topic, json));
        }
    }

    fn ack(&mut self, site: &str, origin: &str) {
        let next = match self.store.watermark(site, origin) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(site, origin, "cannot read the watermark to ack: {e}");
                return;
            }
        };
        let payload = proto::UplinkAck { next }.encode();
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
