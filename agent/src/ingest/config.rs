//! `[ingest]`: what a reading may be and how refusals are logged.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub max_payload_bytes: usize,
    pub queue_readings: usize,
    pub reject_log_interval_ms: u64,
}
