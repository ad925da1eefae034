//! `[mqtt]`: the front end's listeners and limits.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// Empty: no MQTT 5 listener.
    pub listen_v5: String,
    pub max_connections: usize,
    pub max_packet_bytes: usize,
    pub max_inflight: usize,
    /// The agent's sessions (the gateway has none of its own).
    #[serde(default = "default_max_queued")]
    pub max_queued_messages: usize,
    #[serde(default = "default_session_expiry")]
    pub session_expiry_max_secs: u32,
    pub connect_timeout_ms: u16,
    /// Topic aliases an MQTT 5 client may set (Topic Alias Maximum); 0: none.
    #[serde(default = "default_topic_alias_max")]
    pub topic_alias_max: u16,
    /// Longest keep alive a client may ask for; 0: any (including none).
    #[serde(default)]
    pub max_keep_alive_secs: u16,
}

fn default_topic_alias_max() -> u16 {
    32
}

fn default_max_queued() -> usize {
    1000
}

fn default_session_expiry() -> u32 {
    7 * 24 * 3600
}

impl MqttConfig {
    /// The MQTT 5 listen address, if that listener is on.
    pub fn listen_v5_addr(&self) -> Result<Option<SocketAddr>, String> {
        let raw = self.listen_v5.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        raw.parse().map(Some).map_err(|_| {
            format!("mqtt.listen_v5 = {raw:?} is not an ADDR:PORT (use \"\" to turn it off)")
        })
    }
}
