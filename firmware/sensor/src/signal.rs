//! Simulated sensors with signals that look like a room or a greenhouse: a daily
//! temperature cycle, relative humidity that falls as the air warms, slowly wandering
//! pressure, measurement noise, and occasional spikes (a door opened, a glitching sensor)
//! that aggregates and dashboards should survive.
//!
//! The environment follows the host's real time of day, whatever the simulated device's own
//! clock says, so that the agent's aggregates show a plausible day.

use std::convert::Infallible;

use embedded_hal::delay::DelayNs;
use fogline_firmware::sensor::{metric, Measurement, Sample, Sensor};

use crate::clock::system_ms;

/// A delay that does not wait: simulated sensors have nothing to wait for.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDelay;

impl DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

/// Metrics a simulated device can have.
pub const METRICS: [&str; 3] = [metric::TEMPERATURE, metric::HUMIDITY, metric::PRESSURE];

/// Where one simulated device sits: its own climate, fixed at creation from the seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Daily mean temperature, °C.
    pub mean_temperature: f64,
    /// Half the day/night swing, °C.
    pub daily_amplitude: f64,
    /// Hour (UTC) of the warmest moment.
    pub warmest_hour: f64,
    /// Relative humidity at the mean temperature, %.
    pub mean_humidity: f64,
    /// Mean pressure, hPa.
    pub mean_pressure: f64,
}

impl Profile {
    /// A plausible indoor/greenhouse climate drawn from `rng`.
    pub fn random(rng: &mut fastrand::Rng) -> Profile {
        Profile {
            mean_temperature: 17.0 + 8.0 * rng.f64(),
            daily_amplitude: 1.5 + 4.0 * rng.f64(),
            warmest_hour: 13.0 + 4.0 * rng.f64(),
            mean_humidity: 40.0 + 25.0 * rng.f64(),
            mean_pressure: 1000.0 + 25.0 * rng.f64(),
        }
    }

    /// Temperature without noise at `hour` (0–24, UTC): a sine with its peak at
    /// `warmest_hour`.
    pub fn baseline_temperature(&self, hour: f64) -> f64 {
        let phase = (hour - self.warmest_hour + 6.0) / 24.0 * std::f64::consts::TAU;
        self.mean_temperature + self.daily_amplitude * phase.sin()
    }

    /// Relative humidity without noise: about 2.5 %RH less per degree warmer (the same
    /// water in warmer air), kept in 0–100.
    pub fn baseline_humidity(&self, temperature: f64) -> f64 {
        (self.mean_humidity - 2.5 * (temperature - self.mean_temperature)).clamp(0.0, 100.0)
    }
}

/// A simulated device's sensor.
pub struct SimSensor {
    metrics: Vec<&'static str>,
    profile: Profile,
    rng: fastrand::Rng,
    spike_probability: f64,
    pressure: f64,
    /// Source of the time of day; the host's clock unless a test pins it.
    clock: fn() -> u64,
}

impl SimSensor {
    /// A sensor producing `metrics` (names from [`METRICS`]), seeded for reproducibility.
    pub fn new(metrics: Vec<&'static str>, seed: u64, spike_probability: f64) -> SimSensor {
        let mut rng = fastrand::Rng::with_seed(seed);
        let profile = Profile::random(&mut rng);
        SimSensor {
            metrics,
            pressure: profile.mean_pressure,
            profile,
            rng,
            spike_probability: spike_probability.clamp(0.0, 1.0),
            clock: system_ms,
        }
    }

    /// This device's climate.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Normal noise with standard deviation `sigma` (Box–Muller).
    fn noise(&mut self, sigma: f64) -> f64 {
        let u1 = self.rng.f64().max(f64::MIN_POSITIVE);
        let u2 = self.rng.f64();
        sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Rounds to the sensors' 0.01 resolution (also what keeps values short on the wire
    /// and in the agent's buffer).
    fn round(value: f64) -> f64 {
        (value * 100.0).round() / 100.0
    }

    /// One set of values at Unix time `unix_ms`.
    pub fn values_at(&mut self, unix_ms: u64) -> Sample {
        let hour = (unix_ms % 86_400_000) as f64 / 3_600_000.0;
        let base_t = self.profile.baseline_temperature(hour);
        let mut temperature = base_t + self.noise(0.05);
        if self.rng.f64() < self.spike_probability {
            let size = 5.0 + 10.0 * self.rng.f64();
            temperature += if self.rng.bool() { size } else { -size };
        }
        let humidity = (self.profile.baseline_humidity(base_t) + self.noise(0.3)).clamp(0.0, 100.0);
        // A mean-reverting random walk: weather fronts, not noise.
        self.pressure += 0.002 * (self.profile.mean_pressure - self.pressure) + self.noise(0.02);
        let pressure = self.pressure + self.noise(0.03);
        let mut sample = Sample::new();
        for &name in &self.metrics {
            let value = match name {
                metric::TEMPERATURE => temperature,
                metric::HUMIDITY => humidity,
                _ => pressure,
            };
            // A Sample holds four; callers pass at most the three METRICS.
            let _ = sample.push(Measurement::new(name, Self::round(value)));
        }
        sample
    }
}

impl<D: DelayNs> Sensor<D> for SimSensor {
    type Error = Infallible;

    fn sample(&mut self, _delay: &mut D) -> Result<Sample, Infallible> {
        let now = (self.clock)();
        Ok(self.values_at(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn all() -> Vec<&'static str> {
        METRICS.to_vec()
    }

    #[test]
    fn the_afternoon_is_warmer_than_the_night_and_drier() {
        for seed in 0..20 {
            let p = SimSensor::new(all(), seed, 0.0).profile;
            let (warm, cold) = (p.warmest_hour, p.warmest_hour - 12.0);
            assert!(p.baseline_temperature(warm) > p.baseline_temperature(cold) + 2.0);
            assert!(
                p.baseline_humidity(p.baseline_temperature(warm))
                    < p.baseline_humidity(p.baseline_temperature(cold))
            );
        }
    }

    #[test]
    fn a_day_of_values_stays_physical() {
        let mut s = SimSensor::new(all(), 7, 0.0);
        for minute in 0..(24 * 60) {
            let sample = s.values_at(1_700_000_000_000 + minute * 60_000);
            assert_eq!(sample.len(), 3);
            let (t, h, p) = (sample[0].value, sample[1].value, sample[2].value);
            assert!((5.0..40.0).contains(&t), "{t}");
            assert!((0.0..=100.0).contains(&h), "{h}");
            assert!((950.0..1075.0).contains(&p), "{p}");
            assert_eq!((t * 100.0).round() / 100.0, t, "0.01 resolution");
        }
    }

    #[test]
    fn spikes_happen_at_about_the_configured_rate() {
        let mut s = SimSensor::new(vec![metric::TEMPERATURE], 3, 0.01);
        let ts = 1_700_000_000_000 + 14 * HOUR;
        let base = s
            .profile
            .baseline_temperature((ts % 86_400_000) as f64 / HOUR as f64);
        let spikes = (0..20_000)
            .filter(|_| (s.values_at(ts)[0].value - base).abs() > 4.0)
            .count();
        assert!(
            (100..=300).contains(&spikes),
            "{spikes} spikes in 20000 (expected ~200)"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_signal() {
        let mut a = SimSensor::new(all(), 11, 0.01);
        let mut b = SimSensor::new(all(), 11, 0.01);
        for i in 0..100 {
            assert_eq!(a.values_at(i * 1000), b.values_at(i * 1000));
        }
        let mut c = SimSensor::new(all(), 12, 0.01);
        assert_ne!(a.values_at(0), c.values_at(0));
    }

    #[test]
    fn only_the_chosen_metrics_are_produced() {
        let mut s = SimSensor::new(vec![metric::PRESSURE], 1, 0.0);
        s.clock = || 1_700_000_000_000;
        let sample = Sensor::<NoDelay>::sample(&mut s, &mut NoDelay).expect("infallible");
        assert_eq!(sample.len(), 1);
        assert_eq!(sample[0].metric, metric::PRESSURE);
    }
}
