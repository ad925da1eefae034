//! `[uplink]`: the link to the gateway (and, with the same shape, to each peer).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// HOST:PORT of the gateway's MQTT listener; empty: no uplink.
    pub gateway: String,
    pub batch_readings: u64,
    pub max_inflight_readings: u64,
    pub max_inflight_batches: u16,
    pub drain_rate: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub keepalive_secs: u64,
    pub ack_timeout_ms: u64,
    pub retention_secs: u64,
}
