//! Bosch BME280: temperature, pressure and relative humidity over I2C, in forced mode.
//!
//! Written here rather than wrapped. Of the two embedded-hal 1.0 crates, `bme280` cannot
//! give the bus back and waits a fixed 40 ms per measurement; `bme280-rs` is well kept but
//! returns the bare bus error (so "wrong chip" or "conversion never finished" cannot be
//! told apart from a NACK), polls the NVM-copy flag in `init` without a bound, and reads
//! the humidity coefficients H4/H5 without the sign extension Bosch's reference code does.
//! The BME280 has no CRC, so the compensation is the only place where a corrupted read can
//! be caught; here it uses wrapping arithmetic (never a panic, whatever the bytes) and every
//! compensated value is checked against the sensor's operating range.
//!
//! Datasheet: Bosch Sensortec, "BME280 Combined humidity and pressure sensor",
//! BST-BME280-DS002. The transactions ([`Bme280::init`], then [`Bme280::measure`]):
//!
//! | step | I2C | datasheet |
//! |---|---|---|
//! | chip id | write `0xD0`, read 1 byte = `0x60` | 5.4.1 |
//! | soft reset | write `0xE0 0xB6`, wait 2 ms (start-up time) | 5.4.2, table 1 |
//! | NVM copied | write `0xF3`, read status until bit 0 (`im_update`) is 0 | 5.4.4 |
//! | calibration | write `0x88`, read 26 bytes; write `0xE1`, read 7 bytes | 4.2.2, table 16 |
//! | settings | write `0xF2 osrs_h`; write `0xF5 filter<<2` | 5.4.3, 5.4.6 |
//! | measure | write `0xF4 osrs_t<<5 \| osrs_p<<2 \| 0b01` (forced mode) | 3.3.3, 5.4.5 |
//! | wait | the maximum measurement time, then status bit 3 (`measuring`) is 0 | 9.1 |
//! | data | write `0xF7`, read 8 bytes: `press[19:0]`, `temp[19:0]`, `hum[15:0]` | 4, 5.4.7–9 |
//!
//! The compensation is the datasheet's integer code (section 4.2.3 and 8.2: 32-bit for
//! temperature and humidity, 64-bit for pressure), which is exact on a microcontroller
//! without a double-precision FPU.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::sensor::{self, metric, Sample, Sensor};

/// Address with SDO to GND (most generic breakout boards).
pub const PRIMARY_ADDRESS: u8 = 0x76;
/// Address with SDO to VDDIO (Adafruit and some others).
pub const SECONDARY_ADDRESS: u8 = 0x77;
/// The BME280's chip id (a BMP280 answers 0x58 and has no humidity sensor).
pub const CHIP_ID: u8 = 0x60;

const REG_CALIB_TP: u8 = 0x88;
const REG_ID: u8 = 0xD0;
const REG_RESET: u8 = 0xE0;
const REG_CALIB_H: u8 = 0xE1;
const REG_CTRL_HUM: u8 = 0xF2;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_CONFIG: u8 = 0xF5;
const REG_DATA: u8 = 0xF7;

const SOFT_RESET: u8 = 0xB6;
const STATUS_IM_UPDATE: u8 = 1 << 0;
const STATUS_MEASURING: u8 = 1 << 3;
const MODE_FORCED: u8 = 0b01;
/// Start-up time after power-on or soft reset (datasheet table 1).
const STARTUP_MS: u32 = 2;
/// Status polls after the expected time has passed, 1 ms apart, before giving up.
const MAX_POLLS: u32 = 10;
/// Data registers read this after a reset or when the measurement was skipped.
const SKIPPED_20BIT: u32 = 0x80000;
const SKIPPED_16BIT: u32 = 0x8000;

/// Length of the first calibration block (0x88..=0xA1).
pub const CALIB_TP_LEN: usize = 26;
/// Length of the humidity calibration block (0xE1..=0xE7).
pub const CALIB_H_LEN: usize = 7;

/// Oversampling of one measurement: more samples, less noise, longer conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Oversampling {
    /// Not measured (pressure and humidity only; temperature is always measured because
    /// the other two are compensated with it).
    Skip,
    /// ×1
    X1,
    /// ×2
    X2,
    /// ×4
    X4,
    /// ×8
    X8,
    /// ×16
    X16,
}

impl Oversampling {
    fn bits(self) -> u8 {
        match self {
            Oversampling::Skip => 0,
            Oversampling::X1 => 1,
            Oversampling::X2 => 2,
            Oversampling::X4 => 3,
            Oversampling::X8 => 4,
            Oversampling::X16 => 5,
        }
    }

    fn factor(self) -> u32 {
        match self {
            Oversampling::Skip => 0,
            Oversampling::X1 => 1,
            Oversampling::X2 => 2,
            Oversampling::X4 => 4,
            Oversampling::X8 => 8,
            Oversampling::X16 => 16,
        }
    }
}

/// IIR filter coefficient (smooths pressure against short disturbances such as a slammed
/// door; not useful at the slow rates of weather monitoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Filter off.
    Off,
    /// Coefficient 2.
    X2,
    /// Coefficient 4.
    X4,
    /// Coefficient 8.
    X8,
    /// Coefficient 16.
    X16,
}

impl Filter {
    fn bits(self) -> u8 {
        match self {
            Filter::Off => 0,
            Filter::X2 => 1,
            Filter::X4 => 2,
            Filter::X8 => 3,
            Filter::X16 => 4,
        }
    }
}

/// Measurement settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Config {
    /// Temperature oversampling ([`Oversampling::Skip`] is treated as ×1).
    pub temperature: Oversampling,
    /// Pressure oversampling.
    pub pressure: Oversampling,
    /// Humidity oversampling.
    pub humidity: Oversampling,
    /// IIR filter.
    pub filter: Filter,
}

impl Config {
    /// The datasheet's recommendation for weather monitoring (section 3.5.1): forced mode,
    /// ×1 oversampling everywhere, filter off — 9.3 ms and well under 1 µA at one reading
    /// a minute.
    pub const WEATHER: Config = Config {
        temperature: Oversampling::X1,
        pressure: Oversampling::X1,
        humidity: Oversampling::X1,
        filter: Filter::Off,
    };

    fn temperature_os(&self) -> Oversampling {
        match self.temperature {
            Oversampling::Skip => Oversampling::X1,
            os => os,
        }
    }

    /// The datasheet's maximum measurement time in microseconds (section 9.1):
    /// 1.25 ms + 2.3 ms · T_os + (2.3 ms · P_os + 0.575 ms) + (2.3 ms · H_os + 0.575 ms),
    /// where a skipped measurement adds nothing.
    pub fn max_measurement_us(&self) -> u32 {
        let part = |os: Oversampling| match os.factor() {
            0 => 0,
            n => 2_300 * n + 575,
        };
        1_250 + 2_300 * self.temperature_os().factor() + part(self.pressure) + part(self.humidity)
    }

    fn ctrl_meas(&self, mode: u8) -> u8 {
        (self.temperature_os().bits() << 5) | (self.pressure.bits() << 2) | mode
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::WEATHER
    }
}

/// What can go wrong talking to a BME280.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I2C bus reported an error.
    Bus(E),
    /// The chip at the address is not a BME280 (0x58 is a BMP280, which has no humidity).
    WrongChip(u8),
    /// The sensor kept reporting "busy" (NVM copy or conversion) past its datasheet time.
    Timeout,
    /// The data registers hold their reset value: the sensor was reset or power-cycled
    /// since it was configured. The next measurement configures it again.
    NoData,
    /// A compensated value is outside the sensor's operating range (−40…85 °C,
    /// 300…1100 hPa): the calibration or data bytes were corrupted on the bus.
    Implausible,
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "BME280: I2C error: {e:?}"),
            Error::WrongChip(id) => write!(
                f,
                "BME280: chip id is {id:#04x}, expected {CHIP_ID:#04x} (0x58 is a BMP280)"
            ),
            Error::Timeout => f.write_str("BME280: sensor stayed busy past its datasheet time"),
            Error::NoData => f.write_str("BME280: no data (sensor was reset); reconfiguring"),
            Error::Implausible => {
                f.write_str("BME280: value outside the sensor's range (corrupted read)")
            }
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for Error<E> {}

/// The factory calibration coefficients (datasheet table 16), read once per [`Bme280::init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

/// Uncompensated ADC values of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw {
    /// 20-bit pressure.
    pub pressure: u32,
    /// 20-bit temperature.
    pub temperature: u32,
    /// 16-bit humidity.
    pub humidity: u32,
}

impl Raw {
    /// Splits the 8 data bytes read from 0xF7.
    pub fn from_registers(d: &[u8; 8]) -> Raw {
        let u20 = |msb: u8, lsb: u8, xlsb: u8| {
            (u32::from(msb) << 12) | (u32::from(lsb) << 4) | (u32::from(xlsb) >> 4)
        };
        Raw {
            pressure: u20(d[0], d[1], d[2]),
            temperature: u20(d[3], d[4], d[5]),
            humidity: (u32::from(d[6]) << 8) | u32::from(d[7]),
        }
    }
}

fn le_u16(lo: u8, hi: u8) -> u16 {
    u16::from_le_bytes([lo, hi])
}

fn le_i16(lo: u8, hi: u8) -> i16 {
    i16::from_le_bytes([lo, hi])
}

impl Calibration {
    /// Decodes the two calibration blocks. H4 and H5 are 12-bit values split across three
    /// registers; their high bytes are signed and sign-extended (as in Bosch's reference
    /// driver), which matters for parts with negative coefficients.
    pub fn from_registers(tp: &[u8; CALIB_TP_LEN], h: &[u8; CALIB_H_LEN]) -> Calibration {
        Calibration {
            t1: le_u16(tp[0], tp[1]),
            t2: le_i16(tp[2], tp[3]),
            t3: le_i16(tp[4], tp[5]),
            p1: le_u16(tp[6], tp[7]),
            p2: le_i16(tp[8], tp[9]),
            p3: le_i16(tp[10], tp[11]),
            p4: le_i16(tp[12], tp[13]),
            p5: le_i16(tp[14], tp[15]),
            p6: le_i16(tp[16], tp[17]),
            p7: le_i16(tp[18], tp[19]),
            p8: le_i16(tp[20], tp[21]),
            p9: le_i16(tp[22], tp[23]),
            // tp[24] (0xA0) is unused.
            h1: tp[25],
            h2: le_i16(h[0], h[1]),
            h3: h[2],
            h4: (i16::from(h[3] as i8) * 16) | i16::from(h[4] & 0x0F),
            h5: (i16::from(h[5] as i8) * 16) | i16::from(h[4] >> 4),
            h6: h[6] as i8,
        }
    }

    /// `t_fine`, the fine temperature that pressure and humidity are compensated with
    /// (datasheet `BME280_compensate_T_int32`).
    pub fn t_fine(&self, adc_t: u32) -> i32 {
        // adc_t is 20 bits, so the cast is lossless.
        let adc_t = adc_t as i32;
        let t1 = i32::from(self.t1);
        let var1 = ((adc_t >> 3).wrapping_sub(t1 << 1)).wrapping_mul(i32::from(self.t2)) >> 11;
        let d = (adc_t >> 4).wrapping_sub(t1);
        let var2 = (d.wrapping_mul(d) >> 12).wrapping_mul(i32::from(self.t3)) >> 14;
        var1.wrapping_add(var2)
    }

    /// Temperature in 0.01 °C.
    pub fn temperature_centi(t_fine: i32) -> i32 {
        t_fine.wrapping_mul(5).wrapping_add(128) >> 8
    }

    /// Pressure in Pa as Q24.8 (datasheet `BME280_compensate_P_int64`); `None` where the
    /// reference code would divide by zero or its result does not fit.
    pub fn pressure_q24_8(&self, adc_p: u32, t_fine: i32) -> Option<u32> {
        let (p1, p2, p3) = (i64::from(self.p1), i64::from(self.p2), i64::from(self.p3));
        let (p4, p5, p6) = (i64::from(self.p4), i64::from(self.p5), i64::from(self.p6));
        let (p7, p8, p9) = (i64::from(self.p7), i64::from(self.p8), i64::from(self.p9));
        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1.wrapping_mul(var1).wrapping_mul(p6);
        var2 = var2.wrapping_add(var1.wrapping_mul(p5) << 17);
        var2 = var2.wrapping_add(p4 << 35);
        var1 = (var1.wrapping_mul(var1).wrapping_mul(p3) >> 8)
            .wrapping_add(var1.wrapping_mul(p2) << 12);
        var1 = ((1i64 << 47).wrapping_add(var1)).wrapping_mul(p1) >> 33;
        if var1 == 0 {
            return None;
        }
        let mut p = 1_048_576 - i64::from(adc_p);
        p = ((p << 31).wrapping_sub(var2))
            .wrapping_mul(3125)
            .wrapping_div(var1);
        var1 = p9.wrapping_mul(p >> 13).wrapping_mul(p >> 13) >> 25;
        var2 = p8.wrapping_mul(p) >> 19;
        p = (p.wrapping_add(var1).wrapping_add(var2) >> 8).wrapping_add(p7 << 4);
        u32::try_from(p).ok()
    }

    /// Relative humidity in %RH as Q22.10 (datasheet `bme280_compensate_H_int32`), which
    /// the reference code already limits to 0–100 %.
    pub fn humidity_q22_10(&self, adc_h: u32, t_fine: i32) -> u32 {
        // adc_h is 16 bits, so the cast is lossless.
        let adc_h = adc_h as i32;
        let x = t_fine.wrapping_sub(76_800);
        let a = (adc_h << 14)
            .wrapping_sub(i32::from(self.h4) << 20)
            .wrapping_sub(i32::from(self.h5).wrapping_mul(x))
            .wrapping_add(16_384)
            >> 15;
        let b = ((((x.wrapping_mul(i32::from(self.h6)) >> 10)
            .wrapping_mul((x.wrapping_mul(i32::from(self.h3)) >> 11).wrapping_add(32_768)))
            >> 10)
            .wrapping_add(2_097_152))
        .wrapping_mul(i32::from(self.h2))
        .wrapping_add(8_192)
            >> 14;
        let mut v = a.wrapping_mul(b);
        v = v.wrapping_sub(
            (((v >> 15).wrapping_mul(v >> 15)) >> 7).wrapping_mul(i32::from(self.h1)) >> 4,
        );
        let v = v.clamp(0, 419_430_400);
        // Non-negative after the clamp.
        (v >> 12) as u32
    }

    /// Compensates one measurement and checks it against the sensor's operating range.
    pub fn compensate(&self, raw: Raw, config: &Config) -> Result<Measurement, Implausible> {
        let t_fine = self.t_fine(raw.temperature);
        let temperature = f64::from(Self::temperature_centi(t_fine)) / 100.0;
        if !(-40.0..=85.0).contains(&temperature) {
            return Err(Implausible);
        }
        let pressure = match config.pressure {
            Oversampling::Skip => None,
            _ => {
                let q = self
                    .pressure_q24_8(raw.pressure, t_fine)
                    .ok_or(Implausible)?;
                let hpa = f64::from(q) / 256.0 / 100.0;
                if !(300.0..=1100.0).contains(&hpa) {
                    return Err(Implausible);
                }
                Some(hpa)
            }
        };
        let humidity = match config.humidity {
            Oversampling::Skip => None,
            _ => Some(f64::from(self.humidity_q22_10(raw.humidity, t_fine)) / 1024.0),
        };
        Ok(Measurement {
            temperature,
            pressure,
            humidity,
        })
    }
}

/// A compensated value fell outside the sensor's operating range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Implausible;

/// One compensated measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Degrees Celsius, resolution 0.01.
    pub temperature: f64,
    /// Hectopascal; `None` when pressure is not measured.
    pub pressure: Option<f64>,
    /// Relative humidity, percent; `None` when humidity is not measured.
    pub humidity: Option<f64>,
}

/// A BME280 on an I2C bus.
#[derive(Debug)]
pub struct Bme280<I2C> {
    i2c: I2C,
    address: u8,
    config: Config,
    calibration: Option<Calibration>,
}

impl<I2C: I2c> Bme280<I2C> {
    /// A driver for the sensor at [`PRIMARY_ADDRESS`]; does not touch the bus.
    pub fn new(i2c: I2C) -> Self {
        Self::new_with_address(i2c, PRIMARY_ADDRESS)
    }

    /// A driver for the sensor at `address` (see [`SECONDARY_ADDRESS`]).
    pub fn new_with_address(i2c: I2C, address: u8) -> Self {
        Bme280 {
            i2c,
            address,
            config: Config::WEATHER,
            calibration: None,
        }
    }

    /// Changes the settings; they are written at the next [`Bme280::init`], which the next
    /// [`Bme280::measure`] does by itself.
    pub fn set_config(&mut self, config: Config) {
        self.config = config;
        self.calibration = None;
    }

    /// The calibration read by the last successful [`Bme280::init`].
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.i2c
    }

    fn read(&mut self, register: u8, buf: &mut [u8]) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write_read(self.address, &[register], buf)
            .map_err(Error::Bus)
    }

    fn write(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write(self.address, &[register, value])
            .map_err(Error::Bus)
    }

    /// Waits until none of the `busy` status bits is set, at most [`MAX_POLLS`] ms.
    fn wait_not_busy<D: DelayNs>(
        &mut self,
        busy: u8,
        delay: &mut D,
    ) -> Result<(), Error<I2C::Error>> {
        for attempt in 0..=MAX_POLLS {
            let mut status = [0u8];
            self.read(REG_STATUS, &mut status)?;
            if status[0] & busy == 0 {
                return Ok(());
            }
            if attempt < MAX_POLLS {
                delay.delay_ms(1);
            }
        }
        Err(Error::Timeout)
    }

    /// Checks the chip id, resets the sensor, reads its calibration and writes the settings.
    pub fn init<D: DelayNs>(&mut self, delay: &mut D) -> Result<(), Error<I2C::Error>> {
        self.calibration = None;
        let mut id = [0u8];
        self.read(REG_ID, &mut id)?;
        if id[0] != CHIP_ID {
            return Err(Error::WrongChip(id[0]));
        }
        self.write(REG_RESET, SOFT_RESET)?;
        delay.delay_ms(STARTUP_MS);
        self.wait_not_busy(STATUS_IM_UPDATE, delay)?;
        let mut tp = [0u8; CALIB_TP_LEN];
        self.read(REG_CALIB_TP, &mut tp)?;
        let mut h = [0u8; CALIB_H_LEN];
        self.read(REG_CALIB_H, &mut h)?;
        // After the reset the sensor sleeps, so these writes take effect; ctrl_hum is
        // applied by the ctrl_meas write that starts each measurement (datasheet 5.4.3).
        self.write(REG_CTRL_HUM, self.config.humidity.bits())?;
        self.write(REG_CONFIG, self.config.filter.bits() << 2)?;
        self.calibration = Some(Calibration::from_registers(&tp, &h));
        Ok(())
    }

    /// Takes one forced-mode measurement, configuring the sensor first if needed.
    ///
    /// After an error that suggests the sensor lost its settings or the bytes were
    /// corrupted ([`Error::NoData`], [`Error::Timeout`], [`Error::Implausible`]) the next
    /// call configures it again, so a sensor that browned out recovers by itself.
    pub fn measure<D: DelayNs>(&mut self, delay: &mut D) -> Result<Measurement, Error<I2C::Error>> {
        let result = self.measure_once(delay);
        if matches!(
            result,
            Err(Error::NoData | Error::Timeout | Error::Implausible)
        ) {
            self.calibration = None;
        }
        result
    }

    fn measure_once<D: DelayNs>(
        &mut self,
        delay: &mut D,
    ) -> Result<Measurement, Error<I2C::Error>> {
        let calibration = match self.calibration {
            Some(c) => c,
            None => {
                self.init(delay)?;
                self.calibration.ok_or(Error::NoData)?
            }
        };
        self.write(REG_CTRL_MEAS, self.config.ctrl_meas(MODE_FORCED))?;
        delay.delay_us(self.config.max_measurement_us());
        self.wait_not_busy(STATUS_MEASURING, delay)?;
        let mut data = [0u8; 8];
        self.read(REG_DATA, &mut data)?;
        let raw = Raw::from_registers(&data);
        let skipped = raw.temperature == SKIPPED_20BIT
            || (self.config.pressure != Oversampling::Skip && raw.pressure == SKIPPED_20BIT)
            || (self.config.humidity != Oversampling::Skip && raw.humidity == SKIPPED_16BIT);
        if skipped {
            return Err(Error::NoData);
        }
        calibration
            .compensate(raw, &self.config)
            .map_err(|Implausible| Error::Implausible)
    }
}

impl<I2C: I2c, D: DelayNs> Sensor<D> for Bme280<I2C> {
    type Error = Error<I2C::Error>;

    fn sample(&mut self, delay: &mut D) -> Result<Sample, Self::Error> {
        let m = self.measure(delay)?;
        let mut sample = Sample::new();
        let values = [
            Some((metric::TEMPERATURE, m.temperature)),
            m.humidity.map(|h| (metric::HUMIDITY, h)),
            m.pressure.map(|p| (metric::PRESSURE, p)),
        ];
        for (name, value) in values.into_iter().flatten() {
            // Three values always fit a Sample (MAX_METRICS is 4).
            let _ = sample.push(sensor::Measurement::new(name, value));
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as DelayTx};
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cTx};
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    const ADDR: u8 = PRIMARY_ADDRESS;
    /// ctrl_meas: osrs_t = ×1 (bits 7:5), osrs_p = ×1 (bits 4:2), mode = forced (bits 1:0).
    const CTRL_MEAS_X1_FORCED: u8 = (0b001 << 5) | (0b001 << 2) | 0b01;

    /// The temperature and pressure coefficients of Bosch's worked example (BMP280
    /// datasheet, section 3.12, same compensation as the BME280) and typical humidity ones.
    const EXAMPLE: Calibration = Calibration {
        t1: 27504,
        t2: 26435,
        t3: -1000,
        p1: 36477,
        p2: -10685,
        p3: 3024,
        p4: 2855,
        p5: 140,
        p6: -7,
        p7: 15500,
        p8: -14600,
        p9: 6000,
        h1: 75,
        h2: 362,
        h3: 0,
        h4: 324,
        h5: 50,
        h6: 30,
    };
    /// The worked example's raw values: adc_T = 519888 → 25.08 °C, adc_P = 415148 →
    /// 100653.27 Pa (double-precision formula; the 64-bit integer one gives 100653.25).
    const DATA: [u8; 8] = [0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00, 0x6C, 0x00];

    fn calibration_registers(c: &Calibration) -> (Vec<u8>, Vec<u8>) {
        let mut tp = Vec::new();
        for w in [c.t1.to_le_bytes(), c.t2.to_le_bytes(), c.t3.to_le_bytes()] {
            tp.extend_from_slice(&w);
        }
        tp.extend_from_slice(&c.p1.to_le_bytes());
        for p in [c.p2, c.p3, c.p4, c.p5, c.p6, c.p7, c.p8, c.p9] {
            tp.extend_from_slice(&p.to_le_bytes());
        }
        tp.push(0); // 0xA0, unused
        tp.push(c.h1);
        let h4 = c.h4 as u16;
        let h5 = c.h5 as u16;
        let mut h = Vec::new();
        h.extend_from_slice(&c.h2.to_le_bytes());
        h.push(c.h3);
        h.push((h4 >> 4) as u8);
        h.push(((h5 & 0x0F) << 4) as u8 | (h4 & 0x0F) as u8);
        h.push((h5 >> 4) as u8);
        h.push(c.h6 as u8);
        (tp, h)
    }

    fn init_transactions(c: &Calibration) -> Vec<I2cTx> {
        let (tp, h) = calibration_registers(c);
        vec![
            I2cTx::write_read(ADDR, vec![0xD0], vec![0x60]),
            I2cTx::write(ADDR, vec![0xE0, 0xB6]),
            // NVM still being copied on the first poll, done on the second.
            I2cTx::write_read(ADDR, vec![0xF3], vec![0x01]),
            I2cTx::write_read(ADDR, vec![0xF3], vec![0x00]),
            I2cTx::write_read(ADDR, vec![0x88], tp),
            I2cTx::write_read(ADDR, vec![0xE1], h),
            I2cTx::write(ADDR, vec![0xF2, 0x01]),
            I2cTx::write(ADDR, vec![0xF5, 0x00]),
        ]
    }

    fn measure_transactions(data: [u8; 8]) -> Vec<I2cTx> {
        vec![
            I2cTx::write(ADDR, vec![0xF4, CTRL_MEAS_X1_FORCED]),
            I2cTx::write_read(ADDR, vec![0xF3], vec![0x00]),
            I2cTx::write_read(ADDR, vec![0xF7], data.to_vec()),
        ]
    }

    /// The datasheet's double-precision humidity formula (section 8.1), as an independent
    /// check of the integer one.
    fn humidity_double(c: &Calibration, adc_h: f64, t_fine: f64) -> f64 {
        let x = t_fine - 76800.0;
        let v = (adc_h - (f64::from(c.h4) * 64.0 + f64::from(c.h5) / 16384.0 * x))
            * (f64::from(c.h2) / 65536.0
                * (1.0
                    + f64::from(c.h6) / 67108864.0 * x * (1.0 + f64::from(c.h3) / 67108864.0 * x)));
        (v * (1.0 - f64::from(c.h1) * v / 524288.0)).clamp(0.0, 100.0)
    }

    #[test]
    fn init_and_measure_replay_the_datasheet_transactions() {
        let mut expect = init_transactions(&EXAMPLE);
        expect.extend(measure_transactions(DATA));
        let i2c = I2cMock::new(&expect);
        let mut delay = CheckedDelay::new(&[
            DelayTx::delay_ms(2), // start-up after the soft reset
            DelayTx::delay_ms(1), // one NVM-copy poll
            DelayTx::delay_us(9_300),
        ]);
        let mut bme = Bme280::new(i2c);
        let m = bme.measure(&mut delay).expect("valid data");
        assert_eq!(bme.calibration(), Some(&EXAMPLE));
        assert_eq!(m.temperature, 25.08);
        let p = m.pressure.expect("pressure measured");
        assert!((p - 1006.5327).abs() < 0.001, "{p} hPa");
        let h = m.humidity.expect("humidity measured");
        let reference = humidity_double(&EXAMPLE, f64::from(0x6C00u32), 128_422.0);
        assert!((h - reference).abs() < 0.05, "{h} vs {reference}");
        assert!(h > 0.0 && h < 100.0);
        bme.destroy().done();
        delay.done();
    }

    #[test]
    fn the_worked_example_compensates_exactly() {
        let raw = Raw::from_registers(&DATA);
        assert_eq!((raw.temperature, raw.pressure), (519_888, 415_148));
        let t_fine = EXAMPLE.t_fine(raw.temperature);
        assert_eq!(t_fine, 128_422);
        assert_eq!(Calibration::temperature_centi(t_fine), 2508);
        assert_eq!(
            EXAMPLE.pressure_q24_8(raw.pressure, t_fine),
            Some(25_767_233)
        );
    }

    #[test]
    fn negative_humidity_coefficients_are_sign_extended() {
        let c = Calibration {
            h4: -11,
            h5: -300,
            ..EXAMPLE
        };
        let (tp, h) = calibration_registers(&c);
        let tp: [u8; CALIB_TP_LEN] = tp.try_into().expect("26 bytes");
        let h: [u8; CALIB_H_LEN] = h.try_into().expect("7 bytes");
        assert_eq!(Calibration::from_registers(&tp, &h), c);
    }

    #[test]
    fn a_bus_error_is_reported_with_the_bus_error_inside() {
        let mut expect = init_transactions(&EXAMPLE);
        expect
            .push(I2cTx::write(ADDR, vec![0xF4, CTRL_MEAS_X1_FORCED]).with_error(ErrorKind::Other));
        let mut bme = Bme280::new(I2cMock::new(&expect));
        assert_eq!(
            bme.measure(&mut NoopDelay::new()),
            Err(Error::Bus(ErrorKind::Other))
        );
        // A bus error does not throw the calibration away.
        assert!(bme.calibration().is_some());
        bme.destroy().done();
    }

    #[test]
    fn a_bmp280_is_refused() {
        let i2c = I2cMock::new(&[I2cTx::write_read(ADDR, vec![0xD0], vec![0x58])]);
        let mut bme = Bme280::new(i2c);
        assert_eq!(bme.init(&mut NoopDelay::new()), Err(Error::WrongChip(0x58)));
        bme.destroy().done();
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_value_and_the_sensor_is_set_up_again() {
        let mut expect = init_transactions(&EXAMPLE);
        // A read that came back as all ones: 0xFFFFF as temperature is ~700 °C here.
        expect.extend(measure_transactions([0xFF; 8]));
        expect.extend(init_transactions(&EXAMPLE));
        expect.extend(measure_transactions(DATA));
        let mut bme = Bme280::new(I2cMock::new(&expect));
        assert_eq!(bme.measure(&mut NoopDelay::new()), Err(Error::Implausible));
        assert!(bme.measure(&mut NoopDelay::new()).is_ok());
        bme.destroy().done();
    }

    #[test]
    fn a_sensor_that_was_reset_reports_no_data_then_recovers() {
        let mut expect = init_transactions(&EXAMPLE);
        // After a brown-out the humidity measurement is off (ctrl_hum reset to 0).
        let mut reset = DATA;
        reset[6] = 0x80;
        reset[7] = 0x00;
        expect.extend(measure_transactions(reset));
        expect.extend(init_transactions(&EXAMPLE));
        expect.extend(measure_transactions(DATA));
        let mut bme = Bme280::new(I2cMock::new(&expect));
        assert_eq!(bme.measure(&mut NoopDelay::new()), Err(Error::NoData));
        assert!(bme.measure(&mut NoopDelay::new()).is_ok());
        bme.destroy().done();
    }

    #[test]
    fn a_conversion_that_never_finishes_times_out() {
        let mut expect = init_transactions(&EXAMPLE);
        expect.push(I2cTx::write(ADDR, vec![0xF4, CTRL_MEAS_X1_FORCED]));
        for _ in 0..=MAX_POLLS {
            expect.push(I2cTx::write_read(ADDR, vec![0xF3], vec![STATUS_MEASURING]));
        }
        let mut bme = Bme280::new(I2cMock::new(&expect));
        assert_eq!(bme.measure(&mut NoopDelay::new()), Err(Error::Timeout));
        bme.destroy().done();
    }

    #[test]
    fn skipped_measurements_are_absent_and_not_waited_for() {
        let config = Config {
            pressure: Oversampling::Skip,
            humidity: Oversampling::Skip,
            ..Config::WEATHER
        };
        assert_eq!(config.max_measurement_us(), 1_250 + 2_300);
        assert_eq!(
            Config {
                temperature: Oversampling::X16,
                pressure: Oversampling::X16,
                humidity: Oversampling::X16,
                filter: Filter::X16
            }
            .max_measurement_us(),
            112_800
        );
        let mut data = DATA;
        data[0..3].copy_from_slice(&[0x80, 0x00, 0x00]);
        data[6..8].copy_from_slice(&[0x80, 0x00]);
        let raw = Raw::from_registers(&data);
        let m = EXAMPLE.compensate(raw, &config).expect("plausible");
        assert_eq!((m.pressure, m.humidity), (None, None));
    }

    #[test]
    fn the_sensor_trait_yields_three_metrics() {
        let mut expect = init_transactions(&EXAMPLE);
        expect.extend(measure_transactions(DATA));
        let mut bme = Bme280::new(I2cMock::new(&expect));
        let sample = Sensor::sample(&mut bme, &mut NoopDelay::new()).expect("valid");
        let names: Vec<&str> = sample.iter().map(|m| m.metric).collect();
        assert_eq!(
            names,
            [metric::TEMPERATURE, metric::HUMIDITY, metric::PRESSURE]
        );
        bme.destroy().done();
    }

    proptest! {
        /// The BME280 has no CRC: any bytes at all may arrive. The compensation must give
        /// an error or an in-range value, never a panic (debug builds check overflow).
        #[test]
        fn any_bytes_compensate_without_panicking(
            tp in proptest::array::uniform26(any::<u8>()),
            h in proptest::array::uniform7(any::<u8>()),
            data in proptest::array::uniform8(any::<u8>()),
        ) {
            let c = Calibration::from_registers(&tp, &h);
            if let Ok(m) = c.compensate(Raw::from_registers(&data), &Config::WEATHER) {
                prop_assert!((-40.0..=85.0).contains(&m.temperature));
                prop_assert!(m.pressure.is_some_and(|p| (300.0..=1100.0).contains(&p)));
                prop_assert!(m.humidity.is_some_and(|h| (0.0..=100.0).contains(&h)));
            }
        }

        /// Across realistic raw values the integer humidity agrees with the double formula.
        #[test]
        fn integer_and_double_humidity_agree(adc_h in 20_000u32..40_000, adc_t in 480_000u32..560_000) {
            let t_fine = EXAMPLE.t_fine(adc_t);
            let int = f64::from(EXAMPLE.humidity_q22_10(adc_h, t_fine)) / 1024.0;
            let double = humidity_double(&EXAMPLE, f64::from(adc_h), f64::from(t_fine));
            prop_assert!((int - double).abs() < 0.05, "{} vs {}", int, double);
        }
    }
}
