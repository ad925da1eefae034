//! fogline-gateway: the cloud side of fogline.
//!
//! Agents (each site's leader) publish their origin logs to the gateway's embedded broker
//! (`fogline_agent::uplink::proto`). The writer thread stores each batch once, in offset
//! order, with one fsync per group of batches ([`store`]), then publishes the per-origin
//! watermark back as the agents' durable ack. Aggregates relayed by the agents are
//! republished retained on `agg/<site>/<device>/<metric>/<len>s` for dashboards and kept
//! in the store, so they are served again after a restart.
//!
//! Nothing here assumes it is the only gateway: all state is per (site, origin).

pub mod config;
pub mod store;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use fogline_agent::broker::{self, Publisher, Worker};
use fogline_agent::uplink::proto::{self, Topic};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use config::Config;
use store::{Applied, Store, Txn};

/// One publish the gateway cares about.
struct Message {
    topic: String,
    payload: Vec<u8>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The gateway's counters, on `/metrics`.
pub struct Metrics {
    registry: Registry,
    batches: Family<ResultLabel, Counter>,
    readings_stored: Counter,
    commits: Counter,
    commit_failures: Counter,
    aggregates_relayed: Counter,
    rejected: Counter,
    /// Node links refused at TLS (no certificate, another CA, …) and over the limit.
    links_refused: Arc<fogline_agent::frontend::FrontMetrics>,
    origins: Gauge,
    stored_total: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fogline_gateway");
        let m = Metrics {
            registry: Registry::default(),
            batches: Family::default(),
            readings_stored: Counter::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            aggregates_relayed: Counter::default(),
            rejected: Counter::default(),
            links_refused: fogline_agent::frontend::FrontMetrics::new(Duration::from_secs(10)),
            origins: Gauge::default(),
            stored_total: Gauge::default(),
        };
        for result in ["stored", "duplicate", "gap", "malformed"] {
            let _ = m.batches.get_or_create(&ResultLabel { result });
        }
        registry.register("batches", "Uplink batches by outcome", m.batches.clone());
        registry.register(
            "readings_stored",
            "Readings stored since start",
            m.readings_stored.clone(),
        );
        registry.register(
            "commits",
            "Durable commits (one fsync each)",
            m.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Commits that failed (nothing acked; agents re-send)",
            m.commit_failures.clone(),
        );
        registry.register(
            "aggregates_relayed",
            "Aggregates republished for dashboards",
            m.aggregates_relayed.clone(),
        );
        registry.register(
            "rejected",
            "Uplink publishes with a bad topic or frame",
            m.rejected.clone(),
        );
        registry.register(
            "links_refused",
            "Connections refused at the TLS front end, by reason",
            m.links_refused.refused.clone(),
        );
        registry.register("origins", "(site, origin) logs known", m.origins.clone());
        registry.register(
            "readings",
            "Readings held in the store",
            m.stored_total.clone(),
        );
        Metrics { registry, ..m }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

struct AppState {
    metrics: Arc<Metrics>,
    origins: Arc<Mutex<Vec<serde_json::Value>>>,
    started: Instant,
    last_commit_ms: AtomicU64,
}

/// Runs the gateway until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let data_dir = config.store.data_dir.clone();
    let cache = config.store.cache_bytes;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, cache))
        .await
        .context("store open task")?
        .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?;
    tracing::info!(path = %config.store_path().display(), origins = store.origins().len(), "store open");

    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;

    let mut mqtt = config.mqtt.clone();
    let front = tls_front(&config, &mut mqtt, &metrics)?;
    let mut links = tokio::task::block_in_place(|| {
        broker::embed(
            &mqtt,
            &[proto::GATEWAY_FILTER, "agg/#"],
            &[
                ("gateway-in", &[proto::GATEWAY_FILTER]),
                ("gateway-out", &[]),
            ],
        )
    })
    .context("starting the MQTT broker")?
    .into_iter();
    let (Some((in_tx, in_rx)), Some((out_tx, _))) = (links.next(), links.next()) else {
        anyhow::bail!("broker links missing");
    };
    if let Some(front) = front {
        front.spawn().context("starting the TLS front end")?;
    }
    let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel::<Message>(4096);
    let rejected = metrics.clone();
    let mut receiver = Worker::spawn("uplink-in", move |stop| {
        let _keep = in_tx;
        broker::receive(in_rx, stop, |p| {
            let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                rejected.rejected.inc();
                return true;
            };
            enqueue(
                &queue_tx,
                Message {
                    topic,
                    payload: p.payload.to_vec(),
                },
            )
        });
    })
    .context("starting the uplink receiver")?;

    let state = Arc::new(AppState {
        metrics: metrics.clone(),
        origins: Arc::new(Mutex::new(Vec::new())),
        started: Instant::now(),
        last_commit_ms: AtomicU64::new(0),
    });
    let writer = Writer {
        store,
        publisher: Publisher::new(out_tx),
        metrics,
        state: state.clone(),
        batch_max: config.store.batch_max_messages,
        batch_delay: Duration::from_millis(config.store.batch_max_delay_ms),
    };
    let writer = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run(queue_rx))
        .context("starting the writer thread")?;
    tracing::info!(mqtt = %config.mqtt.listen, http = %config.http.listen, "fogline-gateway ready");

    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move { s.metrics.render() }),
        )
        .route("/status", get(status))
        .with_state(state);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });

    shutdown.await;
    tracing::info!("shutting down: committing what is queued");
    let _ = stop_http.send(());
    tokio::task::spawn_blocking(move || {
        receiver.stop();
        if writer.join().is_err() {
            tracing::error!("the writer thread panicked");
        }
    })
    .await
    .context("shutdown task")?;
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

/// With `[tls]`: the public MQTT listener becomes a TLS front end that requires a client
/// certificate signed by the site CA, and rumqttd moves to a loopback-only port.
fn tls_front(
    config: &Config,
    mqtt: &mut fogline_agent::config::MqttConfig,
    metrics: &Metrics,
) -> anyhow::Result<Option<fogline_agent::frontend::Front>> {
    use fogline_agent::frontend::{internal_addr, Front, Guard};
    if !config.tls.enabled() {
        tracing::warn!(
            "tls is off: any client can connect to the gateway and uplink for any site; \
             set [tls] outside a lab"
        );
        return Ok(None);
    }
    let identity = fogline_agent::tls::NodeIdentity::load(&config.tls)
        .context("loading the TLS files (tls.*)")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    if !mqtt.listen_v5.is_empty() {
        anyhow::bail!("mqtt.listen_v5 is not served over TLS yet: set it to \"\" with [tls]");
    }
    let listener = std::net::TcpListener::bind(mqtt.listen)
        .with_context(|| format!("cannot listen on {}", mqtt.listen))?;
    let backend = internal_addr().context("no loopback port for the broker")?;
    tracing::info!(listen = %mqtt.listen, "node links need a client certificate signed by the site CA");
    let front = Front {
        listener,
        backend,
        guard: Guard::Tls(acceptor),
        max_connections: mqtt.max_connections,
        max_packet: mqtt.max_packet_bytes,
        connect_timeout: Duration::from_millis(u64::from(mqtt.connect_timeout_ms)),
        metrics: metrics.links_refused.clone(),
    };
    mqtt.listen = backend;
    Ok(Some(front))
}

fn enqueue(queue: &SyncSender<Message>, m: Message) -> bool {
    queue.send(m).is_ok()
}

async fn status(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let origins = s.origins.lock().map(|o| o.clone()).unwrap_or_default();
    Json(serde_json::json!({
        "role": "gateway",
        "uptime_secs": s.started.elapsed().as_secs(),
        "origins": origins,
        "last_commit_ms": s.last_commit_ms.load(Ordering::Relaxed),
    }))
}

struct Writer {
    store: Store,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    state: Arc<AppState>,
    batch_max: usize,
    batch_delay: Duration,
}

impl Writer {
    fn run(mut self, queue: Receiver<Message>) {
        // After a restart: serve the dashboards' aggregates and tell agents where we are.
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
        tracing::info!("store closed cleanly");
    }

    fn handle(&mut self, batch: Vec<Message>) {
        let mut txn = Txn::default();
        let mut acks: Vec<(String, String)> = Vec::new();
        let mut aggs: Vec<(String, String)> = Vec::new();
        let mut stored = 0;
        for m in &batch {
            match proto::parse_topic(&m.topic) {
                Some(Topic::Log { site, origin }) => {
                    let applied = match proto::decode_batch(&m.payload) {
                        Ok(frame) => self.store.apply(&mut txn, site, origin, &frame),
                        Err(_) => Applied::Malformed,
                    };
                    self.metrics
                        .batches
                        .get_or_create(&ResultLabel {
                            result: applied.label(),
                        })
                        .inc();
                    match applied {
                        Applied::Stored(n) => stored += n,
                        Applied::Malformed => {
                            tracing::warn!(site, origin, "malformed uplink batch")
                        }
                        Applied::Gap => {
                            tracing::debug!(site, origin, "uplink batch past the watermark")
                        }
                        Applied::Duplicate => {}
                    }
                    push_unique(&mut acks, site, origin);
                }
                Some(Topic::Sync { site, origin }) => push_unique(&mut acks, site, origin),
                Some(Topic::Agg {
                    site,
                    origin: _,
                    rest,
                }) => {
                    let Ok(json) = String::from_utf8(m.payload.clone()) else {
                        self.metrics.rejected.inc();
                        continue;
                    };
                    let topic = format!("agg/{site}/{rest}");
                    Store::put_aggregate(&mut txn, topic.clone(), json.clone());
                    aggs.push((topic, json));
                }
                // Our own acks come back on the filter: nothing to do.
                Some(Topic::Ack { .. }) => {}
                None => {
                    self.metrics.rejected.inc();
                }
            }
        }
        match self.store.commit(txn) {
            Ok(()) => {
                self.metrics.commits.inc();
                self.metrics.readings_stored.inc_by(stored);
                self.state
                    .last_commit_ms
                    .store(fogline_agent::now_ms().max(0) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.commit_failures.inc();
                tracing::error!("store commit failed; nothing acked, agents will re-send: {e}");
                return;
            }
        }
        for (site, origin) in &acks {
            self.ack(site, origin);
        }
        for (topic, json) in aggs {
            if self.publisher.retained(topic, json).is_ok() {
                self.metrics.aggregates_relayed.inc();
            }
        }
        self.refresh();
    }

    fn ack(&mut self, site: &str, origin: &str) {
        let next = self.store.next(&Txn::default(), site, origin);
        let payload = serde_json::json!({ "next": next }).to_string();
        if let Err(e) = self
            .publisher
            .retained(proto::ack_topic(site, origin), payload)
        {
            tracing::warn!(site, origin, "cannot publish the uplink ack: {e}");
        }
    }

    fn refresh(&self) {
        let origins = self.store.origins();
        self.metrics
            .origins
            .set(i64::try_from(origins.len()).unwrap_or(i64::MAX));
        let total: u64 = origins.values().map(|s| s.stored).sum();
        self.metrics
            .stored_total
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        let mut list: Vec<serde_json::Value> = origins
            .iter()
            .map(|((site, origin), s)| {
                serde_json::json!({
                    "site": site, "origin": origin, "next_offset": s.next,
                    "stored": s.stored, "skipped_at_edge": s.skipped,
                })
            })
            .collect();
        list.sort_by_key(|v| v.to_string());
        if let Ok(mut o) = self.state.origins.lock() {
            *o = list;
        }
    }
}

fn push_unique(v: &mut Vec<(String, String)>, site: &str, origin: &str) {
    if !v.iter().any(|(s, o)| s == site && o == origin) {
        v.push((site.to_owned(), origin.to_owned()));
    }
}
