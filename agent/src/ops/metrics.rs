//! Counters and gauges, exported on `/metrics` in the Prometheus text format.
//! Every refusal and every reading that is dropped or downsampled is counted here.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ingest::Reject;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub received: Counter,
    pub accepted: Counter,
    pub duplicates: Counter,
    /// Readings whose device time was far ahead of the agent's clock.
    pub clock_ahead: Counter,
    pub rejected: Family<Reason, Counter>,
    pub commits: Counter,
    pub commit_failures: Counter,
    pub buffer_bytes: Gauge,
    pub buffer_capacity: Gauge,
    pub buffer_readings: Gauge,
    pub downsampled: Counter,
    pub dropped: Family<Reason, Counter>,
    pub acks_published: Counter,
    pub aggregates_published: Counter,
    pub aggregates_too_late: Counter,
    pub devices: Gauge,
    pub queue_full: Counter,
    pub uplink_connected: Gauge,
    pub uplink_acked: Gauge,
    pub uplink_sent: Gauge,
    pub uplink_backlog: Gauge,
    pub uplink_in_flight: Gauge,
    pub uplink_connects: Gauge,
    pub uplink_batches: Gauge,
    pub uplink_bytes: Gauge,
    pub mqtt_connections: Gauge,
    pub mqtt_sessions: Gauge,
    pub mqtt_dropped: Family<Reason, Counter>,
    /// Connections refused by the MQTT front end (device auth, limits).
    pub front: std::sync::Arc<crate::mqtt::refusals::FrontMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fogline");
        let m = Metrics {
            received: Counter::default(),
            accepted: Counter::default(),
            duplicates: Counter::default(),
            clock_ahead: Counter::default(),
            rejected: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            buffer_bytes: Gauge::default(),
            buffer_capacity: Gauge::default(),
            buffer_readings: Gauge::default(),
            downsampled: Counter::default(),
            dropped: Family::default(),
            acks_published: Counter::default(),
            aggregates_published: Counter::default(),
            aggregates_too_late: Counter::default(),
            devices: Gauge::default(),
            queue_full: Counter::default(),
            uplink_connected: Gauge::default(),
            uplink_acked: Gauge::default(),
            uplink_sent: Gauge::default(),
            uplink_backlog: Gauge::default(),
            uplink_in_flight: Gauge::default(),
            uplink_connects: Gauge::default(),
            uplink_batches: Gauge::default(),
            uplink_bytes: Gauge::default(),
            mqtt_connections: Gauge::default(),
            mqtt_sessions: Gauge::default(),
            mqtt_dropped: Family::default(),
            front: crate::mqtt::refusals::FrontMetrics::new(std::time::Duration::from_secs(10)),
            registry: Registry::default(),
        };
        for r in Reject::ALL {
            let _ = m.rejected.get_or_create(&Reason { reason: r.as_str() });
        }
        for reason in ["capacity", "disk_full"] {
            let _ = m.dropped.get_or_create(&Reason { reason });
        }
        for d in crate::mqtt::session::Dropped::ALL {
            let _ = m.mqtt_dropped.get_or_create(&Reason { reason: d.as_str() });
        }
        let r = &mut registry;
        r.register(
            "mqtt_connections",
            "Open MQTT client connections",
            m.mqtt_connections.clone(),
        );
        r.register(
            "mqtt_sessions",
            "MQTT sessions, connected or kept for a client that is away",
            m.mqtt_sessions.clone(),
        );
        r.register(
            "mqtt_messages_dropped",
            "Messages for MQTT subscribers not delivered, by reason",
            m.mqtt_dropped.clone(),
        );
        r.register(
            "connections_refused",
            "MQTT connections refused by the front end, by reason",
            m.front.refused.clone(),
        );
        r.register(
            "ingest_received",
            "Publishes seen on sensors/#",
            m.received.clone(),
        );
        r.register(
            "ingest_accepted",
            "Readings committed to the buffer (duplicates excluded)",
            m.accepted.clone(),
        );
        r.register(
            "ingest_duplicates",
            "Re-sent readings that were already stored and were not stored again",
            m.duplicates.clone(),
        );
        r.register(
            "ingest_clock_ahead",
            "Readings whose device time was more than 10 minutes ahead of the agent's clock: \
             stored with their arrival time",
            m.clock_ahead.clone(),
        );
        r.register(
            "ingest_rejected",
            "Publishes refused, by reason",
            m.rejected.clone(),
        );
        r.register(
            "ingest_queue_full",
            "Times the ingest queue was full and the broker had to wait",
            m.queue_full.clone(),
        );
        r.register(
            "buffer_commits",
            "Durable commits (one fsync each)",
            m.commits.clone(),
        );
        r.register(
            "buffer_commit_failures",
            "Commits that failed; their readings were not acknowledged",
            m.commit_failures.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes of readings held",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_capacity_bytes",
            "Configured buffer capacity",
            m.buffer_capacity.clone(),
        );
        r.register(
            "buffer_readings",
            "Raw readings held",
            m.buffer_readings.clone(),
        );
        r.register(
            "buffer_downsampled",
            "Raw readings folded into summaries to make room",
            m.downsampled.clone(),
        );
        r.register(
            "buffer_dropped",
            "Readings dropped, by reason",
            m.dropped.clone(),
        );
        r.register(
            "acks_published",
            "Ack watermarks published",
            m.acks_published.clone(),
        );
        r.register(
            "aggregates_published",
            "Window aggregates published",
            m.aggregates_published.clone(),
        );
        r.register(
            "aggregates_too_late",
            "Reading-window pairs skipped because the window had closed for good",
            m.aggregates_too_late.clone(),
        );
        r.register("devices", "Devices known to the buffer", m.devices.clone());
        for (name, help, g) in [
            (
                "uplink_connected",
                "1 while the uplink to the gateway is connected",
                &m.uplink_connected,
            ),
            (
                "uplink_acked_offset",
                "The gateway has every reading below this offset",
                &m.uplink_acked,
            ),
            (
                "uplink_sent_offset",
                "Readings below this offset were sent",
                &m.uplink_sent,
            ),
            (
                "uplink_backlog_readings",
                "Readings the gateway does not have yet",
                &m.uplink_backlog,
            ),
            (
                "uplink_in_flight_readings",
                "Readings sent but not yet acked",
                &m.uplink_in_flight,
            ),
            (
                "uplink_connects",
                "Successful uplink connections since start",
                &m.uplink_connects,
            ),
            (
                "uplink_batches_sent",
                "Batches sent upstream since start",
                &m.uplink_batches,
            ),
            (
                "uplink_bytes_sent",
                "Batch bytes sent upstream since start",
                &m.uplink_bytes,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        Metrics { registry, ..m }
    }

    pub fn reject(&self, reason: Reject) {
        self.rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn drop_readings(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&Reason { reason }).inc_by(n);
    }

    pub fn rejected_total(&self) -> u64 {
        Reject::ALL
            .iter()
            .map(|r| {
                self.rejected
                    .get_or_create(&Reason { reason: r.as_str() })
                    .get()
            })
            .sum()
    }

    /// Copies the uplink's state into its gauges.
    pub fn set_uplink(&self, u: &crate::uplink::UplinkStatus) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.uplink_connected.set(i64::from(u.link == "connected"));
        self.uplink_acked.set(g(u.acked));
        self.uplink_sent.set(g(u.sent));
        self.uplink_backlog.set(g(u.backlog()));
        self.uplink_in_flight.set(g(u.in_flight()));
        self.uplink_connects.set(g(u.connects));
        self.uplink_batches.set(g(u.batches_sent));
        self.uplink_bytes.set(g(u.bytes_sent));
    }

    /// The Prometheus text exposition.
    /// Adds the replica receiver's counters as `fogline_replica_*`.
    pub fn register_replica(&mut self, counters: &crate::shipping::receiver::Counters) {
        counters.register(self.registry.sub_registry_with_prefix("replica"));
    }

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

    #[test]
    fn every_reject_reason_is_exported_from_the_start() {
        let m = Metrics::new();
        m.reject(Reject::Oversized);
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
