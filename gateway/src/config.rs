//! The gateway's configuration: same layering and sections as the agent's where they
//! mean the same thing (`mqtt`, `http`, `log`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::Env;
use fogline_agent::ops::config::{load_layers, ConfigError, HttpConfig, LogConfig, MqttConfig};
use serde::{Deserialize, Serialize};

pub const DEFAULTS: &str = include_str!("default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    /// Agents' uplinks over TLS with client certificates signed by the site CA.
    #[serde(default)]
    pub tls: fogline_agent::security::tls::TlsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub batch_max_messages: usize,
    pub batch_max_delay_ms: u64,
    pub cache_bytes: usize,
}

/// Command-line values; they override every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub mqtt_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
}

impl Config {
    pub fn load(file: Option<&Path>, o: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(file, o, Env::prefixed("FOGLINE_GW_").split("__"))
    }

    fn load_with_env(file: Option<&Path>, o: &Overrides, env: Env) -> Result<Config, ConfigError> {
        let mut c: Config = load_layers(DEFAULTS, file, env)?;
        if let Some(v) = &o.data_dir {
            c.store.data_dir = v.clone();
        }
        if let Some(v) = o.mqtt_listen {
            c.mqtt.listen = v;
        }
        if let Some(v) = o.http_listen {
            c.http.listen = v;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.mqtt
            .listen_v5_addr()
            .map_err(fogline_agent::ops::config::ConfigError::Invalid)?;
        if self.mqtt.max_packet_bytes < 64 * 1024 {
            return bad("mqtt.max_packet_bytes must be at least 65536 (uplink batches)".into());
        }
        self.tls.validate().map_err(ConfigError::Invalid)?;
        if self.store.batch_max_messages == 0 {
            return bad("store.batch_max_messages must be at least 1".into());
        }
        self.log.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn store_path(&self) -> PathBuf {
        store_path(&self.store.data_dir)
    }
}

pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("gateway.redb")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_load() {
        let c = Config::load_with_env(
            None,
            &Overrides::default(),
            Env::prefixed("FOGLINE_GW_TEST_NOTHING_"),
        )
        .expect("defaults");
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.http.listen.port(), 9280);
    }
}
