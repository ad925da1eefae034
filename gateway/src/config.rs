//! The gateway's configuration: same layering and sections as the agent's where they
//! mean the same thing (`mqtt`, `http`, `log`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use figment::providers::Env;
use fogline_agent::ops::config::{load_layers, ConfigError, HttpConfig, LogConfig, MqttConfig};
use fogline_agent::security::auth::SecretHash;
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
    /// Who may do what on `mqtt.listen` besides nodes with a certificate.
    #[serde(default)]
    pub access: AccessConfig,
}

/// `[access]`: dashboards and clients without a node certificate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// What a client with neither a node certificate nor credentials becomes.
    pub anonymous: AnonymousPolicy,
    /// Dashboards: user name → argon2 hash (`fogline-agent auth hash`). They subscribe
    /// to `agg/#` and publish nothing.
    pub readers: BTreeMap<String, SecretHash>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousPolicy {
    /// `node` without `[tls]` (a lab, warned at start), `refuse` with it.
    #[default]
    Auto,
    /// Refused at CONNECT.
    Refuse,
    /// A read-only dashboard: subscribes to `agg/#`, publishes nothing.
    Read,
    /// A node of any site (never an ack): only without `[tls]`.
    Node,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub batch_max_messages: usize,
    pub batch_max_delay_ms: u64,
    pub cache_bytes: usize,
    /// Index every reading and aggregate by series and time for the history API.
    #[serde(default = "yes")]
    pub history: bool,
    /// `postgres://USER@HOST:PORT/DB`: the store is in PostgreSQL (shared by any number
    /// of gateways); empty: the embedded store in `data_dir`.
    #[serde(default)]
    pub url: String,
    /// PostgreSQL only: days of readings, summaries and aggregates kept (whole daily
    /// partitions are dropped after that); 0: kept forever.
    #[serde(default)]
    pub retention_days: u32,
}

fn yes() -> bool {
    true
}

/// Command-line values; they override every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    /// `--store`: a PostgreSQL URL (`store.url`).
    pub store_url: Option<String>,
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
        if let Some(v) = &o.store_url {
            c.store.url = v.clone();
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
        fogline_agent::security::auth::validate_users("access.readers", &self.access.readers)
            .map_err(ConfigError::Invalid)?;
        if self.tls.enabled() && self.access.anonymous == AnonymousPolicy::Node {
            return bad(
                "access.anonymous = \"node\" with [tls] would let any client without a \
                        certificate ship for any site; use \"refuse\" or \"read\""
                    .into(),
            );
        }
        if !self.store.url.is_empty() && !crate::pg::is_url(&self.store.url) {
            return bad(format!(
                "store.url = {:?}: a PostgreSQL URL postgres://USER@HOST:PORT/DB, or empty \
                 for the embedded store in store.data_dir",
                crate::pg::redact(&self.store.url)
            ));
        }
        if self.store.retention_days > 0 && self.store.url.is_empty() {
            return bad(
                "store.retention_days needs store.url (PostgreSQL): the embedded store keeps \
                 everything"
                    .into(),
            );
        }
        if self.store.batch_max_messages == 0 {
            return bad("store.batch_max_messages must be at least 1".into());
        }
        self.log.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// What `access.anonymous` comes to with this `[tls]`.
    pub fn anonymous(&self) -> fogline_agent::mqtt::Anonymous {
        use fogline_agent::mqtt::Anonymous;
        match self.access.anonymous {
            AnonymousPolicy::Auto if self.tls.enabled() => Anonymous::Refuse,
            AnonymousPolicy::Auto | AnonymousPolicy::Node => Anonymous::Node,
            AnonymousPolicy::Refuse => Anonymous::Refuse,
            AnonymousPolicy::Read => Anonymous::Read,
        }
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
        // No TLS, no readers: a lab where anyone may ship (warned at start).
        assert_eq!(c.anonymous(), fogline_agent::mqtt::Anonymous::Node);
    }

    #[test]
    fn anonymous_nodes_are_refused_with_tls() {
        let mut c = Config::load_with_env(
            None,
            &Overrides::default(),
            Env::prefixed("FOGLINE_GW_TEST_NOTHING_"),
        )
        .expect("defaults");
        c.tls.ca = "ca.pem".into();
        c.tls.cert = "gw.pem".into();
        c.tls.key = "gw.key".into();
        assert_eq!(c.anonymous(), fogline_agent::mqtt::Anonymous::Refuse);
        c.access.anonymous = AnonymousPolicy::Node;
        let err = c.validate().expect_err("node with tls");
        assert!(err.to_string().contains("access.anonymous"), "{err}");
        c.access.anonymous = AnonymousPolicy::Read;
        c.validate().expect("read with tls");
        c.access
            .readers
            .insert("grafana".into(), SecretHash::new("not-a-hash"));
        let err = c.validate().expect_err("bad hash");
        assert!(err.to_string().contains("access.readers.grafana"), "{err}");
    }
}
