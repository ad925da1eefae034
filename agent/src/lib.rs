//! fogline-agent: the edge agent of a fogline site.
//!
//! Data path: sensors publish to the embedded broker ([`broker`]); the ingest thread
//! validates each publish ([`ingest`]) and queues it; the writer thread ([`pipeline`])
//! commits batches to the durable [`buffer`] (redb, one fsync per batch), publishes each
//! device's durable watermark on `fogline/ack/<device>`, and folds committed readings into
//! tumbling-window [`aggregate`]s published on `agg/<device>/<metric>/<len>s`.
//! Operations: [`config`] (layered TOML), [`http`] (`/healthz`, `/metrics`, `/status`),
//! [`metrics`].

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
                destination: config.uplink.gateway.clone(),
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
