//! The gateway's MQTT side: the agent's MQTT front end (`fogline_agent::mqtt`) on
//! `mqtt.listen` (and `mqtt.listen_v5`), over rumqttd's router, with the gateway's rules
//! of who may do what:
//!
//! | client | how it is known | may publish | may subscribe |
//! |---|---|---|---|
//! | node | TLS client certificate naming its site (`certs node --site`) | `fogline/uplink/<its site>/…` but never `…/ack` | its site's acks and aggregates |
//! | dashboard | `access.readers` login, or `access.anonymous = "read"` | nothing | `agg/…`, `$SYS/…` |
//! | lab client | no `[tls]`, `access.anonymous = "node"` (the default without TLS) | `fogline/uplink/<any site>/…` but never `…/ack` | anything |
//!
//! Only the gateway publishes acks and `agg/…`. A refused publish ends the connection
//! (MQTT 3.1.1 has no way to refuse one), a refused subscription gets a failure code;
//! both are counted in `fogline_gateway_connections_refused_total` and logged, at most
//! once per reason per 10 s.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fogline_agent::mqtt::{self, GatewayDoor, GatewayLogin, GatewayTls, Guard, Publisher};
use fogline_agent::router::Link;
use fogline_agent::security::auth::Authenticator;

use crate::Config;

/// The gateway's MQTT side, running.
pub struct Mqtt {
    /// Uplink batches, syncs and aggregates from every site.
    pub uplinks: Link,
    /// The gateway's own retained messages: acks and aggregates.
    pub publisher: Publisher,
    /// Aggregates other gateways stored (PostgreSQL), from a thread of their own.
    pub relay_publisher: Publisher,
    /// MQTT over WebSocket on the HTTP listener, into the same front end.
    pub ws: crate::ws::WsDoor,
    pub sessions: Sessions,
}

/// Clients' sessions, saved in `sessions.redb` next to the store.
pub struct Sessions {
    stop: fogline_agent::shutdown::Trigger,
    persist: tokio::task::JoinHandle<()>,
}

impl Sessions {
    /// Writes the sessions a last time.
    pub async fn stop(self) {
        self.stop.fire();
        let _ = self.persist.await;
    }
}

/// Starts the router and the front end on every listener; `uplink_filter` is what the
/// store's receiver gets.
pub async fn start(
    config: &Config,
    metrics: Arc<mqtt::Metrics>,
    uplink_filter: &str,
) -> anyhow::Result<Mqtt> {
    let m = &config.mqtt;
    let v5 = m.listen_v5_addr().map_err(anyhow::Error::msg)?;
    // Bind everything first: a taken port is an error now, not a log line later.
    let mut listeners = Vec::new();
    for addr in std::iter::once(m.listen).chain(v5) {
        let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    let door = Arc::new(door(config)?);

    let make_link = fogline_agent::router::start_router(fogline_agent::router::router_config(
        m.max_connections,
        &[uplink_filter, "agg/#"],
    ));
    let (mut in_tx, in_rx) = make_link("gateway-in").map_err(|e| anyhow::anyhow!("{e}"))?;
    in_tx.subscribe(uplink_filter)?;
    let (out_tx, _out_rx) = make_link("gateway-out").map_err(|e| anyhow::anyhow!("{e}"))?;
    let (relay_tx, _relay_rx) = make_link("gateway-relay").map_err(|e| anyhow::anyhow!("{e}"))?;
    let settings = mqtt::Settings {
        max_packet: m.max_packet_bytes,
        // Uplink batches: only nodes may send packets this large, dashboards get the same
        // limit (they publish nothing).
        max_batch_packet: m.max_packet_bytes,
        topic_alias_max: m.topic_alias_max,
        max_keep_alive_secs: m.max_keep_alive_secs,
        max_inflight: m.max_inflight,
        max_queued: m.max_queued_messages,
        session_expiry_max_secs: m.session_expiry_max_secs,
        connect_timeout: Duration::from_millis(u64::from(m.connect_timeout_ms)),
        max_connections: m.max_connections,
        site_private: false,
    };
    let server = mqtt::Server::new(
        make_link,
        &config.store.data_dir,
        Arc::new(fogline_agent::ingest::Ingest::none()),
        settings,
        metrics,
    )
    .map_err(anyhow::Error::msg)
    .context("starting the MQTT front end")?;
    let restored = server.restore().await.map_err(anyhow::Error::msg)?;
    if restored > 0 {
        tracing::info!(sessions = restored, "MQTT sessions restored");
    }
    for listener in listeners {
        server
            .listen(listener, Guard::Gateway(door.clone()), m.max_connections)
            .context("starting the MQTT listener")?;
    }
    let (stop, stop_rx) = fogline_agent::shutdown::channel();
    let persist = tokio::spawn(mqtt::persist_loop(server.clone(), stop_rx));
    let ws = crate::ws::WsDoor {
        server: server.clone(),
        login: door.login.clone(),
        max_connections: m.max_connections,
        max_packet: m.max_packet_bytes,
    };
    Ok(Mqtt {
        ws,
        uplinks: (in_tx, in_rx),
        publisher: Publisher::behind(out_tx, server.clone()),
        relay_publisher: Publisher::behind(relay_tx, server),
        sessions: Sessions { stop, persist },
    })
}

/// Who may connect, from `[tls]` and `[access]`.
fn door(config: &Config) -> anyhow::Result<GatewayDoor> {
    let anonymous = config.anonymous();
    let readers = &config.access.readers;
    let login = Arc::new(GatewayLogin {
        readers: (!readers.is_empty()).then(|| Authenticator::for_users(readers)),
        anonymous,
    });
    if !config.tls.enabled() {
        if anonymous == mqtt::Anonymous::Node {
            tracing::warn!(
                "tls is off: any client can connect to the gateway and uplink for any site \
                 (acks and aggregates are still the gateway's own); set [tls] outside a lab"
            );
        }
        return Ok(GatewayDoor { tls: None, login });
    }
    let identity = fogline_agent::security::tls::NodeIdentity::load(&config.tls)
        .context("loading the TLS files (tls.*)")?;
    // Clients without a certificate get in only to log in as dashboards.
    let logins = !readers.is_empty() || anonymous == mqtt::Anonymous::Read;
    let server = if logins {
        identity.server_config_optional_client()?
    } else {
        identity.server_config()?
    };
    let ca_sites = identity.ca_sites();
    tracing::info!(
        listen = %config.mqtt.listen,
        site_cas = ca_sites.len(),
        dashboards = readers.len(),
        anonymous_read = anonymous == mqtt::Anonymous::Read,
        "nodes need a certificate naming their site, signed by a CA in tls.ca"
    );
    Ok(GatewayDoor {
        tls: Some(GatewayTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            ca_sites,
        }),
        login,
    })
}
