//! Sensirion SHT4x (SHT40, SHT41, SHT45): temperature and relative humidity over I2C.
//!
//! A thin wrapper around the [`sht4x`](https://crates.io/crates/sht4x) crate rather than a
//! rewrite: it is on embedded-hal 1.0, already has the shape we want (`new(bus)`,
//! `destroy() -> bus`, an error generic over the bus error with a CRC variant), checks
//! every word's CRC-8 with Sensirion's own `sensirion-i2c` crate, and waits the datasheet's
//! conversion times. The wrapper adds what the node loop needs: the [`Sensor`] trait,
//! `f64` values from the raw words (the crate's converted values are 16.16 fixed point),
//! and the datasheet's advice to crop humidity to 0–100 %RH.
//!
//! Transactions (datasheet "SHT4x", version 6.6, section 4.5): write one command byte
//! (`0xFD` high, `0xF6` medium, `0xE0` low precision), wait ≤ 8.3 / 4.5 / 1.6 ms, read
//! `T_msb T_lsb CRC RH_msb RH_lsb CRC`.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::sensor::{self, metric, sample_of, Sample, Sensor};

pub use sht4x::{Address, Precision};

/// What can go wrong talking to an SHT4x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I2C bus reported an error.
    Bus(E),
    /// A word arrived with a wrong CRC: the data was corrupted on the bus.
    Crc,
    /// An error the wrapped `sht4x` crate added after this wrapper was written.
    Driver,
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "SHT4x: I2C error: {e:?}"),
            Error::Crc => f.write_str("SHT4x: CRC mismatch, data corrupted on the bus"),
            Error::Driver => f.write_str("SHT4x: driver error"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for Error<E> {}

impl<E> From<sht4x::Error<E>> for Error<E> {
    fn from(e: sht4x::Error<E>) -> Self {
        match e {
            sht4x::Error::I2c(e) => Error::Bus(e),
            sht4x::Error::Crc => Error::Crc,
            _ => Error::Driver,
        }
    }
}

/// One converted measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Degrees Celsius.
    pub temperature: f64,
    /// Relative humidity, percent, cropped to 0–100.
    pub humidity: f64,
}

impl Measurement {
    /// The datasheet's conversion (section 4.6): T = −45 + 175 · S_T / (2¹⁶ − 1),
    /// RH = −6 + 125 · S_RH / (2¹⁶ − 1), cropped to 0–100 %RH (the formula reaches −6 and
    /// 119 at the ends of its range; the datasheet says to crop).
    pub fn from_raw(raw_temperature: u16, raw_humidity: u16) -> Measurement {
        let full = f64::from(u16::MAX);
        Measurement {
            temperature: -45.0 + 175.0 * f64::from(raw_temperature) / full,
            humidity: (-6.0 + 125.0 * f64::from(raw_humidity) / full).clamp(0.0, 100.0),
        }
    }
}

/// An SHT4x on an I2C bus.
pub struct Sht4x<I2C, D> {
    inner: sht4x::Sht4x<I2C, D>,
    precision: Precision,
}

impl<I2C: I2c, D: DelayNs> Sht4x<I2C, D> {
    /// A driver for the sensor at 0x44 (most SHT4x parts); does not touch the bus.
    pub fn new(i2c: I2C) -> Self {
        Sht4x {
            inner: sht4x::Sht4x::new(i2c),
            precision: Precision::High,
        }
    }

    /// A driver for the sensor at `address` (0x45 and 0x46 exist as order variants).
    pub fn new_with_address(i2c: I2C, address: Address) -> Self {
        Sht4x {
            inner: sht4x::Sht4x::new_with_address(i2c, address),
            precision: Precision::High,
        }
    }

    /// Precision used by [`Sht4x::measure`] and by the [`Sensor`] implementation.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.inner.destroy()
    }

    /// Takes one measurement.
    pub fn measure(&mut self, delay: &mut D) -> Result<Measurement, Error<I2C::Error>> {
        let raw = self.inner.measure_raw(self.precision, delay)?;
        Ok(Measurement::from_raw(raw.temperature, raw.humidity))
    }

    /// Soft reset.
    pub fn soft_reset(&mut self, delay: &mut D) -> Result<(), Error<I2C::Error>> {
        Ok(self.inner.soft_reset(delay)?)
    }

    /// The sensor's 32-bit serial number (also a cheap "is it there" check).
    pub fn serial_number(&mut self, delay: &mut D) -> Result<u32, Error<I2C::Error>> {
        Ok(self.inner.serial_number(delay)?)
    }
}

impl<I2C: I2c, D: DelayNs> Sensor<D> for Sht4x<I2C, D> {
    type Error = Error<I2C::Error>;

    fn sample(&mut self, delay: &mut D) -> Result<Sample, Self::Error> {
        let m = self.measure(delay)?;
        Ok(sample_of([
            sensor::Measurement::new(metric::TEMPERATURE, m.temperature),
            sensor::Measurement::new(metric::HUMIDITY, m.humidity),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as DelayTx};
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cTx};
    use std::vec;

    const ADDR: u8 = 0x44;

    #[test]
    fn a_measurement_replays_the_datasheet_transactions() {
        // 0x6666 → 25.0 °C; 0x6100 → −6 + 125·0.37891 = 41.36 %RH.
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0xFD]),
            I2cTx::read(ADDR, vec![0x66, 0x66, 0x93, 0x61, 0x00, 0x20]),
        ]);
        let mut delay = CheckedDelay::new(&[DelayTx::delay_ms(9)]);
        let mut sht = Sht4x::new(i2c);
        let m = sht.measure(&mut delay).expect("valid CRCs");
        assert!((m.temperature - 25.0).abs() < 0.001, "{m:?}");
        let rh = -6.0 + 125.0 * f64::from(0x6100u16) / 65535.0;
        assert!((m.humidity - rh).abs() < 1e-9, "{m:?}");
        sht.destroy().done();
        delay.done();
    }

    #[test]
    fn a_corrupt_crc_is_an_error_not_a_value() {
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0xFD]),
            I2cTx::read(ADDR, vec![0x66, 0x66, 0x93, 0x61, 0x00, 0x21]),
        ]);
        let mut sht = Sht4x::new(i2c);
        assert_eq!(sht.measure(&mut NoopDelay::new()), Err(Error::Crc));
        sht.destroy().done();
    }

    #[test]
    fn a_bus_error_is_reported_with_the_bus_error_inside() {
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0xFD]),
            I2cTx::read(ADDR, vec![0; 6]).with_error(ErrorKind::Bus),
        ]);
        let mut sht = Sht4x::new(i2c);
        assert_eq!(
            sht.measure(&mut NoopDelay::new()),
            Err(Error::Bus(ErrorKind::Bus))
        );
        sht.destroy().done();
    }

    #[test]
    fn low_precision_at_another_address_uses_its_command() {
        let i2c = I2cMock::new(&[
            I2cTx::write(0x45, vec![0xE0]),
            I2cTx::read(0x45, vec![0x66, 0x66, 0x93, 0x61, 0x00, 0x20]),
        ]);
        let mut sht = Sht4x::new_with_address(i2c, Address::Address0x45);
        sht.set_precision(Precision::Low);
        let sample = Sensor::sample(&mut sht, &mut NoopDelay::new()).expect("valid");
        assert_eq!(
            (sample[0].metric, sample[1].metric),
            (metric::TEMPERATURE, metric::HUMIDITY)
        );
        sht.destroy().done();
    }

    #[test]
    fn humidity_is_cropped_to_the_physical_range() {
        assert_eq!(Measurement::from_raw(0, 0).humidity, 0.0);
        assert_eq!(Measurement::from_raw(0, u16::MAX).humidity, 100.0);
    }
}
