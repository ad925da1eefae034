//! Starting the agent's MQTT side from its configuration: the router, the front end on
//! every listener (`mqtt.listen`, `mqtt.listen_v5`, `cluster.listen`), and the agent's
//! links; [`Front::stop`] closes ingest and saves the sessions.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use crate::ingest::limits::LimitsConfig;
use crate::ingest::IngestConfig;
use crate::router::{BrokerError, Link};
use crate::security::auth::AuthConfig;
use crate::security::tls::TlsConfig;

use super::config::MqttConfig;

use super::Publisher;

/// The agent's MQTT side, running: stop it to close ingest and save the sessions.
pub struct Front {
    server: Arc<super::Server>,
    stop: crate::shutdown::Trigger,
    persist: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Takes no more readings (the writer drains its queue and ends) and writes the
    /// sessions a last time.
    pub async fn stop(self) {
        self.server.ingest.close();
        self.stop.fire();
        let _ = self.persist.await;
    }
}

/// What the front end is told by the configuration.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    pub mqtt: MqttConfig,
    pub ingest: IngestConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    /// Where `sessions.redb` lives.
    pub data_dir: std::path::PathBuf,
    /// In a site: how peers reach this agent.
    pub site: Option<SiteListener>,
}

/// How the other agents of a site reach this one.
#[derive(Debug, Clone)]
pub struct SiteListener {
    /// `cluster.listen`; empty: they use `mqtt.listen`.
    pub listen: String,
    pub peers: usize,
    /// `cluster.max_batch_bytes`: the largest batch a peer ships.
    pub max_batch_bytes: usize,
}

/// The front end's metrics and the ingest metrics of the readings it takes.
pub struct StartMetrics {
    pub mqtt: Arc<super::Metrics>,
    pub ingest: Arc<crate::ingest::Metrics>,
}

/// Starts the agent's MQTT side: rumqttd's router, the front end on every listener
/// (`mqtt.listen`, `mqtt.listen_v5`, `cluster.listen`), the agent's publishing link and
/// one link per entry of `extra` (name, filters), returned in that order. Readings go
/// from the front end to `queue`.
pub async fn start(
    config: &FrontConfig,
    queue: flume::Sender<crate::ingest::Queued>,
    metrics: StartMetrics,
    extra: &[(&str, &[&str])],
) -> Result<(Front, Publisher, Vec<Link>), BrokerError> {
    use super::{Server, Settings};
    use crate::ingest::Ingest;
    let mqtt_cfg = &config.mqtt;
    let v5 = mqtt_cfg.listen_v5_addr().map_err(BrokerError::Config)?;
    // Bind everything first: a taken port is an error now, not a log line later.
    let mut device_listeners = Vec::new();
    for addr in std::iter::once(mqtt_cfg.listen).chain(v5) {
        let l = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
        device_listeners.push(l);
    }
    let node = node_listener(config)?;

    let mut bulk: Vec<&str> = vec!["agg/#"];
    bulk.extend(extra.iter().flat_map(|(_, f)| f.iter().copied()));
    let make_link = crate::router::start_router(crate::router::router_config(
        mqtt_cfg.max_connections,
        &bulk,
    ));
    let mut links = Vec::with_capacity(extra.len());
    let (publish_tx, _publish_rx) = make_link("fogline-publish").map_err(BrokerError::Link)?;
    for (name, filters) in extra {
        let (mut tx, rx) = make_link(name).map_err(BrokerError::Link)?;
        for filter in *filters {
            tx.subscribe(*filter)?;
        }
        links.push((tx, rx));
    }

    let cluster_on = config.site.is_some();
    let settings = Settings {
        max_packet: mqtt_cfg.max_packet_bytes,
        // Replication batches are larger than readings; only peers get to send them.
        max_batch_packet: if cluster_on {
            mqtt_cfg
                .max_packet_bytes
                .max(config.site.as_ref().map_or(0, |s| s.max_batch_bytes) + 1024)
        } else {
            mqtt_cfg.max_packet_bytes
        },
        topic_alias_max: mqtt_cfg.topic_alias_max,
        max_keep_alive_secs: mqtt_cfg.max_keep_alive_secs,
        max_inflight: mqtt_cfg.max_inflight,
        max_queued: mqtt_cfg.max_queued_messages,
        session_expiry_max_secs: mqtt_cfg.session_expiry_max_secs,
        connect_timeout: Duration::from_millis(u64::from(mqtt_cfg.connect_timeout_ms)),
        max_connections: mqtt_cfg.max_connections,
        site_private: config.site.as_ref().is_some_and(|s| !s.listen.is_empty()),
    };
    let ingest = Arc::new(Ingest::new(
        queue,
        config.limits.clone(),
        Duration::from_millis(config.ingest.reject_log_interval_ms),
        metrics.ingest.clone(),
        config.ingest.max_payload_bytes,
    ));
    metrics
        .mqtt
        .front
        .set_log_every(Duration::from_millis(config.ingest.reject_log_interval_ms));
    let server = Server::new(
        make_link,
        &config.data_dir,
        ingest,
        settings,
        metrics.mqtt.clone(),
    )
    .map_err(BrokerError::Config)?;
    let restored = server.restore().await.map_err(BrokerError::Config)?;
    if restored > 0 {
        tracing::info!(sessions = restored, "MQTT sessions restored");
    }

    let guard = device_guard(config)?;
    for listener in device_listeners {
        server
            .listen(listener, guard.clone(), mqtt_cfg.max_connections)
            .map_err(|e| BrokerError::Config(format!("cannot start the MQTT listener: {e}")))?;
    }
    if let Some((listener, guard)) = node {
        let max = 4 * (config.site.as_ref().map_or(0, |s| s.peers) + 1);
        server
            .listen(listener, guard, max)
            .map_err(|e| BrokerError::Config(format!("cannot start the node listener: {e}")))?;
    }
    let (stop, stop_rx) = crate::shutdown::channel();
    let persist = tokio::spawn(super::persist_loop(server.clone(), stop_rx));
    Ok((
        Front {
            server: server.clone(),
            stop,
            persist,
        },
        Publisher::behind(publish_tx, server.clone()),
        links,
    ))
}

/// With `cluster.listen`: the site's own listener; over TLS with a client certificate
/// from the site CA when `[tls]` is set.
fn node_listener(config: &FrontConfig) -> Result<Option<(TcpListener, super::Guard)>, BrokerError> {
    use super::Guard;
    let Some(c) = config.site.as_ref().filter(|s| !s.listen.is_empty()) else {
        return Ok(None);
    };
    let addr: SocketAddr = c
        .listen
        .parse()
        .map_err(|e| BrokerError::Config(format!("cluster.listen: {e}")))?;
    let guard = if config.tls.enabled() {
        let identity = crate::security::tls::NodeIdentity::load(&config.tls)
            .map_err(|e| BrokerError::Config(format!("tls: {e}")))?;
        let server = identity
            .server_config()
            .map_err(|e| BrokerError::Config(format!("tls: {e}")))?;
        tracing::info!(listen = %addr, "site links need a client certificate signed by the site CA");
        Guard::Tls(tokio_rustls::TlsAcceptor::from(server))
    } else {
        tracing::warn!(listen = %addr, "tls is off: any node can join this site; set [tls] outside a lab");
        Guard::Node
    };
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    Ok(Some((listener, guard)))
}

/// `auth.mode = "credentials"`: devices log in and publish under their own topics.
/// `open`: anyone, with a warning.
fn device_guard(config: &FrontConfig) -> Result<super::Guard, BrokerError> {
    use crate::security::auth::{AuthMode, Authenticator};
    if config.auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = \"open\": any client can connect and publish readings for any device; \
             set auth.mode = \"credentials\" outside a lab"
        );
        return Ok(super::Guard::Open);
    }
    let auth = Arc::new(Authenticator::new(&config.auth));
    tracing::info!(
        devices = auth.device_count(),
        "device authentication on: each device publishes only under sensors/<its id>/"
    );
    Ok(super::Guard::Devices(auth))
}
