//! `[aggregate]`: window lengths, lateness and quantiles.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    pub windows_secs: Vec<u32>,
    pub lateness_secs: u32,
    pub publish_interval_ms: u64,
    pub quantiles: Vec<f64>,
}
