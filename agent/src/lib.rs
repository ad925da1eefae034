//! fogline-agent: the edge agent of a fogline site.
//!
//! # Layout
//!
//! One room per stage of a reading's path. Each room uses only the rooms above it in
//! this table, never one below; `cargo test -p fogline-tests --test layout` checks that,
//! and that no file passes 600 lines of code. `ARCHITECTURE.md` at the top of the
//! repository draws the whole system.
//!
//! | room | what lives there |
//! |---|---|
//! | [`addr`], [`batch`], [`fsync`], [`labels`], [`shutdown`] | shared pieces: `HOST:PORT`, the one group-commit collector, directory fsync, the `reason` label, the one shutdown type |
//! | [`ingest`] | a publish becomes a validated reading ([`ingest::parse`](mod@ingest::parse)), held to its device's [`ingest::limits`], queued for the writer with its connection's ack cursor ([`ingest::queue`]) |
//! | [`aggregate`] | tumbling-window summaries per device and metric, pure |
//! | [`buffer`] | the durable origin log in redb: the commit, per-device sequence state ([`buffer::seq`]), window checkpoints, capacity, a full disk, `buffer check` |
//! | [`security`] | device credentials, node certificates and TLS, the `certs` command |
//! | [`router`] | rumqttd's router in the process, and the links the stages reach it by |
//! | [`mqtt`] | the MQTT front end: listeners, CONNECT, the sans-io connection [`mqtt::protocol`], sessions, routing, the agent's own retained messages |
//! | [`shipping`] | log shipping, both ends: the protocol ([`shipping::proto`]), the store of shipped logs, the receiver that writes it |
//! | [`uplink`] | sending an origin log to the gateway or to a peer: the sans-io [`uplink::window`] and its async shell |
//! | [`writer`] | the writer thread: group commit into the buffer, the acks after it (through the replicated-ack [`writer::gate`]), aggregates |
//! | [`site`] | the site cluster: the election, replication of this agent's log to its peers, the replicas it keeps of theirs |
//! | [`ops`] | configuration, the HTTP surface, the metrics registry, what every `main` does |
//!
//! # A reading's path
//!
//! 1. A device publishes on `sensors/<device>/<metric>`. Its connection (an I/O shell
//!    around [`mqtt::protocol::Protocol`]) hands the publish to [`ingest`], which parses
//!    it, holds it to the device's limits and queues it with the connection's ack cursor.
//!    A refusal is counted and answered at once: a negative PUBACK in MQTT 5; in 3.1.1 a
//!    temporary refusal closes the connection unacknowledged, so the device sends again.
//! 2. The writer thread ([`writer`]) gathers what is queued into one batch per fsync and
//!    commits it to [`buffer::Buffer`] (redb), dropping re-sent duplicates by
//!    (device, boot, seq).
//! 3. Only after the commit — and with `cluster.ack_after = "replicated"` only once
//!    enough peers hold it — does the connection send its PUBACK (or PUBREC), and the
//!    writer publish the device's durable watermark on `fogline/ack/<device>`. Committed
//!    readings fold into [`aggregate`]s, published on `agg/<device>/<metric>/<len>s`.
//! 4. The [`uplink`] reads committed blocks from the buffer (never from memory) and ships
//!    them to the gateway; in a site only the leader does, and every agent also
//!    replicates its log to its peers ([`site`]), who keep it until the gateway has it.
//! 5. The gateway's ack moves the uplink's acked offset; the writer deletes what is acked
//!    once `uplink.retention_secs` have passed.
//!
//! [`run`] starts the components in that order and stops them from the edges inwards.

pub mod addr;
pub mod aggregate;
pub mod batch;
pub mod buffer;
pub mod fsync;
pub mod ingest;
pub mod labels;
pub mod mqtt;
pub mod ops;
pub mod router;
pub mod security;
pub mod shipping;
pub mod shutdown;
pub mod site;
pub mod uplink;
pub mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

pub use ops::config::Config;

/// The agent's wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs the agent until `shutdown` completes, then stops its components from the edges
/// inwards: the HTTP surface, the uplinks and the site, the front end (no more readings;
/// sessions saved), and last the writer, which commits what is queued and checkpoints the
/// aggregates.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let cluster_on = !config.cluster.peers.is_empty();
    let uplink_on = !config.uplink.gateway.is_empty();
    let replica_counters = Arc::new(shipping::receiver::Counters::default());
    let mut metrics = ops::metrics::Metrics::new();
    if cluster_on {
        metrics.register_replica(&replica_counters);
    }
    let metrics = Arc::new(metrics);
    let status = Arc::new(Mutex::new(writer::BufferStatus::default()));

    let open_cfg = config.clone();
    let buffer = tokio::task::spawn_blocking(move || {
        buffer::Buffer::open(&open_cfg.buffer, &open_cfg.aggregate, now_ms())
    })
    .await
    .context("buffer open task")?
    .with_context(|| format!("opening the buffer in {}", config.buffer.data_dir.display()))?;
    let meta = buffer.meta();
    tracing::info!(
        path = %buffer.path().display(),
        readings = meta.raw_readings,
        next_offset = meta.next_offset,
        devices = buffer.devices(),
        "buffer open"
    );
    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;

    // The front end, with the router links the site needs.
    let origin = buffer.origin(&config.node.id);
    let (queue_tx, queue_rx) = flume::bounded(config.ingest.queue_readings);
    let cluster_filter = site::cluster_topic(&config.node.site, &config.node.id);
    let repl_filter = shipping::proto::REPLICATION.filter();
    let cluster_filters = [cluster_filter.as_str()];
    let repl_filters = [repl_filter.as_str()];
    let extra: Vec<(&str, &[&str])> = if cluster_on {
        vec![
            ("fogline-cluster", &cluster_filters),
            ("fogline-repl-in", &repl_filters),
            ("fogline-repl-out", &[]),
        ]
    } else {
        Vec::new()
    };
    let (front, publisher, links) = mqtt::start(
        &front_config(&config),
        queue_tx,
        mqtt::StartMetrics {
            mqtt: metrics.mqtt.clone(),
            ingest: metrics.ingest.clone(),
        },
        &extra,
    )
    .await
    .context("starting the MQTT broker")?;
    tracing::info!(
        mqtt = %config.mqtt.listen,
        mqtt_v5 = %config.mqtt.listen_v5,
        http = %config.http.listen,
        node = %config.node.id,
        site = %config.node.site,
        %origin,
        peers = config.cluster.peers.len(),
        "fogline-agent ready"
    );

    let (stop, stopping) = shutdown::channel();
    let client_tls = security::tls::client_tls(&config.tls, uplink_on)
        .context("loading the TLS files (tls.*)")?;
    let (head_tx, head_rx) = tokio::sync::watch::channel(meta.next_offset);
    let uplink_shared = Arc::new(uplink::Shared::default());

    // The site: replication, replicas, the election.
    let site = if cluster_on {
        let mut links = links.into_iter();
        let (Some(cluster_link), Some(repl_link), Some((repl_out, _))) =
            (links.next(), links.next(), links.next())
        else {
            anyhow::bail!("broker links missing");
        };
        Some(
            site::start(site::SiteParts {
                config: site::SiteConfig {
                    node_id: config.node.id.clone(),
                    site: config.node.site.clone(),
                    cluster: config.cluster.clone(),
                    uplink: config.uplink.clone(),
                    buffer: config.buffer.clone(),
                },
                origin: origin.clone(),
                log: buffer.log(),
                head: head_rx.clone(),
                own_gateway: uplink_shared.clone(),
                cluster_link,
                repl_link,
                repl_out,
                counters: replica_counters,
                gateway_tls: client_tls.clone(),
                shutdown: stopping.clone(),
            })
            .context("starting the site cluster")?,
        )
    } else {
        None
    };

    // The uplink of this agent's own log.
    let uplink = uplink_on.then(|| {
        uplink::spawn(
            uplink::Uplink {
                config: config.uplink.clone(),
                destinations: config.uplink.gateway.as_slice().to_vec(),
                scheme: shipping::proto::UPLINK,
                site: config.node.site.clone(),
                origin: origin.clone(),
                source: Arc::new(buffer.log()),
                head: head_rx,
                shared: uplink_shared.clone(),
                // In a site, only the leader holding its lease uplinks.
                active: site.as_ref().map(|s| s.lease.clone()),
                tls: client_tls.clone(),
                own_log: true,
            },
            stopping.clone(),
        )
    });
    if !uplink_on {
        tracing::info!("no uplink.gateway configured: readings stay on this site");
    }

    // The writer, with what it shares with the uplink and the site.
    let mut relays = Vec::new();
    if uplink_on {
        relays.push(uplink_shared.clone());
    }
    let mut insync: Option<Box<dyn Fn(u64) -> u64 + Send>> = None;
    if let Some(site) = &site {
        relays.extend(site.replicators.iter().cloned());
        if config.cluster.replicated_acks() {
            insync = Some(site.insync_gauge());
        }
    }
    let writer = writer::spawn(
        writer::WriterParts {
            config: writer_config(&config),
            buffer,
            publisher,
            metrics: metrics.writer.clone(),
            ingest_metrics: metrics.ingest.clone(),
            status: status.clone(),
            head: head_tx,
            links: writer::Links {
                // Followers learn the gateway's ack of their log from the leader.
                gateway: (uplink_on || site.is_some()).then(|| uplink_shared.clone()),
                relays,
                insync,
            },
        },
        queue_rx,
    )
    .context("starting the writer thread")?;

    let http = ops::http::spawn(
        http_listener,
        Arc::new(ops::http::AppState {
            node_id: config.node.id.clone(),
            site: config.node.site.clone(),
            metrics,
            buffer: status,
            uplink: uplink_on.then_some(uplink_shared),
            site_status: site.as_ref().map(|s| s.status.clone()),
            origin,
            started: Instant::now(),
        }),
        stopping,
    );

    shutdown.await;
    tracing::info!("shutting down: committing what is queued");
    stop.fire();
    http.stop().await;
    if let Some(uplink) = uplink {
        uplink.stop().await;
    }
    if let Some(site) = site {
        site.stop().await;
    }
    front.stop().await;
    writer.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// The front end's part of the configuration.
fn front_config(config: &Config) -> mqtt::FrontConfig {
    mqtt::FrontConfig {
        mqtt: config.mqtt.clone(),
        ingest: config.ingest.clone(),
        limits: config.limits.clone(),
        auth: config.auth.clone(),
        tls: config.tls.clone(),
        data_dir: config.buffer.data_dir.clone(),
        site: (!config.cluster.peers.is_empty()).then(|| mqtt::SiteListener {
            listen: config.cluster.listen.clone(),
            peers: config.cluster.peers.len(),
            max_batch_bytes: config.cluster.max_batch_bytes,
        }),
    }
}

/// The writer's part of the configuration.
fn writer_config(config: &Config) -> writer::WriterConfig {
    writer::WriterConfig {
        batch_max: config.buffer.batch_max_readings,
        batch_delay: Duration::from_millis(config.buffer.batch_max_delay_ms),
        publish_every: Duration::from_millis(config.aggregate.publish_interval_ms),
        quantiles: config.aggregate.quantiles.clone(),
        reject_log_every: Duration::from_millis(config.ingest.reject_log_interval_ms),
        retention: Duration::from_secs(config.uplink.retention_secs),
        capacity_bytes: config.buffer.max_bytes,
    }
}
