//! `/metrics`: every component's counters and gauges in one registry, in the Prometheus
//! text format. Each component owns and registers its own; every refusal and every
//! reading dropped or downsampled is counted by the component that decides it.

use std::sync::Arc;

use prometheus_client::registry::Registry;

/// The agent's registry and the metrics of its components.
pub struct Metrics {
    registry: Registry,
    pub ingest: Arc<crate::ingest::Metrics>,
    pub writer: Arc<crate::writer::Metrics>,
    pub mqtt: Arc<crate::mqtt::Metrics>,
    pub uplink: Arc<crate::uplink::Metrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fogline");
        let mqtt = Arc::new(crate::mqtt::Metrics::default());
        mqtt.register(&mut registry);
        let ingest = Arc::new(crate::ingest::Metrics::default());
        ingest.register(&mut registry);
        let writer = Arc::new(crate::writer::Metrics::default());
        writer.register(&mut registry);
        let uplink = Arc::new(crate::uplink::Metrics::default());
        uplink.register(&mut registry);
        Metrics {
            registry,
            ingest,
            writer,
            mqtt,
            uplink,
        }
    }

    /// Adds the replica receiver's counters as `fogline_replica_*`.
    pub fn register_replica(&mut self, counters: &crate::shipping::receiver::Counters) {
        counters.register(self.registry.sub_registry_with_prefix("replica"));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Reject;

    #[test]
    fn every_reject_reason_is_exported_from_the_start() {
        let m = Metrics::new();
        m.ingest.reject(Reject::Oversized);
        let text = m.render();
        assert!(
            text.contains("fogline_ingest_rejected_total{reason=\"oversized\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fogline_ingest_rejected_total{reason=\"non_finite\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fogline_buffer_dropped_total{reason=\"capacity\"} 0"),
            "{text}"
        );
        assert!(text.contains("fogline_buffer_commits_total 0"), "{text}");
    }
}
