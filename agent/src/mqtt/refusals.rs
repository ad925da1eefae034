//! The refusal counters every front end shares (the agent's MQTT front end, the gateway's
//! TLS relay): one counter per reason, and at most one log line per reason per interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub reason: &'static str,
}

/// Every reason a front end (the agent's MQTT front end, the gateway's TLS relay)
/// refuses a connection, exported from the start.
pub const REFUSALS: [&str; 17] = [
    "no_credentials",
    "unknown_device",
    "bad_password",
    "client_id_mismatch",
    "foreign_will",
    "foreign_topic",
    "foreign_subscription",
    "not_connect",
    "malformed_packet",
    "oversized_packet",
    "max_connections",
    "no_certificate",
    "unknown_ca",
    "bad_certificate",
    "tls_handshake",
    "no_site",
    "foreign_site",
];

/// Shared by the front ends of one process; register `refused` on `/metrics`.
#[derive(Default)]
pub struct FrontMetrics {
    pub refused: Family<RefusedLabel, Counter>,
    log: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
    log_every: Mutex<Duration>,
}

impl FrontMetrics {
    pub fn new(log_every: Duration) -> Arc<FrontMetrics> {
        let m = FrontMetrics {
            log_every: Mutex::new(log_every),
            ..Default::default()
        };
        for reason in REFUSALS {
            let _ = m.refused.get_or_create(&RefusedLabel { reason });
        }
        Arc::new(m)
    }

    /// At most one log line per reason per this interval.
    pub fn set_log_every(&self, every: Duration) {
        if let Ok(mut e) = self.log_every.lock() {
            *e = every;
        }
    }

    pub fn refused_total(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&RefusedLabel { reason }).get()
    }

    /// Counts a refusal and logs it, at most once per reason per interval.
    pub fn refuse(&self, reason: &'static str, peer: SocketAddr, detail: &str) {
        self.refused.get_or_create(&RefusedLabel { reason }).inc();
        let every = self.log_every.lock().map_or(Duration::ZERO, |d| *d);
        let Ok(mut log) = self.log.lock() else {
            return;
        };
        let now = Instant::now();
        let entry = log.entry(reason).or_insert((None, 0));
        if entry.0.is_some_and(|at| now.duration_since(at) < every) {
            entry.1 += 1;
            return;
        }
        tracing::warn!(
            reason,
            %peer,
            suppressed = entry.1,
            "refused a connection: {reason}{}{detail}",
            if detail.is_empty() { "" } else { ": " }
        );
        *entry = (Some(now), 0);
    }
}
