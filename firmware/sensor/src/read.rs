//! `fogline-sensor read`: a Linux board (a Raspberry Pi) with a real SHT3x, SHT4x or
//! BME280 on `/dev/i2c-N`, read through linux-embedded-hal with the firmware's drivers and
//! delivered by the same node loop the microcontroller firmware and the simulator use.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fogline_firmware::sensor::Sample;

use crate::clock::{DeviceClock, WallClock};
use crate::device::{run_device, DeviceReport, DeviceSpec, Phase};
use crate::{parse_duration, MqttArgs, MAX_RING};

/// The sensor on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SensorKind {
    /// Sensirion SHT30/31/35 (address 0x44, or 0x45 with ADDR high).
    Sht3x,
    /// Sensirion SHT40/41/45 (address 0x44).
    Sht4x,
    /// Bosch BME280 (address 0x76, or 0x77 with SDO high).
    Bme280,
}

/// Options of `fogline-sensor read`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Which sensor is wired to the bus.
    #[arg(long, value_enum)]
    pub sensor: SensorKind,
    /// The I2C bus device (on a Pi, pins 3/5 are /dev/i2c-1 once I2C is enabled).
    #[arg(long, default_value = "/dev/i2c-1")]
    pub bus: PathBuf,
    /// The sensor's 7-bit address, e.g. 0x45; the sensor's usual address by default.
    #[arg(long, value_parser = parse_address)]
    pub address: Option<u8>,
    /// This node's device id, used in the topics (`sensors/<device>/<metric>`).
    #[arg(long)]
    pub device: Option<String>,
    /// Time between readings, e.g. 10s, 1m.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub interval: Duration,
    /// Take one reading, print it as JSON and exit, without connecting (a wiring check).
    #[arg(long)]
    pub once: bool,
    /// Readings kept while the agent is unreachable (10 s readings: 8640 is a day).
    #[arg(long, default_value_t = 8640)]
    pub ring: usize,
    /// Readings that may be published and not yet acked.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Re-send what is in flight when no ack progress is seen for this long.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub resend_after: Duration,
    /// On Ctrl-C or SIGTERM, wait this long for unacked readings to be acked.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub drain_timeout: Duration,
}

/// `0x44`, `0X44` or `68`.
pub fn parse_address(s: &str) -> Result<u8, String> {
    let s = s.trim();
    let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not an I2C address (e.g. 0x44)"))?;
    if !(0x08..=0x77).contains(&value) {
        return Err(format!(
            "{s} is outside the 7-bit I2C address range 0x08..=0x77"
        ));
    }
    Ok(value)
}

/// The one sample as JSON, e.g. `{"temperature":21.52,"humidity":40.1}`.
pub fn sample_json(sample: &Sample) -> String {
    let map: serde_json::Map<String, serde_json::Value> = sample
        .iter()
        .map(|m| (m.metric.to_string(), serde_json::json!(m.value)))
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(target_os = "linux")]
mod linux {
    use fogline_firmware::drivers::{bme280, sht3x, sht4x};
    use fogline_firmware::sensor::{Sample, Sensor};
    use linux_embedded_hal::{Delay, I2cdev};

    use super::SensorKind;

    /// Any of the supported sensors on a Linux I2C bus.
    pub enum AnySensor {
        Sht3x(sht3x::Sht3x<I2cdev>),
        Sht4x(sht4x::Sht4x<I2cdev, Delay>),
        Bme280(bme280::Bme280<I2cdev>),
    }

    impl AnySensor {
        pub fn open(
            kind: SensorKind,
            bus: &std::path::Path,
            address: Option<u8>,
        ) -> anyhow::Result<Self> {
            let i2c = I2cdev::new(bus).map_err(|e| {
                anyhow::anyhow!(
                    "opening {}: {e} (is I2C enabled, e.g. with raspi-config, and are you in the i2c group?)",
                    bus.display()
                )
            })?;
            Ok(match kind {
                SensorKind::Sht3x => AnySensor::Sht3x(sht3x::Sht3x::new_with_address(
                    i2c,
                    address.unwrap_or(sht3x::DEFAULT_ADDRESS),
                )),
                SensorKind::Sht4x => {
                    let addr = match address {
                        None | Some(0x44) => sht4x::Address::Address0x44,
                        Some(0x45) => sht4x::Address::Address0x45,
                        Some(0x46) => sht4x::Address::Address0x46,
                        Some(other) => {
                            anyhow::bail!("an SHT4x is at 0x44, 0x45 or 0x46, not {other:#04x}")
                        }
                    };
                    AnySensor::Sht4x(sht4x::Sht4x::new_with_address(i2c, addr))
                }
                SensorKind::Bme280 => AnySensor::Bme280(bme280::Bme280::new_with_address(
                    i2c,
                    address.unwrap_or(bme280::PRIMARY_ADDRESS),
                )),
            })
        }
    }

    impl Sensor<Delay> for AnySensor {
        type Error = String;

        fn sample(&mut self, delay: &mut Delay) -> Result<Sample, String> {
            match self {
                AnySensor::Sht3x(s) => Sensor::<Delay>::sample(s, delay).map_err(|e| e.to_string()),
                AnySensor::Sht4x(s) => s.sample(delay).map_err(|e| e.to_string()),
                AnySensor::Bme280(s) => {
                    Sensor::<Delay>::sample(s, delay).map_err(|e| e.to_string())
                }
            }
        }
    }

    pub use linux_embedded_hal::Delay as LinuxDelay;
}

/// Runs `read`. `stop` resolves on each request to stop (Ctrl-C, SIGTERM).
#[cfg(target_os = "linux")]
pub async fn read<F, Fut>(args: ReadArgs, mut stop: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    use fogline_firmware::sensor::Sensor;

    let mut sensor = linux::AnySensor::open(args.sensor, &args.bus, args.address)?;
    let mut delay = linux::LinuxDelay;
    if args.once {
        let sample = tokio::task::block_in_place(|| sensor.sample(&mut delay))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{}", sample_json(&sample));
        return Ok(true);
    }
    let device = args
        .device
        .clone()
        .context("--device is required unless --once is given")?;
    if !fogline_firmware::wire::valid_id(&device) {
        anyhow::bail!("--device {device:?} must be 1-32 characters of [A-Za-z0-9_.-]");
    }
    if args.ring == 0 || args.max_in_flight == 0 || args.ring > MAX_RING {
        anyhow::bail!("--ring must be 1..={MAX_RING} and --max-in-flight at least 1");
    }
    if args.interval < Duration::from_millis(100) {
        anyhow::bail!("--interval must be at least 100ms (a conversion alone takes up to 16 ms)");
    }
    let spec = DeviceSpec {
        device,
        // The ring lives in memory, so every start of this program is a new boot.
        boot: fastrand::u32(1..),
        ring: args.ring,
        sample_period_ms: u64::try_from(args.interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
        max_in_flight: args.max_in_flight,
        resend_after_ms: u64::try_from(args.resend_after.as_millis()).unwrap_or(u64::MAX),
        max_catch_up: 0,
        blocking_sensor: true,
        log_connections: true,
        mqtt: args.mqtt.settings()?,
    };
    tracing::info!(
        device = %spec.device, boot = spec.boot, sensor = ?args.sensor, bus = %args.bus.display(),
        "reading every {:?}, publishing to {}:{}", args.interval, spec.mqtt.host, spec.mqtt.port
    );
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Run);
    let report = Arc::new(Mutex::new(DeviceReport::default()));
    // A Pi's clock is set by NTP after boot; until then the node stamps uptime.
    let clock = DeviceClock::new(WallClock::System, 0);
    let mut task = tokio::spawn(run_device(
        spec,
        sensor,
        delay,
        clock,
        phase_rx,
        report.clone(),
    ));

    tokio::select! {
        r = &mut task => return r.context("device task")?,
        () = stop() => {}
    }
    tracing::info!(
        "stopping; waiting up to {:?} for unacked readings",
        args.drain_timeout
    );
    let _ = phase_tx.send(Phase::Drain);
    tokio::select! {
        r = &mut task => return r.context("device task")?,
        () = tokio::time::sleep(args.drain_timeout) => {}
        () = stop() => {}
    }
    let _ = phase_tx.send(Phase::Stop);
    let finished = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .context("device task did not stop")?
        .context("device task")??;
    let r = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tracing::info!(
        "stopped: sent {} acked {} pending {} dropped {}",
        r.last_seq,
        r.acked,
        r.pending,
        r.dropped
    );
    Ok(finished)
}

/// `read` needs Linux's I2C device interface.
#[cfg(not(target_os = "linux"))]
pub async fn read<F, Fut>(_args: ReadArgs, _stop: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    anyhow::bail!(
        "`fogline-sensor read` needs Linux (/dev/i2c-N); use the library on other systems"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogline_firmware::sensor::{metric, sample_of, Measurement};

    #[test]
    fn addresses_parse_in_hex_or_decimal_and_are_range_checked() {
        assert_eq!(parse_address("0x44"), Ok(0x44));
        assert_eq!(parse_address("0X77"), Ok(0x77));
        assert_eq!(parse_address("68"), Ok(0x44));
        assert!(parse_address("0x78").is_err());
        assert!(parse_address("0x03").is_err());
        assert!(parse_address("sensor").is_err());
        assert!(parse_address("0x1ff").is_err());
    }

    #[test]
    fn a_sample_prints_as_a_json_object() {
        let s = sample_of([
            Measurement::new(metric::TEMPERATURE, 21.52),
            Measurement::new(metric::HUMIDITY, 40.0),
        ]);
        let v: serde_json::Value = serde_json::from_str(&sample_json(&s)).expect("JSON");
        assert_eq!(v["temperature"], 21.52);
        assert_eq!(v["humidity"], 40.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_missing_bus_is_a_clear_error() {
        let err = linux::AnySensor::open(
            SensorKind::Sht3x,
            std::path::Path::new("/dev/i2c-does-not-exist"),
            None,
        )
        .err()
        .expect("no such bus");
        assert!(err.to_string().contains("/dev/i2c-does-not-exist"), "{err}");
    }
}
