//! Sensirion SHT3x (SHT30, SHT31, SHT35): temperature and relative humidity over I2C.
//!
//! Written here rather than wrapped: the SHT3x crates on embedded-hal 1.0 use the
//! clock-stretching measurement commands, which the Raspberry Pi's I2C controller handles
//! badly, and the one with the widest feature set talks to the bus in `new` and cannot give
//! the bus back. This driver uses the datasheet's *no clock stretching* single-shot
//! commands (write the command, wait the maximum conversion time, read), so it works on a
//! Pi as well as on a microcontroller. The CRC-8 and word framing come from Sensirion's own
//! `sensirion-i2c` crate, which the SHT4x driver crate uses too.
//!
//! Datasheet: Sensirion, "Datasheet SHT3x-DIS", version 7 (2022). Transactions:
//!
//! | operation | write | then read |
//! |---|---|---|
//! | single shot, high/medium/low repeatability | `0x24 0x00` / `0x24 0x0B` / `0x24 0x16` | after ≤ 15.5 / 6.5 / 4.5 ms: `T_msb T_lsb CRC RH_msb RH_lsb CRC` |
//! | soft reset | `0x30 0xA2` | — (ready after ≤ 1.5 ms) |
//! | read status | `0xF3 0x2D` | `S_msb S_lsb CRC` |
//! | clear status | `0x30 0x41` | — |
//!
//! Every 16-bit word is followed by CRC-8 (polynomial 0x31, init 0xFF); a word whose CRC
//! does not match is reported as [`Error::Crc`] and never converted into a value.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;
use sensirion_i2c::i2c as sensirion;

use crate::sensor::{self, metric, sample_of, Sample, Sensor};

/// Address with the ADDR pin low (most breakout boards).
pub const DEFAULT_ADDRESS: u8 = 0x44;
/// Address with the ADDR pin high.
pub const ALTERNATE_ADDRESS: u8 = 0x45;

const CMD_SOFT_RESET: u16 = 0x30A2;
const CMD_READ_STATUS: u16 = 0xF32D;
const CMD_CLEAR_STATUS: u16 = 0x3041;
/// Soft reset takes at most 1.5 ms (datasheet table 4); waited in whole milliseconds.
const SOFT_RESET_MS: u32 = 2;

/// Repeatability of a single-shot measurement: higher is less noisy but takes longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repeatability {
    /// 0.04 °C / 0.08 %RH noise, up to 15.5 ms.
    High,
    /// 0.08 °C / 0.15 %RH noise, up to 6.5 ms.
    Medium,
    /// 0.15 °C / 0.21 %RH noise, up to 4.5 ms.
    Low,
}

impl Repeatability {
    /// The single-shot command without clock stretching.
    fn command(self) -> u16 {
        match self {
            Repeatability::High => 0x2400,
            Repeatability::Medium => 0x240B,
            Repeatability::Low => 0x2416,
        }
    }

    /// The datasheet's maximum conversion time (table 4, including the longer times at a
    /// supply below 2.4 V), rounded up to whole milliseconds.
    fn max_duration_ms(self) -> u32 {
        match self {
            Repeatability::High => 16,
            Repeatability::Medium => 7,
            Repeatability::Low => 5,
        }
    }
}

/// What can go wrong talking to an SHT3x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I2C bus reported an error (often a NACK: no sensor at that address, or it is
    /// still converting).
    Bus(E),
    /// A word arrived with a wrong CRC: the data was corrupted on the bus.
    Crc,
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "SHT3x: I2C error: {e:?}"),
            Error::Crc => f.write_str("SHT3x: CRC mismatch, data corrupted on the bus"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for Error<E> {}

fn from_sensirion<I: embedded_hal::i2c::ErrorType>(e: sensirion::Error<I>) -> Error<I::Error> {
    match e {
        sensirion::Error::I2cWrite(e) | sensirion::Error::I2cRead(e) => Error::Bus(e),
        sensirion::Error::Crc => Error::Crc,
    }
}

/// One converted measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Degrees Celsius.
    pub temperature: f64,
    /// Relative humidity, percent.
    pub humidity: f64,
}

impl Measurement {
    /// Converts the raw words with the datasheet's formulas (section 4.13):
    /// T = −45 + 175 · S_T / (2¹⁶ − 1), RH = 100 · S_RH / (2¹⁶ − 1).
    pub fn from_raw(raw_temperature: u16, raw_humidity: u16) -> Measurement {
        let full = f64::from(u16::MAX);
        Measurement {
            temperature: -45.0 + 175.0 * f64::from(raw_temperature) / full,
            humidity: 100.0 * f64::from(raw_humidity) / full,
        }
    }
}

/// An SHT3x on an I2C bus.
#[derive(Debug)]
pub struct Sht3x<I2C> {
    i2c: I2C,
    address: u8,
    repeatability: Repeatability,
}

impl<I2C: I2c> Sht3x<I2C> {
    /// A driver for the sensor at [`DEFAULT_ADDRESS`]; does not touch the bus.
    pub fn new(i2c: I2C) -> Self {
        Self::new_with_address(i2c, DEFAULT_ADDRESS)
    }

    /// A driver for the sensor at `address` (see [`ALTERNATE_ADDRESS`]).
    pub fn new_with_address(i2c: I2C, address: u8) -> Self {
        Sht3x {
            i2c,
            address,
            repeatability: Repeatability::High,
        }
    }

    /// Repeatability used by [`Sht3x::measure`] and by the [`Sensor`] implementation.
    pub fn set_repeatability(&mut self, repeatability: Repeatability) {
        self.repeatability = repeatability;
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.i2c
    }

    /// Takes one single-shot measurement and returns the raw (temperature, humidity) words,
    /// both CRC-checked.
    pub fn measure_raw<D: DelayNs>(
        &mut self,
        delay: &mut D,
    ) -> Result<(u16, u16), Error<I2C::Error>> {
        sensirion::write_command_u16(&mut self.i2c, self.address, self.repeatability.command())
            .map_err(Error::Bus)?;
        delay.delay_ms(self.repeatability.max_duration_ms());
        let mut buf = [0u8; 6];
        sensirion::read_words_with_crc(&mut self.i2c, self.address, &mut buf)
            .map_err(from_sensirion::<I2C>)?;
        Ok((
            u16::from_be_bytes([buf[0], buf[1]]),
            u16::from_be_bytes([buf[3], buf[4]]),
        ))
    }

    /// Takes one single-shot measurement.
    pub fn measure<D: DelayNs>(&mut self, delay: &mut D) -> Result<Measurement, Error<I2C::Error>> {
        let (t, rh) = self.measure_raw(delay)?;
        Ok(Measurement::from_raw(t, rh))
    }

    /// Soft reset: the sensor reloads its calibration and returns to idle.
    pub fn soft_reset<D: DelayNs>(&mut self, delay: &mut D) -> Result<(), Error<I2C::Error>> {
        sensirion::write_command_u16(&mut self.i2c, self.address, CMD_SOFT_RESET)
            .map_err(Error::Bus)?;
        delay.delay_ms(SOFT_RESET_MS);
        Ok(())
    }

    /// The 16-bit status register (datasheet table 17: alert, heater, reset-detected and
    /// checksum flags).
    pub fn status(&mut self) -> Result<u16, Error<I2C::Error>> {
        sensirion::write_command_u16(&mut self.i2c, self.address, CMD_READ_STATUS)
            .map_err(Error::Bus)?;
        let mut buf = [0u8; 3];
        sensirion::read_words_with_crc(&mut self.i2c, self.address, &mut buf)
            .map_err(from_sensirion::<I2C>)?;
        Ok(u16::from_be_bytes([buf[0], buf[1]]))
    }

    /// Clears the alert and reset-detected flags of the status register.
    pub fn clear_status(&mut self) -> Result<(), Error<I2C::Error>> {
        sensirion::write_command_u16(&mut self.i2c, self.address, CMD_CLEAR_STATUS)
            .map_err(Error::Bus)
    }
}

impl<I2C: I2c, D: DelayNs> Sensor<D> for Sht3x<I2C> {
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

    const ADDR: u8 = DEFAULT_ADDRESS;

    #[test]
    fn a_measurement_replays_the_datasheet_transactions() {
        // 0xBEEF with CRC 0x92 is the datasheet's CRC example (section 4.12);
        // 0x6666 → −45 + 175·0.4 = 25.0 °C, 0x8000 → 50.0 %RH.
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0x24, 0x00]),
            I2cTx::read(ADDR, vec![0x66, 0x66, 0x93, 0x80, 0x00, 0xA2]),
            I2cTx::write(ADDR, vec![0x24, 0x00]),
            I2cTx::read(ADDR, vec![0xBE, 0xEF, 0x92, 0xBE, 0xEF, 0x92]),
        ]);
        // The driver must wait the worst-case conversion time before reading.
        let mut delay = CheckedDelay::new(&[DelayTx::delay_ms(16), DelayTx::delay_ms(16)]);
        let mut sht = Sht3x::new(i2c);
        let m = sht.measure(&mut delay).expect("valid CRCs");
        assert!((m.temperature - 25.0).abs() < 0.001, "{m:?}");
        assert!((m.humidity - 50.0).abs() < 0.001, "{m:?}");
        let m = sht.measure(&mut delay).expect("valid CRCs");
        assert!((m.temperature - (-45.0 + 175.0 * 48879.0 / 65535.0)).abs() < 1e-9);
        sht.destroy().done();
        delay.done();
    }

    #[test]
    fn a_corrupt_crc_is_an_error_not_a_value() {
        for (what, bytes) in [
            ("temperature", vec![0x66, 0x66, 0x94, 0x80, 0x00, 0xA2]),
            ("humidity", vec![0x66, 0x66, 0x93, 0x80, 0x01, 0xA2]),
        ] {
            let i2c = I2cMock::new(&[
                I2cTx::write(ADDR, vec![0x24, 0x00]),
                I2cTx::read(ADDR, bytes),
            ]);
            let mut sht = Sht3x::new(i2c);
            assert_eq!(
                sht.measure(&mut NoopDelay::new()),
                Err(Error::Crc),
                "{what}"
            );
            sht.destroy().done();
        }
    }

    #[test]
    fn a_bus_error_is_reported_with_the_bus_error_inside() {
        // No sensor at the address: the write is not acknowledged.
        let i2c = I2cMock::new(&[I2cTx::write(ADDR, vec![0x24, 0x00]).with_error(
            ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address),
        )]);
        let mut sht = Sht3x::new(i2c);
        assert!(matches!(
            sht.measure(&mut NoopDelay::new()),
            Err(Error::Bus(ErrorKind::NoAcknowledge(_)))
        ));
        sht.destroy().done();

        // The sensor answers the command but the read fails.
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0x24, 0x00]),
            I2cTx::read(ADDR, vec![0; 6]).with_error(ErrorKind::ArbitrationLoss),
        ]);
        let mut sht = Sht3x::new(i2c);
        assert_eq!(
            sht.measure(&mut NoopDelay::new()),
            Err(Error::Bus(ErrorKind::ArbitrationLoss))
        );
        sht.destroy().done();
    }

    #[test]
    fn repeatability_and_address_select_command_and_wait() {
        let i2c = I2cMock::new(&[
            I2cTx::write(ALTERNATE_ADDRESS, vec![0x24, 0x16]),
            I2cTx::read(ALTERNATE_ADDRESS, vec![0x66, 0x66, 0x93, 0x80, 0x00, 0xA2]),
        ]);
        let mut delay = CheckedDelay::new(&[DelayTx::delay_ms(5)]);
        let mut sht = Sht3x::new_with_address(i2c, ALTERNATE_ADDRESS);
        sht.set_repeatability(Repeatability::Low);
        assert!(sht.measure(&mut delay).is_ok());
        sht.destroy().done();
        delay.done();
    }

    #[test]
    fn status_reset_and_clear_use_their_commands() {
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0xF3, 0x2D]),
            // 0x8010: alert pending + reset detected; CRC 0xE1.
            I2cTx::read(ADDR, vec![0x80, 0x10, 0xE1]),
            I2cTx::write(ADDR, vec![0x30, 0x41]),
            I2cTx::write(ADDR, vec![0x30, 0xA2]),
            I2cTx::write(ADDR, vec![0xF3, 0x2D]),
            I2cTx::read(ADDR, vec![0x80, 0x10, 0x00]),
        ]);
        let mut delay = CheckedDelay::new(&[DelayTx::delay_ms(2)]);
        let mut sht = Sht3x::new(i2c);
        assert_eq!(sht.status(), Ok(0x8010));
        assert_eq!(sht.clear_status(), Ok(()));
        assert_eq!(sht.soft_reset(&mut delay), Ok(()));
        assert_eq!(sht.status(), Err(Error::Crc));
        sht.destroy().done();
        delay.done();
    }

    #[test]
    fn the_sensor_trait_yields_temperature_and_humidity() {
        let i2c = I2cMock::new(&[
            I2cTx::write(ADDR, vec![0x24, 0x00]),
            I2cTx::read(ADDR, vec![0x66, 0x66, 0x93, 0x80, 0x00, 0xA2]),
        ]);
        let mut sht = Sht3x::new(i2c);
        let sample = Sensor::sample(&mut sht, &mut NoopDelay::new()).expect("valid");
        assert_eq!(sample.len(), 2);
        assert_eq!(sample[0].metric, metric::TEMPERATURE);
        assert_eq!(sample[1].metric, metric::HUMIDITY);
        assert!((sample[1].value - 50.0).abs() < 0.001);
        sht.destroy().done();
    }

    #[test]
    fn conversion_covers_the_full_range() {
        let low = Measurement::from_raw(0, 0);
        let high = Measurement::from_raw(u16::MAX, u16::MAX);
        assert_eq!((low.temperature, low.humidity), (-45.0, 0.0));
        assert_eq!((high.temperature, high.humidity), (130.0, 100.0));
    }
}
