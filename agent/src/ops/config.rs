//! The agent's configuration: built-in defaults (`default.toml`, printed by
//! `fogline-agent config defaults`), then the user's file, then `FOGLINE_…` environment
//! variables, then command-line flags. Unknown keys are errors, so a typo is reported
//! instead of silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use crate::aggregate::AggregateConfig;
pub use crate::buffer::config::{buffer_path, BufferConfig};
pub use crate::ingest::config::IngestConfig;
pub use crate::mqtt::config::MqttConfig;
pub use crate::site::config::{AckAfter, ClusterConfig, Peer};
pub use crate::uplink::config::{Gateways, UplinkConfig};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The commented default configuration, exactly as shipped.
pub const DEFAULTS: &str = include_str!("default.toml");

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0}")]
    Parse(Box<figment::Error>),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub buffer: BufferConfig,
    pub aggregate: AggregateConfig,
    pub uplink: UplinkConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
    // Security (issue 8): each section lives in its own module.
    #[serde(default)]
    pub tls: crate::security::tls::TlsConfig,
    #[serde(default)]
    pub auth: crate::security::auth::AuthConfig,
    #[serde(default)]
    pub limits: crate::ingest::limits::LimitsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    pub site: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl LogConfig {
    /// `log.level` must be a tracing filter (`info`, `fogline_agent=debug,warn`, …).
    pub fn validate(&self) -> Result<(), String> {
        match self.level.parse::<tracing_subscriber::EnvFilter>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "log.level = {:?} is not a tracing filter",
                self.level
            )),
        }
    }
}

/// Values given on the command line; they override every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub mqtt_listen: Option<SocketAddr>,
    pub mqtt_listen_v5: Option<String>,
    pub http_listen: Option<SocketAddr>,
    pub node_id: Option<String>,
    pub site: Option<String>,
    /// `HOST:PORT,…`
    pub gateway: Option<Gateways>,
    /// `ID=HOST:PORT,…`
    pub peers: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults are checked by a unit test, so this cannot fail at run time.
        #[allow(clippy::expect_used)]
        Figment::from(Toml::string(DEFAULTS))
            .extract()
            .expect("built-in default.toml is valid")
    }
}

impl Config {
    /// Loads the layers in order and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(file, overrides, Env::prefixed("FOGLINE_").split("__"))
    }

    fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: Env,
    ) -> Result<Config, ConfigError> {
        let mut config: Config = load_layers(DEFAULTS, file, env)?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.data_dir {
            self.buffer.data_dir = v.clone();
        }
        if let Some(v) = o.mqtt_listen {
            self.mqtt.listen = v;
        }
        if let Some(v) = &o.mqtt_listen_v5 {
            self.mqtt.listen_v5 = v.clone();
        }
        if let Some(v) = o.http_listen {
            self.http.listen = v;
        }
        if let Some(v) = &o.node_id {
            self.node.id = v.clone();
        }
        if let Some(v) = &o.site {
            self.node.site = v.clone();
        }
        if let Some(v) = &o.gateway {
            self.uplink.gateway = v.clone();
        }
        if let Some(v) = &o.peers {
            self.cluster.peers = v.clone();
        }
    }

    /// The MQTT 5 listen address, if that listener is on.
    pub fn listen_v5(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.mqtt.listen_v5_addr().map_err(ConfigError::Invalid)
    }

    /// Checks everything that deserialization cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        for (key, id) in [("node.id", &self.node.id), ("node.site", &self.node.site)] {
            if !fogline_firmware::wire::valid_id(id) {
                return bad(format!(
                    "{key} = {id:?}: use 1-32 characters of [A-Za-z0-9_.-]"
                ));
            }
        }
        self.listen_v5()?;
        if self.mqtt.max_inflight == 0 || self.mqtt.max_inflight > 65535 {
            return bad(format!(
                "mqtt.max_inflight = {}: use 1 to 65535",
                self.mqtt.max_inflight
            ));
        }
        if self.mqtt.max_queued_messages == 0 {
            return bad("mqtt.max_queued_messages must be at least 1".into());
        }
        let peers = self.cluster.peers().map_err(ConfigError::Invalid)?;
        if peers.iter().any(|p| p.id == self.node.id) {
            return bad(format!(
                "cluster.peers lists this agent ({}) itself; list only the others",
                self.node.id
            ));
        }
        let c = &self.cluster;
        if !c.listen.is_empty() && c.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "cluster.listen = {:?}: expected IP:PORT, e.g. 0.0.0.0:1885",
                c.listen
            ));
        }
        if !peers.is_empty()
            && c.listen.is_empty()
            && (self.tls.enabled() || self.auth.mode != crate::security::auth::AuthMode::Open)
        {
            return bad(
                "with [tls] or device authentication the site's agents need their own \
                 listener: set cluster.listen (and give peers that address)"
                    .into(),
            );
        }
        // A stored block holds at most batch_max_readings readings of at most ~100 bytes.
        if c.max_batch_bytes < 4096 || self.buffer.batch_max_readings * 128 > c.max_batch_bytes {
            return bad(format!(
                "cluster.max_batch_bytes = {} must be at least 4096 and hold \
                 buffer.batch_max_readings ({}) readings of 128 bytes",
                c.max_batch_bytes, self.buffer.batch_max_readings
            ));
        }
        let members = peers.len() + 1;
        if c.min_insync == 0 || (c.replicated_acks() && c.min_insync > members) {
            return bad(format!(
                "cluster.min_insync = {} must be between 1 and the number of agents ({members})",
                c.min_insync
            ));
        }
        if c.replication_factor > members {
            return bad(format!(
                "cluster.replication_factor = {} is more than the number of agents ({members})",
                c.replication_factor
            ));
        }
        if c.replicated_acks() && c.replication_factor != 0 && c.min_insync > c.replication_factor {
            return bad(format!(
                "cluster.min_insync = {} can never be reached with replication_factor = {}",
                c.min_insync, c.replication_factor
            ));
        }
        if c.tick_ms == 0
            || c.heartbeat_ticks == 0
            || c.lease_ticks >= c.election_timeout_min_ticks
            || c.election_timeout_min_ticks > c.election_timeout_max_ticks
            || c.heartbeat_ticks >= c.lease_ticks
        {
            return bad(
                "cluster timing: need tick_ms > 0 and 0 < heartbeat_ticks < lease_ticks < \
                 election_timeout_min_ticks <= election_timeout_max_ticks"
                    .into(),
            );
        }
        if self.mqtt.max_connections == 0 {
            return bad("mqtt.max_connections must be at least 1".into());
        }
        if self.ingest.max_payload_bytes == 0
            || self.ingest.max_payload_bytes > self.mqtt.max_packet_bytes
        {
            return bad(format!(
                "ingest.max_payload_bytes = {} must be between 1 and mqtt.max_packet_bytes ({})",
                self.ingest.max_payload_bytes, self.mqtt.max_packet_bytes
            ));
        }
        if self.ingest.queue_readings == 0 {
            return bad("ingest.queue_readings must be at least 1".into());
        }
        let b = &self.buffer;
        if b.max_bytes < 16 * 1024 {
            return bad(format!(
                "buffer.max_bytes = {} is too small (at least 16384)",
                b.max_bytes
            ));
        }
        if !(b.downsample_to > 0.0 && b.downsample_to < b.downsample_at && b.downsample_at <= 1.0) {
            return bad(format!(
                "need 0 < buffer.downsample_to ({}) < buffer.downsample_at ({}) <= 1",
                b.downsample_to, b.downsample_at
            ));
        }
        if b.downsample_window_secs == 0 {
            return bad("buffer.downsample_window_secs must be at least 1".into());
        }
        if b.min_free_disk_bytes < 1 << 20 {
            return bad(format!(
                "buffer.min_free_disk_bytes = {} is too small (at least 1048576: a full disk \
                 needs a reserve to recover)",
                b.min_free_disk_bytes
            ));
        }
        if b.batch_max_readings == 0 {
            return bad("buffer.batch_max_readings must be at least 1".into());
        }
        let a = &self.aggregate;
        if a.windows_secs.is_empty() || a.windows_secs.contains(&0) {
            return bad("aggregate.windows_secs needs at least one window, none of 0 s".into());
        }
        if let Some(q) = a.quantiles.iter().find(|q| !(0.0..=1.0).contains(*q)) {
            return bad(format!("aggregate.quantiles: {q} is not between 0 and 1"));
        }
        if a.publish_interval_ms == 0 {
            return bad("aggregate.publish_interval_ms must be at least 1".into());
        }
        let u = &self.uplink;
        u.gateway.addresses().map_err(ConfigError::Invalid)?;
        if u.batch_readings == 0 || u.max_inflight_readings < u.batch_readings {
            return bad("need 0 < uplink.batch_readings <= uplink.max_inflight_readings".into());
        }
        if u.backoff_min_ms == 0 || u.backoff_max_ms < u.backoff_min_ms {
            return bad("need 0 < uplink.backoff_min_ms <= uplink.backoff_max_ms".into());
        }
        self.log.validate().map_err(ConfigError::Invalid)?;
        self.tls.validate().map_err(ConfigError::Invalid)?;
        self.auth.validate().map_err(ConfigError::Invalid)?;
        self.limits.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The redb file inside the data directory.
    pub fn buffer_path(&self) -> PathBuf {
        buffer_path(&self.buffer.data_dir)
    }
}

/// Built-in defaults, then `file`, then `env`: the layering every fogline program uses.
pub fn load_layers<T: serde::de::DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    env: Env,
) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Toml::string(defaults));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError::Parse(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env::prefixed("FOGLINE_TEST_NOTHING_SHOULD_MATCH_")
    }

    #[test]
    fn built_in_defaults_parse_and_validate() {
        let c = Config::load_with_env(None, &Overrides::default(), no_env()).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.aggregate.windows_secs, vec![10, 60, 3600]);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn file_env_and_flags_layer_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "[node]\nid = \"from-file\"\nsite = \"s\"\n[buffer]\nmax_bytes = 100000\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("FOGLINE_BUFFER__MAX_BYTES", "200000");
            jail.set_env("FOGLINE_NODE__SITE", "from-env");
            let flags = Overrides {
                site: Some("from-flag".into()),
                ..Overrides::default()
            };
            let c = Config::load(Some(&file), &flags).map_err(|e| e.to_string())?;
            assert_eq!(c.node.id, "from-file");
            assert_eq!(c.buffer.max_bytes, 200000);
            assert_eq!(c.node.site, "from-flag");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
    fn gateways_come_as_a_string_a_comma_string_or_an_array_from_every_layer() {
        let list = |c: &Config| c.uplink.gateway.as_slice().to_vec();
        let two = vec!["gw1:1883".to_owned(), "gw2:1883".to_owned()];
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        for (toml, want) in [
            (r#""gw1:1883""#, vec!["gw1:1883".to_owned()]),
            (r#""gw1:1883,gw2:1883""#, two.clone()),
            (r#"["gw1:1883", "gw2:1883"]"#, two.clone()),
            (r#""""#, Vec::new()),
            ("[]", Vec::new()),
        ] {
            std::fs::write(&file, format!("[uplink]\ngateway = {toml}\n")).expect("write");
            let c = Config::load_with_env(Some(&file), &Overrides::default(), no_env())
                .unwrap_or_else(|e| panic!("{toml}: {e}"));
            assert_eq!(list(&c), want, "{toml}");
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("FOGLINE_UPLINK__GATEWAY", "gw1:1883,gw2:1883");
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(list(&c), two);
            jail.set_env("FOGLINE_UPLINK__GATEWAY", "[gw1:1883, gw2:1883]");
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(list(&c), two);
            let flags = Overrides {
                gateway: "gw3:1883,gw1:1883".parse().ok(),
                ..Overrides::default()
            };
            let c = Config::load(None, &flags).map_err(|e| e.to_string())?;
            assert_eq!(list(&c), vec!["gw3:1883", "gw1:1883"]);
            let flags = Overrides {
                gateway: "".parse().ok(),
                ..Overrides::default()
            };
            let c = Config::load(None, &flags).map_err(|e| e.to_string())?;
            assert!(c.uplink.gateway.is_empty(), "--gateway \"\" is no uplink");
            Ok(())
        });
    }

    #[test]
    fn a_bad_or_repeated_gateway_is_refused_by_name() {
        for (gateway, names) in [
            ("gw1:1883,gw2", "\"gw2\""),
            ("gw1:1883,gw2:1883,gw1:1883", "\"gw1:1883\" twice"),
        ] {
            let flags = Overrides {
                gateway: gateway.parse().ok(),
                ..Overrides::default()
            };
            let err = Config::load_with_env(None, &flags, no_env()).expect_err(gateway);
            assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("uplink.gateway") && msg.contains(names),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "[buffer]\nmax_byte = 5\n").expect("write");
        let err = Config::load_with_env(Some(&file), &Overrides::default(), no_env())
            .expect_err("typo must be refused");
        assert!(err.to_string().contains("max_byte"), "{err}");

        std::fs::write(&file, "[node]\nid = \"bad id\"\n").expect("write");
        let err = Config::load_with_env(Some(&file), &Overrides::default(), no_env())
            .expect_err("bad id must be refused");
        assert!(err.to_string().contains("node.id"), "{err}");

        let missing = dir.path().join("nope.toml");
        let err = Config::load_with_env(Some(&missing), &Overrides::default(), no_env())
            .expect_err("missing file");
        assert!(matches!(err, ConfigError::Missing(_)));
    }
}
