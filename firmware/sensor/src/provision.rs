//! `fogline-sensor provision`: the configuration block of a Pico W sensor, as a file.
//!
//! The Pico W image is the same for every sensor; its Wi-Fi network, agent, device id,
//! MQTT credentials and sensor live in the last flash sector (`fogline-pico-config`). This
//! writes that sector as a UF2 file, which the Pico's boot ROM writes to flash when it is
//! copied onto the Pico's USB drive (hold BOOTSEL while plugging it in), or as a raw
//! `.bin` for `probe-rs download --binary-format bin --base-address 0x101FF000`. Neither
//! touches the image, so a sensor is re-provisioned without re-flashing it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use fogline_pico_config::{uf2, Config, SensorKind, BLOCK_ADDRESS, SECTOR_SIZE};

use crate::device::MqttSettings;
use crate::parse_duration;
use crate::read::parse_address;

/// Options of `fogline-sensor provision`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionArgs {
    /// The sensor's device id (1-32 of [A-Za-z0-9_.-]); also its MQTT client id.
    #[arg(long)]
    pub device: String,
    /// The Wi-Fi network's name.
    #[arg(long)]
    pub wifi_ssid: String,
    /// The Wi-Fi passphrase (WPA2); leave out for an open network.
    #[arg(
        long,
        env = "FOGLINE_WIFI_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    pub wifi_password: String,
    /// The agent's MQTT listener, host:port (port 1883 when left out); a host name is
    /// looked up with the DHCP server's DNS.
    #[arg(long)]
    pub agent: String,
    /// MQTT user name, if the agent requires device credentials.
    #[arg(long, env = "FOGLINE_SENSOR_USERNAME", default_value = "")]
    pub username: String,
    /// MQTT password (prefer the environment variable over the command line).
    #[arg(
        long,
        env = "FOGLINE_SENSOR_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    pub password: String,
    /// Which sensor is wired to the Pico's I2C0 (GP4 SDA, GP5 SCL).
    #[arg(long, value_parser = parse_sensor)]
    pub sensor: SensorKind,
    /// The sensor's 7-bit address, e.g. 0x77; the sensor's usual address by default.
    #[arg(long, value_parser = parse_address)]
    pub address: Option<u8>,
    /// Time between readings (1 s to 1 day).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub interval: Duration,
    /// Where to write the block: NAME.uf2 for the USB drive, NAME.bin for a debug probe.
    #[arg(long, short)]
    pub out: PathBuf,
}

fn parse_sensor(s: &str) -> Result<SensorKind, String> {
    SensorKind::from_name(s).ok_or_else(|| format!("unknown sensor {s:?}: sht3x, sht4x or bme280"))
}

/// The block for `args`, as the whole flash sector (unused bytes erased, 0xFF).
pub fn sector(args: &ProvisionArgs) -> anyhow::Result<Vec<u8>> {
    let (host, port) = MqttSettings::parse_broker(&args.agent)?;
    let sample_period_ms = u32::try_from(args.interval.as_millis())
        .map_err(|_| anyhow::anyhow!("--interval is longer than a day"))?;
    let config = Config {
        device: &args.device,
        wifi_ssid: &args.wifi_ssid,
        wifi_password: &args.wifi_password,
        agent_host: &host,
        agent_port: port,
        username: &args.username,
        password: &args.password,
        sensor: args.sensor,
        sensor_address: args.address,
        sample_period_ms,
    };
    let mut sector = vec![0xFF; SECTOR_SIZE];
    config
        .encode(&mut sector)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(sector)
}

/// The file's bytes for `args`: UF2 blocks, or the raw sector for a `.bin` name.
pub fn file_bytes(args: &ProvisionArgs) -> anyhow::Result<Vec<u8>> {
    let sector = sector(args)?;
    let raw = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("bin"));
    Ok(if raw {
        sector
    } else {
        uf2::blocks(BLOCK_ADDRESS, &sector).flatten().collect()
    })
}

/// Runs `provision`: writes the file and says what to do with it.
pub fn provision(args: &ProvisionArgs) -> anyhow::Result<String> {
    let bytes = file_bytes(args)?;
    std::fs::write(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(format!(
        "wrote the configuration of {} ({} bytes) to {}\n\
         copy it onto the Pico's USB drive (hold BOOTSEL while plugging it in), after the image;\n\
         or: probe-rs download --chip RP2040 --binary-format bin --base-address {BLOCK_ADDRESS:#x} <the .bin>\n",
        args.device,
        bytes.len(),
        args.out.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &str) -> ProvisionArgs {
        ProvisionArgs {
            device: "greenhouse-1".into(),
            wifi_ssid: "farm".into(),
            wifi_password: "correct horse".into(),
            agent: "agent.local:1884".into(),
            username: String::new(),
            password: String::new(),
            sensor: SensorKind::Bme280,
            address: Some(0x77),
            interval: Duration::from_secs(30),
            out: out.into(),
        }
    }

    #[test]
    fn the_sector_parses_back_as_the_options_given() {
        let sector = sector(&args("x.uf2")).expect("valid options");
        assert_eq!(sector.len(), SECTOR_SIZE);
        let config = Config::parse(&sector).expect("the firmware can read it");
        assert_eq!(config.device, "greenhouse-1");
        assert_eq!(
            (config.agent_host, config.agent_port),
            ("agent.local", 1884)
        );
        assert_eq!(config.sensor_address(), 0x77);
        assert_eq!(config.sample_period_ms, 30_000);
    }

    #[test]
    fn uf2_and_bin_files_carry_the_same_sector() {
        let uf2_bytes = file_bytes(&args("x.uf2")).expect("valid options");
        let bin = file_bytes(&args("x.BIN")).expect("valid options");
        assert_eq!(bin.len(), SECTOR_SIZE);
        assert_eq!(uf2_bytes.len(), 16 * uf2::BLOCK_LEN);
        let from_uf2: Vec<u8> = uf2_bytes
            .chunks(uf2::BLOCK_LEN)
            .filter_map(uf2::parse_block)
            .flat_map(|b| b.payload.to_vec())
            .collect();
        assert_eq!(from_uf2, bin);
    }

    #[test]
    fn bad_options_are_errors_that_name_the_field() {
        let cases = [
            (
                ProvisionArgs {
                    device: "a b".into(),
                    ..args("x.uf2")
                },
                "device id",
            ),
            (
                ProvisionArgs {
                    wifi_password: "short".into(),
                    ..args("x.uf2")
                },
                "Wi-Fi password",
            ),
            (
                ProvisionArgs {
                    agent: "".into(),
                    ..args("x.uf2")
                },
                "no host",
            ),
            (
                ProvisionArgs {
                    username: "u".into(),
                    ..args("x.uf2")
                },
                "MQTT password",
            ),
            (
                ProvisionArgs {
                    interval: Duration::from_millis(10),
                    ..args("x.uf2")
                },
                "sample period",
            ),
        ];
        for (a, want) in cases {
            let err = sector(&a).expect_err("refused").to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
