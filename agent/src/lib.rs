//! fogline-agent: the edge agent of a fogline site.
//!
//! Data path: sensors publish to the embedded broker ([`broker`]); the ingest thread
//! validates each publish ([`ingest`]) and queues it; the writer thread ([`pipeline`])
//! commits batches to the durable [`buffer`] (redb, one fsync per batch), publishes each
//! device's durable watermark on `fogline/ack/<device>`, and folds committed readings into
//! tumbling-window [`aggregate`]s published on `agg/<device>/<metric>/<len>s`.
//! Operations: [`config`] (layered TOML), [`http`] (`/healthz`, `/metrics`, `/status`),
//! [`metrics`].

pub mod aggregate;
pub mod buffer;
pub mod ingest;
pub mod labels;
pub mod mqtt;
pub mod ops;
pub mod router;
pub mod security;
pub mod shipping;
pub mod site;
pub mod uplink;
pub mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

pub use ops::config::Config;

/// The agent's wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs the agent until `shutdown` completes, then stops ingest, commits what is queued,
/// checkpoints the aggregates and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let cluster_on = !config.cluster.peers.is_empty();
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
    let (running, publisher, links) = mqtt::start(&config, queue_tx, &metrics, &extra)
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

    let uplink_tls = security::tls::uplink_tls(&config).context("loading the TLS files (tls.*)")?;
    let (head_tx, head_rx) = tokio::sync::watch::channel(meta.next_offset);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let uplink_shared = Arc::new(uplink::Shared::default());
    let uplink_on = !config.uplink.gateway.is_empty();
    let site = if cluster_on {
        let mut links = links.into_iter();
        let (Some(cluster_link), Some(repl_link), Some((repl_out, _))) =
            (links.next(), links.next(), links.next())
        else {
            anyhow::bail!("broker links missing");
        };
        Some(
            site::start(site::SiteParts {
                config: config.clone(),
                origin: origin.clone(),
                log: buffer.log(),
                head: head_rx.clone(),
                own_gateway: uplink_shared.clone(),
                cluster_link,
                repl_link,
                repl_out,
                counters: replica_counters,
                gateway_tls: uplink_tls.clone(),
                shutdown: stop_rx.clone(),
            })
            .context("starting the site cluster")?,
        )
    } else {
        None
    };
    let uplink_task = uplink_on.then(|| {
        let up = uplink::Uplink {
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
            tls: uplink_tls.clone(),
        };
        tokio::spawn(up.run(stop_rx))
    });
    if !uplink_on {
        tracing::info!("no uplink.gateway configured: readings stay on this site");
    }
    let mut relays = Vec::new();
    if uplink_on {
        relays.push(uplink_shared.clone());
    }
    let mut insync: Option<Box<dyn Fn(u64) -> u64 + Send>> = None;
    if let Some(site) = &site {
        relays.extend(site.replicators.iter().cloned());
        if config.cluster.replicated_acks() {
            let replicators = site.replicators.clone();
            let min_insync = config.cluster.min_insync;
            insync = Some(Box::new(move |head| {
                site::insync_offset(
                    head,
                    replicators
                        .iter()
                        .map(|r| r.acked.load(std::sync::atomic::Ordering::SeqCst)),
                    min_insync,
                )
            }));
        }
    }
    let pipe = writer::Pipeline::new(
        buffer,
        publisher,
        &config,
        &metrics,
        status.clone(),
        head_tx,
        writer::Links {
            // Followers learn the gateway's ack of their log from the leader.
            gateway: (uplink_on || site.is_some()).then(|| uplink_shared.clone()),
            relays,
            insync,
        },
    );
    let writer = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || pipe.run(queue_rx))
        .context("starting the writer thread")?;

    let state = Arc::new(ops::http::AppState {
        node_id: config.node.id.clone(),
        site: config.node.site.clone(),
        metrics,
        buffer: status,
        uplink: uplink_on.then_some(uplink_shared),
        site_status: site.as_ref().map(|s| s.status.clone()),
        origin,
        started: Instant::now(),
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(ops::http::serve(http_listener, state, async {
        let _ = http_stopped.await;
    }));

    shutdown.await;
    tracing::info!("shutting down: committing what is queued");
    let _ = stop_http.send(());
    let _ = stop_tx.send(true);
    if let Some(task) = uplink_task {
        let _ = task.await;
    }
    if let Some(site) = site {
        site.stop().await;
    }
    running.stop().await;
    tokio::task::spawn_blocking(move || {
        if writer.join().is_err() {
            tracing::error!("the writer thread panicked");
        }
    })
    .await
    .context("shutdown task")?;
    match http.await {
        Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
        Err(e) => tracing::warn!("HTTP task: {e}"),
        Ok(Ok(())) => {}
    }
    tracing::info!("stopped");
    Ok(())
}
