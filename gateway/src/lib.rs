//! fogline-gateway: the cloud side of fogline.
//!
//! # Layout
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | the gateway's configuration (the agent's layering and sections where they mean the same) |
//! | `front` | the agent's MQTT front end on `mqtt.listen`, over rumqttd's router, with the gateway's access rules (nodes bound to their site by certificate, dashboards read-only, acks and `agg/…` the gateway's own) |
//! | [`store`] | the agent's `shipping::store`: every (site, origin) log complete, in offset order, in `gateway.redb` (the default) |
//! | [`pg`] | the store in PostgreSQL (`store.url`), shared by any number of gateways; the relay of their aggregates |
//! | [`history`] | the history API (`/api/v1/…`) over either store ([`history::HistorySource`]) |
//! | [`export`] | `store export\|stats` lines, the same from either store |
//! | `ws` | MQTT over WebSocket on the HTTP listener (`/mqtt`), for dashboards in a browser |
//! | `lib.rs` | [`run`]: the receiver, the writer thread, HTTP (`/healthz`, `/metrics`, `/status`), start and stop |
//!
//! The log-shipping protocol and its receiver are the agent's (`fogline_agent::shipping`):
//! a site's replicas and the gateway store shipped logs with the same code.
//!
//! # A batch's path
//!
//! 1. A site's leader publishes a batch of its origin log on
//!    `fogline/uplink/<site>/<origin>/…` (`fogline_agent::shipping::proto`).
//! 2. The `uplink-in` thread moves it from rumqttd into a queue bounded in messages and
//!    bytes; the `store-writer` thread takes it only if it joins the stored log without a
//!    hole, stores each offset once, with one fsync per group of batches.
//! 3. After the commit it publishes the per-origin watermark retained on
//!    `fogline/uplink/<site>/<origin>/ack` as `{"next":N}`, the agents' durable ack.
//! 4. Aggregates relayed by the agents are republished retained on
//!    `agg/<site>/<device>/<metric>/<len>s` for dashboards and kept in the store, so they
//!    are served again after a restart.
//!
//! Nothing here assumes it is the only gateway: all state is per (site, origin), and on
//! PostgreSQL any number of gateways share it.

pub mod config;
pub mod export;
mod front;
pub mod history;
pub mod pg;
mod ws;
pub use fogline_agent::shipping::store;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use fogline_agent::shipping::proto;
use fogline_agent::shipping::receiver::{self, AggOut, Counters, Hooks, Receiver};
use prometheus_client::registry::Registry;

pub use config::Config;
use store::{LogStore, Store};

/// The gateway's counters, on `/metrics`.
pub struct Metrics {
    registry: Registry,
    counters: Arc<Counters>,
    /// The MQTT front end's: connections, sessions, refusals by reason.
    mqtt: Arc<fogline_agent::mqtt::Metrics>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fogline_gateway");
        let counters = Arc::new(Counters::default());
        counters.register(&mut registry);
        let mqtt = Arc::new(fogline_agent::mqtt::Metrics::default());
        mqtt.register(&mut registry);
        Metrics {
            registry,
            counters,
            mqtt,
        }
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

/// Opens the embedded store (off the runtime: it blocks). The PostgreSQL store is opened
/// on the writer thread itself ([`Writer::spawn_postgres`]): its client may not even be
/// dropped on the runtime.
async fn open_embedded(config: &Config) -> anyhow::Result<Store> {
    let path = config.store_path();
    let cache = config.store.cache_bytes;
    let keep_history = config.store.history;
    let store = tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&path, cache)?;
        if keep_history {
            let indexed = store.keep_history()?;
            if indexed > 0 {
                tracing::info!(readings = indexed, "history index built for the stored log");
            }
        }
        Ok::<_, store::StoreError>(store)
    })
    .await
    .context("store open task")?
    .with_context(|| format!("opening the store in {}", config.store.data_dir.display()))?;
    tracing::info!(path = %config.store_path().display(), origins = store.origins().len(), "store open");
    Ok(store)
}

/// Runs the gateway until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let embedded = if config.store.url.is_empty() {
        Some(open_embedded(&config).await?)
    } else {
        // Only the MQTT sessions live there.
        std::fs::create_dir_all(&config.store.data_dir)
            .with_context(|| format!("cannot create {}", config.store.data_dir.display()))?;
        None
    };
    let readers = (config.access.anonymous != config::AnonymousPolicy::Read
        && !config.access.readers.is_empty())
    .then(|| fogline_agent::security::auth::Authenticator::for_users(&config.access.readers));
    let source: Option<Arc<dyn history::HistorySource>> = match &embedded {
        // With store.history off there is no index to serve from: /api/v1/… is a 404.
        Some(store) => config
            .store
            .history
            .then(|| Arc::new(store.reader()) as Arc<dyn history::HistorySource>),
        None => Some(Arc::new(pg::PgHistory::new(&config.store.url))),
    };

    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;

    let filter = proto::UPLINK.filter();
    let front::Mqtt {
        uplinks,
        publisher,
        relay_publisher,
        ws,
        sessions,
    } = front::start(&config, metrics.mqtt.clone(), &filter)
        .await
        .context("starting MQTT")?;
    // Batches from every site's leader: 4096 messages, 64 MiB at most.
    let (queue_tx, queue_rx) = receiver::queue(4096, 64 << 20);
    let mut reader =
        receiver::spawn_reader("uplink-in", uplinks, queue_tx, metrics.counters.clone())
            .context("starting the uplink receiver")?;

    let state = Arc::new(AppState {
        metrics: metrics.clone(),
        origins: Arc::new(Mutex::new(Vec::new())),
        started: Instant::now(),
        last_commit_ms: AtomicU64::new(0),
    });
    let writer = Writer {
        publisher,
        counters: metrics.counters.clone(),
        batch_max: config.store.batch_max_messages,
        batch_delay: Duration::from_millis(config.store.batch_max_delay_ms),
        state: state.clone(),
    };
    let (writer, relay) = match embedded {
        Some(store) => (writer.spawn(store, queue_rx)?, None),
        None => {
            let url = config.store.url.clone();
            let retention = config.store.retention_days;
            tokio::task::spawn_blocking(move || {
                writer.spawn_postgres(&url, retention, relay_publisher, queue_rx)
            })
            .await
            .context("store open task")??
        }
    };
    tracing::info!(mqtt = %config.mqtt.listen, http = %config.http.listen, "fogline-gateway ready");

    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move { s.metrics.render() }),
        )
        .route("/status", get(status))
        .with_state(state);
    let app = app.merge(ws::routes(Arc::new(ws)));
    let app = match source {
        Some(reader) => app.merge(history::routes(Arc::new(history::History {
            reader,
            readers,
        }))),
        None => app,
    };
    let (stop, mut stopping) = fogline_agent::shutdown::channel();
    let http = tokio::spawn(async move {
        axum::serve(
            http_listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopping.fired().await })
        .await
    });

    // Stopped from the edges inwards, as the agent's: HTTP, then the link reader (no
    // more batches), then the writer, which commits what is queued and acks it.
    shutdown.await;
    tracing::info!("shutting down: committing what is queued");
    stop.fire();
    tokio::task::spawn_blocking(move || {
        reader.stop();
        if writer.join().is_err() {
            tracing::error!("the writer thread panicked");
        }
        if let Some(relay) = relay {
            relay.stop();
        }
    })
    .await
    .context("shutdown task")?;
    let _ = http.await;
    sessions.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// What the store's writer thread is started with.
struct Writer {
    publisher: fogline_agent::mqtt::Publisher,
    counters: Arc<Counters>,
    batch_max: usize,
    batch_delay: Duration,
    state: Arc<AppState>,
}

impl Writer {
    /// Opens the PostgreSQL store and starts the writer and the relay of other
    /// gateways' aggregates (call it off the runtime).
    fn spawn_postgres(
        self,
        url: &str,
        retention_days: u32,
        relay_publisher: fogline_agent::mqtt::Publisher,
        queue: receiver::QueueRx,
    ) -> anyhow::Result<(std::thread::JoinHandle<()>, Option<pg::Relay>)> {
        let store = pg::PgStore::open(url, retention_days)
            .with_context(|| format!("opening the store {}", pg::redact(url)))?;
        tracing::info!(store = %pg::redact(url), origins = store.origins().len(), "store open (PostgreSQL)");
        let relay = pg::spawn_relay(url.to_owned(), store.own_pid(), relay_publisher)
            .context("starting the aggregate relay")?;
        Ok((self.spawn(store, queue)?, Some(relay)))
    }

    fn spawn<S: LogStore>(
        self,
        store: S,
        queue: receiver::QueueRx,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let writer = Receiver {
            store,
            publisher: self.publisher,
            scheme: proto::UPLINK,
            counters: self.counters,
            agg_out: AggOut::PerSite,
            batch_max: self.batch_max,
            batch_delay: self.batch_delay,
            budget: None,
            downsample_window_secs: 60,
            max_batch_bytes: None,
            hooks: StatusHooks { state: self.state },
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(queue))
            .context("starting the writer thread")
    }
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

/// Keeps `/status` current after every commit.
struct StatusHooks {
    state: Arc<AppState>,
}

impl<S: LogStore> Hooks<S> for StatusHooks {
    fn committed(&mut self, store: &S) {
        self.state
            .last_commit_ms
            .store(fogline_agent::now_ms().max(0) as u64, Ordering::Relaxed);
        let list = match export::stats(store.origins()) {
            serde_json::Value::Object(mut o) => o.remove("origins"),
            _ => None,
        };
        if let (Ok(mut o), Some(serde_json::Value::Array(list))) = (self.state.origins.lock(), list)
        {
            *o = list;
        }
    }
}
