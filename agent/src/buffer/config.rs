//! `[buffer]`: where the log lives, its capacity and the group commit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    pub data_dir: PathBuf,
    pub max_bytes: u64,
    pub downsample_at: f64,
    pub downsample_to: f64,
    pub downsample_window_secs: u32,
    pub batch_max_readings: usize,
    pub batch_max_delay_ms: u64,
    pub cache_bytes: usize,
    pub min_free_disk_bytes: u64,
}

/// The redb file inside a data directory.
pub fn buffer_path(data_dir: &Path) -> PathBuf {
    data_dir.join("buffer.redb")
}
