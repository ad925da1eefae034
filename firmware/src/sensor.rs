//! The one interface the node loop samples through, whatever is behind it: an I2C driver
//! from [`crate::drivers`], a wrapped driver crate, or a simulated signal.
//!
//! A sensor returns all of its metrics at once because that is how the chips work (one
//! SHT3x conversion yields temperature and humidity, one BME280 burst read all three), and
//! because compensated values depend on each other (BME280 pressure needs the temperature).

use embedded_hal::delay::DelayNs;

/// Metric names used by the drivers in this crate, so that every node reporting the same
/// quantity uses the same name (and aggregates line up at the agent).
pub mod metric {
    /// Degrees Celsius.
    pub const TEMPERATURE: &str = "temperature";
    /// Relative humidity in percent (0–100).
    pub const HUMIDITY: &str = "humidity";
    /// Barometric pressure in hectopascal (the unit weather reports use).
    pub const PRESSURE: &str = "pressure";
}

/// Most metrics one [`Sample`] holds.
pub const MAX_METRICS: usize = 4;

/// One value of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Metric name: 1..=32 bytes of `[A-Za-z0-9_.-]`, usually one of [`metric`].
    pub metric: &'static str,
    /// The value in the metric's unit.
    pub value: f64,
}

impl Measurement {
    /// A measurement of `metric`.
    pub const fn new(metric: &'static str, value: f64) -> Measurement {
        Measurement { metric, value }
    }
}

/// Everything one sampling of a sensor produced.
pub type Sample = heapless::Vec<Measurement, MAX_METRICS>;

/// Builds a [`Sample`] from up to [`MAX_METRICS`] measurements; extra ones are refused at
/// compile time.
pub fn sample_of<const K: usize>(measurements: [Measurement; K]) -> Sample {
    const {
        assert!(
            K <= MAX_METRICS,
            "a Sample holds at most MAX_METRICS measurements"
        )
    };
    let mut sample = Sample::new();
    for m in measurements {
        // Cannot fail: K <= MAX_METRICS is checked above.
        let _ = sample.push(m);
    }
    sample
}

/// Something the node loop can sample.
///
/// The delay is passed in rather than owned because a microcontroller usually has one
/// timer that every driver shares; drivers that need none simply ignore it.
pub trait Sensor<D: DelayNs> {
    /// Why a sampling failed (usually the driver's bus-generic error).
    type Error: core::fmt::Debug;

    /// Takes one measurement of every metric this sensor has.
    fn sample(&mut self, delay: &mut D) -> Result<Sample, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_of_keeps_order_and_values() {
        let s = sample_of([
            Measurement::new(metric::TEMPERATURE, 21.5),
            Measurement::new(metric::HUMIDITY, 40.0),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], Measurement::new("temperature", 21.5));
        assert_eq!(s[1].metric, "humidity");
    }

    #[test]
    fn metric_names_are_valid_ids() {
        for m in [metric::TEMPERATURE, metric::HUMIDITY, metric::PRESSURE] {
            assert!(crate::wire::valid_id(m), "{m}");
        }
    }
}
