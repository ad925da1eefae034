//! `fogline-sensor`: the firmware's node loop on a host.
//!
//! - [`device`]: one device — a [`fogline_firmware::node::Node`], a sensor and an MQTT
//!   connection (rumqttc) — as two small async tasks.
//! - [`simulate`]: a fleet of simulated devices, with progress, a summary and a JSON
//!   report; also the load generator for benchmarks.
//! - [`signal`]: the simulated sensors' signals (daily cycle, noise, spikes).
//! - [`read`]: a real SHT3x/SHT4x/BME280 on a Linux I2C bus.
//! - [`clock`]: device clocks, including one that starts in 1970.
//! - [`provision`]: the configuration block of a Pico W sensor, as a UF2 or `.bin` file.
//!
//! `main.rs` only parses flags, sets up logging and signals, and calls into here.

pub mod clock;
pub mod device;
pub mod provision;
pub mod read;
pub mod signal;
pub mod simulate;

use std::time::Duration;

use crate::device::MqttSettings;

/// Largest ring per device (about 40 MB on a 64-bit host): bounds memory for any input.
pub const MAX_RING: usize = 1_000_000;

/// How to reach the broker (the agent's MQTT listener).
#[derive(Debug, Clone, clap::Args)]
pub struct MqttArgs {
    /// The agent's MQTT listener, host:port.
    #[arg(long, env = "FOGLINE_SENSOR_BROKER", default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// MQTT user name, if the broker requires one.
    #[arg(long, env = "FOGLINE_SENSOR_USERNAME")]
    pub username: Option<String>,
    /// MQTT password (prefer the environment variable over the command line).
    #[arg(long, env = "FOGLINE_SENSOR_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// MQTT keep-alive.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub keep_alive: Duration,
    /// Publishes the MQTT client queues per device before a device waits.
    #[arg(long, default_value_t = 256)]
    pub client_queue: usize,
}

impl MqttArgs {
    /// The connection settings these flags describe.
    pub fn settings(&self) -> anyhow::Result<MqttSettings> {
        let (host, port) = MqttSettings::parse_broker(&self.broker)?;
        let credentials = match (&self.username, &self.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            (None, Some(_)) => anyhow::bail!("--password needs --username"),
            (None, None) => None,
        };
        if self.keep_alive < Duration::from_secs(1) {
            anyhow::bail!("--keep-alive must be at least 1s");
        }
        Ok(MqttSettings {
            host,
            port,
            credentials,
            keep_alive: self.keep_alive,
            queue: self.client_queue.max(1),
        })
    }
}

/// Parses `250ms`, `10s`, `5m`, `2h`, or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 5m, 2h)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    let secs = value * scale;
    if !(0.0..=10.0 * 365.0 * 86_400.0).contains(&secs) {
        return Err(format!("{s:?} is not a usable duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "ten", "5 parsecs", "-1s", "NaN", "1e300h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn credentials_need_a_user_name() {
        let args = MqttArgs {
            broker: "127.0.0.1:1883".into(),
            username: None,
            password: Some("x".into()),
            keep_alive: Duration::from_secs(10),
            client_queue: 10,
        };
        assert!(args.settings().is_err());
        let ok = MqttArgs {
            username: Some("u".into()),
            ..args
        };
        assert_eq!(
            ok.settings().expect("valid").credentials,
            Some(("u".to_string(), "x".to_string()))
        );
    }
}
