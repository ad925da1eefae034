//! What the writer counts (`fogline_buffer_*`, acks and aggregates published).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::labels::Reason;

#[derive(Default)]
pub struct Metrics {
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
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        for reason in ["capacity", "disk_full"] {
            let _ = self.dropped.get_or_create(&Reason { reason });
        }
        r.register(
            "buffer_commits",
            "Durable commits (one fsync each)",
            self.commits.clone(),
        );
        r.register(
            "buffer_commit_failures",
            "Commits that failed; their readings were not acknowledged",
            self.commit_failures.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes of readings held",
            self.buffer_bytes.clone(),
        );
        r.register(
            "buffer_capacity_bytes",
            "Configured buffer capacity",
            self.buffer_capacity.clone(),
        );
        r.register(
            "buffer_readings",
            "Raw readings held",
            self.buffer_readings.clone(),
        );
        r.register(
            "buffer_downsampled",
            "Raw readings folded into summaries to make room",
            self.downsampled.clone(),
        );
        r.register(
            "buffer_dropped",
            "Readings dropped, by reason",
            self.dropped.clone(),
        );
        r.register(
            "acks_published",
            "Ack watermarks published",
            self.acks_published.clone(),
        );
        r.register(
            "aggregates_published",
            "Window aggregates published",
            self.aggregates_published.clone(),
        );
        r.register(
            "aggregates_too_late",
            "Reading-window pairs skipped because the window had closed for good",
            self.aggregates_too_late.clone(),
        );
        r.register(
            "devices",
            "Devices known to the buffer",
            self.devices.clone(),
        );
    }

    pub fn drop_readings(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&Reason { reason }).inc_by(n);
    }
}
