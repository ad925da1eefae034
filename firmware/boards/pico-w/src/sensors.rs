//! The sensor named in the configuration block, behind one type the session can sample.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;
use fogline_firmware::drivers::{bme280, sht3x, sht4x};
use fogline_firmware::sensor::{Sample, Sensor};
use fogline_pico_config::SensorKind;

/// One of the supported sensors on the I2C bus.
pub enum AnySensor<I2C, D> {
    /// Sensirion SHT3x.
    Sht3x(sht3x::Sht3x<I2C>),
    /// Sensirion SHT4x.
    Sht4x(sht4x::Sht4x<I2C, D>),
    /// Bosch BME280.
    Bme280(bme280::Bme280<I2C>),
}

/// A sampling error of whichever sensor it is.
#[derive(Debug)]
pub enum AnyError<E> {
    /// From the SHT3x driver.
    Sht3x(sht3x::Error<E>),
    /// From the SHT4x driver.
    Sht4x(sht4x::Error<E>),
    /// From the BME280 driver.
    Bme280(bme280::Error<E>),
}

/// The configured address is not one the sensor can have (SHT4x parts exist at 0x44,
/// 0x45 and 0x46 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedAddress(pub u8);

impl<I2C: I2c, D: DelayNs> AnySensor<I2C, D> {
    /// A driver for `kind` at `address` on `i2c`; no bus traffic yet.
    pub fn new(kind: SensorKind, address: u8, i2c: I2C) -> Result<Self, UnsupportedAddress> {
        Ok(match kind {
            SensorKind::Sht3x => AnySensor::Sht3x(sht3x::Sht3x::new_with_address(i2c, address)),
            SensorKind::Sht4x => {
                let address = match address {
                    0x44 => sht4x::Address::Address0x44,
                    0x45 => sht4x::Address::Address0x45,
                    0x46 => sht4x::Address::Address0x46,
                    other => return Err(UnsupportedAddress(other)),
                };
                AnySensor::Sht4x(sht4x::Sht4x::new_with_address(i2c, address))
            }
            SensorKind::Bme280 => AnySensor::Bme280(bme280::Bme280::new_with_address(i2c, address)),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> SensorKind {
        match self {
            AnySensor::Sht3x(_) => SensorKind::Sht3x,
            AnySensor::Sht4x(_) => SensorKind::Sht4x,
            AnySensor::Bme280(_) => SensorKind::Bme280,
        }
    }
}

impl<I2C: I2c, D: DelayNs> Sensor<D> for AnySensor<I2C, D> {
    type Error = AnyError<I2C::Error>;

    fn sample(&mut self, delay: &mut D) -> Result<Sample, Self::Error> {
        match self {
            AnySensor::Sht3x(s) => Sensor::<D>::sample(s, delay).map_err(AnyError::Sht3x),
            AnySensor::Sht4x(s) => s.sample(delay).map_err(AnyError::Sht4x),
            AnySensor::Bme280(s) => Sensor::<D>::sample(s, delay).map_err(AnyError::Bme280),
        }
    }
}

#[cfg(test)]
mod tests {
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    use super::*;

    #[test]
    fn each_kind_gets_its_driver_at_the_configured_address() {
        let table = [
            (SensorKind::Sht3x, 0x45, Some(SensorKind::Sht3x)),
            (SensorKind::Sht4x, 0x44, Some(SensorKind::Sht4x)),
            (SensorKind::Sht4x, 0x46, Some(SensorKind::Sht4x)),
            (SensorKind::Sht4x, 0x47, None),
            (SensorKind::Bme280, 0x77, Some(SensorKind::Bme280)),
        ];
        for (kind, address, want) in table {
            let mut bus = Mock::new(&[]);
            let got = AnySensor::<_, NoopDelay>::new(kind, address, bus.clone());
            assert_eq!(
                got.as_ref().ok().map(AnySensor::kind),
                want,
                "{kind:?} {address:#x}"
            );
            if want.is_none() {
                assert_eq!(got.err(), Some(UnsupportedAddress(address)));
            }
            bus.done();
        }
    }

    #[test]
    fn a_bus_error_reaches_the_caller_as_that_sensors_error() {
        // The SHT3x's high-repeatability single shot without clock stretching, NACKed.
        let expectations =
            [Transaction::write(0x44, std::vec![0x24, 0x00])
                .with_error(ErrorKind::ArbitrationLoss)];
        let mut bus = Mock::new(&expectations);
        let mut sensor = AnySensor::<_, NoopDelay>::new(SensorKind::Sht3x, 0x44, bus.clone())
            .expect("valid address");
        let got = sensor.sample(&mut NoopDelay::new());
        assert!(
            matches!(got, Err(AnyError::Sht3x(sht3x::Error::Bus(_)))),
            "{got:?}"
        );
        bus.done();
    }
}
