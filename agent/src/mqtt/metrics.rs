//! What the front end counts (`fogline_mqtt_*`, `fogline_connections_refused_total`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::refusals::FrontMetrics;
use super::session::Dropped;
use crate::labels::Reason;

pub struct Metrics {
    pub connections: Gauge,
    pub sessions: Gauge,
    pub dropped: Family<Reason, Counter>,
    /// Connections refused (device auth, limits, bad packets).
    pub front: Arc<FrontMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Gauge::default(),
            sessions: Gauge::default(),
            dropped: Family::default(),
            front: FrontMetrics::new(std::time::Duration::from_secs(10)),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        for d in Dropped::ALL {
            let _ = self.dropped.get_or_create(&Reason { reason: d.as_str() });
        }
        r.register(
            "mqtt_connections",
            "Open MQTT client connections",
            self.connections.clone(),
        );
        r.register(
            "mqtt_sessions",
            "MQTT sessions, connected or kept for a client that is away",
            self.sessions.clone(),
        );
        r.register(
            "mqtt_messages_dropped",
            "Messages for MQTT subscribers not delivered, by reason",
            self.dropped.clone(),
        );
        r.register(
            "connections_refused",
            "MQTT connections refused by the front end, by reason",
            self.front.refused.clone(),
        );
    }
}
